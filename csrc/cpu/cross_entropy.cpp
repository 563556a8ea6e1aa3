// CPU kernels of the chunked linear cross-entropy (linear_ce_forward, linear_ce_backward). csrc/ops.cpp states the
// contract; python/leanops/cross_entropy.py documents the math; python/leanops/reference/cross_entropy.py is the
// same contract in plain PyTorch.
//
// The N x V logits z = hidden @ weight^T + bias never exist. Tokens are cut into blocks of kTokenBlock rows and the
// vocabulary into blocks of kVocabBlock classes; a task computes one z tile (fp32) with ATen's CPU matmul (MKL
// sgemm; leanops/tile_cpu.h) and runs a fused pass over it, the "epilogue" (bias, softcap, exponentials, the
// per-token statistics or the gradient weights G). Like csrc/cpu/contrastive.cpp, whose design this follows.
// Everything accumulates in fp32; the running per-token sums across vocabulary tiles are kept in double, which costs
// O(N) and keeps the statistics of a 50k-class vocabulary at fp32 accuracy.
//
// Schedules: every output has exactly one owner, so there are no races, no atomics and no partial sums across
// chunks, and results do not depend on the thread count (each output is reduced in the same order whoever runs it).
//  - forward: parallel over token blocks; a task sweeps all vocabulary tiles of its rows with an online
//    log-sum-exp (running max, sum rescaled whenever the max grows: no overflow for any logit), and sums z', z'^2
//    and picks the target logit on the way.
//  - backward, pass 1: parallel over token blocks; a task recomputes its z tiles over the whole vocabulary, turns
//    each into G and accumulates grad_hidden rows += G @ W_block (output-stationary, in an fp32 buffer).
//  - backward, pass 2: parallel over vocabulary blocks; a task recomputes its z tiles over all tokens and
//    accumulates grad_weight rows += G^T @ hidden_block and grad_bias += column sums of G.
// The backward thus computes z twice (4 matmuls of N x V x D against the forward's 1) and stores nothing N x V.
// Memory: the fp32 copies of bf16/fp16 hidden and weight (O((N + V) D)), O(N + V) vectors, and per thread one
// kTokenBlock x kVocabBlock tile and one block x D accumulator.
//
// at::parallel_for parallelises only because this file is compiled with OpenMP (-fopenmp); inside its region each
// tile matmul runs single-threaded, as it should (see csrc/cpu/contrastive.cpp).
//
// Input dtype. bf16/fp16 hidden and weight are converted to fp32 once, up front: block-by-block conversion would
// redo it for every tile. Gradients are reduced in fp32 and rounded once to the input dtype when a block is done.
//
// Epilogues: 8-lane GCC vectors with branch-free exp and tanh polynomials, compiled as baseline SSE2 and as an
// AVX2 + FMA clone chosen at run time (csrc/include/leanops/vector_cpu.h, shared with csrc/cpu/contrastive.cpp).
// Exponentials dominate the time at small D.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "leanops/cross_entropy_host.h"
#include "leanops/tile_cpu.h"
#include "leanops/vector_cpu.h"

namespace leanops {
namespace cross_entropy {
namespace {

// Tile = kTokenBlock tokens x kVocabBlock classes, fp32: 256 KiB, which stays in L2 across the epilogue's passes.
// 128 token rows keep N = 4096 at 32 parallel tasks for the token passes; 512 classes amortise the per-call cost
// of the matmuls (the vocabulary pass has V / 512 ~ 100 tasks at V = 50k).
constexpr int64_t kTokenBlock = 128;
constexpr int64_t kVocabBlock = 512;

using namespace cpu_vector;  // NOLINT: the epilogues are written in its vocabulary
using cpu_tile::float32_contiguous;
using cpu_tile::num_blocks;
using cpu_tile::wrap;
using cpu_tile::wrap_transposed;

static_assert(kVocabBlock % kWidth == 0, "per-column scratch is read in whole vectors");

// z' = softcap * tanh(z / softcap) when capped (inverse = 1 / softcap), else z.
template <bool kCapped>
LEANOPS_INLINE vfloat cap(const vfloat& z, float softcap, float inverse) {
  if (!kCapped) return z;
  return tanh(z * inverse) * softcap;
}

// ---------------------------------------------------------------------------------------------------------------
// Tile epilogues. A tile is R tokens x C classes (R <= kTokenBlock, C <= kVocabBlock), row-major with leading
// dimension C, holding z = h W^T without the bias on entry. Per-token pointers are offset to the tile's first row;
// `bias` to its first class, readable in whole vectors past C (the bias array is zero-padded by kWidth). Rows are
// read and written in whole vectors up to the last, partial one; padding lanes are masked out of every reduction.
// Each functor's operator() is force-inlined into a baseline and an AVX2 + FMA clone (run_cloned).

// What every epilogue reads of its tile (see above); softcap > 0: capped, with inverse_softcap = 1 / softcap.
struct Tile {
  float* logits;
  int64_t rows, cols;
  int64_t first_class;
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

// Forward: z -> z' in place, and folds the tile into the running statistics of its rows.
template <bool kCapped>
struct ForwardTile : Tile {
  float* running_max;
  double* running_sum;  // of exp(z' - running_max)
  double* logit_sum;
  double* square_sum;
  float* target_logit;

