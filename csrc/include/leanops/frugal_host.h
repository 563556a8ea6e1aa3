// The host side of FRUGAL's fused split step, shared by the CPU kernel (csrc/cpu/frugal.cpp) and the CUDA kernel
// (csrc/cuda/frugal.cu): the argument checks, the op's entry point and the dispatch to the step's types. The
// per-element step is in leanops/frugal.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "leanops/common_host.h"
#include "leanops/frugal.h"

namespace leanops {
namespace frugal {

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
    TORCH_CHECK_VALUE(!spans_intersect(exp_avgs[i], exp_avg_sqs[i]) && !spans_intersect(exp_avgs[i], theta) &&
                          !spans_intersect(exp_avg_sqs[i], theta),
                      kOp, ": the moments and the parameter of index ", i, " must not share memory");
  }
}

// One call of the op with at least one tensor, its arguments checked: the lists (csrc/ops.cpp states the schema) and
// the float32 scalars.
struct Call {
  at::TensorList params, params_lo, exp_avgs, exp_avg_sqs, grads, positions, addends;
  at::IntArrayRef modes;
  at::ArrayRef<double> step_sizes, bias_correction2_roots;
  Scalars scalars;
};

// The op leanops::frugal_split_step_ on one backend, whose Run steps a Call: every check comes first, before any
// work, and a call without tensors does nothing. Each backend registers &split_step<its Run>.
template <void (*Run)(const Call&)>
void split_step(at::TensorList params, at::TensorList params_lo, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList grads, at::TensorList positions, at::TensorList addends, at::IntArrayRef modes,
                at::ArrayRef<double> step_sizes, at::ArrayRef<double> bias_correction2_roots, double beta1,
                double beta2, double eps, double decay, double free_lr, int64_t state_free) {
  check_arguments(params, params_lo, exp_avgs, exp_avg_sqs, grads, positions, addends, modes, step_sizes,
                  bias_correction2_roots, state_free);
  if (params.empty()) return;
  Run(Call{params, params_lo, exp_avgs, exp_avg_sqs, grads, positions, addends, modes, step_sizes,
           bias_correction2_roots, make_scalars(beta1, beta2, eps, decay, free_lr, state_free)});
}

// Calls fn(T{}, G{}, F{}, std::bool_constant<Compensated>{}) for the call's parameter type T (float, c10::BFloat16,
// c10::Half) with its format F, the gradient type G (T or float) and the call's compensation.
template <typename Fn>
void dispatch_step_types(const Call& call, Fn&& fn) {
  const at::ScalarType dtype = call.params[0].scalar_type();
  const bool float_grads = call.grads[0].scalar_type() == at::kFloat && dtype != at::kFloat;
  const bool compensated = !call.params_lo.empty();
  const bool supported = dispatch_float_dtype<float, c10::Half, c10::BFloat16>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using F = storage_format_t<T>;
    if constexpr (std::is_same_v<T, float>) {
      fn(float{}, float{}, F{}, std::false_type{});  // float32 parameters: no compensation, float32 gradients
    } else if (float_grads) {
      compensated ? fn(T{}, float{}, F{}, std::true_type{}) : fn(T{}, float{}, F{}, std::false_type{});
    } else {
      compensated ? fn(T{}, T{}, F{}, std::true_type{}) : fn(T{}, T{}, F{}, std::false_type{});
    }
  });
  TORCH_INTERNAL_ASSERT(supported, kOp, ": unexpected dtype ", dtype_name(dtype));
}

}  // namespace frugal
}  // namespace leanops
