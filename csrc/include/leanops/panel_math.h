// The per-element and per-statistic math of the loss plans' fused steps (csrc/include/leanops/contrastive_plan_host.h,
// csrc/include/leanops/cross_entropy_plan_host.h), host+device like eft.h: the CPU steps (csrc/cpu/contrastive.cpp,
// csrc/cpu/cross_entropy.cpp) run it on floats and on vector_cpu.h's 8-lane vectors, the CUDA steps
// (csrc/cuda/contrastive.cu, csrc/cuda/cross_entropy.cu) on floats. Exponentials come from the caller (each device
// has its own: vector polynomials on the CPU, expf on the GPU); what is here fixes the formulas and their order of
// operations, so that both providers round alike.
//
// The gradient formulas are templates over F (float, or an 8-lane vector) and Mask (bool, or the vector's lane mask):
// `mask ? a : b` selects per lane for vectors.
#pragma once

#include <cmath>
#include <cstdint>

#include "leanops/eft.h"

#if defined(__GNUC__) && !defined(__CUDACC__)
// The CPU steps instantiate the templates below with 32-byte vectors; as in vector_cpu.h, every such function is
// force-inlined, so GCC's note on the ABI of returning them without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace leanops {
namespace panel_math {

constexpr float kInfinity = INFINITY;

// ---------------------------------------------------------------------------------------------------------------
// Scalars.

LEANOPS_HOST_DEVICE float exp_float(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

// max(a, b), but NaN when either is NaN (fmaxf would drop a NaN logit, and a NaN input must reach the output).
LEANOPS_HOST_DEVICE float max_with_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// A set of logits as (max, sum of exp(logit - max)); max = -inf with sum = 0 is the empty set. Merges the set
// (max_b, sum_b) into (max_a, sum_a): the running log-sum-exp of a row across panels (or of a column across row
// blocks), without overflow at any logit size. A NaN in either set makes the merged sum NaN.
LEANOPS_HOST_DEVICE void merge_log_sum_exp(float& max_a, float& sum_a, float max_b, float sum_b) {
  const float merged = max_with_nan(max_a, max_b);
  if (merged == -kInfinity) return;  // both empty (exp(-inf - -inf) would be NaN)
  const float part_a = max_a == -kInfinity ? 0.0f : sum_a * exp_float(max_a - merged);
  const float part_b = max_b == -kInfinity ? 0.0f : sum_b * exp_float(max_b - merged);
  sum_a = part_a + part_b;
  max_a = merged;
}

// (hi, lo) += value, an unevaluated float32 sum hi + lo that carries the rounding error of every addition in lo
// (eft::grow): the per-token sums of the cross-entropy plan (sum z', sum z'^2) add one partial per panel and lose
// nothing to their number. Once a sum is not finite, it continues as a plain sum (inf stays inf, NaN stays NaN).
LEANOPS_HOST_DEVICE void compensated_add(float& hi, float& lo, float value) {
  const eft::Pair sum = eft::grow<eft::Float32Format>(hi, lo, value);
  if (sum.hi - sum.hi == 0.0f) {
    hi = sum.hi;
    lo = sum.lo;
  } else {
    hi = hi + value;
  }
}

// float16 gradient panels (CUDA) hold G * scale, scale = 2^k the power of two that puts a bound on |G| in
// [2^(kGradientScaleExponent - 1), 2^kGradientScaleExponent): below float16's largest value (65504) with room for
// rounding in the bound, and entries down to 2^-38 of the bound stay above float16's smallest subnormal. The GEMMs'
// float32 results are multiplied by the inverse afterwards; both scalings are exact.
constexpr int kGradientScaleExponent = 14;

struct GradientScale {
  float scale;
  float inverse;
};

// The scale for a bound on |G|; 1 when the bound is 0, infinite or NaN (then G is too: nothing to protect).
LEANOPS_HOST_DEVICE GradientScale gradient_scale(float bound) {
  if (!(bound > 0.0f) || !(bound - bound == 0.0f)) return {1.0f, 1.0f};
  int exponent = 0;
  frexpf(bound, &exponent);  // bound = m 2^exponent, m in [1/2, 1)
  int k = kGradientScaleExponent - exponent;
  k = k < -126 ? -126 : (k > 126 ? 126 : k);
  return {ldexpf(1.0f, k), ldexpf(1.0f, -k)};
}

// ---------------------------------------------------------------------------------------------------------------
// Gradients with respect to one entry of the panel (G = dL/dS for the contrastive losses, dL/dz for linear
// cross-entropy), from the probabilities the caller computed with its own exponential.

// CLIP: G[i, j] = row_coefficient[i] p[i, j] + column_coefficient[j] q[i, j], where a coefficient is weight * scale
// of its row (column), p the row softmax exp(s[i] S - row_lse[i]) and q the column softmax exp(s[j] S - col_lse[j]).
template <typename F>
LEANOPS_HOST_DEVICE F clip_gradient(const F& row_coefficient, const F& p, const F& column_coefficient, const F& q) {
  return row_coefficient * p + column_coefficient * q;
}

// SigLIP: D[i, j] = -row_weight[i] label sigmoid(-label z), label = +1 (same_group) or -1, given
// sigmoid_of_signed = sigmoid(-label z): -w sigmoid(-z) for a positive pair, +w sigmoid(z) for a negative one.
template <typename F, typename Mask>
LEANOPS_HOST_DEVICE F siglip_logit_gradient(const Mask& same_group, const F& row_weight, const F& sigmoid_of_signed) {
  return same_group ? -row_weight * sigmoid_of_signed : row_weight * sigmoid_of_signed;
}

// Linear cross-entropy, before the softcap's derivative: (grad_lse p + grad_sum) + 2 grad_square_sum z', plus
// grad_target where the entry is the token's target (p = exp(z' - lse)); the reference's order of operations.
// square_term = (grad_square_sum != 0), per token: the z' term is left out where the loss does not use the sum of
// squares, so that a masked class (z' = -inf: a -inf bias) gets the gradient 0 rather than 0 * inf = NaN.
template <typename F, typename Mask>
LEANOPS_HOST_DEVICE F linear_ce_logit_gradient(const F& capped_logit, const F& probability, const F& grad_lse,
                                               const F& grad_sum, bool square_term, const F& twice_grad_square_sum,
                                               const Mask& is_target, const F& grad_target) {
  F gradient = grad_lse * probability + grad_sum;
  if (square_term) gradient = gradient + twice_grad_square_sum * capped_logit;
  return gradient + (is_target ? grad_target : F{});
}

// dz'/dz of the softcap z' = c tanh(z / c): 1 - (z' / c)^2, with inverse_softcap = 1 / c.
template <typename F>
LEANOPS_HOST_DEVICE F softcap_derivative(const F& capped_logit, float inverse_softcap) {
  const F ratio = capped_logit * inverse_softcap;
  return 1.0f - ratio * ratio;
}

}  // namespace panel_math
}  // namespace leanops
