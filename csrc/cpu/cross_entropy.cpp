// The CPU provider of the linear cross-entropy primitives (linear_ce_forward, linear_ce_backward). The plan, its math
// and its GEMMs are leanops/cross_entropy_plan_host.h's, shared with the CUDA provider; this file holds what runs
// between the GEMMs on the CPU, the fused steps over one vocabulary chunk of the logits (N tokens x Vc classes,
// float32), and the CPU's GEMM schedule (leanops/tile_cpu.h: fixed blocks, one MKL thread each).
//
// Inputs. bf16/fp16 hidden and weight are converted to float32 once, up front (Steps::gemm_operand): MKL multiplies
// float32. G is float32 and overwrites the chunk's logits in place; gradients are rounded once to the input dtype by
// the plan.
//
// Steps. A chunk's tokens are cut into blocks of kTokenBlock rows, fixed by N (never by the thread count), run in
// parallel; a block sweeps its rows in tiles of kColumnTile classes and runs an "epilogue" per tile:
//  - forward: bias and softcap (z -> z' in place), then the tile folded into its tokens' running statistics (an
//    online log-sum-exp: running max, sum rescaled whenever the max grows; sum z' and sum z'^2 added per tile as
//    compensated float32 pairs, panel_math::compensated_add; the target logit). Every token has one owner and sees
//    the tiles in vocabulary order: the statistics do not depend on the thread count.
//  - backward: G in place of the logits (panel_math::linear_ce_logit_gradient), and with a bias the tile's column
//    sums of G, one row of a per-chunk scratch per block; the blocks' rows are then added in block order into
//    grad_bias[chunk].
//
// Epilogues: 8-lane GCC vectors with branch-free exp and tanh polynomials, compiled as baseline SSE2 and as an
// AVX2 + FMA clone chosen at run time (leanops/vector_cpu.h, shared with csrc/cpu/contrastive.cpp). Exponentials
// dominate the steps' time at small D. at::parallel_for parallelises only because this file is compiled with OpenMP.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "leanops/cross_entropy_host.h"
#include "leanops/cross_entropy_plan_host.h"
#include "leanops/panel_math.h"
#include "leanops/tile_cpu.h"
#include "leanops/vector_cpu.h"

namespace leanops {
namespace cross_entropy {
namespace {

// A tile is kTokenBlock tokens x kColumnTile classes of float32: 256 KiB, which stays in L2 across the epilogue's
// passes.
constexpr int64_t kTokenBlock = 128;
constexpr int64_t kColumnTile = 512;

using namespace cpu_vector;  // NOLINT: the epilogues are written in its vocabulary
using cpu_tile::num_blocks;

static_assert(kColumnTile % kWidth == 0, "per-column scratch is read in whole vectors");

// z' = softcap * tanh(z / softcap) when capped (inverse = 1 / softcap), else z.
template <bool kCapped>
LEANOPS_INLINE vfloat cap(const vfloat& z, float softcap, float inverse) {
  if (!kCapped) return z;
  return tanh(z * inverse) * softcap;
}

// ---------------------------------------------------------------------------------------------------------------
// Tile epilogues. A tile is R tokens x C classes (R <= kTokenBlock, C <= kColumnTile) of the chunk, row-major with
// leading dimension `stride` (the chunk's Vc), holding z = h W^T without the bias on entry. Per-token pointers are
// offset to the tile's first row; `bias` to its first class, readable in whole vectors past C (the chunk's bias
// array is zero-padded by kWidth). Rows are read and written in whole vectors up to the last, partial one; padding
// lanes are masked out of every reduction. Each functor's operator() is force-inlined into a baseline and an AVX2 +
// FMA clone (run_cloned).

// What every epilogue reads of its tile (see above); softcap > 0: capped, with inverse_softcap = 1 / softcap.
struct Tile {
  float* logits;
  int64_t rows, cols, stride;
  int64_t first_class;  // the tile's first class, counted in the whole vocabulary
  const float* bias;
  float softcap, inverse_softcap;
  const int64_t* targets;
};

// Runs Epilogue<true> (capped) or Epilogue<false> over a tile; `rest` initialises the epilogue's own members.
template <template <bool> class Epilogue, typename... Rest>
void run_tile_epilogue(const Tile& tile, Rest... rest) {
  if (tile.softcap > 0) {
    run_cloned(Epilogue<true>{tile, rest...});
  } else {
    run_cloned(Epilogue<false>{tile, rest...});
  }
}

// Forward: z -> z' in place, and folds the tile into the running statistics of its rows (the plan's per-token
// state rows, offset to the tile's first token).
template <bool kCapped>
struct ForwardTile : Tile {
  float* running_max;
  float* running_sum;  // of exp(z' - running_max)
  float* logit_sum_high;
  float* logit_sum_low;
  float* square_sum_high;
  float* square_sum_low;
  float* target_logit;

