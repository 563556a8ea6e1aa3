// What the CPU providers of the loss plans share (csrc/cpu/contrastive.cpp, csrc/cpu/cross_entropy.cpp): their GEMMs
// (multiply, the Steps::multiply of leanops/contrastive_plan_host.h and leanops/cross_entropy_plan_host.h) and the
// block arithmetic of their fused steps.
//
// multiply cuts one GEMM's output into fixed blocks (gemm_block_rows x kGemmColumns) and runs the blocks in parallel
// (at::parallel_for), each through the dispatcher (aten::mm / aten::addmm, MKL's sgemm underneath) on one thread.
// Why not one multi-threaded MKL call: MKL splits the reduction dimension of some shapes across its threads (for
// instance (1100 x 300) (300 x 20) with 3 threads), so its results would depend on the thread count; with fixed
// blocks, each computed whole by one thread, every output element is the same dot product in the same order whatever
// the thread count, and the parallel speed is the same. The blocks' aten::mm calls carry the caller's thread-local
// state (at::ThreadLocalStateGuard), so that torch.profiler records every one of them, with its shapes, on whichever
// thread runs it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>

#include "leanops/panel_host.h"

// MKL's thread-local thread count, its C interface (mkl_service.h defines mkl_set_num_threads_local as this name; the
// lower-case symbol itself is the Fortran interface, which takes a pointer). Exported by libtorch_cpu when torch is
// built with MKL; null otherwise.
extern "C" __attribute__((weak, visibility("default"))) int MKL_Set_Num_Threads_Local(int threads);

namespace leanops {
namespace cpu_tile {

// GEMM output blocks: up to 256 rows x 512 columns of float32 (512 KiB). Measured with one MKL thread on the panels
// of B = 4096, D = 256 (S, G y, G^T x): 256-row blocks run at 80-90 GFLOP/s, like one call for the whole product,
// 128-row blocks 10-20 % slower. A product with fewer than kGemmMinBlocks such blocks (a small panel's G y) takes
// shorter ones, down to 64 rows, so that it still has blocks for several cores. The blocks depend on the sizes only.
constexpr int64_t kGemmMaxRows = 256;
constexpr int64_t kGemmMinRows = 64;
constexpr int64_t kGemmColumns = 512;
constexpr int64_t kGemmMinBlocks = 8;

inline int64_t num_blocks(int64_t count, int64_t block) { return (count + block - 1) / block; }

// Rows per GEMM block of a rows x columns output.
inline int64_t gemm_block_rows(int64_t rows, int64_t columns) {
  const int64_t column_blocks = num_blocks(columns, kGemmColumns);
  int64_t block_rows = kGemmMaxRows;
  while (block_rows > kGemmMinRows && num_blocks(rows, block_rows) * column_blocks < kGemmMinBlocks) block_rows /= 2;
  return block_rows;
}

// The kernels' float32 copy of an input (the input itself when it is float32 and contiguous).
inline at::Tensor float32_contiguous(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Makes MKL run single-threaded on this thread while it lives. Inside at::parallel_for's OpenMP region MKL does so
// anyway, but a parallel_for of one block runs on the calling thread outside any region, where MKL would use all of
// torch's threads.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

// out (M x N, float32, rows of stride >= N) = a (M x K) b (K x N), or out += a b when accumulate; a and b float32
// (any strides BLAS takes: contiguous or transposed views). See the file comment for the schedule.
inline void multiply(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t rows = out.size(0);
  const int64_t columns = out.size(1);
  if (rows == 0 || columns == 0) return;
  if (a.size(1) == 0) {  // empty dot products: not left to the BLAS's handling of k = 0
    if (!accumulate) out.zero_();
    return;
  }
  const int64_t block_rows = gemm_block_rows(rows, columns);
  const int64_t row_blocks = num_blocks(rows, block_rows);
  const int64_t column_blocks = num_blocks(columns, kGemmColumns);
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, row_blocks * column_blocks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state(caller_state);
    const SingleThreadedBlas single_threaded;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t row0 = block / column_blocks * block_rows;
      const int64_t column0 = block % column_blocks * kGemmColumns;
      const int64_t count = std::min(block_rows, rows - row0);
      const int64_t width = std::min(kGemmColumns, columns - column0);
      panel::matrix_product(out.narrow(0, row0, count).narrow(1, column0, width), a.narrow(0, row0, count),
                            b.narrow(1, column0, width), accumulate);
    }
  });
}

}  // namespace cpu_tile
}  // namespace leanops
