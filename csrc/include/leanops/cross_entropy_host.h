// Host-side argument checks of the chunked linear cross-entropy ops (linear_ce_forward, linear_ce_backward), shared
// by the CPU and CUDA kernels, and their registration. Every check runs before any work and names the argument: a
// wrong dtype is a TypeError (TORCH_CHECK_TYPE), a wrong shape or device a ValueError (TORCH_CHECK_VALUE).
// csrc/ops.cpp states the contract of both ops.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "leanops/common_host.h"

namespace leanops {
namespace cross_entropy {

// hidden (N, D), weight (V, D), bias (V,) or (0,), all of one kernel dtype on one device, contiguous;
// targets (N,) int64.
inline void check_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& targets) {
  TORCH_CHECK_TYPE(is_float_dtype(hidden.scalar_type()), "leanops.", op, ": argument 'hidden' has dtype ",
                   dtype_name(hidden.scalar_type()),
                   "; the kernels support torch.bfloat16, torch.float16 and torch.float32");
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), "leanops.", op, ": argument 'weight' has dtype ",
                   dtype_name(weight.scalar_type()), " but 'hidden' has dtype ", dtype_name(hidden.scalar_type()));
  TORCH_CHECK_TYPE(bias.scalar_type() == hidden.scalar_type(), "leanops.", op, ": argument 'bias' has dtype ",
                   dtype_name(bias.scalar_type()), " but 'hidden' has dtype ", dtype_name(hidden.scalar_type()));
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, "leanops.", op, ": argument 'targets' has dtype ",
                   dtype_name(targets.scalar_type()), "; expected torch.int64");
  auto check_device = [&](const char* name, const at::Tensor& tensor) {
    TORCH_CHECK_VALUE(tensor.device() == hidden.device(), "leanops.", op, ": argument '", name, "' is on ",
                      tensor.device(), " but 'hidden' is on ", hidden.device());
  };
  check_device("weight", weight);
  check_device("bias", bias);
  check_device("targets", targets);
  TORCH_CHECK_VALUE(hidden.dim() == 2, "leanops.", op, ": argument 'hidden' must be 2-D (N, D), got shape ",
                    hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(1), "leanops.", op,
                    ": argument 'weight' must be (V, D) with D = ", hidden.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "leanops.", op, ": argument 'weight' has no classes (V = 0)");
  TORCH_CHECK_VALUE(bias.dim() == 1 && (bias.size(0) == 0 || bias.size(0) == weight.size(0)), "leanops.", op,
                    ": argument 'bias' must be (V,) = (", weight.size(0), ",) or empty (0,) for none, got shape ",
                    bias.sizes());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == hidden.size(0), "leanops.", op,
                    ": argument 'targets' has shape ", targets.sizes(), "; expected (", hidden.size(0),
                    ",), one class index (or -1) per row of 'hidden'");
}

// A per-token float32 (N,) tensor beside `hidden` (lse and the gradients of the four statistics).
inline void check_per_token(const char* op, const char* name, const at::Tensor& t, const at::Tensor& hidden) {
  check_per_row(op, name, t, "hidden", hidden);
}

inline void check_forward(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& targets) {
  check_inputs("linear_ce_forward", hidden, weight, bias, targets);
}

inline void check_backward(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& grad_lse,
                           const at::Tensor& grad_target, const at::Tensor& grad_sum,
                           const at::Tensor& grad_square_sum) {
  const char* op = "linear_ce_backward";
  check_inputs(op, hidden, weight, bias, targets);
  check_per_token(op, "lse", lse, hidden);
  check_per_token(op, "grad_lse", grad_lse, hidden);
  check_per_token(op, "grad_target", grad_target, hidden);
  check_per_token(op, "grad_sum", grad_sum, hidden);
  check_per_token(op, "grad_square_sum", grad_square_sum, hidden);
}

// Registers one backend's kernels of the two ops; called from TORCH_LIBRARY_IMPL(leanops, <dispatch key>, m).
template <typename Forward, typename Backward>
void register_kernels(torch::Library& m, Forward* forward, Backward* backward) {
  m.impl("linear_ce_forward", forward);
  m.impl("linear_ce_backward", backward);
}

}  // namespace cross_entropy
}  // namespace leanops
