// CUDA kernel of FRUGAL's fused split step (leanops::frugal_split_step_; the math and the oracle are in
// python/leanops/reference/frugal.py, the per-element step in leanops/frugal.h and the checks in
// leanops/frugal_host.h, shared with the CPU kernel).
//
// One launch serves every tensor of the lists. The host cuts each tensor into chunks of kChunk elements and writes
// a table, one entry per non-empty tensor (its seven operand pointers, its size and matrix view, its mode, the global
// index of its first chunk and its two float32 scalars), into pinned memory, copied to the device on the current
// stream. Blocks stride over the global chunk indices; a block finds its chunk's tensor by binary search over the
// table (leanops/multi_tensor_cuda.cuh, shared with csrc/cuda/collage.cu) and its threads step the chunk's elements,
// consecutive threads on consecutive elements (coalesced). In COLUMNS / ROWS modes element e is (i, j) =
// (e / columns, e % columns) of the matrix; it is state-full when positions[j] (columns) or positions[i] (rows) is
// >= 0, and its moments are at i * k + p (columns) or p * columns + j (rows).
//
// Bytes per element: float32 parameters 12 (read theta and g, write theta), plus 16 for a state-full element's
// moments; at density 0.25 about 16 bytes per element: ~4.3 GB for 268M parameters, ~1.5 ms at 2.95 TB/s.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "leanops/frugal_host.h"
#include "leanops/multi_tensor_cuda.cuh"

namespace leanops {
namespace frugal {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 1 << 14;  // elements per chunk: 64 per thread
constexpr int kOperands = 7;         // params, params_lo, exp_avgs, exp_avg_sqs, grads, positions, addends

// One non-empty tensor of the lists (pointer 0 where the tensor has no such operand).
struct TensorEntry {
  uint64_t pointer[kOperands];
  int64_t numel;
  int64_t columns;   // COLUMNS / ROWS: the matrix's row length
  int64_t subspace;  // COLUMNS / ROWS: k, the moments' columns (COLUMNS) or rows (ROWS)
  int64_t mode;
  int64_t first_chunk;
  TensorScalars scalars;
};

template <typename T, typename G, typename F, bool Compensated>
__global__ void __launch_bounds__(kThreads)
    frugal_step_kernel(const TensorEntry* __restrict__ table, int num_tensors, int64_t num_chunks, const Scalars s) {
  for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    const TensorEntry& entry = multi_tensor::entry_of_chunk(table, num_tensors, chunk);
    const Operands<T, G> o{reinterpret_cast<T*>(entry.pointer[0]),
                           reinterpret_cast<T*>(entry.pointer[1]),
                           reinterpret_cast<float*>(entry.pointer[2]),
                           reinterpret_cast<float*>(entry.pointer[3]),
                           reinterpret_cast<const G*>(entry.pointer[4]),
                           reinterpret_cast<const int32_t*>(entry.pointer[5]),
                           reinterpret_cast<const float*>(entry.pointer[6])};
    const int64_t mode = entry.mode;
    const int64_t begin = (chunk - entry.first_chunk) * kChunk;
    const int64_t end = begin + kChunk < entry.numel ? begin + kChunk : entry.numel;
    const bool matrix = mode == kColumns || mode == kRows;
    const int64_t columns = matrix ? entry.columns : 1;
    // (i, j) of the thread's first element; then moved along by kThreads elements at a time, dividing only when j
    // runs past the end of a row (a 64-bit division per element would cost about as much as the memory traffic).
    const int64_t first = begin + threadIdx.x;
    int64_t i = first / columns;
    int64_t j = first - i * columns;
    for (int64_t e = first; e < end; e += kThreads) {
      bool state_full = mode == kAdamW;
      int64_t moment = e;
      if (matrix) {
        const int64_t p = o.positions[mode == kColumns ? j : i];
        state_full = p >= 0;
        moment = mode == kColumns ? i * entry.subspace + p : p * columns + j;
      }
      step_element<T, G, F, Compensated>(o, e, state_full, moment, s, entry.scalars);
      j += kThreads;
      if (j >= columns) {
        const int64_t rows_crossed = j / columns;
        i += rows_crossed;
        j -= rows_crossed * columns;
      }
    }
  }
}

template <typename T, typename G, typename F, bool Compensated>
void launch(const TensorEntry* table, int num_tensors, int64_t num_chunks, const Scalars& scalars, int device_index,
            cudaStream_t stream) {
  const auto kernel = frugal_step_kernel<T, G, F, Compensated>;
  const int64_t grid = multi_tensor::grid_for(kernel, kThreads, num_chunks, device_index);
  kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(table, num_tensors, num_chunks, scalars);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_cuda(const Call& call) {
  const at::Device device = call.params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool compensated = !call.params_lo.empty();

  std::vector<TensorEntry> entries;
  entries.reserve(call.params.size());
  int64_t num_chunks = 0;
  for (size_t i = 0; i < call.params.size(); ++i) {
    const int64_t numel = call.params[i].numel();
    if (numel == 0) continue;
    const int64_t mode = call.modes[i];
    const bool has_moments = mode != kFree;
    const bool matrix = mode == kColumns || mode == kRows;
    TensorEntry entry{};
    const at::Tensor* operands[kOperands] = {&call.params[i],
                                             compensated ? &call.params_lo[i] : nullptr,
                                             has_moments ? &call.exp_avgs[i] : nullptr,
                                             has_moments ? &call.exp_avg_sqs[i] : nullptr,
                                             &call.grads[i],
                                             matrix ? &call.positions[i] : nullptr,
                                             call.addends[i].numel() > 0 ? &call.addends[i] : nullptr};
    for (int k = 0; k < kOperands; ++k) {
      entry.pointer[k] = operands[k] == nullptr ? 0 : reinterpret_cast<uint64_t>(operands[k]->const_data_ptr());
    }
    entry.numel = numel;
    if (matrix) {
      const MatrixShape shape = matrix_shape(mode, numel, call.positions[i].numel(), call.exp_avgs[i].numel());
      entry.columns = shape.columns;
      entry.subspace = shape.subspace;
    }
    entry.mode = mode;
    entry.first_chunk = num_chunks;
    entry.scalars = {static_cast<float>(call.step_sizes[i]), static_cast<float>(call.bias_correction2_roots[i])};
    entries.push_back(entry);
    num_chunks += (numel + kChunk - 1) / kChunk;
  }
  if (entries.empty()) return;
  TORCH_CHECK(entries.size() <= static_cast<size_t>(INT32_MAX), kOp, ": too many tensors");
  const at::Tensor table = multi_tensor::upload_table(entries, device);
  const auto* table_pointer = reinterpret_cast<const TensorEntry*>(table.const_data_ptr());
  const int num_tensors = static_cast<int>(entries.size());

  dispatch_step_types(call, [&](auto param, auto grad, auto format, auto compensation) {
    launch<decltype(param), decltype(grad), decltype(format), decltype(compensation)::value>(
        table_pointer, num_tensors, num_chunks, call.scalars, device.index(), stream);
  });
}

}  // namespace
}  // namespace frugal
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CUDA, m) {
  m.impl("frugal_split_step_", &leanops::frugal::split_step<leanops::frugal::run_cuda>);
}