  LEANOPS_INLINE void operator()() const {
    const int64_t C = cols;
    for (int64_t r = 0; r < rows; ++r) {
      float* row = logits + r * stride;
      vfloat best = splat(-kInfinity);
      vfloat sum = splat(0.0f);
      vfloat squares = splat(0.0f);
      // Pass 1: z' (kept in the tile for pass 2), the row maximum, sum and sum of squares.
      for (int64_t c = 0; c < C; c += kWidth) {
        const int64_t n = std::min<int64_t>(kWidth, C - c);
        const vfloat z = cap<kCapped>(load_partial(row + c, n) + load(bias + c), softcap, inverse_softcap);
        store_partial(row + c, z, n);
        const vint valid = lanes_below(n);
        best = max(best, valid ? z : splat(-kInfinity));
        const vfloat z_valid = valid ? z : splat(0.0f);
        sum += z_valid;
        squares += z_valid * z_valid;
      }
      const float new_max = std::max(running_max[r], horizontal_max(best));
      // Pass 2: exponentials against the new maximum, every argument <= 0: no overflow at any logit size.
      const vfloat m = splat(new_max);
      vfloat total = splat(0.0f);
      for (int64_t c = 0; c < C; c += kWidth) {
        const int64_t n = std::min<int64_t>(kWidth, C - c);
        total += lanes_below(n) ? exp(load_partial(row + c, n) - m) : splat(0.0f);
      }
      // Before the first tile running_max = -inf and running_sum = 0: exp(-inf) = 0 keeps the product 0.
      running_sum[r] = running_sum[r] * std::exp(running_max[r] - new_max) + horizontal_sum(total);
      running_max[r] = new_max;
      panel_math::compensated_add(logit_sum_high[r], logit_sum_low[r], horizontal_sum(sum));
      panel_math::compensated_add(square_sum_high[r], square_sum_low[r], horizontal_sum(squares));
      const int64_t t = targets[r] - first_class;
      if (t >= 0 && t < C) target_logit[r] = row[t];
    }
  }
};

// Backward: z -> G in place (panel_math::linear_ce_logit_gradient, times dz'/dz when capped); with column_sums, also
// adds the sum over the tile's rows of G per class (column_sums: the block's scratch row, offset to the tile's first
// class, readable in whole vectors past C).
template <bool kCapped>
struct BackwardTile : Tile {
  const float* lse;
  const float* grad_lse;
  const float* grad_target;
  const float* grad_sum;
  const float* grad_square_sum;
  float* column_sums;  // nullptr: not wanted

