// The host side of Collage AdamW's fused step, shared by the CPU kernel (csrc/cpu/collage.cpp) and the CUDA kernel
// (csrc/cuda/collage.cu): the float32 scalars of a call, the argument checks and the storage dtype dispatch. The
// per-element step is in leanops/collage.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/TypeCast.h>

#include <cstdint>
#include <optional>
#include <string>

#include "leanops/collage.h"
#include "leanops/common_host.h"

namespace leanops {
namespace collage {

constexpr const char* kOp = "leanops.collage_adamw_step_";

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

// Calls fn(Format{}, Storage{}) for the (validated) storage dtype: bfloat16 or float16.
template <typename Fn>
void dispatch_storage(at::ScalarType dtype, Fn&& fn) {
  const bool supported = dispatch_float_dtype<void, c10::Half, c10::BFloat16>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    fn(storage_format_t<T>{}, T{});
  });
  TORCH_INTERNAL_ASSERT(supported, kOp, ": unexpected storage dtype ", dtype_name(dtype));
}

}  // namespace collage
}  // namespace leanops
