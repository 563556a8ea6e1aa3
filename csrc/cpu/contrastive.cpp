// The CPU provider of the contrastive primitives: CLIP/InfoNCE (clip_forward, clip_backward) and SigLIP
// (siglip_forward, siglip_backward). The plan, its math and its GEMMs are leanops/contrastive_plan_host.h's, shared
// with the CUDA provider; this file holds what runs between the GEMMs on the CPU, the fused steps over one row panel
// of S (P rows x B columns, float32), and the CPU's GEMM schedule (leanops/tile_cpu.h: fixed blocks, one MKL thread
// each, so results do not depend on the thread count).
//
// Features. bf16/fp16 features are converted to float32 once, up front (Steps::gemm_operand): MKL multiplies float32,
// and converting per panel would redo the text features' conversion for every panel. G is float32 and overwrites S
// in place (no second panel).
//
// Steps. A panel is cut into blocks of kRowBlock rows, fixed by the panel (never by the thread count), and the blocks
// run in parallel (at::parallel_for). A block sweeps its rows' columns in tiles of kColumnTile and runs an "epilogue"
// per tile: exponentials, the running row statistics of its rows (complete once its sweep ends: a panel holds every
// column), and its own partial column statistics, one (B,) row of a per-panel scratch per block. The column partials
// of the blocks are then merged in block order into the running column statistics of the plan (clip_forward: the
// (max, sum of exponentials) of every column, panel_math::merge_log_sum_exp; clip_backward: sum_i q S). So each output
// is reduced in a fixed order, with no races and no atomics. Scratch: blocks x B floats per column statistic, a 64th
// of the panel. siglip has only row outputs. The scalars of siglip_backward are reduced from per-row partials by a
// fixed pairwise sum.
//
// The epilogues are written with explicit 8-lane vectors and branch-free exp/log1p polynomials
// (leanops/vector_cpu.h), compiled twice on x86-64 like csrc/cpu/mcf.cpp: baseline SSE2 and an AVX2 + FMA clone
// chosen at run time; the gradient formulas are leanops/panel_math.h's, shared with the CUDA steps. Exponentials
// dominate the steps' time at small D, where a libm call per element would cost about four times as much.
//
// at::parallel_for parallelises only where this file is compiled with OpenMP (-fopenmp: ATen/ParallelOpenMP.h runs
// the loop serially otherwise).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "leanops/contrastive_host.h"
#include "leanops/contrastive_plan_host.h"
#include "leanops/panel_math.h"
#include "leanops/tile_cpu.h"
#include "leanops/vector_cpu.h"

namespace leanops {
namespace contrastive {
namespace {

// Rows of a panel per block (one task), and columns per tile: a 128 x 256 float32 tile is 128 KiB, which stays in
// L2 across the epilogue's passes.
constexpr int64_t kRowBlock = 128;
constexpr int64_t kColumnTile = 256;

using namespace cpu_vector;  // NOLINT: the epilogues are written in its vocabulary
using cpu_tile::num_blocks;

static_assert(kColumnTile % kWidth == 0, "per-column scratch is read in whole vectors");

// ---------------------------------------------------------------------------------------------------------------
// Tile epilogues. Each is a functor whose operator() is force-inlined into a baseline and an AVX2 + FMA clone
// (run_cloned), so the same source compiles to both. A tile is R x C (R <= kRowBlock, C <= kColumnTile) entries of
// the panel, row-major with leading dimension `stride` (= B); pointers to per-row data are offset to the tile's
// first row, per-column data to its first column. Per-column inputs are first copied into zero-padded local arrays,
// so whole vectors can be read past column C; tile rows are read and written in whole vectors up to the last,
// partial one (load_partial/store_partial), and the padding lanes of a row reduction are masked out.

// What every epilogue reads of its tile: S's R x C entries.
struct Tile {
  const float* similarity;
  int64_t rows, cols, stride;
};

// Copies n values (per-column inputs of a tile) into a kColumnTile array, padding with `fill`.
template <typename T>
LEANOPS_INLINE void copy_padded(T* out, const T* in, int64_t n, T fill) {
  int64_t c = 0;
  for (; c < n; ++c) out[c] = in[c];
  for (; c < kColumnTile; ++c) out[c] = fill;
}

// What both CLIP epilogues read: the scales of the tile's rows and columns.
struct ClipTile : Tile {
  const float* row_scale;
  const float* col_scale;

