// CPU kernels of the blockwise contrastive losses: CLIP/InfoNCE (clip_forward, clip_backward) and SigLIP
// (siglip_forward, siglip_backward). csrc/ops.cpp states the math of each op; python/leanops/contrastive.py
// documents it.
//
// The B x B similarity matrix S = image @ text^T never exists. Rows and columns are cut into blocks of kBlock; a
// task computes one S tile (kBlock x kBlock, fp32) with ATen's CPU matmul (MKL sgemm: far faster than a loop of
// ours; leanops/tile_cpu.h, shared with csrc/cpu/cross_entropy.cpp), then runs a fused pass over the tile, the
// "epilogue": exponentials, running maxima and sums, the gradient weights G. The backward recomputes the tiles
// instead of storing anything B x B. Memory: O(B * D) for the fp32 features and the outputs, O(B) for the running
// statistics, two tiles of scratch per thread. Everything accumulates in fp32.
//
// Parallel schedule. CLIP needs statistics of rows (over j) and of columns (over i), and both backwards write rows
// (grad_image) and columns (grad_text). Rather than giving every thread private copies of the column outputs
// (O(threads * B * D)), or computing every tile twice (once per side), tiles are visited in diagonals of block
// groups: the nb row (and column) blocks form P = min(nb, threads) contiguous groups; step s = 0 .. P-1 runs the P
// row groups g in parallel, and task g sweeps the rectangle (row group g) x (column group (g + s) mod P). Within a
// step the tasks hold pairwise distinct row groups and pairwise distinct column groups, so each owns its rows and
// its columns outright: no races, no atomics, no partial buffers, every tile computed once, and after P steps every
// tile has been visited. That costs P fork/joins per call, and balances like a per-block diagonal schedule (steps of
// single blocks) with fewer synchronisations, which matters when the cores are shared. Results are deterministic
// for a given thread count; the order in which a row meets its column blocks (hence the last bits) depends on P.
// siglip_forward has only row outputs: it runs over row blocks, each sweeping all column blocks.
//
// at::parallel_for parallelises only where this file is compiled with OpenMP (-fopenmp: ATen/ParallelOpenMP.h runs
// the loop serially otherwise). Inside its OpenMP region each tile matmul runs single-threaded, as it should. Built
// without OpenMP, the tiles run one after another and MKL splits each small tile matmul over all of torch's threads,
// which is slower than one thread, and far slower on shared cores (measured on 2 shared cores: 190 s instead of
// 3 s for clip_forward + clip_backward at B = 16384, D = 64).
//
// Input dtype. bf16/fp16 features are converted to fp32 once, up front (O(B * D) extra memory, small next to the
// B x B the op avoids): converting block by block would redo the conversion of every text block for every row
// block, nb times the work.
//
// The epilogues are written with explicit 8-lane vectors and branch-free exp/log1p polynomials, compiled twice on
// x86-64 like csrc/cpu/mcf.cpp: baseline SSE2 and an AVX2 + FMA clone chosen at run time. Exponentials dominate
// the time at small D, where a libm call per element would cost about four times as much.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "leanops/contrastive_host.h"
#include "leanops/tile_cpu.h"
#include "leanops/vector_cpu.h"

namespace leanops {
namespace contrastive {
namespace {

// Rows (and columns) per tile: a 256 x 256 fp32 tile is 256 KiB, which stays in L2 across the epilogue's passes,
// and sgemm on 256-row panels runs near its peak.
constexpr int64_t kBlock = 256;

using namespace cpu_vector;  // NOLINT: the epilogues are written in its vocabulary
using cpu_tile::float32_contiguous;
using cpu_tile::num_blocks;

// ---------------------------------------------------------------------------------------------------------------
// Tile epilogues. Each is a functor whose operator() is force-inlined into a baseline and an AVX2 + FMA clone
// (run_cloned), so the same source compiles to both. Tiles are R x C (R, C <= kBlock), row-major with leading
// dimension C; pointers to per-row data are offset to the tile's first row, per-column data to its first column.
// Per-column inputs are first copied into zero-padded local arrays, so whole vectors can be read past column C;
// tile rows are read and written in whole vectors up to the last, partial one (load_partial/store_partial), and
// the padding lanes of a row reduction are masked out.

// What every epilogue reads of its tile: S's R x C entries (row-major, leading dimension C).
struct Tile {
  const float* similarity;
  int64_t rows, cols;
};

// Copies n values (per-column inputs of a tile) into a kBlock array, padding with `fill`.
template <typename T>
LEANOPS_INLINE void copy_padded(T* out, const T* in, int64_t n, T fill) {
  int64_t c = 0;
  for (; c < n; ++c) out[c] = in[c];
  for (; c < kBlock; ++c) out[c] = fill;
}

// What both CLIP epilogues read: the scales of the tile's rows and columns.
struct ClipTile : Tile {
  const float* row_scale;
  const float* col_scale;

