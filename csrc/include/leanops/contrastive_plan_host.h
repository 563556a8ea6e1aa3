// The panel plan of the contrastive primitives (clip_forward, clip_backward, siglip_forward, siglip_backward): one
// host loop of ATen GEMMs, shared by the CPU provider (csrc/cpu/contrastive.cpp) and the CUDA provider
// (csrc/cuda/contrastive.cu), which supply only the fused elementwise / reduction steps between the GEMMs.
// csrc/ops.cpp states each op's contract; python/leanops/reference/contrastive.py is the same math in plain PyTorch.
//
// Math. x = image, y = text, both (B, D); S = x y^T (B x B); s = scale.
//   clip_forward:    row_lse[i] = logsumexp_j(s[i] S[i, j]),  col_lse[j] = logsumexp_i(s[j] S[i, j])
//   clip_backward:   p = exp(s[i] S - row_lse[i]), q = exp(s[j] S - col_lse[j]),
//                    G[i, j] = row_weight[i] s[i] p[i, j] + col_weight[j] s[j] q[i, j],
//                    grad_image = G y, grad_text = G^T x,
//                    grad_scale[i] = row_weight[i] sum_j p[i, j] S[i, j] + col_weight[i] sum_k q[k, i] S[k, i]
//   siglip_forward:  z = s S + bias (scalars), label = +1 where groups match else -1,
//                    row_loss[i] = sum_j softplus(-label z)
//   siglip_backward: D[i, j] = -row_weight[i] label sigmoid(-label z), G = s D,
//                    grad_image = G y, grad_text = G^T x, grad_scale = sum D S, grad_bias = sum D
//
// Plan. S is never whole: the batch's rows are cut into panels of P rows (leanops/panel_host.h: P from a memory
// budget: 64 MiB and at least 512 rows on CUDA, 32 MiB on the CPU). Per panel [i0, i0 + P):
//   forward   S_panel = x[panel] y^T                  (GEMM, P x B, float32)
//             fused step: the panel's row statistics, complete (the panel holds every column), and its column
//             statistics merged into running (max, sum) float32 (B,) vectors (SigLIP: the panel's row losses)
//   backward  S_panel = x[panel] y^T                  (GEMM, recomputed: storing it would be B x B)
//             fused step: G_panel, and the panel's part of the scale (and SigLIP bias) gradient, reduced in float32
//             per row (complete) and per column (running (B,) sums), each in a fixed order
//             grad_image[panel] = G_panel y           (GEMM, float32 output, written once)
//             grad_text += G_panel^T x[panel]         (GEMM, accumulated into a float32 (B, D) buffer)
// The matrix work is exactly the floor: every S entry is computed twice (forward, backward) and G enters two GEMMs,
// 2 B^2 D FLOPs each, 8 B^2 D in all, whatever D; no GEMM is repeated per output chunk. Everything else is linear in
// the panel's entries (exponentials, reductions). The GEMMs are ATen's (cuBLAS on CUDA, MKL on the CPU), called
// through the dispatcher (aten::mm / aten::addmm, visible to torch.profiler with their shapes): Steps::multiply issues
// them, one call per GEMM on CUDA, deterministic fixed blocks on the CPU (leanops/tile_cpu.h).
//
// Dtypes. The GEMMs read the features as Steps::gemm_operand gives them: the CPU converts 16-bit features to
// float32 once (MKL has no fast 16-bit path with float32 accumulation); CUDA keeps the input dtype and asks cuBLAS
// for float32 results (aten::mm.dtype: float32 accumulation and output for bfloat16 / float16; float32 features take
// the plain float32 GEMM). S and every statistic are float32. G is float32 on the CPU (in place of S); on CUDA it is
// in the feature dtype, so that its two GEMMs run on the tensor cores (at the cost of one rounding of each G entry,
// as in FlashAttention and the Triton provider), and for float16 it is stored times a power of two that puts a bound
// on |G| just below float16's range (panel_math.h, gradient_scale; the GEMMs' float32 results are scaled back,
// exactly). The bound: |G| <= max |row_weight s| + max |col_weight s| for CLIP (p, q <= 1 given the forward's
// log-sum-exps), |G| <= |s| max |row_weight| for SigLIP (sigmoid <= 1).
//
// Memory, besides the inputs and outputs: one S panel (P x B float32) and, when G is not float32, one G panel
// (P x B 16-bit); the provider's step scratch (a few float32 rows per block of panel rows); the CPU's float32 copies
// of 16-bit features. Deterministic: the panels, the steps' blocks and the GEMM blocks are fixed by the sizes,
// never by the thread count or the stream.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>

