// Host-side argument checks of the blockwise contrastive ops (clip_forward, clip_backward, siglip_forward,
// siglip_backward), shared by the CPU and CUDA kernels, and their registration. Every check runs before any work and
// names the argument: a wrong dtype is a TypeError (TORCH_CHECK_TYPE), a wrong shape or device a ValueError
// (TORCH_CHECK_VALUE).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "leanops/common_host.h"

namespace leanops {
namespace contrastive {

// image and text: (B, D) features of one kernel dtype on one device.
inline void check_features(const char* op, const at::Tensor& image, const at::Tensor& text) {
  TORCH_CHECK_TYPE(is_float_dtype(image.scalar_type()), "leanops.", op, ": argument 'image' has dtype ",
                   dtype_name(image.scalar_type()),
                   "; the kernels support torch.bfloat16, torch.float16 and torch.float32");
  TORCH_CHECK_TYPE(text.scalar_type() == image.scalar_type(), "leanops.", op, ": argument 'text' has dtype ",
                   dtype_name(text.scalar_type()), " but 'image' has dtype ", dtype_name(image.scalar_type()));
  TORCH_CHECK_VALUE(text.device() == image.device(), "leanops.", op, ": argument 'text' is on ", text.device(),
                    " but 'image' is on ", image.device());
  TORCH_CHECK_VALUE(image.dim() == 2, "leanops.", op, ": argument 'image' must be 2-D (batch, dim), got shape ",
                    image.sizes());
  TORCH_CHECK_VALUE(text.sizes() == image.sizes(), "leanops.", op, ": argument 'text' has shape ", text.sizes(),
                    " but 'image' has shape ", image.sizes());
}

// A 0-dim float32 tensor beside `image` (siglip's scale and bias).
inline void check_scalar(const char* op, const char* name, const at::Tensor& t, const at::Tensor& image) {
  check_float32_beside(op, name, t, "image", image);
  TORCH_CHECK_VALUE(t.dim() == 0, "leanops.", op, ": argument '", name, "' has shape ", t.sizes(),
                    "; expected a 0-dim tensor");
}

// A per-anchor statistic (scale, row_lse, col_lse, row_weight, col_weight): float32 of shape (B,) beside `image`.
inline void check_per_anchor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& image) {
  check_per_row(op, name, t, "image", image);
}

// Group ids (siglip's labels: +1 where two rows share a group): int64 of shape (B,) beside `image`.
inline void check_groups(const char* op, const at::Tensor& groups, const at::Tensor& image) {
  TORCH_CHECK_TYPE(groups.scalar_type() == at::kLong, "leanops.", op, ": argument 'groups' has dtype ",
                   dtype_name(groups.scalar_type()), "; expected torch.int64");
  TORCH_CHECK_VALUE(groups.device() == image.device(), "leanops.", op, ": argument 'groups' is on ",
                    groups.device(), " but 'image' is on ", image.device());
  TORCH_CHECK_VALUE(groups.dim() == 1 && groups.size(0) == image.size(0), "leanops.", op,
                    ": argument 'groups' has shape ", groups.sizes(), "; expected (", image.size(0),
                    ",), one group id per row of 'image'");
}

inline void check_clip_forward(const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale) {
  check_features("clip_forward", image, text);
  check_per_anchor("clip_forward", "scale", scale, image);
}

inline void check_clip_backward(const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale,
                                const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& row_weight,
                                const at::Tensor& col_weight) {
  check_features("clip_backward", image, text);
  check_per_anchor("clip_backward", "scale", scale, image);
  check_per_anchor("clip_backward", "row_lse", row_lse, image);
  check_per_anchor("clip_backward", "col_lse", col_lse, image);
  check_per_anchor("clip_backward", "row_weight", row_weight, image);
  check_per_anchor("clip_backward", "col_weight", col_weight, image);
}

inline void check_siglip_forward(const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale,
                                 const at::Tensor& bias, const at::Tensor& groups) {
  check_features("siglip_forward", image, text);
  check_scalar("siglip_forward", "scale", scale, image);
  check_scalar("siglip_forward", "bias", bias, image);
  check_groups("siglip_forward", groups, image);
}

inline void check_siglip_backward(const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale,
                                  const at::Tensor& bias, const at::Tensor& groups, const at::Tensor& row_weight) {
  check_features("siglip_backward", image, text);
  check_scalar("siglip_backward", "scale", scale, image);
  check_scalar("siglip_backward", "bias", bias, image);
  check_groups("siglip_backward", groups, image);
  check_per_anchor("siglip_backward", "row_weight", row_weight, image);
}

// Registers one backend's kernels of the four ops; called from TORCH_LIBRARY_IMPL(leanops, <dispatch key>, m).
template <typename ClipForward, typename ClipBackward, typename SiglipForward, typename SiglipBackward>
void register_kernels(torch::Library& m, ClipForward* clip_forward, ClipBackward* clip_backward,
                      SiglipForward* siglip_forward, SiglipBackward* siglip_backward) {
  m.impl("clip_forward", clip_forward);
  m.impl("clip_backward", clip_backward);
  m.impl("siglip_forward", siglip_forward);
  m.impl("siglip_backward", siglip_backward);
}

}  // namespace contrastive
}  // namespace leanops
