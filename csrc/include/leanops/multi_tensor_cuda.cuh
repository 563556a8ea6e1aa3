// The multi-tensor launch shared by the fused optimizer kernels (csrc/cuda/collage.cu, csrc/cuda/frugal.cu): every
// tensor of a list is cut into chunks of a fixed number of elements; the host writes one entry per non-empty tensor
// (its operand pointers, its size, the global index of its first chunk, ...) into a table in pinned memory, copied
// to the device on the current stream; blocks stride over the global chunk indices and find each chunk's tensor by
// binary search over the table. An Entry type needs an int64_t `first_chunk` field and a size that is a whole
// number of int64 words.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace leanops {
namespace multi_tensor {

// The last entry whose first chunk is at or before `chunk` (the same for every thread of a block).
template <typename Entry>
__device__ __forceinline__ const Entry& entry_of_chunk(const Entry* __restrict__ table, int num_tensors,
                                                      int64_t chunk) {
  int low = 0;
  int high = num_tensors - 1;
  while (low < high) {
    const int middle = (low + high + 1) >> 1;
    if (table[middle].first_chunk <= chunk) {
      low = middle;
    } else {
      high = middle - 1;
    }
  }
  return table[low];
}

// The entries as a device tensor (from pinned memory, without blocking the host: torch's pinned allocator keeps the
// buffer alive until the copy has run). Keep the returned tensor alive until the kernel is launched.
template <typename Entry>
at::Tensor upload_table(const std::vector<Entry>& entries, const at::Device& device) {
  static_assert(sizeof(Entry) % sizeof(int64_t) == 0, "the table is copied as int64 words");
  at::Tensor host_table = at::empty({static_cast<int64_t>(entries.size() * sizeof(Entry) / sizeof(int64_t))},
                                    at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host_table.mutable_data_ptr(), entries.data(), entries.size() * sizeof(Entry));
  return host_table.to(device, /*non_blocking=*/true);
}

// Blocks for a grid-stride loop over `num_chunks` chunks: as many as are resident at once on the device, at most one
// per chunk.
template <typename Kernel>
int64_t grid_for(Kernel kernel, int threads, int64_t num_chunks, int device_index) {
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, threads, 0));
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device_index));
  return std::min<int64_t>(num_chunks, static_cast<int64_t>(multiprocessors) * std::max(blocks_per_sm, 1));
}

}  // namespace multi_tensor
}  // namespace leanops
