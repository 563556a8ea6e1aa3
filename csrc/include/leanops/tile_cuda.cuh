// What the CUDA providers of the loss plans share (csrc/cuda/contrastive.cu, csrc/cuda/cross_entropy.cu): their
// GEMMs (multiply, the Steps::multiply of leanops/contrastive_plan_host.h and leanops/cross_entropy_plan_host.h: one
// cuBLAS call through ATen per GEMM), the GEMM operands' layout, the float16 gradient scale, and the building blocks
// of their fused steps: element conversions and deterministic warp / CTA reductions.
//
// The fused steps are plain elementwise and reduction kernels over a float32 panel in global memory (the GEMMs'
// output): a CTA of kThreads threads per panel row for row statistics (each thread takes the columns
// threadIdx.x + kThreads k, then one CTA-wide reduction in a fixed order), one thread per panel column for column
// statistics (the panel's rows in fixed splits, each split's partial written to a scratch row, the splits then
// combined in order by one thread per column). No atomics: every result is reproducible bit for bit, on any stream.
//
// Header names: <topic>.h host+device, <topic>_host.h ATen host code of both backends, <topic>_cpu.h, <topic>_cuda.cuh.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

#include "leanops/common_host.h"
#include "leanops/panel_host.h"
#include "leanops/panel_math.h"

namespace leanops {
namespace cuda_tile {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// The fused steps' kernels are compiled for at least this many resident CTAs per multiprocessor (__launch_bounds__:
// at most 64 registers per thread). Without a minimum, ptxas squeezed linear_ce_forward_rows_kernel into 32 registers
// and spilled; with it, every kernel takes 12 to 48 registers and none spills (scripts/reports/hopper_cuda_report.py).
constexpr int kMinimumCtasPerMultiprocessor = 4;
constexpr float kInfinity = std::numeric_limits<float>::infinity();
// Rows of a panel per split of the column kernels: a split's partial is one float per column (a 64th of the
// panel's entries, a 256th of its bytes), and a panel of P rows gives P / 64 splits to spread over the GPU.
constexpr int64_t kRowsPerSplit = 64;

// ---------------------------------------------------------------------------------------------------------------
// Element conversions.

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------------------------------------------
// Reductions. The xor butterflies leave the same bits in every lane (at each step two lanes add the same two values,
// and IEEE addition commutes); the CTA reductions add the warps' results in warp order.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    v = panel_math::max_with_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// The sum (max) over the CTA of every thread's v, returned to all threads; every thread must call it. `scratch` is a
// __shared__ float[kWarps]; it ends with a barrier, so scratch can be reused at once.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float total = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float best = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) best = panel_math::max_with_nan(best, scratch[w]);
  __syncthreads();
  return best;
}

// ---------------------------------------------------------------------------------------------------------------
// Host side. `kernels` names the calling file's kernels in messages ("leanops contrastive CUDA kernels").

// Calls fn(TypeTag<T>{}) with the CUDA element type T (float, __half, __nv_bfloat16) of a float32, float16 or
// bfloat16 dtype. The ops check the dtype first; any other is an error that starts with `unsupported`.
template <typename Fn>
void dispatch_features(at::ScalarType dtype, const char* unsupported, Fn&& fn) {
  const bool supported = dispatch_float_dtype<float, __half, __nv_bfloat16>(dtype, std::forward<Fn>(fn));
  TORCH_CHECK_TYPE(supported, unsupported, dtype_name(dtype));
}

template <typename T>
const T* data_of(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mutable_data_of(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// Makes the device of the op's first feature argument `name` current for the op, after checking that it is a CUDA
// device.
inline c10::cuda::CUDAGuard device_guard(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), "leanops.", op, ": argument '", name, "' is on ", t.device(),
                    "; the CUDA kernels need CUDA tensors");
  return c10::cuda::CUDAGuard(t.device());
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// A grid dimension of `blocks` CTAs (at least 1); too many is an error naming what they cover ("batch", "N", ...).
inline unsigned grid_size(int64_t blocks, const char* kernels, const char* what) {
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int>::max(), kernels, ": ", what, " too large");
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

// The column kernels' split of a panel's rows: rows per split (kRowsPerSplit, more when the splits would exceed the
// grid's y dimension) and the number of splits.
struct RowSplits {
  int64_t rows_per_split;
  int64_t count;
};
inline RowSplits row_splits(int64_t rows) {
  const int64_t per_split = std::max<int64_t>(kRowsPerSplit, (rows + 65534) / 65535);
  return {per_split, std::max<int64_t>(1, (rows + per_split - 1) / per_split)};
}

// A GEMM operand: the tensor contiguous, starting on a 256-byte boundary (a fresh copy when it does not). cuBLAS(Lt)
// picks its kernels by the operands' alignment (up to 256 bytes), and different kernels add in different orders:
// realigned operands give the same bits however the caller's tensor was laid out.
inline at::Tensor gemm_operand(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 256 != 0) c = c.clone();
  return c;
}

// out (float32) = a b, or += a b: one aten::mm / aten::addmm call (cuBLAS; the .dtype overload for 16-bit a and b,
// float32 accumulation and output). float32 operands take cuBLAS's float32 GEMM: torch's default matmul precision
// ("highest", no TF32) is assumed, as everywhere in torch.
inline void multiply(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  panel::matrix_product(std::move(out), a, b, accumulate);
}

namespace {  // the kernel and its launcher are compiled into each file that includes this header

// scale[0 .. 1] = (s, 1 / s), panel_math::gradient_scale of *bound; read and written on the device.
__global__ void gradient_scale_kernel(const float* __restrict__ bound, float* __restrict__ scale) {
  const panel_math::GradientScale s = panel_math::gradient_scale(*bound);
  scale[0] = s.scale;
  scale[1] = s.inverse;
}

// [scale, 1 / scale] (float32 (2,), on the device, no host synchronisation) from a 0-dim bound on |G|.
at::Tensor gradient_scale(const at::Tensor& bound) {
  const at::Tensor bound_c = bound.to(at::kFloat).contiguous();
  at::Tensor scale = at::empty({2}, bound_c.options());
  gradient_scale_kernel<<<1, 1, 0, current_stream()>>>(bound_c.const_data_ptr<float>(),
                                                        scale.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return scale;
}

// sums[j] = (accumulate ? sums[j] : 0) + the splits' partials of column j, added in split order (deterministic):
// the second half of every split column reduction of the loss steps. Grid: columns / kThreads.
__global__ void __launch_bounds__(kThreads, kMinimumCtasPerMultiprocessor)
    sum_column_partials_kernel(const float* __restrict__ partial, int64_t splits, int64_t columns,
                               float* __restrict__ sums, bool accumulate) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= columns) return;
  float total = 0.0f;
  for (int64_t split = 0; split < splits; ++split) total += partial[split * columns + j];
  sums[j] = accumulate ? sums[j] + total : total;
}

}  // namespace

}  // namespace cuda_tile
}  // namespace leanops
