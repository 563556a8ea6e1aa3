"""The linear cross-entropy family: the chunked primitives of leanops.linear_cross_entropy (python/leanops/
cross_entropy.py states the math; csrc/ops.cpp each primitive's contract). The N x V logits never exist beyond one
chunk; statistics come back in float32 (float64 for float64 inputs), gradients in the input dtype.

Autograd is declared on ``linear_ce_forward``: the gradient of sum_n (a_n lse_n + b_n target_logit_n + c_n logit_sum_n
+ d_n logit_square_sum_n) is exactly what ``linear_ce_backward`` computes, so every loss option built on the four
statistics (label smoothing, z-loss, squentropy, ignored tokens, reductions) differentiates with plain torch autograd
on O(N) tensors, and torch.compile sees no graph break.
"""
import torch

from .registry import Autograd, OpFamily, Operator, standard_providers, statistics_dtype


def _fake_forward(hidden, weight, bias, targets, softcap):
    return tuple(torch.empty(hidden.shape[0], dtype=statistics_dtype(hidden), device=hidden.device)
                 for _ in range(4))


def _fake_backward(hidden, weight, bias, targets, softcap, lse, grad_lse, grad_target, grad_sum, grad_square_sum):
    return torch.empty_like(hidden), torch.empty_like(weight), torch.empty_like(bias)


def _setup(ctx, inputs, output):
    hidden, weight, bias, targets, softcap = inputs
    ctx.softcap = softcap
    ctx.save_for_backward(hidden, weight, bias, targets, output[0])


def _backward(operators, ctx, *grad_statistics):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    grads = [torch.zeros_like(lse) if g is None else g.contiguous() for g in grad_statistics]
    grad_hidden, grad_weight, grad_bias = operators.linear_ce_backward(hidden, weight, bias, targets, ctx.softcap,
                                                                      lse, *grads)
    return grad_hidden, grad_weight, grad_bias, None, None


def _formula(ctx):
    """The four statistics from the saved inputs, dense and differentiable (for second derivatives)."""
    hidden, weight, bias, targets, _ = ctx.saved_tensors
    dtype = statistics_dtype(hidden)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias.numel():
        logits = logits + bias.to(dtype)
    if ctx.softcap > 0:
        logits = ctx.softcap * torch.tanh(logits / ctx.softcap)
    picked = logits.gather(1, targets.clamp_min(0)[:, None])[:, 0]
    statistics = (torch.logsumexp(logits, dim=1), torch.where(targets >= 0, picked, 0), logits.sum(dim=1),
                  logits.square().sum(dim=1))
    return statistics, (hidden, weight, bias, targets, None)


CROSS_ENTROPY = OpFamily(
    name="cross_entropy",
    description="chunked linear cross-entropy (leanops.linear_cross_entropy)",
    operators=(
        Operator("linear_ce_forward(Tensor hidden, Tensor weight, Tensor bias, Tensor targets, float softcap) -> "
                 "(Tensor lse, Tensor target_logit, Tensor logit_sum, Tensor logit_square_sum)",
                 _fake_forward, Autograd(_setup, _backward, _formula)),
        Operator("linear_ce_backward(Tensor hidden, Tensor weight, Tensor bias, Tensor targets, float softcap, "
                 "Tensor lse, Tensor grad_lse, Tensor grad_target, Tensor grad_sum, Tensor grad_square_sum) -> "
                 "(Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)", _fake_backward),
    ),
    providers=standard_providers("cross_entropy"),
    # On a GPU: Triton first until the H100 benchmark (`leanops bench ce`) has measured both GPU providers.
    preference={"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")},
).register()
