// The tile matmuls of the CPU loss kernels (csrc/cpu/contrastive.cpp: S = image text^T, csrc/cpu/cross_entropy.cpp:
// z = hidden W^T), through ATen's CPU kernels: at::cpu:: calls the CPU implementation directly (no dispatcher, no
// autograd, safe in worker threads; inside at::parallel_for the BLAS runs single-threaded). Operands are wrapped with
// from_blob, which costs a TensorImpl and no copy.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <algorithm>
#include <cstdint>

namespace leanops {
namespace cpu_tile {

// The row-major rows x cols float32 matrix at `data`.
inline at::Tensor wrap(const float* data, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<float*>(data), {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

// The transpose (cols x rows) of the row-major rows x cols matrix at `data`.
inline at::Tensor wrap_transposed(const float* data, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<float*>(data), {cols, rows}, {1, cols}, at::TensorOptions().dtype(at::kFloat));
}

// tile (rows x cols, leading dimension cols) = a @ b^T for the row-major a (rows x dim) and b (cols x dim).
inline void product_tile(const float* a, int64_t rows, const float* b, int64_t cols, int64_t dim, float* tile) {
  if (dim == 0) {
    std::fill_n(tile, rows * cols, 0.0f);  // empty dot products; not left to the BLAS's handling of k = 0
    return;
  }
  at::Tensor out = wrap(tile, rows, cols);
  at::cpu::mm_out(out, wrap(a, rows, dim), wrap_transposed(b, cols, dim));
}

// The kernels' float32 copy of an input (the input itself when it is float32 and contiguous).
inline at::Tensor float32_contiguous(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

inline int64_t num_blocks(int64_t count, int64_t block) { return (count + block - 1) / block; }

}  // namespace cpu_tile
}  // namespace leanops