  // The columns' scales in a kBlock array, padded with 0.
  LEANOPS_INLINE void column_scales(float* out) const { copy_padded(out, col_scale, cols, 0.0f); }
};

// CLIP forward: folds one tile into the running (max, sum of exp(z - max)) of its rows (z = row_scale * S) and of
// its columns (z = col_scale * S).
struct ClipForwardTile : ClipTile {
  float* row_max;
  float* row_sum;
  float* col_max;
  float* col_sum;

  LEANOPS_INLINE void operator()() const {
    alignas(32) float scale_c[kBlock];
    alignas(32) float old_max_c[kBlock];
    alignas(32) float new_max_c[kBlock];
    alignas(32) float sum_c[kBlock];
    float new_max_r[kBlock];
    column_scales(scale_c);
    const int64_t C = cols;
    copy_padded(old_max_c, col_max, C, 0.0f);
    for (int64_t c = 0; c < kBlock; ++c) new_max_c[c] = old_max_c[c];
    // Pass 1, maxima: a row's is complete at once (its exponentials need it); columns accumulate over the rows.
    for (int64_t r = 0; r < rows; ++r) {
      const float* s_row = similarity + r * C;
      const vfloat scale = splat(row_scale[r]);
      vfloat row_best = splat(-kInfinity);
      for (int64_t c = 0; c < C; c += kWidth) {
        const int64_t n = std::min<int64_t>(kWidth, C - c);
        const vfloat s = load_partial(s_row + c, n);
        row_best = max(row_best, lanes_below(n) ? scale * s : splat(-kInfinity));
        store(new_max_c + c, max(load(new_max_c + c), load(scale_c + c) * s));
      }
      new_max_r[r] = std::max(row_max[r], horizontal_max(row_best));
    }
    for (int64_t c = 0; c < kBlock; ++c) sum_c[c] = 0.0f;
    // Pass 2, exponentials against the new maxima: every argument is <= 0, so no overflow at any scale.
    for (int64_t r = 0; r < rows; ++r) {
      const float* s_row = similarity + r * C;
      const vfloat scale = splat(row_scale[r]);
      const vfloat m = splat(new_max_r[r]);
      vfloat row_total = splat(0.0f);
      for (int64_t c = 0; c < C; c += kWidth) {
        const int64_t n = std::min<int64_t>(kWidth, C - c);
        const vfloat s = load_partial(s_row + c, n);
        row_total += lanes_below(n) ? exp(scale * s - m) : splat(0.0f);
        store(sum_c + c, load(sum_c + c) + exp(load(scale_c + c) * s - load(new_max_c + c)));
      }
      // Before the first tile row_max = -inf and row_sum = 0: exp(-inf) = 0 keeps the product 0.
      row_sum[r] = row_sum[r] * std::exp(row_max[r] - new_max_r[r]) + horizontal_sum(row_total);
      row_max[r] = new_max_r[r];
    }
    for (int64_t c = 0; c < C; ++c) {
      col_sum[c] = col_sum[c] * std::exp(old_max_c[c] - new_max_c[c]) + sum_c[c];
      col_max[c] = new_max_c[c];
    }
  }
};

// CLIP backward: G = row_weight * row_scale * p + col_weight * col_scale * q for one tile, where
// p = exp(row_scale * S - row_lse) and q = exp(col_scale * S - col_lse); accumulates sum_j p S into row_ps and
// sum_i q S into col_qs (the weights are applied once, at the end).
struct ClipBackwardTile : ClipTile {
  const float* row_lse;
  const float* col_lse;
  const float* row_weight;
  const float* col_weight;
  float* weights;  // G, R x C
  float* row_ps;
  float* col_qs;

