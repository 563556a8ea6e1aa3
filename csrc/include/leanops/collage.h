// Collage AdamW's fused step, shared by the CPU kernel (csrc/cpu/collage.cpp) and the CUDA kernel
// (csrc/cuda/collage.cu): the per-element step (host and device) and the float32 scalars it takes; the host side (the
// scalars of a call, the argument checks) is in leanops/collage_host.h. python/leanops/reference/collage.py states
// the math and is the oracle: every backend produces the same bits for every state tensor.
//
// float32 arithmetic follows the reference's order, one correctly rounded operation at a time (no FMA: the host is
// compiled with -ffp-contract=off and the device code uses the _rn intrinsics, which nvcc never contracts; division
// and square root are IEEE-rounded on both). "Arithmetic in F" is leanops::eft's: each operation in float32, rounded
// to F.
#pragma once

#include "leanops/eft.h"

namespace leanops {
namespace collage {

// The step's float32 scalars, each the float32 that torch.tensor(value, dtype=torch.float32) holds; beta2_hi and
// beta2_lo are the pair (F(beta2), F(beta2 - F(beta2))) of the storage format (reference.collage.beta_pair).
struct Scalars {
  float beta1;
  float one_minus_beta1;  // (float)(1.0 - beta1): the difference is taken in float64
  float beta2;
  float one_minus_beta2;
  float beta2_hi;
  float beta2_lo;
  float eps;
  float weight_decay;
  float neg_lr;  // -(float)lr
  float bias_correction1;
  float bias_correction2;
};

// TwoProd for the 16-bit formats: the float32 product of two F values is exact (2p <= 24 significant bits, and the
// exponent range of float32 covers every product of two float16 subnormals), so its difference from p is the
// rounding error, computed exactly in float32. The same bits as eft::two_prod's fma(a, b, -p) without needing an FMA
// unit on the host.
template <typename F>
LEANOPS_HOST_DEVICE eft::Pair two_prod_exact(float a, float b) {
  static_assert(2 * F::significand_bits <= 24, "the float32 product of two F values must be exact");
  const float exact = eft::mul_rn(a, b);
  const float p = F::round(exact);
  return {p, F::round(eft::sub_rn(exact, p))};
}

// eft::scale with two_prod_exact: (hi + lo) * (b_hi + b_lo), dropping lo * b_lo (reference mcf.scale).
template <typename F>
LEANOPS_HOST_DEVICE eft::Pair scale(float hi, float lo, float b_hi, float b_lo) {
  const eft::Pair product = two_prod_exact<F>(hi, b_hi);
  const float cross = eft::add<F>(eft::mul<F>(hi, b_lo), eft::mul<F>(lo, b_hi));
  return eft::fast_two_sum<F>(product.hi, eft::add<F>(product.lo, cross));
}

// What the telemetry needs of one element: the stored change s and the intended update delta (float32).
struct Outcome {
  float stored;
  float delta;
};

// The step in two halves around its square root, so that a CPU loop can take the square roots of a tile in one
// vector instruction (a libm sqrtf call, which may set errno, keeps GCC from vectorising a loop that contains it).
//
// First half: the moments. m, v, v_lo (unused unless Plus) are F values held as float32, updated in place (to F
// values); g is the F gradient. Returns second / c2, whose square root the second half takes. Reference lines quoted.
template <typename F, bool Plus>
LEANOPS_HOST_DEVICE float step_moments(float& m, float& v, float& v_lo, float g, const Scalars& s) {
  using eft::add_rn;
  using eft::div_rn;
  using eft::mul_rn;
  // m32 = beta1 * m + (1 - beta1) * g; m = F(m32)
  m = F::round(add_rn(mul_rn(s.beta1, m), mul_rn(s.one_minus_beta1, g)));
  // square_update = (1 - beta2) * (g * g)
  const float square_update = mul_rn(s.one_minus_beta2, mul_rn(g, g));
  float second;
  if (Plus) {
    // (v, v_lo) = scale((v, v_lo), (b_hi, b_lo)); (v, v_lo) = grow((v, v_lo), F(square_update))
    const eft::Pair scaled = scale<F>(v, v_lo, s.beta2_hi, s.beta2_lo);
    const eft::Pair grown = eft::grow<F>(scaled.hi, scaled.lo, F::round(square_update));
    v = grown.hi;
    v_lo = grown.lo;
    second = add_rn(v, v_lo);
  } else {
    // v = F(beta2 * v + square_update)
    v = F::round(add_rn(mul_rn(s.beta2, v), square_update));
    second = v;
  }
  // second / c2 (under the square root of: denominator = sqrt(second / c2) + eps)
  return div_rn(second, s.bias_correction2);
}

// Second half: the parameter pair. theta, theta_lo are F values held as float32, updated in place; m is the updated
// first moment and root = eft::sqrt_rn(step_moments(...)).
template <typename F>
LEANOPS_HOST_DEVICE Outcome step_update(float& theta, float& theta_lo, float m, float root, const Scalars& s) {
  using eft::add_rn;
  using eft::div_rn;
  using eft::mul_rn;
  // first = m / c1; denominator = sqrt(second / c2) + eps
  const float first = div_rn(m, s.bias_correction1);
  const float denominator = add_rn(root, s.eps);
  // before = theta + theta_lo; delta = -lr * (first / denominator + weight_decay * before)
  const float before = add_rn(theta, theta_lo);
  const float delta = mul_rn(s.neg_lr, add_rn(div_rn(first, denominator), mul_rn(s.weight_decay, before)));
  // (theta, theta_lo) = grow((theta, theta_lo), F(delta))
  const eft::Pair updated = eft::grow<F>(theta, theta_lo, F::round(delta));
  theta = updated.hi;
  theta_lo = updated.lo;
  // stored = (theta' + theta_lo') - before
  return {eft::sub_rn(add_rn(theta, theta_lo), before), delta};
}

// One element's whole step (v_lo unused unless Plus).
template <typename F, bool Plus>
LEANOPS_HOST_DEVICE Outcome step(float& theta, float& theta_lo, float& m, float& v, float& v_lo, float g,
                                 const Scalars& s) {
  const float root = eft::sqrt_rn(step_moments<F, Plus>(m, v, v_lo, g, s));
  return step_update<F>(theta, theta_lo, m, root, s);
}

// Whether an element's update was lost: nothing stored although something was intended.
LEANOPS_HOST_DEVICE bool lost_update(const Outcome& outcome) {
  return outcome.stored == 0.0f && outcome.delta != 0.0f;
}

}  // namespace collage
}  // namespace leanops