  LEANOPS_INLINE void operator()() const {
    const int64_t C = cols;
    for (int64_t r = 0; r < rows; ++r) {
      float* row = logits + r * C;
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
      running_sum[r] = running_sum[r] * std::exp(static_cast<double>(running_max[r]) - new_max) +
                       horizontal_sum(total);
      running_max[r] = new_max;
      logit_sum[r] += horizontal_sum(sum);
      square_sum[r] += horizontal_sum(squares);
      const int64_t t = targets[r] - first_class;
      if (t >= 0 && t < C) target_logit[r] = row[t];
    }
  }
};

// Backward: z -> G in place, G = (grad_lse exp(z' - lse) + grad_sum + 2 grad_square_sum z' + grad_target [j = t])
// * (1 - (z' / softcap)^2 when capped); with column_sums, also adds sum over the tile's rows of G per class
// (column_sums is a zeroed kVocabBlock array).
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
      float* row = logits + r * C;
      const vfloat m = splat(lse[r]);
      const vfloat g_lse = splat(grad_lse[r]);
      const vfloat g_sum = splat(grad_sum[r]);
      const vfloat g_square = splat(2.0f * grad_square_sum[r]);
      const vfloat g_target = splat(grad_target[r]);
      // The target's column inside this tile, or -1 (no lane matches): a lane compare instead of a branch.
      const int64_t t = targets[r] - first_class;
      const vint target = splat_int(t >= 0 && t < C ? static_cast<int32_t>(t) : -1);
      for (int64_t c = 0; c < C; c += kWidth) {
        const int64_t n = std::min<int64_t>(kWidth, C - c);
        const vfloat z = cap<kCapped>(load_partial(row + c, n) + load(bias + c), softcap, inverse_softcap);
        vfloat g = g_lse * exp(z - m) + g_sum + g_square * z;
        g += (lane_index() + static_cast<int32_t>(c)) == target ? g_target : splat(0.0f);
        if (kCapped) {
          const vfloat u = z * inverse_softcap;
          g *= 1.0f - u * u;
        }
        store_partial(row + c, g, n);
        if (column_sums != nullptr) {
          store(column_sums + c, load(column_sums + c) + (lanes_below(n) ? g : splat(0.0f)));
        }
      }
    }
  }
};


// ---------------------------------------------------------------------------------------------------------------
// Tile matmuls (leanops/tile_cpu.h).

// The inputs of one call, in fp32 (row-major hidden (N, D), weight (V, D); bias zero-padded to V + kWidth, all
// zeros without a bias).
struct Problem {
  const float* hidden;
  const float* weight;
  const float* bias;
  const int64_t* targets;
  int64_t tokens, classes, dim;
  bool has_bias;
  float softcap;  // > 0: capped
  float inverse_softcap;
};

// tile (R x C, leading dimension C) = hidden[i0 : i0 + R] @ weight[j0 : j0 + C]^T; returns the Tile of its epilogues.
Tile logits_tile(const Problem& p, int64_t i0, int64_t R, int64_t j0, int64_t C, float* tile) {
  cpu_tile::product_tile(p.hidden + i0 * p.dim, R, p.weight + j0 * p.dim, C, p.dim, tile);
  return Tile{tile, R, C, j0, p.bias + j0, p.softcap, p.inverse_softcap, p.targets + i0};
}

// count fp32 values rounded once to the output dtype.
void store_rounded(const float* source, int64_t count, at::ScalarType dtype, void* destination) {
  const bool supported = dispatch_float_dtype<float, c10::Half, c10::BFloat16>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(destination, source, count * sizeof(float));
    } else {
      auto* out = static_cast<T*>(destination);
      for (int64_t k = 0; k < count; ++k) out[k] = T(source[k]);  // round to nearest even
    }
  });
  TORCH_INTERNAL_ASSERT(supported, "unexpected dtype ", dtype);
}

// ---------------------------------------------------------------------------------------------------------------
// The ops.

