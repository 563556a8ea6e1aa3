// FRUGAL's fused split step, shared by the CPU kernel (csrc/cpu/frugal.cpp) and the CUDA kernel
// (csrc/cuda/frugal.cu): the per-element step (host and device) and its float32 scalars; the host side (the op's
// argument checks and dispatch) is in leanops/frugal_host.h. python/leanops/reference/frugal.py states the math and
// is the oracle: every backend produces its bits.
//
// float32 operations follow the reference's order, one correctly rounded operation at a time (host code is compiled
// with -ffp-contract=off; device code uses the _rn intrinsics, which nvcc never contracts).
#pragma once

#include <cstdint>

#include "leanops/eft.h"

namespace leanops {
namespace frugal {

// A tensor's mode (reference.frugal: ADAMW, FREE, COLUMNS, ROWS).
enum Mode : int64_t { kAdamW = 0, kFree = 1, kColumns = 2, kRows = 3 };
// The state-free rule (reference.frugal: SIGNSGD, SGD, NONE).
enum Rule : int64_t { kSignSGD = 0, kSGD = 1, kNone = 2 };

// The call's float32 scalars, each as torch.tensor(value, dtype=torch.float32) holds it.
struct Scalars {
  float beta1;
  float one_minus_beta1;  // (float)(1.0 - beta1): the difference is taken in float64
  float beta2;
  float one_minus_beta2;
  float eps;
  float decay;    // (float)(1 - lr * weight_decay)
  float free_lr;  // (float)(lr * state_free_lr_scale)
  int64_t rule;
};

// A tensor's own scalars (its step count differs from its neighbours' after a reset).
struct TensorScalars {
  float step_size;              // (float)(lr * state_full_lr_scale / (1 - beta1^t))
  float bias_correction2_root;  // (float)sqrt(1 - beta2^t)
};

inline Scalars make_scalars(double beta1, double beta2, double eps, double decay, double free_lr, int64_t rule) {
  return {static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
          static_cast<float>(1.0 - beta2), static_cast<float>(eps), static_cast<float>(decay),
          static_cast<float>(free_lr), rule};
}

// The AdamW part of one state-full element: m, v updated in place; returns the new work value.
LEANOPS_HOST_DEVICE float state_full_step(float work, float& m, float& v, float g, const Scalars& s,
                                          const TensorScalars& t) {
  using eft::add_rn;
  using eft::mul_rn;
  // m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * (g * g)
  m = add_rn(mul_rn(s.beta1, m), mul_rn(s.one_minus_beta1, g));
  v = add_rn(mul_rn(s.beta2, v), mul_rn(s.one_minus_beta2, mul_rn(g, g)));
  // work = work - step_size * (m / (sqrt(v) / bias_correction2_root + eps))
  const float denominator = add_rn(eft::div_rn(eft::sqrt_rn(v), t.bias_correction2_root), s.eps);
  return eft::sub_rn(work, mul_rn(t.step_size, eft::div_rn(m, denominator)));
}

// signSGD's sign (reference.frugal.sign): +-1, +0 for +-0, and NaN for NaN, so that a NaN gradient reaches the
// parameter (torch.sign would give 0) on every provider.
LEANOPS_HOST_DEVICE float sign_keeping_nan(float g) {
  return g > 0.0f ? 1.0f : (g < 0.0f ? -1.0f : (g != g ? g : 0.0f));
}

// The state-free part of one element: signSGD, SGD or nothing.
LEANOPS_HOST_DEVICE float state_free_step(float work, float g, const Scalars& s) {
  if (s.rule == kSignSGD) {
    const float sign = sign_keeping_nan(g);
    return eft::sub_rn(work, eft::mul_rn(s.free_lr, sign));
  }
  if (s.rule == kSGD) return eft::sub_rn(work, eft::mul_rn(s.free_lr, g));
  return work;
}

// The step of one element. theta (and theta_lo when Compensated) are F values held as float32, updated in place;
// m, v are read and written only when state_full. F is eft::Float32Format for float32 parameters.
template <typename F, bool Compensated>
LEANOPS_HOST_DEVICE void step(float& theta, float& theta_lo, bool state_full, float& m, float& v, float g,
                              bool has_addend, float addend, const Scalars& s, const TensorScalars& t) {
  // before = theta (+ theta_lo); work = before * decay
  const float before = Compensated ? eft::add_rn(theta, theta_lo) : theta;
  float work = eft::mul_rn(before, s.decay);
  if (state_full) work = state_full_step(work, m, v, g, s, t);
  if (has_addend) work = eft::add_rn(work, addend);
  if (!state_full) work = state_free_step(work, g, s);
  if (Compensated) {
    // (theta, theta_lo) = Grow((theta, theta_lo), F(work - before))
    const eft::Pair grown = eft::grow<F>(theta, theta_lo, F::round(eft::sub_rn(work, before)));
    theta = grown.hi;
    theta_lo = grown.lo;
  } else {
    theta = F::round(work);
  }
}

// One tensor's operands, typed: parameter type T and gradient type G (c10::BFloat16, c10::Half or float); theta_lo,
// m, v, positions and addend may be null where the tensor's mode or the call does not use them.
template <typename T, typename G>
struct Operands {
  T* theta;
  T* theta_lo;
  float* m;
  float* v;
  const G* g;
  const int32_t* positions;
  const float* addend;
};

// Element e of a tensor: loaded, stepped, stored. m[moment], v[moment] are touched only when state_full.
template <typename T, typename G, typename F, bool Compensated>
LEANOPS_HOST_DEVICE void step_element(const Operands<T, G>& o, int64_t e, bool state_full, int64_t moment,
                                      const Scalars& s, const TensorScalars& t) {
  float theta = static_cast<float>(o.theta[e]);
  float theta_lo = Compensated ? static_cast<float>(o.theta_lo[e]) : 0.0f;
  float m = state_full ? o.m[moment] : 0.0f;
  float v = state_full ? o.v[moment] : 0.0f;
  const bool has_addend = o.addend != nullptr;
  step<F, Compensated>(theta, theta_lo, state_full, m, v, static_cast<float>(o.g[e]), has_addend,
                       has_addend ? o.addend[e] : 0.0f, s, t);
  // theta and theta_lo are F values: the conversions back to T are exact.
  o.theta[e] = static_cast<T>(theta);
  if (Compensated) o.theta_lo[e] = static_cast<T>(theta_lo);
  if (state_full) {
    o.m[moment] = m;
    o.v[moment] = v;
  }
}

// The matrix view of a tensor in COLUMNS / ROWS mode: positions has one entry per column / row.
struct MatrixShape {
  int64_t rows;
  int64_t columns;
  int64_t subspace;  // k: columns (COLUMNS) or rows (ROWS) of the moments
};

}  // namespace frugal
}  // namespace leanops
