// Collage AdamW's fused step, shared by the CPU kernel (csrc/cpu/collage.cpp) and the CUDA kernel
// (csrc/cuda/collage.cu): the per-element step (host and device), the float32 scalars it takes, and the host-side
// argument checks. python/leanops/reference/collage.py states the math and is the oracle: every backend produces the
// same bits for every state tensor.
//
// float32 arithmetic follows the reference's order, one correctly rounded operation at a time (no FMA: the host is
// compiled with -ffp-contract=off and the device code uses the _rn intrinsics, which nvcc never contracts; division
// and square root are IEEE-rounded on both). "Arithmetic in F" is leanops::eft's: each operation in float32, rounded
// to F.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/TypeCast.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "leanops/eft.h"

namespace leanops {
namespace collage {

// ---------------------------------------------------------------------------------------------------------------
// float32 division and square root, correctly rounded (eft.h has +, -, *).
LEANOPS_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

LEANOPS_HOST_DEVICE float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return __builtin_sqrtf(x);
#endif
}

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
// first moment and root = sqrt_rn(step_moments(...)).
template <typename F>
LEANOPS_HOST_DEVICE Outcome step_update(float& theta, float& theta_lo, float m, float root, const Scalars& s) {
  using eft::add_rn;
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
  const float root = sqrt_rn(step_moments<F, Plus>(m, v, v_lo, g, s));
  return step_update<F>(theta, theta_lo, m, root, s);
}

// Whether an element's update was lost: nothing stored although something was intended.
LEANOPS_HOST_DEVICE bool lost_update(const Outcome& outcome) {
  return outcome.stored == 0.0f && outcome.delta != 0.0f;
}

}  // namespace collage
}  // namespace leanops