// Targets must be class indices in [0, V) or -1. The kernels only compare them with class indices (no out-of-bounds
// access either way), but an index >= V, or another negative, would silently mean "no target": an error instead.
void check_target_values(const char* op, const at::Tensor& targets, int64_t classes) {
  const int64_t* data = targets.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < targets.numel(); ++n) {
    TORCH_CHECK_VALUE(data[n] >= -1 && data[n] < classes, "leanops.", op, ": argument 'targets' holds ", data[n],
                      " at index ", n, "; expected class indices in [0, ", classes, ") or -1 for no target");
  }
}

// Holds the fp32 copies a Problem points into.
struct ProblemStorage {
  at::Tensor hidden, weight, targets;
  std::vector<float> bias;
  Problem problem;

  ProblemStorage(const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
                 const at::Tensor& targets_in, double softcap)
      : hidden(float32_contiguous(hidden_in)), weight(float32_contiguous(weight_in)), targets(targets_in) {
    const int64_t classes = weight.size(0);
    bias.assign(classes + kWidth, 0.0f);
    const bool has_bias = bias_in.numel() > 0;
    if (has_bias) {
      const at::Tensor b = float32_contiguous(bias_in);
      std::memcpy(bias.data(), b.const_data_ptr<float>(), classes * sizeof(float));
    }
    const bool capped = softcap > 0;
    problem = Problem{hidden.const_data_ptr<float>(),
                      weight.const_data_ptr<float>(),
                      bias.data(),
                      targets.const_data_ptr<int64_t>(),
                      hidden.size(0),
                      classes,
                      hidden.size(1),
                      has_bias,
                      capped ? static_cast<float>(softcap) : 0.0f,
                      capped ? static_cast<float>(1.0 / softcap) : 0.0f};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_forward(const at::Tensor& hidden,
                                                                             const at::Tensor& weight,
                                                                             const at::Tensor& bias,
                                                                             const at::Tensor& targets,
                                                                             double softcap) {
  check_forward(hidden, weight, bias, targets);
  const at::Tensor targets_contiguous = targets.contiguous();
  check_target_values("linear_ce_forward", targets_contiguous, weight.size(0));
  const int64_t tokens = hidden.size(0);
  const auto options = hidden.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({tokens}, options);
  at::Tensor target_logit = at::empty({tokens}, options);
  at::Tensor logit_sum = at::empty({tokens}, options);
  at::Tensor logit_square_sum = at::empty({tokens}, options);
  if (tokens == 0) return {lse, target_logit, logit_sum, logit_square_sum};

  const ProblemStorage storage(hidden, weight, bias, targets_contiguous, softcap);
  const Problem& p = storage.problem;
  float* lse_out = lse.mutable_data_ptr<float>();
  float* target_out = target_logit.mutable_data_ptr<float>();
  float* sum_out = logit_sum.mutable_data_ptr<float>();
  float* square_out = logit_square_sum.mutable_data_ptr<float>();

  at::parallel_for(0, num_blocks(tokens, kTokenBlock), 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> tile(new float[kTokenBlock * kVocabBlock]);
    float running_max[kTokenBlock], picked[kTokenBlock];
    double running_sum[kTokenBlock], sums[kTokenBlock], squares[kTokenBlock];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kTokenBlock;
      const int64_t R = std::min(kTokenBlock, tokens - i0);
      std::fill_n(running_max, R, -kInfinity);
      std::fill_n(picked, R, 0.0f);
      std::fill_n(running_sum, R, 0.0);
      std::fill_n(sums, R, 0.0);
      std::fill_n(squares, R, 0.0);
      for (int64_t j0 = 0; j0 < p.classes; j0 += kVocabBlock) {
        const int64_t C = std::min(kVocabBlock, p.classes - j0);
        run_tile_epilogue<ForwardTile>(logits_tile(p, i0, R, j0, C, tile.get()), running_max, running_sum, sums,
                                       squares, picked);
      }
      for (int64_t r = 0; r < R; ++r) {
        lse_out[i0 + r] = static_cast<float>(running_max[r] + std::log(running_sum[r]));
        target_out[i0 + r] = picked[r];
        sum_out[i0 + r] = static_cast<float>(sums[r]);
        square_out[i0 + r] = static_cast<float>(squares[r]);
      }
    }
  });
  return {lse, target_logit, logit_sum, logit_square_sum};
}

// The per-token inputs of the backward, fp32 contiguous.
struct TokenGradients {
  at::Tensor lse, grad_lse, grad_target, grad_sum, grad_square_sum;