  // The columns' scales in a kColumnTile array, padded with 0.
  LEANOPS_INLINE void column_scales(float* out) const { copy_padded(out, col_scale, cols, 0.0f); }
};

// CLIP forward: folds one tile into the running (max, sum of exp(z - max)) of its rows (z = row_scale * S) and of
// its columns (z = col_scale * S; the block's partial column statistics).
struct ClipForwardTile : ClipTile {
  float* row_max;
  float* row_sum;
  float* col_max;
  float* col_sum;

  LEANOPS_INLINE void operator()() const {
    alignas(32) float scale_c[kColumnTile];
    alignas(32) float old_max_c[kColumnTile];
    alignas(32) float new_max_c[kColumnTile];
    alignas(32) float sum_c[kColumnTile];
    float new_max_r[kRowBlock];
    column_scales(scale_c);
    const int64_t C = cols;
    copy_padded(old_max_c, col_max, C, 0.0f);
    for (int64_t c = 0; c < kColumnTile; ++c) new_max_c[c] = old_max_c[c];
    // Pass 1, maxima: a row's is complete at once (its exponentials need it); columns accumulate over the rows.
    for (int64_t r = 0; r < rows; ++r) {
      const float* s_row = similarity + r * stride;
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
    for (int64_t c = 0; c < kColumnTile; ++c) sum_c[c] = 0.0f;
    // Pass 2, exponentials against the new maxima: every argument is <= 0, so no overflow at any scale.
    for (int64_t r = 0; r < rows; ++r) {
      const float* s_row = similarity + r * stride;
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
// p = exp(row_scale * S - row_lse) and q = exp(col_scale * S - col_lse), written over S (`gradient` may be the
// tile's own memory: each vector is read before it is written); accumulates sum_j p S into row_ps and sum_i q S
// into col_qs (the weights are applied once, at the end).
struct ClipBackwardTile : ClipTile {
  const float* row_lse;
  const float* col_lse;
  const float* row_weight;
  const float* col_weight;
  float* gradient;  // R x C, leading dimension stride
  float* row_ps;
  float* col_qs;

  LEANOPS_INLINE void operator()() const {
    alignas(32) float scale_c[kColumnTile];
    alignas(32) float lse_c[kColumnTile];
    alignas(32) float coefficient_c[kColumnTile];
    alignas(32) float qs_c[kColumnTile];
    column_scales(scale_c);
    const int64_t C = cols;
    copy_padded(lse_c, col_lse, C, 0.0f);
    for (int64_t c = 0; c < kColumnTile; ++c) {
      coefficient_c[c] = c < C ? col_weight[c] * scale_c[c] : 0.0f;
      qs_c[c] = 0.0f;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* s_row = similarity + r * stride;
      float* g_row = gradient + r * stride;
      const vfloat scale = splat(row_scale[r]);
      const vfloat lse = splat(row_lse[r]);
      const vfloat coefficient_r = splat(row_weight[r] * row_scale[r]);
      vfloat ps = splat(0.0f);
      for (int64_t c = 0; c < C; c += kWidth) {
        const int64_t n = std::min<int64_t>(kWidth, C - c);
        const vfloat s = load_partial(s_row + c, n);
        const vfloat p = exp(scale * s - lse);
        const vfloat q = exp(load(scale_c + c) * s - load(lse_c + c));
        store_partial(g_row + c, panel_math::clip_gradient(coefficient_r, p, load(coefficient_c + c), q), n);
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
  const int32_t* row_group;  // dense group ids (see prepare_groups)
  const int32_t* col_group;

  // The columns' group ids in a kColumnTile array, padded (the padding lanes are masked out of every row reduction).
  LEANOPS_INLINE void column_groups(int32_t* out) const { copy_padded(out, col_group, cols, 0); }
};

// SigLIP forward: row_loss[r] += sum_c softplus(-label * (scale * S + bias)).
struct SiglipForwardTile : SiglipTile {
  float* row_loss;

  LEANOPS_INLINE void operator()() const {
    alignas(32) int32_t group_c[kColumnTile];
    column_groups(group_c);
    const int64_t C = cols;
    for (int64_t r = 0; r < rows; ++r) {
      const float* s_row = similarity + r * stride;
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

// SigLIP backward: D = -row_weight * label * sigmoid(-label * z) for one tile, z = scale * S + bias; writes
// G = scale * D over S (as ClipBackwardTile) and accumulates sum_c D and sum_c D S per row.
struct SiglipBackwardTile : SiglipTile {
  const float* row_weight;
  float* gradient;
  float* row_d;
  float* row_ds;

  LEANOPS_INLINE void operator()() const {
    alignas(32) int32_t group_c[kColumnTile];
    column_groups(group_c);
    const int64_t C = cols;
    for (int64_t r = 0; r < rows; ++r) {
      const float* s_row = similarity + r * stride;
      float* g_row = gradient + r * stride;
      const vint group = splat_int(row_group[r]);
      const vfloat weight = splat(row_weight[r]);
      vfloat d_total = splat(0.0f);
      vfloat ds_total = splat(0.0f);
      for (int64_t c = 0; c < C; c += kWidth) {
        const int64_t n = std::min<int64_t>(kWidth, C - c);
        const vfloat s = load_partial(s_row + c, n);
        const vfloat z = s * scale + bias;
        const vint same = load_int(group_c + c) == group;
        const vfloat d = panel_math::siglip_logit_gradient(same, weight, sigmoid(same ? -z : z));
        store_partial(g_row + c, d * scale, n);
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
// Sweeps.

// A panel as the steps see it: its rows x B float32 entries and its first row in the batch.
struct PanelRows {
  const float* similarity;
  int64_t rows, batch, first_row;

  explicit PanelRows(const at::Tensor& similarity_panel, int64_t first)
      : similarity(similarity_panel.const_data_ptr<float>()),
        rows(similarity_panel.size(0)),
        batch(similarity_panel.size(1)),
        first_row(first) {}

  int64_t blocks() const { return num_blocks(rows, kRowBlock); }

  // The tile of the panel's rows [r0, r0 + kRowBlock) and columns [c0, c0 + kColumnTile), cut at the panel's end.
  Tile tile(int64_t r0, int64_t c0) const {
    return Tile{similarity + r0 * batch + c0, std::min(kRowBlock, rows - r0), std::min(kColumnTile, batch - c0),
                batch};
  }
};

// Calls fn(block, r0, rows) for every block of kRowBlock panel rows, in parallel: a task owns its blocks' rows and
// the blocks' rows of any per-block scratch.
template <typename Fn>
void for_each_block(const PanelRows& panel, const Fn& fn) {
  at::parallel_for(0, panel.blocks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * kRowBlock;
      fn(block, r0, std::min(kRowBlock, panel.rows - r0));
    }
  });
}

// Calls fn(j) for every column j < batch, in parallel (each column has one owner).
template <typename Fn>
void for_each_column(int64_t batch, const Fn& fn) {
  at::parallel_for(0, batch, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) fn(j);
  });
}

// The sum of n floats by recursive halving: a fixed order, with rounding errors that grow with log2(n).
float pairwise_sum(const float* values, int64_t n) {
  if (n <= 8) {
    float total = 0.0f;
    for (int64_t k = 0; k < n; ++k) total += values[k];
    return total;
  }
  const int64_t half = n / 2;
  return pairwise_sum(values, half) + pairwise_sum(values + half, n - half);
}

// ---------------------------------------------------------------------------------------------------------------
// The steps of the plan (leanops/contrastive_plan_host.h documents the interface).

struct CpuSteps {
  static at::Tensor gemm_operand(const at::Tensor& features) { return cpu_tile::float32_contiguous(features); }
  static at::ScalarType gradient_dtype(at::ScalarType /*features*/) { return at::kFloat; }
  static bool scales_gradient(at::ScalarType /*features*/) { return false; }
  static at::Tensor gradient_scale(const at::Tensor& /*bound*/) {
    TORCH_INTERNAL_ASSERT(false, "the CPU steps keep G in float32, unscaled");
    return {};
  }

  static void multiply(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
    cpu_tile::multiply(out, a, b, accumulate);
  }

  // Group ids as dense int32 (equal ids stay equal, distinct stay distinct), so the label test in the epilogue
  // compares 32-bit lanes alongside the 32-bit floats and vectorises.
  static at::Tensor prepare_groups(const at::Tensor& groups) {
    const at::Tensor inverse = std::get<1>(at::_unique(groups, /*sorted=*/true, /*return_inverse=*/true));
    return inverse.to(at::kInt).contiguous();
  }

  static at::Tensor sum_rows(const at::Tensor& matrix) {
    const at::Tensor m = matrix.contiguous();
    at::Tensor totals = at::empty({m.size(0)}, m.options());
    for (int64_t k = 0; k < m.size(0); ++k) {
      totals.mutable_data_ptr<float>()[k] = pairwise_sum(m.const_data_ptr<float>() + k * m.size(1), m.size(1));
    }
    return totals;
  }

  static void clip_forward(const ClipForwardPanel& step) {
    const PanelRows panel(step.similarity, step.first_row);
    const int64_t batch = panel.batch;
    const float* scale = step.scale.const_data_ptr<float>();
    float* row_lse = step.row_lse.mutable_data_ptr<float>() + panel.first_row;
    // Per block, the (max, sum) of every column over the block's rows.
    std::vector<float> partial_max(panel.blocks() * batch, -kInfinity);
    std::vector<float> partial_sum(panel.blocks() * batch, 0.0f);
    for_each_block(panel, [&](int64_t block, int64_t r0, int64_t rows) {
      float row_max[kRowBlock], row_sum[kRowBlock];
      std::fill_n(row_max, rows, -kInfinity);
      std::fill_n(row_sum, rows, 0.0f);
      for (int64_t c0 = 0; c0 < batch; c0 += kColumnTile) {
        const int64_t partial = block * batch + c0;
        run_cloned(ClipForwardTile{{panel.tile(r0, c0), scale + panel.first_row + r0, scale + c0}, row_max, row_sum,
                                   partial_max.data() + partial, partial_sum.data() + partial});
      }
      for (int64_t r = 0; r < rows; ++r) row_lse[r0 + r] = row_max[r] + std::log(row_sum[r]);
    });
    float* column_max = step.column_max.mutable_data_ptr<float>();
    float* column_sum = step.column_sum.mutable_data_ptr<float>();
    for_each_column(batch, [&](int64_t j) {
      for (int64_t block = 0; block < panel.blocks(); ++block) {
        panel_math::merge_log_sum_exp(column_max[j], column_sum[j], partial_max[block * batch + j],
                                      partial_sum[block * batch + j]);
      }
    });
  }

  static void clip_backward(const ClipBackwardPanel& step) {
    const PanelRows panel(step.similarity, step.first_row);
    const int64_t batch = panel.batch;
    const int64_t first = panel.first_row;
    const float* scale = step.scale.const_data_ptr<float>();
    const float* row_lse = step.row_lse.const_data_ptr<float>();
    const float* col_lse = step.col_lse.const_data_ptr<float>();
    const float* row_weight = step.row_weight.const_data_ptr<float>();
    const float* col_weight = step.col_weight.const_data_ptr<float>();
    float* gradient = step.gradient.mutable_data_ptr<float>();
    float* row_ps = step.row_ps.mutable_data_ptr<float>() + first;
    std::vector<float> partial_qs(panel.blocks() * batch, 0.0f);  // per block, sum_i q S of every column
    for_each_block(panel, [&](int64_t block, int64_t r0, int64_t rows) {
      std::fill_n(row_ps + r0, rows, 0.0f);
      for (int64_t c0 = 0; c0 < batch; c0 += kColumnTile) {
        run_cloned(ClipBackwardTile{{panel.tile(r0, c0), scale + first + r0, scale + c0},
                                    row_lse + first + r0,
                                    col_lse + c0,
                                    row_weight + first + r0,
                                    col_weight + c0,
                                    gradient + r0 * batch + c0,
                                    row_ps + r0,
                                    partial_qs.data() + block * batch + c0});
      }
    });
    float* column_qs = step.column_qs.mutable_data_ptr<float>();
    for_each_column(batch, [&](int64_t j) {
      float panel_total = 0.0f;
      for (int64_t block = 0; block < panel.blocks(); ++block) panel_total += partial_qs[block * batch + j];
      column_qs[j] += panel_total;
    });
  }

  static void siglip_forward(const SiglipForwardPanel& step) {
    const PanelRows panel(step.similarity, step.first_row);
    const float scale = step.scale.item<float>();
    const float bias = step.bias.item<float>();
    const int32_t* groups = step.groups.const_data_ptr<int32_t>();
    float* row_loss = step.row_loss.mutable_data_ptr<float>() + panel.first_row;
    for_each_block(panel, [&](int64_t /*block*/, int64_t r0, int64_t rows) {
      std::fill_n(row_loss + r0, rows, 0.0f);
      for (int64_t c0 = 0; c0 < panel.batch; c0 += kColumnTile) {
        run_cloned(SiglipForwardTile{{panel.tile(r0, c0), scale, bias, groups + panel.first_row + r0, groups + c0},
                                     row_loss + r0});
      }
    });
  }

  static void siglip_backward(const SiglipBackwardPanel& step) {
    const PanelRows panel(step.similarity, step.first_row);
    const int64_t batch = panel.batch;
    const int64_t first = panel.first_row;
    const float scale = step.scale.item<float>();
    const float bias = step.bias.item<float>();
    const int32_t* groups = step.groups.const_data_ptr<int32_t>();
    const float* row_weight = step.row_weight.const_data_ptr<float>();
    float* gradient = step.gradient.mutable_data_ptr<float>();
    float* row_d = step.row_sums.mutable_data_ptr<float>() + first;
    float* row_ds = row_d + batch;
    for_each_block(panel, [&](int64_t /*block*/, int64_t r0, int64_t rows) {
      std::fill_n(row_d + r0, rows, 0.0f);
      std::fill_n(row_ds + r0, rows, 0.0f);
      for (int64_t c0 = 0; c0 < batch; c0 += kColumnTile) {
        run_cloned(SiglipBackwardTile{{panel.tile(r0, c0), scale, bias, groups + first + r0, groups + c0},
                                      row_weight + first + r0, gradient + r0 * batch + c0, row_d + r0,
                                      row_ds + r0});
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------------------------
// The ops: argument checks, then the plan.

std::tuple<at::Tensor, at::Tensor> clip_forward(const at::Tensor& image, const at::Tensor& text,
                                                const at::Tensor& scale) {
  check_clip_forward(image, text, scale);
  return clip_forward_plan<CpuSteps>(image, text, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_backward(const at::Tensor& image, const at::Tensor& text,
                                                             const at::Tensor& scale, const at::Tensor& row_lse,
                                                             const at::Tensor& col_lse, const at::Tensor& row_weight,
                                                             const at::Tensor& col_weight) {
  check_clip_backward(image, text, scale, row_lse, col_lse, row_weight, col_weight);
  return clip_backward_plan<CpuSteps>(image, text, scale, row_lse, col_lse, row_weight, col_weight);
}

at::Tensor siglip_forward(const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale,
                          const at::Tensor& bias, const at::Tensor& groups) {
  check_siglip_forward(image, text, scale, bias, groups);
  return siglip_forward_plan<CpuSteps>(image, text, scale, bias, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_backward(const at::Tensor& image,
                                                                           const at::Tensor& text,
                                                                           const at::Tensor& scale,
                                                                           const at::Tensor& bias,
                                                                           const at::Tensor& groups,
                                                                           const at::Tensor& row_weight) {
  check_siglip_backward(image, text, scale, bias, groups, row_weight);
  return siglip_backward_plan<CpuSteps>(image, text, scale, bias, groups, row_weight);
}

}  // namespace
}  // namespace contrastive
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CPU, m) {
  namespace k = leanops::contrastive;
  k::register_kernels(m, &k::clip_forward, &k::clip_backward, &k::siglip_forward, &k::siglip_backward);
}
