// CUDA kernels of the MCF ops: one generic elementwise kernel, 16-byte vector loads and stores per thread.
//
// The ops are memory-bound (a few dozen flops per element against 8-20 bytes moved), so the kernel aims at the
// copy bandwidth: each thread moves one 16-byte vector per non-scalar operand, with an unaligned fallback.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "leanops/mcf_host.h"

namespace leanops {
namespace mcf {
namespace {

constexpr int kThreadsPerBlock = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T value[N];
};

template <typename Op, typename InT, typename OutT, int NumIn, int NumOut, int VecSize>
__global__ void __launch_bounds__(kThreadsPerBlock)
    elementwise_kernel(const ElementwiseProblem<InT, OutT, NumIn, NumOut> problem, const Op op) {
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreadsPerBlock + threadIdx.x) * VecSize;
  if (first >= problem.numel) return;
  float in[NumIn][VecSize];
  float out[NumOut][VecSize];
  const bool full_vector = first + VecSize <= problem.numel;
  if (full_vector) {
#pragma unroll
    for (int k = 0; k < NumIn; ++k) {
      if (problem.broadcast[k]) {
        const float scalar = static_cast<float>(problem.in[k][0]);
#pragma unroll
        for (int j = 0; j < VecSize; ++j) in[k][j] = scalar;
      } else {
        const auto vector = *reinterpret_cast<const AlignedVector<InT, VecSize>*>(problem.in[k] + first);
#pragma unroll
        for (int j = 0; j < VecSize; ++j) in[k][j] = static_cast<float>(vector.value[j]);
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < NumIn; ++k) {
#pragma unroll
      for (int j = 0; j < VecSize; ++j) {
        const int64_t index = problem.broadcast[k] ? 0 : (first + j < problem.numel ? first + j : problem.numel - 1);
        in[k][j] = static_cast<float>(problem.in[k][index]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < VecSize; ++j) {
    float in_j[NumIn];
    float out_j[NumOut];
#pragma unroll
    for (int k = 0; k < NumIn; ++k) in_j[k] = in[k][j];
    op(in_j, out_j);
#pragma unroll
    for (int k = 0; k < NumOut; ++k) out[k][j] = out_j[k];
  }
  if (full_vector) {
#pragma unroll
    for (int k = 0; k < NumOut; ++k) {
      AlignedVector<OutT, VecSize> vector;
#pragma unroll
      for (int j = 0; j < VecSize; ++j) vector.value[j] = static_cast<OutT>(out[k][j]);
      *reinterpret_cast<AlignedVector<OutT, VecSize>*>(problem.out[k] + first) = vector;
    }
  } else {
#pragma unroll
    for (int k = 0; k < NumOut; ++k) {
#pragma unroll
      for (int j = 0; j < VecSize; ++j) {
        if (first + j < problem.numel) problem.out[k][first + j] = static_cast<OutT>(out[k][j]);
      }
    }
  }
}

inline bool is_aligned(const void* pointer, size_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

struct CudaLauncher {
  template <typename Op, typename InT, typename OutT, int NumIn, int NumOut>
  static void launch(const ElementwiseProblem<InT, OutT, NumIn, NumOut>& problem, Op op, at::Device device) {
    const c10::cuda::CUDAGuard guard(device);
    constexpr int vec_size = 16 / static_cast<int>(sizeof(InT) > sizeof(OutT) ? sizeof(InT) : sizeof(OutT));
    bool vectorizable = true;
    for (int k = 0; k < NumIn; ++k) {
      vectorizable &= problem.broadcast[k] || is_aligned(problem.in[k], vec_size * sizeof(InT));
    }
    for (int k = 0; k < NumOut; ++k) vectorizable &= is_aligned(problem.out[k], vec_size * sizeof(OutT));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (vectorizable) {
      const int64_t blocks = (problem.numel + kThreadsPerBlock * vec_size - 1) / (kThreadsPerBlock * vec_size);
      elementwise_kernel<Op, InT, OutT, NumIn, NumOut, vec_size>
          <<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0, stream>>>(problem, op);
    } else {
      const int64_t blocks = (problem.numel + kThreadsPerBlock - 1) / kThreadsPerBlock;
      elementwise_kernel<Op, InT, OutT, NumIn, NumOut, 1>
          <<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0, stream>>>(problem, op);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace mcf
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CUDA, m) { leanops::mcf::register_kernels<leanops::mcf::CudaLauncher>(m); }