  LEANOPS_INLINE void operator()() const {
    alignas(32) float scale_c[kBlock];
    alignas(32) float lse_c[kBlock];
    alignas(32) float coefficient_c[kBlock];
    alignas(32) float qs_c[kBlock];
    column_scales(scale_c);
    const int64_t C = cols;
    copy_padded(lse_c, col_lse, C, 0.0f);
    for (int64_t c = 0; c < kBlock; ++c) {
      coefficient_c[c] = c < C ? col_weight[c] * scale_c[c] : 0.0f;
      qs_c[c] = 0.0f;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* s_row = similarity + r * C;
      float* g_row = weights + r * C;
      const vfloat scale = splat(row_scale[r]);
      const vfloat lse = splat(row_lse[r]);
      const vfloat coefficient_r = splat(row_weight[r] * row_scale[r]);
      vfloat ps = splat(0.0f);
      for (int64_t c = 0; c < C; c += kWidth) {
        const int64_t n = std::min<int64_t>(kWidth, C - c);
        const vfloat s = load_partial(s_row + c, n);
        const vfloat p = exp(scale * s - lse);
        const vfloat q = exp(load(scale_c + c) * s - load(lse_c + c));
        store_partial(g_row + c, coefficient_r * p + load(coefficient_c + c) * q, n);
        ps += lanes_below(n) ? p * s : splat(0.0f);
        store(qs_c + c, load(qs_c + c) + q * s);
      }
      row_ps[r] += horizontal_sum(ps);
    }
    for (int64_t c = 0; c < C; ++c) col_qs[c] += qs_c[c];
  }
};

// What both SigLIP epilogues read: z = scale * S + bias, and the labels from the group ids of the tile's rows and
// columns.
struct SiglipTile : Tile {
  float scale, bias;
  const int32_t* row_group;  // dense group ids (see dense_group_ids)
  const int32_t* col_group;

  // The columns' group ids in a kBlock array, padded (the padding lanes are masked out of every row reduction).
  LEANOPS_INLINE void column_groups(int32_t* out) const { copy_padded(out, col_group, cols, 0); }
};

// SigLIP forward: row_loss[r] += sum_c softplus(-label * (scale * S + bias)).
struct SiglipForwardTile : SiglipTile {
  float* row_loss;

  LEANOPS_INLINE void operator()() const {
    alignas(32) int32_t group_c[kBlock];
    column_groups(group_c);
    const int64_t C = cols;
    for (int64_t r = 0; r < rows; ++r) {
      const float* s_row = similarity + r * C;
      const vint group = splat_int(row_group[r]);
      vfloat total = splat(0.0f);
      for (int64_t c = 0; c < C; c += kWidth) {
        const int64_t n = std::min<int64_t>(kWidth, C - c);
        const vfloat z = load_partial(s_row + c, n) * scale + bias;
        const vfloat t = load_int(group_c + c) == group ? -z : z;  // -label * z
        total += lanes_below(n) ? softplus(t) : splat(0.0f);
      }
      row_loss[r] += horizontal_sum(total);
    }
  }
};

// SigLIP backward: D = -row_weight * label * sigmoid(-label * z) for one tile, z = scale * S + bias; accumulates
// sum_c D and sum_c D S per row.
struct SiglipBackwardTile : SiglipTile {
  const float* row_weight;
  float* weights;  // D, R x C
  float* row_d;
  float* row_ds;