#include "leanops/panel_host.h"

namespace leanops {
namespace contrastive {

// What the fused steps read and write for one panel: rows [first_row, first_row + similarity.size(0)) of S, all B
// columns. Per-anchor vectors are float32 (B,), contiguous, on the features' device; "the panel's rows" of a (B,)
// output are its entries first_row ... first_row + rows - 1.
struct ClipForwardPanel {
  at::Tensor similarity;  // (rows, B) float32, contiguous: S[panel]
  int64_t first_row;
  at::Tensor scale;
  at::Tensor row_lse;        // the step writes the panel's rows
  at::Tensor column_max;     // running (max, sum of exp(s[j] S - max)) of every column over the panels so far:
  at::Tensor column_sum;     // the step merges the panel's rows into them
};

struct ClipBackwardPanel {
  at::Tensor similarity;
  int64_t first_row;
  at::Tensor scale, row_lse, col_lse, row_weight, col_weight;
  at::Tensor gradient;        // (rows, B) contiguous, Steps::gradient_dtype: the step writes G (times the scale)
  at::Tensor gradient_scale;  // undefined, or float32 (2,) on the device: [scale, 1 / scale]
  at::Tensor row_ps;          // the step writes the panel's rows: sum_j p[i, j] S[i, j]
  at::Tensor column_qs;       // running: the step adds sum over the panel's rows i of q[i, j] S[i, j]
};

struct SiglipForwardPanel {
  at::Tensor similarity;
  int64_t first_row;
  at::Tensor scale, bias;  // 0-dim float32
  at::Tensor groups;       // (B,) Steps::prepare_groups(groups)
  at::Tensor row_loss;     // the step writes the panel's rows
};

struct SiglipBackwardPanel {
  at::Tensor similarity;
  int64_t first_row;
  at::Tensor scale, bias, groups, row_weight;
  at::Tensor gradient;        // the step writes G = s D (times the scale)
  at::Tensor gradient_scale;  // as in ClipBackwardPanel
  at::Tensor row_sums;        // (2, B): the step writes the panel's rows of [0] sum_j D and [1] sum_j D S
};

// The providers' Steps (a class with static members):
//   at::Tensor gemm_operand(features)        the features as the GEMMs read them, (B, D) contiguous
//   at::ScalarType gradient_dtype(dtype)     G's dtype for features of `dtype`
//   bool scales_gradient(dtype)              whether G is stored times gradient_scale(bound)
//   at::Tensor gradient_scale(bound)         float32 (2,) [scale, 1 / scale] from a 0-dim bound on |G|
//   void multiply(out, a, b, accumulate)     out (float32) = a b, or += a b, through aten::mm / aten::addmm
//   at::Tensor prepare_groups(groups)        the group ids as the SigLIP steps read them
//   at::Tensor sum_rows(matrix)              (k, n) float32 -> (k,) row sums, in a fixed order
//   void clip_forward(const ClipForwardPanel&), clip_backward(...), siglip_forward(...), siglip_backward(...)

// The backward's GEMMs around one fused step per panel: S_panel, then step(similarity, first_row, gradient) writes
// G_panel, then grad_x[panel] = G_panel y and grad_y += G_panel^T x[panel]. Returns (grad_x, grad_y), float32 (B, D),
// scaled back when gradient_scale is defined.
template <typename Steps, typename Step>
std::pair<at::Tensor, at::Tensor> backward_panels(const at::Tensor& x, const at::Tensor& y,
                                                  at::ScalarType feature_dtype, const at::Tensor& gradient_scale,
                                                  Step&& step) {
  const int64_t batch = x.size(0);
  const int64_t dim = x.size(1);
  const at::TensorOptions options = x.options().dtype(at::kFloat);
  const at::ScalarType gradient_dtype = Steps::gradient_dtype(feature_dtype);
  const bool in_place = gradient_dtype == at::kFloat;
  const int64_t rows_per_panel =
      panel::panel_rows(batch, batch, panel::backward_bytes_per_entry(gradient_dtype), x.device().type());
  const at::Tensor similarity_buffer = at::empty({rows_per_panel * batch}, options);
  const at::Tensor gradient_buffer =
      in_place ? similarity_buffer : at::empty({rows_per_panel * batch}, options.dtype(gradient_dtype));
  at::Tensor grad_x = at::empty({batch, dim}, options);
  at::Tensor grad_y = at::zeros({batch, dim}, options);
  const at::Tensor y_transposed = y.t();
  panel::for_each_panel(batch, rows_per_panel, [&](int64_t first, int64_t rows) {
    const at::Tensor x_panel = x.narrow(0, first, rows);
    const at::Tensor similarity = panel::panel_view(similarity_buffer, rows, batch);
    const at::Tensor gradient = panel::panel_view(gradient_buffer, rows, batch);
    Steps::multiply(similarity, x_panel, y_transposed, /*accumulate=*/false);
    step(similarity, first, gradient);
    Steps::multiply(grad_x.narrow(0, first, rows), gradient, y, /*accumulate=*/false);
    Steps::multiply(grad_y, gradient.t(), x_panel, /*accumulate=*/true);
  });
  if (gradient_scale.defined()) {
    const at::Tensor inverse = gradient_scale.select(0, 1);
    grad_x.mul_(inverse);
    grad_y.mul_(inverse);
  }
  return {grad_x, grad_y};
}

template <typename Steps>
std::tuple<at::Tensor, at::Tensor> clip_forward_plan(const at::Tensor& image, const at::Tensor& text,
                                                     const at::Tensor& scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain kernels underneath: nothing to record
  const int64_t batch = image.size(0);
  const at::TensorOptions options = image.options().dtype(at::kFloat);
  at::Tensor row_lse = at::empty({batch}, options);
  if (batch == 0) return {row_lse, at::empty({0}, options)};
  const at::Tensor x = Steps::gemm_operand(image);
  const at::Tensor y = Steps::gemm_operand(text);
  const at::Tensor scale_c = scale.contiguous();
  at::Tensor column_max = at::full({batch}, -std::numeric_limits<float>::infinity(), options);
  at::Tensor column_sum = at::zeros({batch}, options);
  const int64_t rows_per_panel = panel::panel_rows(batch, batch, /*bytes_per_entry=*/4, x.device().type());
  const at::Tensor similarity_buffer = at::empty({rows_per_panel * batch}, options);
  const at::Tensor y_transposed = y.t();
  panel::for_each_panel(batch, rows_per_panel, [&](int64_t first, int64_t rows) {
    const at::Tensor similarity = panel::panel_view(similarity_buffer, rows, batch);
    Steps::multiply(similarity, x.narrow(0, first, rows), y_transposed, /*accumulate=*/false);
    Steps::clip_forward(ClipForwardPanel{similarity, first, scale_c, row_lse, column_max, column_sum});
  });
  return {row_lse, column_max + at::log(column_sum)};
}

template <typename Steps>
std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_backward_plan(const at::Tensor& image, const at::Tensor& text,
                                                                  const at::Tensor& scale, const at::Tensor& row_lse,
                                                                  const at::Tensor& col_lse,
                                                                  const at::Tensor& row_weight,
                                                                  const at::Tensor& col_weight) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t batch = image.size(0);
  const at::TensorOptions options = image.options().dtype(at::kFloat);
  if (batch == 0) {
    return {at::zeros(image.sizes(), options), at::zeros(text.sizes(), options), at::empty({0}, options)};
  }
  const at::Tensor x = Steps::gemm_operand(image);
  const at::Tensor y = Steps::gemm_operand(text);
  const at::Tensor scale_c = scale.contiguous(), row_lse_c = row_lse.contiguous(), col_lse_c = col_lse.contiguous();
  const at::Tensor row_weight_c = row_weight.contiguous(), col_weight_c = col_weight.contiguous();
  at::Tensor row_ps = at::empty({batch}, options);
  at::Tensor column_qs = at::zeros({batch}, options);
  at::Tensor gradient_scale;
  if (Steps::scales_gradient(image.scalar_type())) {
    gradient_scale = Steps::gradient_scale((row_weight_c * scale_c).abs().amax() +
                                           (col_weight_c * scale_c).abs().amax());
  }
  auto [grad_image, grad_text] = backward_panels<Steps>(
      x, y, image.scalar_type(), gradient_scale,
      [&](const at::Tensor& similarity, int64_t first, const at::Tensor& gradient) {
        Steps::clip_backward(ClipBackwardPanel{similarity, first, scale_c, row_lse_c, col_lse_c, row_weight_c,
                                               col_weight_c, gradient, gradient_scale, row_ps, column_qs});
      });
  return {grad_image, grad_text, row_weight_c * row_ps + col_weight_c * column_qs};
}

template <typename Steps>
at::Tensor siglip_forward_plan(const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale,
                               const at::Tensor& bias, const at::Tensor& groups) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t batch = image.size(0);
  const at::TensorOptions options = image.options().dtype(at::kFloat);
  at::Tensor row_loss = at::empty({batch}, options);
  if (batch == 0) return row_loss;
  const at::Tensor x = Steps::gemm_operand(image);
  const at::Tensor y = Steps::gemm_operand(text);
  const at::Tensor group_ids = Steps::prepare_groups(groups);
  const int64_t rows_per_panel = panel::panel_rows(batch, batch, /*bytes_per_entry=*/4, x.device().type());
  const at::Tensor similarity_buffer = at::empty({rows_per_panel * batch}, options);
  const at::Tensor y_transposed = y.t();
  panel::for_each_panel(batch, rows_per_panel, [&](int64_t first, int64_t rows) {
    const at::Tensor similarity = panel::panel_view(similarity_buffer, rows, batch);
    Steps::multiply(similarity, x.narrow(0, first, rows), y_transposed, /*accumulate=*/false);
    Steps::siglip_forward(SiglipForwardPanel{similarity, first, scale, bias, group_ids, row_loss});
  });
  return row_loss;
}

