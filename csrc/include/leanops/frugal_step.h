// FRUGAL's fused split step, shared by the CPU kernel (csrc/cpu/frugal.cpp) and the CUDA kernel
// (csrc/cuda/frugal.cu): the per-element step (host and device), its float32 scalars, and the host-side argument
// checks. python/leanops/reference/frugal.py states the math and is the oracle: every backend produces its bits.
//
// float32 operations follow the reference's order, one correctly rounded operation at a time (host code is compiled
// with -ffp-contract=off; device code uses the _rn intrinsics, which nvcc never contracts).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/TypeCast.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "leanops/collage_step.h"
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
  const float denominator = add_rn(collage::div_rn(collage::sqrt_rn(v), t.bias_correction2_root), s.eps);
  return eft::sub_rn(work, mul_rn(t.step_size, collage::div_rn(m, denominator)));
}

// The state-free part of one element: signSGD, SGD or nothing. sign(0) is 0 (and a NaN stays NaN), as torch.sign.
LEANOPS_HOST_DEVICE float state_free_step(float work, float g, const Scalars& s) {
  if (s.rule == kSignSGD) {
    const float sign = g > 0.0f ? 1.0f : (g < 0.0f ? -1.0f : g);
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

// Calls fn(T{}, G{}, F{}, std::bool_constant<Compensated>{}) for the parameter type T (float, c10::BFloat16,
// c10::Half) with its format F, the gradient type G (T or float) and the compensation of a (validated) call.
template <typename Fn>
void dispatch_step_types(at::ScalarType dtype, bool float_grads, bool compensated, Fn&& fn) {
  auto with_gradient_and_compensation = [&](auto param, auto format) {
    using T = decltype(param);
    if (float_grads) {
      compensated ? fn(T{}, float{}, format, std::true_type{}) : fn(T{}, float{}, format, std::false_type{});
    } else {
      compensated ? fn(T{}, T{}, format, std::true_type{}) : fn(T{}, T{}, format, std::false_type{});
    }
  };
  if (dtype == at::kFloat) {
    fn(float{}, float{}, eft::Float32Format{}, std::false_type{});
  } else if (dtype == at::kBFloat16) {
    with_gradient_and_compensation(c10::BFloat16{}, eft::BFloat16Format{});
  } else {
    with_gradient_and_compensation(c10::Half{}, eft::Float16Format{});
  }
}

// The matrix view of a tensor in COLUMNS / ROWS mode: positions has one entry per column / row.
struct MatrixShape {
  int64_t rows;
  int64_t columns;
  int64_t subspace;  // k: columns (COLUMNS) or rows (ROWS) of the moments
};

// ---------------------------------------------------------------------------------------------------------------
// Host side: argument checks.

constexpr const char* kOp = "leanops.frugal_split_step_";

// positions > 0 entries (checked), moments = the elements of exp_avgs.
inline MatrixShape matrix_shape(int64_t mode, int64_t numel, int64_t positions, int64_t moments) {
  const int64_t other = numel / positions;
  const int64_t subspace = other ? moments / other : 0;
  return mode == kColumns ? MatrixShape{other, positions, subspace} : MatrixShape{positions, other, subspace};
}

// Every check, before any work; a wrong dtype is a TypeError, anything else a ValueError, naming the argument.
// Positions' values are not read here (that would cost a device synchronisation): the optimizer builds them.
inline void check_arguments(at::TensorList params, at::TensorList params_lo, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList grads, at::TensorList positions,
                            at::TensorList addends, at::IntArrayRef modes, at::ArrayRef<double> step_sizes,
                            at::ArrayRef<double> bias_correction2_roots, int64_t state_free) {
  using collage::dtype_name;
  using collage::item_name;
  const size_t n = params.size();
  TORCH_CHECK_VALUE(params_lo.empty() || params_lo.size() == n, kOp, ": argument 'params_lo' has ", params_lo.size(),
                    " tensors; expected 0 (no compensation) or ", n);
  const struct {
    const char* name;
    size_t size;
  } lists[] = {{"exp_avgs", exp_avgs.size()}, {"exp_avg_sqs", exp_avg_sqs.size()}, {"grads", grads.size()},
               {"positions", positions.size()}, {"addends", addends.size()}, {"modes", modes.size()},
               {"step_sizes", step_sizes.size()}, {"bias_correction2_roots", bias_correction2_roots.size()}};
  for (const auto& entry : lists) {
    TORCH_CHECK_VALUE(entry.size == n, kOp, ": argument '", entry.name, "' has ", entry.size,
                      " entries but 'params' has ", n);
  }
  TORCH_CHECK_VALUE(state_free >= kSignSGD && state_free <= kNone, kOp,
                    ": argument 'state_free' must be 0 (signSGD), 1 (SGD) or 2 (none), got ", state_free);
  if (n == 0) return;
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
                   ": argument 'params[0]' has dtype ", dtype_name(dtype),
                   "; the kernels support torch.float32, torch.bfloat16 and torch.float16");
  TORCH_CHECK_VALUE(params_lo.empty() || dtype != at::kFloat, kOp,
                    ": argument 'params_lo' must be empty for float32 parameters (they need no compensation)");
  const at::ScalarType grad_dtype = grads[0].scalar_type();
  TORCH_CHECK_TYPE(grad_dtype == dtype || grad_dtype == at::kFloat, kOp, ": argument 'grads[0]' has dtype ",
                   dtype_name(grad_dtype), "; expected the parameters' ", dtype_name(dtype), " or torch.float32");
  const at::Device device = params[0].device();
  auto check_tensor = [&](const at::Tensor& t, const std::string& name, at::ScalarType expected, int64_t numel) {
    TORCH_CHECK_TYPE(t.scalar_type() == expected, kOp, ": argument '", name, "' has dtype ",
                     dtype_name(t.scalar_type()), "; expected ", dtype_name(expected));
    TORCH_CHECK_VALUE(t.device() == device, kOp, ": argument '", name, "' is on ", t.device(), " but 'params[0]' is on ",
                      device);
    TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": argument '", name, "' must be contiguous");
    if (numel >= 0) {
      TORCH_CHECK_VALUE(t.numel() == numel, kOp, ": argument '", name, "' has ", t.numel(), " elements; expected ",
                        numel);
    }
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& theta = params[i];
    const int64_t numel = theta.numel();
    check_tensor(theta, item_name("params", i), dtype, -1);
    if (!params_lo.empty()) check_tensor(params_lo[i], item_name("params_lo", i), dtype, numel);
    check_tensor(grads[i], item_name("grads", i), grad_dtype, numel);
    if (addends[i].numel() > 0) check_tensor(addends[i], item_name("addends", i), at::kFloat, numel);
    const int64_t mode = modes[i];
    TORCH_CHECK_VALUE(mode >= kAdamW && mode <= kRows, kOp, ": argument 'modes[", i,
                      "]' must be 0 (AdamW), 1 (free), 2 (columns) or 3 (rows), got ", mode);
    if (mode == kFree) continue;
    int64_t moments = numel;
    if (mode == kColumns || mode == kRows) {
      const at::Tensor& position = positions[i];
      check_tensor(position, item_name("positions", i), at::kInt, -1);
      const int64_t size = position.numel();
      TORCH_CHECK_VALUE(size > 0 && numel % size == 0, kOp, ": argument '", item_name("positions", i), "' has ",
                        size, " entries, which must divide ", item_name("params", i), "'s ", numel, " elements");
      const int64_t other = numel / size;
      moments = exp_avgs[i].numel();
      TORCH_CHECK_VALUE(other == 0 || moments % other == 0, kOp, ": argument '", item_name("exp_avgs", i), "' has ",
                        moments, " elements, not a whole number of ", mode == kColumns ? "columns" : "rows", " of ",
                        other);
      TORCH_CHECK_VALUE(other == 0 || moments / other <= size, kOp, ": argument '", item_name("exp_avgs", i),
                        "' holds more ", mode == kColumns ? "columns" : "rows", " than the parameter");
    }
    check_tensor(exp_avgs[i], item_name("exp_avgs", i), at::kFloat, moments);
    check_tensor(exp_avg_sqs[i], item_name("exp_avg_sqs", i), at::kFloat, moments);
    TORCH_CHECK_VALUE(!collage::spans_intersect(exp_avgs[i], exp_avg_sqs[i]) &&
                          !collage::spans_intersect(exp_avgs[i], theta) && !collage::spans_intersect(exp_avg_sqs[i], theta),
                      kOp, ": the moments and the parameter of index ", i, " must not share memory");
  }
}

}  // namespace frugal
}  // namespace leanops
