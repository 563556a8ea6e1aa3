// The vocabulary-chunk plan of the linear cross-entropy primitives (linear_ce_forward, linear_ce_backward): one host
// loop of ATen GEMMs, shared by the CPU provider (csrc/cpu/cross_entropy.cpp) and the CUDA provider
// (csrc/cuda/cross_entropy.cu), which supply only the fused elementwise / reduction steps between the GEMMs.
// csrc/ops.cpp states the contract; python/leanops/reference/cross_entropy.py is the same math in plain PyTorch.
//
// Math. h = hidden (N, D), W = weight (V, D), b = bias (V,) or none, t = targets (N,) (t_n < 0: no target);
// z = h W^T + b; with a softcap c > 0, z' = c tanh(z / c) and dz'/dz = 1 - (z'/c)^2, else z' = z and dz'/dz = 1.
//   forward:  lse[n] = logsumexp_j z'[n, j], target_logit[n] = z'[n, t_n] (0 where t_n < 0),
//             logit_sum[n] = sum_j z'[n, j], logit_square_sum[n] = sum_j z'[n, j]^2
//   backward: G[n, j] = (grad_lse[n] exp(z'[n, j] - lse[n]) + grad_sum[n] + 2 grad_square_sum[n] z'[n, j]
//                        + grad_target[n] [j == t_n]) dz'/dz
//             grad_hidden = G W, grad_weight = G^T h, grad_bias = sum_n G[n, :]
//
// Plan. The N x V logits are never whole: the vocabulary is cut into chunks of Vc rows of W (leanops/panel_host.h:
// Vc from the same memory budget as the contrastive panels, over N x Vc entries). Per chunk [v0, v0 + Vc):
//   forward   Z = h W[chunk]^T                        (GEMM, N x Vc, float32)
//             fused step: bias and softcap, and the chunk merged into per-token running statistics (max and sum
//             of exp(z' - max); sum z' and sum z'^2 as compensated float32 pairs; the target logit), float32
//   backward  Z = h W[chunk]^T                        (GEMM, recomputed)
//             fused step: G_chunk, and grad_bias[chunk] = column sums of G (float32, in a fixed order, rounded once)
//             grad_hidden += G_chunk W[chunk]         (GEMM, accumulated into a float32 (N, D) buffer, rounded once
//                                                      at the end)
//             grad_weight[chunk] = G_chunk^T h        (GEMM with K = N: complete in one product, rounded once)
// The matrix work is exactly the floor: every logit is computed twice (forward, backward) and G enters two GEMMs,
// 2 N V D FLOPs each, 8 N V D in all, whatever D. The GEMMs go through Steps::multiply (aten::mm / aten::addmm,
// cuBLAS on CUDA, MKL on the CPU in fixed blocks; see contrastive_plan_host.h).
//
// Dtypes. As in contrastive_plan_host.h: the CPU multiplies float32 copies of 16-bit inputs and keeps G in float32
// (in place of Z); CUDA multiplies the inputs' dtype into float32 results, keeps G in the input dtype, and for float16
// stores G times a power of two from a bound on |G| (panel_math.h, gradient_scale). The bound, with p <= 1 and
// |dz'/dz| <= 1: |G[n, j]| <= |grad_lse[n]| + |grad_sum[n]| + |grad_target[n]| + 2 |grad_square_sum[n]| |z'|max[n],
// where |z'|max[n] = c with a softcap, else |h_n| max_j |W_j| + max_j |b_j| (Cauchy-Schwarz). Statistics and
// gradient sums are float32; gradients come back in the input dtype, each element rounded once.
//
// Memory, besides the inputs and outputs: one Z chunk (N x Vc float32) and, when G is not float32, one G chunk
// (N x Vc 16-bit); the float32 grad_hidden buffer (N x D); for a non-float32 weight, one float32 Vc x D staging block
// for grad_weight; the per-token state (7 x N float32) and the steps' scratch. Deterministic as the contrastive plan.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "leanops/panel_host.h"