// ---------------------------------------------------------------------------------------------------------------
// Host side: scalars and argument checks.
namespace leanops {
namespace collage {

constexpr const char* kOp = "leanops.collage_adamw_step_";

inline std::string dtype_name(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

inline std::string item_name(const char* list, size_t index) {
  return std::string(list) + "[" + std::to_string(index) + "]";
}

// The float32 scalars of one call. F values are converted the way torch converts float64 to F on the CPU
// (c10::convert, as reference.collage.beta_pair's .to(dtype) does: through float32).
template <typename T>
Scalars make_scalars(double lr, double beta1, double beta2, double eps, double weight_decay, double bias_correction1,
                     double bias_correction2) {
  Scalars s;
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  const T high = c10::convert<T>(beta2);
  s.beta2_hi = static_cast<float>(high);
  s.beta2_lo = static_cast<float>(c10::convert<T>(beta2 - static_cast<double>(static_cast<float>(high))));
  s.eps = static_cast<float>(eps);
  s.weight_decay = static_cast<float>(weight_decay);
  s.neg_lr = -static_cast<float>(lr);
  s.bias_correction1 = static_cast<float>(bias_correction1);
  s.bias_correction2 = static_cast<float>(bias_correction2);
  return s;
}

// Byte span [begin, end) of a tensor's elements (a contiguous tensor, after check_arguments).
inline bool spans_intersect(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto a_begin = reinterpret_cast<uintptr_t>(a.const_data_ptr());
  const auto b_begin = reinterpret_cast<uintptr_t>(b.const_data_ptr());
  const auto a_end = a_begin + static_cast<uintptr_t>(a.numel() * a.element_size());
  const auto b_end = b_begin + static_cast<uintptr_t>(b.numel() * b.element_size());
  return a_begin < b_end && b_begin < a_end;
}

// Every check, before any work; a wrong dtype is a TypeError, anything else a ValueError, naming the argument.
inline void check_arguments(at::TensorList params, at::TensorList params_lo, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList exp_avg_sqs_lo, at::TensorList grads,
                            bool plus, const std::optional<at::Tensor>& metrics) {
  const size_t n = params.size();
  const struct {
    const char* name;
    at::TensorList list;
  } lists[] = {{"params_lo", params_lo}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
               {"exp_avg_sqs_lo", exp_avg_sqs_lo}, {"grads", grads}};
  for (const auto& entry : lists) {
    if (std::string(entry.name) == "exp_avg_sqs_lo" && !plus) {
      TORCH_CHECK_VALUE(entry.list.empty(), kOp, ": argument 'exp_avg_sqs_lo' must be empty when plus is False, got ",
                        entry.list.size(), " tensors");
      continue;
    }
    TORCH_CHECK_VALUE(entry.list.size() == n, kOp, ": argument '", entry.name, "' has ", entry.list.size(),
                      " tensors but 'params' has ", n);
  }
  if (n > 0) {
    const at::Tensor& first = params[0];
    TORCH_CHECK_TYPE(first.scalar_type() == at::kBFloat16 || first.scalar_type() == at::kHalf, kOp,
                     ": argument 'params[0]' has dtype ", dtype_name(first.scalar_type()),
                     "; the kernels support torch.bfloat16 and torch.float16");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& theta = params[i];
    const std::string theta_name = item_name("params", i);
    if (i > 0) {
      TORCH_CHECK_TYPE(theta.scalar_type() == params[0].scalar_type(), kOp, ": argument '", theta_name,
                       "' has dtype ", dtype_name(theta.scalar_type()), " but 'params[0]' has dtype ",
                       dtype_name(params[0].scalar_type()));
      TORCH_CHECK_VALUE(theta.device() == params[0].device(), kOp, ": argument '", theta_name, "' is on ",
                        theta.device(), " but 'params[0]' is on ", params[0].device());
    }
    TORCH_CHECK_VALUE(theta.is_contiguous(), kOp, ": argument '", theta_name, "' must be contiguous");
    const at::Tensor* members[6] = {&theta, &params_lo[i], &exp_avgs[i], &exp_avg_sqs[i],
                                    plus ? &exp_avg_sqs_lo[i] : nullptr, &grads[i]};
    const char* member_lists[6] = {"params", "params_lo", "exp_avgs", "exp_avg_sqs", "exp_avg_sqs_lo", "grads"};
    for (int k = 1; k < 6; ++k) {
      if (members[k] == nullptr) continue;
      const at::Tensor& t = *members[k];
      const std::string name = item_name(member_lists[k], i);
      TORCH_CHECK_TYPE(t.scalar_type() == theta.scalar_type(), kOp, ": argument '", name, "' has dtype ",
                       dtype_name(t.scalar_type()), " but '", theta_name, "' has dtype ",
                       dtype_name(theta.scalar_type()));
      TORCH_CHECK_VALUE(t.device() == theta.device(), kOp, ": argument '", name, "' is on ", t.device(), " but '",
                        theta_name, "' is on ", theta.device());
      TORCH_CHECK_VALUE(t.sizes() == theta.sizes(), kOp, ": argument '", name, "' has shape ", t.sizes(), " but '",
                        theta_name, "' has shape ", theta.sizes());
      TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": argument '", name, "' must be contiguous");
    }
    // The kernels read every operand of an element before writing any: state tensors of one index must not share
    // memory with each other or with the gradient.
    for (int a = 0; a < 6; ++a) {
      for (int b = a + 1; b < 6; ++b) {
        if (members[a] == nullptr || members[b] == nullptr) continue;
        TORCH_CHECK_VALUE(!spans_intersect(*members[a], *members[b]), kOp, ": arguments '",
                          item_name(member_lists[a], i), "' and '", item_name(member_lists[b], i),
                          "' must not share memory");
      }
    }
  }
  if (metrics.has_value()) {
    const at::Tensor& t = *metrics;
    TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, kOp, ": argument 'metrics' has dtype ",
                     dtype_name(t.scalar_type()), "; expected torch.float64");
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == 4, kOp, ": argument 'metrics' has shape ", t.sizes(),
                      "; expected (4,)");
    if (n > 0) {
      TORCH_CHECK_VALUE(t.device() == params[0].device(), kOp, ": argument 'metrics' is on ", t.device(),
                        " but 'params[0]' is on ", params[0].device());
    }
  }
}

// Calls fn(Format{}, Storage{}) for the (validated) storage dtype.
template <typename Fn>
void dispatch_storage(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kBFloat16) {
    fn(eft::BFloat16Format{}, c10::BFloat16{});
  } else {
    fn(eft::Float16Format{}, c10::Half{});
  }
}

}  // namespace collage
}  // namespace leanops