template <typename Steps>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_backward_plan(
    const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale, const at::Tensor& bias,
    const at::Tensor& groups, const at::Tensor& row_weight) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t batch = image.size(0);
  const at::TensorOptions options = image.options().dtype(at::kFloat);
  if (batch == 0) {
    return {at::zeros(image.sizes(), options), at::zeros(text.sizes(), options), at::zeros({}, options),
            at::zeros({}, options)};
  }
  const at::Tensor x = Steps::gemm_operand(image);
  const at::Tensor y = Steps::gemm_operand(text);
  const at::Tensor group_ids = Steps::prepare_groups(groups);
  const at::Tensor row_weight_c = row_weight.contiguous();
  at::Tensor row_sums = at::empty({2, batch}, options);
  at::Tensor gradient_scale;
  if (Steps::scales_gradient(image.scalar_type())) {
    gradient_scale = Steps::gradient_scale(scale.abs() * row_weight_c.abs().amax());
  }
  auto [grad_image, grad_text] = backward_panels<Steps>(
      x, y, image.scalar_type(), gradient_scale,
      [&](const at::Tensor& similarity, int64_t first, const at::Tensor& gradient) {
        Steps::siglip_backward(SiglipBackwardPanel{similarity, first, scale, bias, group_ids, row_weight_c, gradient,
                                                   gradient_scale, row_sums});
      });
  const at::Tensor totals = Steps::sum_rows(row_sums);  // [sum D, sum D S]
  return {grad_image, grad_text, totals[1].clone(), totals[0].clone()};
}

}  // namespace contrastive
}  // namespace leanops