  // G in place of the tile's z (its tokens from i0); column sums when wanted.
  void tile_gradient(const Tile& tile, int64_t i0, float* column_sums) const {
    run_tile_epilogue<BackwardTile>(tile, lse.const_data_ptr<float>() + i0, grad_lse.const_data_ptr<float>() + i0,
                                    grad_target.const_data_ptr<float>() + i0, grad_sum.const_data_ptr<float>() + i0,
                                    grad_square_sum.const_data_ptr<float>() + i0, column_sums);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& targets,
    double softcap, const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& grad_target,
    const at::Tensor& grad_sum, const at::Tensor& grad_square_sum) {
  check_backward(hidden, weight, bias, targets, lse, grad_lse, grad_target, grad_sum, grad_square_sum);
  const at::Tensor targets_contiguous = targets.contiguous();
  check_target_values("linear_ce_backward", targets_contiguous, weight.size(0));
  const int64_t tokens = hidden.size(0), classes = weight.size(0), dim = hidden.size(1);
  const at::ScalarType dtype = hidden.scalar_type();
  at::Tensor grad_hidden = at::empty({tokens, dim}, hidden.options());
  at::Tensor grad_weight = at::empty({classes, dim}, weight.options());
  at::Tensor grad_bias = at::empty({bias.numel() > 0 ? classes : 0}, bias.options());

  const ProblemStorage storage(hidden, weight, bias, targets_contiguous, softcap);
  const Problem& p = storage.problem;
  const TokenGradients per_token{lse.contiguous(), grad_lse.contiguous(), grad_target.contiguous(),
                                 grad_sum.contiguous(), grad_square_sum.contiguous()};
  const size_t element = grad_hidden.element_size();
  char* grad_hidden_out = static_cast<char*>(grad_hidden.mutable_data_ptr());
  char* grad_weight_out = static_cast<char*>(grad_weight.mutable_data_ptr());
  char* grad_bias_out = static_cast<char*>(grad_bias.mutable_data_ptr());

  // Pass 1: grad_hidden, one token block per task, over the whole vocabulary.
  at::parallel_for(0, num_blocks(tokens, kTokenBlock), 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> tile(new float[kTokenBlock * kVocabBlock]);
    std::unique_ptr<float[]> accumulator(new float[kTokenBlock * dim]);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kTokenBlock;
      const int64_t R = std::min(kTokenBlock, tokens - i0);
      std::fill_n(accumulator.get(), R * dim, 0.0f);
      at::Tensor grad_block = wrap(accumulator.get(), R, dim);
      for (int64_t j0 = 0; j0 < classes; j0 += kVocabBlock) {
        const int64_t C = std::min(kVocabBlock, classes - j0);
        per_token.tile_gradient(logits_tile(p, i0, R, j0, C, tile.get()), i0, nullptr);
        if (dim > 0) {
          at::cpu::addmm_out(grad_block, grad_block, wrap(tile.get(), R, C), wrap(p.weight + j0 * dim, C, dim));
        }
      }
      store_rounded(accumulator.get(), R * dim, dtype, grad_hidden_out + i0 * dim * element);
    }
  });

  // Pass 2: grad_weight and grad_bias, one vocabulary block per task, over all tokens.
  at::parallel_for(0, num_blocks(classes, kVocabBlock), 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> tile(new float[kTokenBlock * kVocabBlock]);
    std::unique_ptr<float[]> accumulator(new float[kVocabBlock * dim]);
    alignas(32) float column_sums[kVocabBlock];
    double bias_total[kVocabBlock];
    float bias_rounded[kVocabBlock];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t j0 = block * kVocabBlock;
      const int64_t C = std::min(kVocabBlock, classes - j0);
      std::fill_n(accumulator.get(), C * dim, 0.0f);
      std::fill_n(bias_total, C, 0.0);
      at::Tensor grad_block = wrap(accumulator.get(), C, dim);
      for (int64_t i0 = 0; i0 < tokens; i0 += kTokenBlock) {
        const int64_t R = std::min(kTokenBlock, tokens - i0);
        const Tile logits = logits_tile(p, i0, R, j0, C, tile.get());
        if (p.has_bias) std::fill_n(column_sums, kVocabBlock, 0.0f);
        per_token.tile_gradient(logits, i0, p.has_bias ? column_sums : nullptr);
        if (dim > 0) {
          at::cpu::addmm_out(grad_block, grad_block, wrap_transposed(tile.get(), R, C),
                             wrap(p.hidden + i0 * dim, R, dim));
        }
        if (p.has_bias) {
          for (int64_t c = 0; c < C; ++c) bias_total[c] += column_sums[c];
        }
      }
      store_rounded(accumulator.get(), C * dim, dtype, grad_weight_out + j0 * dim * element);
      if (p.has_bias) {
        for (int64_t c = 0; c < C; ++c) bias_rounded[c] = static_cast<float>(bias_total[c]);
        store_rounded(bias_rounded, C, dtype, grad_bias_out + j0 * element);
      }
    }
  });
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cross_entropy
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CPU, m) {
  namespace k = leanops::cross_entropy;
  k::register_kernels(m, &k::linear_ce_forward, &k::linear_ce_backward);
}