namespace leanops {
namespace cross_entropy {

// Rows of the per-token running state of the forward, a float32 (kStateRows, N) tensor.
enum StateRow : int64_t {
  kRunningMax = 0,     // max_j z'
  kRunningSum = 1,     // sum_j exp(z' - running max)
  kLogitSumHigh = 2,   // sum_j z' = high + low
  kLogitSumLow = 3,
  kSquareSumHigh = 4,  // sum_j z'^2 = high + low
  kSquareSumLow = 5,
  kTargetLogit = 6,    // z'[t_n], 0 until the target's chunk is seen (and for t_n < 0)
  kStateRows = 7,
};

// What the fused steps read and write for one vocabulary chunk, classes [first_class, first_class + Vc). Per-token
// vectors are float32 (N,), contiguous, on the inputs' device.
struct ForwardChunk {
  at::Tensor logits;  // (N, Vc) float32, contiguous: z without the bias; the step may overwrite it
  int64_t first_class;
  at::Tensor bias;     // (V,) or (0,), the input dtype, contiguous
  at::Tensor targets;  // (N,) int64, contiguous
  double softcap;      // > 0: capped
  at::Tensor state;    // (kStateRows, N): the step merges the chunk into it
};

struct BackwardChunk {
  at::Tensor logits;  // as in ForwardChunk
  int64_t first_class;
  at::Tensor bias, targets;
  double softcap;
  at::Tensor lse, grad_lse, grad_target, grad_sum, grad_square_sum;
  at::Tensor gradient;        // (N, Vc) contiguous, Steps::gradient_dtype: the step writes G (times the scale)
  at::Tensor gradient_scale;  // undefined, or float32 (2,) on the device: [scale, 1 / scale]
  at::Tensor bias_gradient;   // undefined without a bias, else float32 (Vc,): the step writes sum_n G[n, :]
};

// The providers' Steps: gemm_operand, gradient_dtype, scales_gradient, gradient_scale, multiply as in
// contrastive_plan_host.h, and void forward(const ForwardChunk&), backward(const BackwardChunk&).

template <typename Steps>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_forward_plan(const at::Tensor& hidden,
                                                                                  const at::Tensor& weight,
                                                                                  const at::Tensor& bias,
                                                                                  const at::Tensor& targets,
                                                                                  double softcap) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t tokens = hidden.size(0);
  const int64_t vocabulary = weight.size(0);
  const at::TensorOptions options = hidden.options().dtype(at::kFloat);
  if (tokens == 0) {
    return {at::empty({0}, options), at::empty({0}, options), at::empty({0}, options), at::empty({0}, options)};
  }
  const at::Tensor h = Steps::gemm_operand(hidden);
  const at::Tensor w = Steps::gemm_operand(weight);
  const at::Tensor bias_c = bias.contiguous();
  const at::Tensor targets_c = targets.contiguous();
  at::Tensor state = at::zeros({kStateRows, tokens}, options);
  state.select(0, kRunningMax).fill_(-std::numeric_limits<float>::infinity());
  const int64_t chunk_rows = panel::panel_rows(vocabulary, tokens, /*bytes_per_entry=*/4, h.device().type());
  const at::Tensor logits_buffer = at::empty({chunk_rows * tokens}, options);
  panel::for_each_panel(vocabulary, chunk_rows, [&](int64_t first, int64_t classes) {
    const at::Tensor logits = panel::panel_view(logits_buffer, tokens, classes);
    Steps::multiply(logits, h, w.narrow(0, first, classes).t(), /*accumulate=*/false);
    Steps::forward(ForwardChunk{logits, first, bias_c, targets_c, softcap, state});
  });
  const auto row = [&](StateRow r) { return state.select(0, r); };
  return {row(kRunningMax) + at::log(row(kRunningSum)), row(kTargetLogit).clone(),
          row(kLogitSumHigh) + row(kLogitSumLow), row(kSquareSumHigh) + row(kSquareSumLow)};
}

// The float16 bound on |G| (see the file comment), a 0-dim float32 tensor on the inputs' device.
inline at::Tensor linear_ce_gradient_bound(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                                           double softcap, const at::Tensor& grad_lse,
                                           const at::Tensor& grad_target, const at::Tensor& grad_sum,
                                           const at::Tensor& grad_square_sum) {
  at::Tensor logit_bound;
  if (softcap > 0) {
    logit_bound = at::full({}, softcap, grad_lse.options());
  } else {
    const at::Tensor hidden_norms = at::linalg_vector_norm(hidden, 2, {1}, false, at::kFloat);
    const at::Tensor largest_weight_norm = at::linalg_vector_norm(weight, 2, {1}, false, at::kFloat).amax();
    logit_bound = hidden_norms * largest_weight_norm;
    if (bias.numel() > 0) logit_bound = logit_bound + bias.abs().amax().to(at::kFloat);
  }
  const at::Tensor token_bound =
      grad_lse.abs() + grad_sum.abs() + grad_target.abs() + 2 * grad_square_sum.abs() * logit_bound;
  return token_bound.amax();
}

template <typename Steps>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_backward_plan(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& targets,
    double softcap, const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& grad_target,
    const at::Tensor& grad_sum, const at::Tensor& grad_square_sum) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t tokens = hidden.size(0);
  const int64_t dim = hidden.size(1);
  const int64_t vocabulary = weight.size(0);
  const bool has_bias = bias.numel() > 0;
  at::Tensor grad_weight = at::empty({vocabulary, dim}, weight.options());
  at::Tensor grad_bias = at::empty({has_bias ? vocabulary : 0}, bias.options());
  if (tokens == 0) {  // no tokens: G is empty and its sums are 0
    return {at::empty({0, dim}, hidden.options()), grad_weight.zero_(), grad_bias.zero_()};
  }
  const at::TensorOptions options = hidden.options().dtype(at::kFloat);
  const at::Tensor h = Steps::gemm_operand(hidden);
  const at::Tensor w = Steps::gemm_operand(weight);
  const at::Tensor bias_c = bias.contiguous();
  const at::Tensor targets_c = targets.contiguous();
  const at::Tensor lse_c = lse.contiguous(), grad_lse_c = grad_lse.contiguous();
  const at::Tensor grad_target_c = grad_target.contiguous(), grad_sum_c = grad_sum.contiguous();
  const at::Tensor grad_square_sum_c = grad_square_sum.contiguous();
  at::Tensor gradient_scale;
  if (Steps::scales_gradient(hidden.scalar_type())) {
    gradient_scale = Steps::gradient_scale(linear_ce_gradient_bound(h, w, bias_c, softcap, grad_lse_c, grad_target_c,
                                                                    grad_sum_c, grad_square_sum_c));
  }
  const at::ScalarType gradient_dtype = Steps::gradient_dtype(hidden.scalar_type());
  const bool in_place = gradient_dtype == at::kFloat;
  const int64_t chunk_rows =
      panel::panel_rows(vocabulary, tokens, panel::backward_bytes_per_entry(gradient_dtype),
                        h.device().type());
  const at::Tensor logits_buffer = at::empty({chunk_rows * tokens}, options);
  const at::Tensor gradient_buffer =
      in_place ? logits_buffer : at::empty({chunk_rows * tokens}, options.dtype(gradient_dtype));
  // grad_weight's rows are written straight from the GEMM when it is float32 and unscaled; otherwise through a
  // float32 block, rounded once by the copy.
  const bool weight_rows_direct = weight.scalar_type() == at::kFloat && !gradient_scale.defined();
  const at::Tensor weight_rows_buffer = weight_rows_direct ? at::Tensor() : at::empty({chunk_rows * dim}, options);
  const at::Tensor bias_gradient_buffer = has_bias ? at::empty({chunk_rows}, options) : at::Tensor();
  at::Tensor grad_hidden = at::zeros({tokens, dim}, options);
  panel::for_each_panel(vocabulary, chunk_rows, [&](int64_t first, int64_t classes) {
    const at::Tensor w_chunk = w.narrow(0, first, classes);
    const at::Tensor logits = panel::panel_view(logits_buffer, tokens, classes);
    const at::Tensor gradient = panel::panel_view(gradient_buffer, tokens, classes);
    const at::Tensor bias_gradient = has_bias ? bias_gradient_buffer.narrow(0, 0, classes) : at::Tensor();
    Steps::multiply(logits, h, w_chunk.t(), /*accumulate=*/false);
    Steps::backward(BackwardChunk{logits, first, bias_c, targets_c, softcap, lse_c, grad_lse_c, grad_target_c,
                                  grad_sum_c, grad_square_sum_c, gradient, gradient_scale, bias_gradient});
    if (has_bias) grad_bias.narrow(0, first, classes).copy_(bias_gradient);
    Steps::multiply(grad_hidden, gradient, w_chunk, /*accumulate=*/true);
    const at::Tensor weight_rows = grad_weight.narrow(0, first, classes);
    if (weight_rows_direct) {
      Steps::multiply(weight_rows, gradient.t(), h, /*accumulate=*/false);
    } else {
      const at::Tensor staged = panel::panel_view(weight_rows_buffer, classes, dim);
      Steps::multiply(staged, gradient.t(), h, /*accumulate=*/false);
      if (gradient_scale.defined()) staged.mul_(gradient_scale.select(0, 1));
      weight_rows.copy_(staged);
    }
  });
  if (gradient_scale.defined()) grad_hidden.mul_(gradient_scale.select(0, 1));
  return {grad_hidden.to(hidden.scalar_type()), grad_weight, grad_bias};
}

}  // namespace cross_entropy
}  // namespace leanops
