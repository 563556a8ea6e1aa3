// Every operator schema of the C++ kernels. Each family is declared in python/leanops/ops/<family>.py (schemas,
// fake kernels, autograd, providers); these schemas must equal the declared ones, which tests/test_registry.py
// checks. Kernels live in csrc/cpu/<family>.cpp (CPU) and csrc/cuda/<family>.cu (CUDA).
#include <torch/library.h>

TORCH_LIBRARY(leanops, m) {
  // Multi-component float (MCF) arithmetic: python/leanops/mcf.py documents the math.
  m.def("two_sum(Tensor a, Tensor b) -> (Tensor sum, Tensor error)");
  m.def("fast_two_sum(Tensor a, Tensor b) -> (Tensor sum, Tensor error)");
  m.def("two_prod(Tensor a, Tensor b) -> (Tensor product, Tensor error)");
  m.def("grow(Tensor hi, Tensor lo, Tensor v) -> (Tensor hi_out, Tensor lo_out)");
  m.def("grow_(Tensor(a!) hi, Tensor(b!) lo, Tensor v) -> ()");
  m.def("scale(Tensor hi, Tensor lo, Tensor b_hi, Tensor b_lo) -> (Tensor hi_out, Tensor lo_out)");
  m.def("split(Tensor x, ScalarType dtype) -> (Tensor hi, Tensor lo)");
  m.def("merge(Tensor hi, Tensor lo) -> Tensor");

  // Blockwise contrastive losses (python/leanops/contrastive.py documents the math). Features (B, D) of one float
  // dtype; every statistic and gradient is float32. The B x B similarity matrix never exists: tiles only.
  //   clip_forward: row_lse[i] = logsumexp_j(scale[i] * <x_i, y_j>), col_lse[j] = logsumexp_i(scale[j] * <x_i, y_j>)
  m.def("clip_forward(Tensor image, Tensor text, Tensor scale) -> (Tensor row_lse, Tensor col_lse)");
  //   clip_backward: with p = row softmax, q = column softmax and
  //   G[i,j] = row_weight[i] * scale[i] * p[i,j] + col_weight[j] * scale[j] * q[i,j]:
  //   grad_image = G @ text, grad_text = G^T @ image,
  //   grad_scale[i] = row_weight[i] * sum_j p[i,j] <x_i,y_j> + col_weight[i] * sum_k q[k,i] <x_k,y_i>
  m.def(
      "clip_backward(Tensor image, Tensor text, Tensor scale, Tensor row_lse, Tensor col_lse, Tensor row_weight, "
      "Tensor col_weight) -> (Tensor grad_image, Tensor grad_text, Tensor grad_scale)");
  //   siglip_forward: row_loss[i] = sum_j softplus(-label[i,j] * (scale * <x_i, y_j> + bias)),
  //   label = +1 where groups[i] == groups[j], else -1
  m.def("siglip_forward(Tensor image, Tensor text, Tensor scale, Tensor bias, Tensor groups) -> Tensor row_loss");
  //   siglip_backward: with D[i,j] = -row_weight[i] * label[i,j] * sigmoid(-label[i,j] * z[i,j]):
  //   grad_image = scale * D @ text, grad_text = scale * D^T @ image, grad_scale = sum D * <x,y>, grad_bias = sum D
  m.def(
      "siglip_backward(Tensor image, Tensor text, Tensor scale, Tensor bias, Tensor groups, Tensor row_weight) -> "
      "(Tensor grad_image, Tensor grad_text, Tensor grad_scale, Tensor grad_bias)");

  // Chunked linear cross-entropy (python/leanops/cross_entropy.py documents the math). hidden (N, D), weight (V, D),
  // bias (V,) or empty (0,) for none, all of one float dtype; targets (N,) int64 in [0, V) or -1 (no target);
  // softcap > 0 caps the logits, z' = softcap * tanh(z / softcap), softcap <= 0 means none. z = hidden @ weight^T
  // + bias never exists beyond one chunk. Statistics are float32; gradients come back in the input dtype, each
  // reduced in float32 and rounded once: grad_weight/bias complete per vocabulary chunk, grad_hidden summed over
  // the chunks in a float32 (N, D) buffer (python/leanops/plans.py).
  //   linear_ce_forward: lse[n] = logsumexp_j z'[n,j], target_logit[n] = z'[n,t_n] (0 where t_n < 0),
  //   logit_sum[n] = sum_j z'[n,j], logit_square_sum[n] = sum_j z'[n,j]^2
  m.def(
      "linear_ce_forward(Tensor hidden, Tensor weight, Tensor bias, Tensor targets, float softcap) -> "
      "(Tensor lse, Tensor target_logit, Tensor logit_sum, Tensor logit_square_sum)");
  //   linear_ce_backward: with G[n,j] = (grad_lse[n] * exp(z'[n,j] - lse[n]) + grad_sum[n]
  //   + 2 * grad_square_sum[n] * z'[n,j] + grad_target[n] * [j == t_n]) * (softcap > 0 ? 1 - (z'[n,j]/softcap)^2 : 1):
  //   grad_hidden = G @ weight, grad_weight = G^T @ hidden, grad_bias = sum_n G[n,:] (empty without a bias)
  m.def(
      "linear_ce_backward(Tensor hidden, Tensor weight, Tensor bias, Tensor targets, float softcap, Tensor lse, "
      "Tensor grad_lse, Tensor grad_target, Tensor grad_sum, Tensor grad_square_sum) -> "
      "(Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // Collage AdamW's fused multi-tensor step (python/leanops/reference/collage.py documents the math and is the
  // oracle: every backend gives the same bits). Lists of equal length; tensor i of every list has the same shape,
  // device and storage dtype (bfloat16 or float16), grads included; exp_avg_sqs_lo is empty unless `plus`.
  // Updates params, params_lo, exp_avgs, exp_avg_sqs (and exp_avg_sqs_lo) in place; metrics, if given, is a float64
  // (4,) tensor on the params' device that receives += (sum s*delta, sum delta^2, count of lost updates, count).
  m.def(
      "collage_adamw_step_(Tensor(a!)[] params, Tensor(b!)[] params_lo, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] exp_avg_sqs_lo, Tensor[] grads, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, float bias_correction1, float bias_correction2, bool plus, "
      "Tensor(f!)? metrics) -> ()");

  // FRUGAL's fused split step (python/leanops/reference/frugal.py documents the math and is the oracle: every backend
  // gives the same bits). One entry per tensor in every list; params share one dtype (float32, bfloat16, float16) and
  // device; params_lo is empty or one compensation per 16-bit parameter; grads have the params' dtype or float32;
  // exp_avgs/exp_avg_sqs are float32 (empty for a state-free tensor), positions int32 (COLUMNS/ROWS modes), addends
  // float32 or empty. modes: 0 AdamW, 1 state-free, 2 columns, 3 rows; state_free: 0 signSGD, 1 SGD, 2 none.
  m.def(
      "frugal_split_step_(Tensor(a!)[] params, Tensor(b!)[] params_lo, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor[] grads, Tensor[] positions, Tensor[] addends, int[] modes, "
      "float[] step_sizes, float[] bias_correction2_roots, float beta1, float beta2, float eps, float decay, "
      "float free_lr, int state_free) -> ()");
}