  LEANOPS_INLINE void operator()() const {
    alignas(32) int32_t group_c[kBlock];
    column_groups(group_c);
    const int64_t C = cols;
    for (int64_t r = 0; r < rows; ++r) {
      const float* s_row = similarity + r * C;
      float* d_row = weights + r * C;
      const vint group = splat_int(row_group[r]);
      const vfloat weight = splat(row_weight[r]);
      vfloat d_total = splat(0.0f);
      vfloat ds_total = splat(0.0f);
      for (int64_t c = 0; c < C; c += kWidth) {
        const int64_t n = std::min<int64_t>(kWidth, C - c);
        const vfloat s = load_partial(s_row + c, n);
        const vfloat z = s * scale + bias;
        const vint same = load_int(group_c + c) == group;
        const vfloat sig = sigmoid(same ? -z : z);
        const vfloat d = same ? -weight * sig : weight * sig;
        store_partial(d_row + c, d, n);
        const vint valid = lanes_below(n);
        d_total += valid ? d : splat(0.0f);
        ds_total += valid ? d * s : splat(0.0f);
      }
      row_d[r] += horizontal_sum(d_total);
      row_ds[r] += horizontal_sum(ds_total);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Tile matmuls (leanops/tile_cpu.h).

// Row-major (B, D) fp32 features (the input, or its fp32 copy: see the file comment) and the block of rows
// [first, first + count).
struct Features {
  at::Tensor fp32;
  const float* data;
  int64_t dim;

  explicit Features(const at::Tensor& features)
      : fp32(float32_contiguous(features)), data(fp32.const_data_ptr<float>()), dim(fp32.size(1)) {}
  const float* row(int64_t first) const { return data + first * dim; }
  at::Tensor block(int64_t first, int64_t count) const { return cpu_tile::wrap(row(first), count, dim); }
};

// similarity (R x C, leading dimension C) = x[i0 : i0 + R] @ y[j0 : j0 + C]^T; returns the Tile of its epilogues.
Tile similarity_tile(const Features& x, int64_t i0, int64_t R, const Features& y, int64_t j0, int64_t C,
                     float* similarity) {
  cpu_tile::product_tile(x.row(i0), R, y.row(j0), C, x.dim, similarity);
  return Tile{similarity, R, C};
}

// grad_x[i0 : i0 + R] += alpha * G @ y[j0 : j0 + C]; grad_y[j0 : j0 + C] += alpha * G^T @ x[i0 : i0 + R].
void accumulate_gradients(const float* weights, float alpha, const Features& x, int64_t i0, int64_t R,
                          const Features& y, int64_t j0, int64_t C, float* grad_x, float* grad_y) {
  if (x.dim == 0) return;
  const at::Tensor g = cpu_tile::wrap(weights, R, C);
  const at::Tensor g_transposed = cpu_tile::wrap_transposed(weights, R, C);
  at::Tensor grad_x_block = cpu_tile::wrap(grad_x + i0 * x.dim, R, x.dim);
  at::Tensor grad_y_block = cpu_tile::wrap(grad_y + j0 * y.dim, C, y.dim);
  at::cpu::addmm_out(grad_x_block, grad_x_block, g, y.block(j0, C), /*beta=*/1.0f, /*alpha=*/alpha);
  at::cpu::addmm_out(grad_y_block, grad_y_block, g_transposed, x.block(i0, R), /*beta=*/1.0f, /*alpha=*/alpha);
}

// ---------------------------------------------------------------------------------------------------------------
// Schedules.

// A task's buffer for S's tiles.
struct TileScratch {
  std::unique_ptr<float[]> similarity{new float[kBlock * kBlock]};

  // S's tile of rows [i0, i0 + kBlock) and columns [j0, j0 + kBlock), cut at B.
  Tile tile(const Features& x, int64_t i0, const Features& y, int64_t j0, int64_t batch) {
    return similarity_tile(x, i0, std::min(kBlock, batch - i0), y, j0, std::min(kBlock, batch - j0),
                           similarity.get());
  }
};

// Calls fn(tile, i0, j0, weights) for every (row block, column block) pair with S's tile (rows from i0, columns from
// j0) computed, in diagonals of block groups: within one parallel step no two tasks share a row block or a column
// block (see the file comment). `weights` is the task's R x C scratch for the gradient weights (with_weights only).
template <typename Fn>
void for_each_tile_by_diagonals(const Features& x, const Features& y, int64_t batch, bool with_weights, const Fn& fn) {
  const int64_t blocks = num_blocks(batch, kBlock);
  const int64_t groups = std::min<int64_t>(blocks, std::max(1, at::get_num_threads()));
  // Group g holds blocks [g * blocks / groups, (g + 1) * blocks / groups): sizes differ by at most one block.
  const auto group_begin = [&](int64_t g) { return g * blocks / groups * kBlock; };
  for (int64_t step = 0; step < groups; ++step) {
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      TileScratch scratch;
      std::unique_ptr<float[]> weights(with_weights ? new float[kBlock * kBlock] : nullptr);
      for (int64_t g = begin; g < end; ++g) {
        const int64_t h = (g + step) % groups;
        for (int64_t i0 = group_begin(g); i0 < group_begin(g + 1); i0 += kBlock) {
          for (int64_t j0 = group_begin(h); j0 < group_begin(h + 1); j0 += kBlock) {
            fn(scratch.tile(x, i0, y, j0, batch), i0, j0, weights.get());
          }
        }
      }
    });
  }
}

// Calls fn(tile, i0, j0) for every tile of S, in parallel over row blocks; a task sweeps all column blocks.
template <typename Fn>
void for_each_tile_by_rows(const Features& x, const Features& y, int64_t batch, const Fn& fn) {
  const int64_t blocks = num_blocks(batch, kBlock);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    TileScratch scratch;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t i0 = i * kBlock;
      for (int64_t j0 = 0; j0 < batch; j0 += kBlock) fn(scratch.tile(x, i0, y, j0, batch), i0, j0);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The ops.

at::Tensor empty_float32(const at::Tensor& like, at::IntArrayRef sizes) {
  return at::empty(sizes, like.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> clip_forward(const at::Tensor& image, const at::Tensor& text,
                                                const at::Tensor& scale) {
  check_clip_forward(image, text, scale);
  const int64_t batch = image.size(0);
  at::Tensor row_lse = empty_float32(image, {batch});
  at::Tensor col_lse = empty_float32(image, {batch});
  const Features x(image), y(text);
  const at::Tensor scale32 = scale.contiguous();
  const float* scale_data = scale32.const_data_ptr<float>();
  std::vector<float> row_max(batch, -kInfinity), row_sum(batch, 0.0f);
  std::vector<float> col_max(batch, -kInfinity), col_sum(batch, 0.0f);

  const auto per_tile = [&](const Tile& tile, int64_t i0, int64_t j0, float* /*weights*/) {
    run_cloned(ClipForwardTile{{tile, scale_data + i0, scale_data + j0}, row_max.data() + i0, row_sum.data() + i0,
                               col_max.data() + j0, col_sum.data() + j0});
  };
  for_each_tile_by_diagonals(x, y, batch, /*with_weights=*/false, per_tile);

  float* row_out = row_lse.mutable_data_ptr<float>();
  float* col_out = col_lse.mutable_data_ptr<float>();
  for (int64_t k = 0; k < batch; ++k) {
    row_out[k] = row_max[k] + std::log(row_sum[k]);
    col_out[k] = col_max[k] + std::log(col_sum[k]);
  }
  return {row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_backward(const at::Tensor& image, const at::Tensor& text,
                                                             const at::Tensor& scale, const at::Tensor& row_lse,
                                                             const at::Tensor& col_lse, const at::Tensor& row_weight,
                                                             const at::Tensor& col_weight) {
  check_clip_backward(image, text, scale, row_lse, col_lse, row_weight, col_weight);
  const int64_t batch = image.size(0);
  at::Tensor grad_image = at::zeros(image.sizes(), image.options().dtype(at::kFloat));
  at::Tensor grad_text = at::zeros(text.sizes(), text.options().dtype(at::kFloat));
  at::Tensor grad_scale = empty_float32(image, {batch});
  const Features x(image), y(text);
  const at::Tensor scale32 = scale.contiguous(), row_lse32 = row_lse.contiguous(), col_lse32 = col_lse.contiguous();
  const at::Tensor row_weight32 = row_weight.contiguous(), col_weight32 = col_weight.contiguous();
  const float* scale_data = scale32.const_data_ptr<float>();
  const float* row_lse_data = row_lse32.const_data_ptr<float>();
  const float* col_lse_data = col_lse32.const_data_ptr<float>();
  const float* row_weight_data = row_weight32.const_data_ptr<float>();
  const float* col_weight_data = col_weight32.const_data_ptr<float>();
  float* grad_image_data = grad_image.mutable_data_ptr<float>();
  float* grad_text_data = grad_text.mutable_data_ptr<float>();
  // The row and column parts of grad_scale are written by different tasks of one step: separate arrays.
  std::vector<float> row_ps(batch, 0.0f), col_qs(batch, 0.0f);

  const auto per_tile = [&](const Tile& tile, int64_t i0, int64_t j0, float* weights) {
    run_cloned(ClipBackwardTile{{tile, scale_data + i0, scale_data + j0}, row_lse_data + i0, col_lse_data + j0,
                                row_weight_data + i0, col_weight_data + j0, weights, row_ps.data() + i0,
                                col_qs.data() + j0});
    accumulate_gradients(weights, 1.0f, x, i0, tile.rows, y, j0, tile.cols, grad_image_data, grad_text_data);
  };
  for_each_tile_by_diagonals(x, y, batch, /*with_weights=*/true, per_tile);

  float* grad_scale_data = grad_scale.mutable_data_ptr<float>();
  for (int64_t k = 0; k < batch; ++k) {
    grad_scale_data[k] = row_weight_data[k] * row_ps[k] + col_weight_data[k] * col_qs[k];
  }
  return {grad_image, grad_text, grad_scale};
}

// Group ids as dense int32 (equal ids stay equal, distinct stay distinct), so the label test in the epilogue
// compares 32-bit lanes alongside the 32-bit floats and vectorises.
at::Tensor dense_group_ids(const at::Tensor& groups) {
  const at::Tensor inverse = std::get<1>(at::_unique(groups, /*sorted=*/true, /*return_inverse=*/true));
  return inverse.to(at::kInt).contiguous();
}

at::Tensor siglip_forward(const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale,
                          const at::Tensor& bias, const at::Tensor& groups) {
  check_siglip_forward(image, text, scale, bias, groups);
  const int64_t batch = image.size(0);
  at::Tensor row_loss = at::zeros({batch}, image.options().dtype(at::kFloat));
  if (batch == 0) return row_loss;
  const Features x(image), y(text);
  const float scale_value = scale.item<float>();
  const float bias_value = bias.item<float>();
  const at::Tensor group_ids = dense_group_ids(groups);
  const int32_t* group_data = group_ids.const_data_ptr<int32_t>();
  float* row_loss_data = row_loss.mutable_data_ptr<float>();

  // Only row outputs: each task owns its row block for the whole sweep.
  for_each_tile_by_rows(x, y, batch, [&](const Tile& tile, int64_t i0, int64_t j0) {
    run_cloned(
        SiglipForwardTile{{tile, scale_value, bias_value, group_data + i0, group_data + j0}, row_loss_data + i0});
  });
  return row_loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_backward(const at::Tensor& image,
                                                                           const at::Tensor& text,
                                                                           const at::Tensor& scale,
                                                                           const at::Tensor& bias,
                                                                           const at::Tensor& groups,
                                                                           const at::Tensor& row_weight) {
  check_siglip_backward(image, text, scale, bias, groups, row_weight);
  const int64_t batch = image.size(0);
  at::Tensor grad_image = at::zeros(image.sizes(), image.options().dtype(at::kFloat));
  at::Tensor grad_text = at::zeros(text.sizes(), text.options().dtype(at::kFloat));
  at::Tensor grad_scale = empty_float32(image, {});
  at::Tensor grad_bias = empty_float32(image, {});
  const Features x(image), y(text);
  const float scale_value = scale.item<float>();
  const float bias_value = bias.item<float>();
  const at::Tensor group_ids = dense_group_ids(groups);
  const int32_t* group_data = group_ids.const_data_ptr<int32_t>();
  const at::Tensor row_weight32 = row_weight.contiguous();
  const float* row_weight_data = row_weight32.const_data_ptr<float>();
  float* grad_image_data = grad_image.mutable_data_ptr<float>();
  float* grad_text_data = grad_text.mutable_data_ptr<float>();
  std::vector<float> row_d(batch, 0.0f), row_ds(batch, 0.0f);

  const auto per_tile = [&](const Tile& tile, int64_t i0, int64_t j0, float* weights) {
    run_cloned(SiglipBackwardTile{{tile, scale_value, bias_value, group_data + i0, group_data + j0},
                                  row_weight_data + i0, weights, row_d.data() + i0, row_ds.data() + i0});
    accumulate_gradients(weights, scale_value, x, i0, tile.rows, y, j0, tile.cols, grad_image_data, grad_text_data);
  };
  for_each_tile_by_diagonals(x, y, batch, /*with_weights=*/true, per_tile);

  // B per-row partials: summed in double, which costs nothing at this size.
  double d_total = 0.0, ds_total = 0.0;
  for (int64_t k = 0; k < batch; ++k) {
    d_total += row_d[k];
    ds_total += row_ds[k];
  }
  grad_scale.fill_(static_cast<float>(ds_total));
  grad_bias.fill_(static_cast<float>(d_total));
  return {grad_image, grad_text, grad_scale, grad_bias};
}

}  // namespace
}  // namespace contrastive
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CPU, m) {
  namespace k = leanops::contrastive;
  k::register_kernels(m, &k::clip_forward, &k::clip_backward, &k::siglip_forward, &k::siglip_backward);
}