  LEANOPS_INLINE void operator()() const {
    const int64_t C = cols;
    for (int64_t r = 0; r < rows; ++r) {
      float* row = logits + r * stride;
      const vfloat m = splat(lse[r]);
      const vfloat g_lse = splat(grad_lse[r]);
      const vfloat g_sum = splat(grad_sum[r]);
      const bool square_term = grad_square_sum[r] != 0.0f;  // (panel_math::linear_ce_logit_gradient)
      const vfloat g_square = splat(2.0f * grad_square_sum[r]);
      const vfloat g_target = splat(grad_target[r]);
      // The target's column inside this tile, or -1 (no lane matches): a lane compare instead of a branch.
      const int64_t t = targets[r] - first_class;
      const vint target = splat_int(t >= 0 && t < C ? static_cast<int32_t>(t) : -1);
      for (int64_t c = 0; c < C; c += kWidth) {
        const int64_t n = std::min<int64_t>(kWidth, C - c);
        const vfloat z = cap<kCapped>(load_partial(row + c, n) + load(bias + c), softcap, inverse_softcap);
        const vint is_target = (lane_index() + static_cast<int32_t>(c)) == target;
        vfloat g = panel_math::linear_ce_logit_gradient(z, exp(z - m), g_lse, g_sum, square_term, g_square, is_target,
                                                             g_target);
        if (kCapped) g *= panel_math::softcap_derivative(z, inverse_softcap);
        store_partial(row + c, g, n);
        if (column_sums != nullptr) {
          store(column_sums + c, load(column_sums + c) + (lanes_below(n) ? g : splat(0.0f)));
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Sweeps.

// A chunk as the steps see it: N x Vc float32 logits, the chunk's bias in float32 zero-padded by kWidth (all zeros
// without a bias), the softcap.
struct ChunkTiles {
  float* logits;
  int64_t tokens, classes, first_class;
  std::vector<float> bias;
  float softcap, inverse_softcap;
  const int64_t* targets;

  ChunkTiles(const at::Tensor& logits_chunk, int64_t first, const at::Tensor& bias_all, double cap,
             const at::Tensor& targets_all)
      : logits(logits_chunk.mutable_data_ptr<float>()),
        tokens(logits_chunk.size(0)),
        classes(logits_chunk.size(1)),
        first_class(first),
        bias(classes + kWidth, 0.0f),
        softcap(cap > 0 ? static_cast<float>(cap) : 0.0f),
        inverse_softcap(cap > 0 ? static_cast<float>(1.0 / cap) : 0.0f),
        targets(targets_all.const_data_ptr<int64_t>()) {
    if (bias_all.numel() > 0) {
      const at::Tensor chunk = bias_all.narrow(0, first, classes).to(at::kFloat).contiguous();
      std::memcpy(bias.data(), chunk.const_data_ptr<float>(), classes * sizeof(float));
    }
  }

  int64_t blocks() const { return num_blocks(tokens, kTokenBlock); }

  // The tile of tokens [r0, r0 + kTokenBlock) and the chunk's classes [c0, c0 + kColumnTile), cut at the ends.
  Tile tile(int64_t r0, int64_t c0) const {
    return Tile{logits + r0 * classes + c0, std::min(kTokenBlock, tokens - r0), std::min(kColumnTile, classes - c0),
                classes, first_class + c0, bias.data() + c0, softcap, inverse_softcap, targets + r0};
  }
};

// Calls fn(block, r0) for every block of kTokenBlock tokens, in parallel: a task owns its blocks' tokens.
template <typename Fn>
void for_each_block(const ChunkTiles& chunk, const Fn& fn) {
  at::parallel_for(0, chunk.blocks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) fn(block, block * kTokenBlock);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The steps of the plan (leanops/cross_entropy_plan_host.h documents the interface).

struct CpuSteps {
  static at::Tensor gemm_operand(const at::Tensor& t) { return cpu_tile::float32_contiguous(t); }
  static at::ScalarType gradient_dtype(at::ScalarType /*inputs*/) { return at::kFloat; }
  static bool scales_gradient(at::ScalarType /*inputs*/) { return false; }
  static at::Tensor gradient_scale(const at::Tensor& /*bound*/) {
    TORCH_INTERNAL_ASSERT(false, "the CPU steps keep G in float32, unscaled");
    return {};
  }

  static void multiply(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
    cpu_tile::multiply(out, a, b, accumulate);
  }

  static void forward(const ForwardChunk& step) {
    const ChunkTiles chunk(step.logits, step.first_class, step.bias, step.softcap, step.targets);
    const int64_t tokens = chunk.tokens;
    float* state = step.state.mutable_data_ptr<float>();
    const auto state_row = [&](StateRow row) { return state + row * tokens; };
    for_each_block(chunk, [&](int64_t /*block*/, int64_t r0) {
      for (int64_t c0 = 0; c0 < chunk.classes; c0 += kColumnTile) {
        run_tile_epilogue<ForwardTile>(chunk.tile(r0, c0), state_row(kRunningMax) + r0, state_row(kRunningSum) + r0,
                                       state_row(kLogitSumHigh) + r0, state_row(kLogitSumLow) + r0,
                                       state_row(kSquareSumHigh) + r0, state_row(kSquareSumLow) + r0,
                                       state_row(kTargetLogit) + r0);
      }
    });
  }

  static void backward(const BackwardChunk& step) {
    TORCH_INTERNAL_ASSERT(step.gradient.data_ptr() == step.logits.data_ptr(), "the CPU steps write G in place");
    const ChunkTiles chunk(step.logits, step.first_class, step.bias, step.softcap, step.targets);
    const bool has_bias = step.bias_gradient.defined();
    // Per block, the column sums of G over the block's tokens (rows padded by kWidth for whole-vector reads).
    const int64_t partial_stride = chunk.classes + kWidth;
    std::vector<float> partial_sums(has_bias ? chunk.blocks() * partial_stride : 0, 0.0f);
    for_each_block(chunk, [&](int64_t block, int64_t r0) {
      for (int64_t c0 = 0; c0 < chunk.classes; c0 += kColumnTile) {
        run_tile_epilogue<BackwardTile>(
            chunk.tile(r0, c0), step.lse.const_data_ptr<float>() + r0, step.grad_lse.const_data_ptr<float>() + r0,
            step.grad_target.const_data_ptr<float>() + r0, step.grad_sum.const_data_ptr<float>() + r0,
            step.grad_square_sum.const_data_ptr<float>() + r0,
            has_bias ? partial_sums.data() + block * partial_stride + c0 : nullptr);
      }
    });
    if (has_bias) {
      float* bias_gradient = step.bias_gradient.mutable_data_ptr<float>();
      at::parallel_for(0, chunk.classes, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          float total = 0.0f;
          for (int64_t block = 0; block < chunk.blocks(); ++block) total += partial_sums[block * partial_stride + c];
          bias_gradient[c] = total;
        }
      });
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// The ops: argument checks, then the plan.

// Targets must be class indices in [0, V) or -1. The kernels only compare them with class indices (no out-of-bounds
// access either way), but an index >= V, or another negative, would silently mean "no target": an error instead.
void check_target_values(const char* op, const at::Tensor& targets, int64_t classes) {
  const at::Tensor contiguous_targets = targets.contiguous();
  const int64_t* data = contiguous_targets.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < contiguous_targets.numel(); ++n) {
    TORCH_CHECK_VALUE(data[n] >= -1 && data[n] < classes, "leanops.", op, ": argument 'targets' holds ", data[n],
                      " at index ", n, "; expected class indices in [0, ", classes, ") or -1 for no target");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_forward(const at::Tensor& hidden,
                                                                             const at::Tensor& weight,
                                                                             const at::Tensor& bias,
                                                                             const at::Tensor& targets,
                                                                             double softcap) {
  check_forward(hidden, weight, bias, targets);
  check_target_values("linear_ce_forward", targets, weight.size(0));
  return linear_ce_forward_plan<CpuSteps>(hidden, weight, bias, targets, softcap);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& targets,
    double softcap, const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& grad_target,
    const at::Tensor& grad_sum, const at::Tensor& grad_square_sum) {
  check_backward(hidden, weight, bias, targets, lse, grad_lse, grad_target, grad_sum, grad_square_sum);
  check_target_values("linear_ce_backward", targets, weight.size(0));
  return linear_ce_backward_plan<CpuSteps>(hidden, weight, bias, targets, softcap, lse, grad_lse, grad_target,
                                           grad_sum, grad_square_sum);
}

}  // namespace
}  // namespace cross_entropy
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CPU, m) {
  namespace k = leanops::cross_entropy;
  k::register_kernels(m, &k::linear_ce_forward, &k::linear_ce_backward);
}
