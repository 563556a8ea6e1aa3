"""The contrastive family: the blockwise CLIP and SigLIP primitives (python/leanops/contrastive.py states the math;
csrc/ops.cpp each primitive's contract). Features (B, D) of one dtype; statistics and gradients come back in float32
(float64 for float64 features); the B x B similarity matrix never exists.

Autograd is declared on the forward primitives: the gradient of sum(w * row_lse) + sum(w' * col_lse) (CLIP) or of
sum(w * row_loss) (SigLIP) is exactly what the backward primitive computes, so everything built on top of them
(positive terms, reductions) differentiates with plain torch autograd, and torch.compile sees no graph break.
"""
import torch

from .registry import Autograd, OpFamily, Operator, standard_providers, statistics_dtype

Tensor = torch.Tensor


def _vectors(like: Tensor, count: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    return tuple(torch.empty(like.shape[0], dtype=dtype, device=like.device) for _ in range(count))


def _fake_clip_forward(image, text, scale):
    return _vectors(image, 2, statistics_dtype(image))


def _fake_clip_backward(image, text, scale, row_lse, col_lse, row_weight, col_weight):
    dtype = statistics_dtype(image)
    return (torch.empty(image.shape, dtype=dtype, device=image.device),
            torch.empty(text.shape, dtype=dtype, device=image.device), *_vectors(image, 1, dtype))


def _fake_siglip_forward(image, text, scale, bias, groups):
    return _vectors(image, 1, statistics_dtype(image))[0]


def _fake_siglip_backward(image, text, scale, bias, groups, row_weight):
    dtype = statistics_dtype(image)
    return (torch.empty(image.shape, dtype=dtype, device=image.device),
            torch.empty(text.shape, dtype=dtype, device=image.device),
            torch.empty((), dtype=dtype, device=image.device), torch.empty((), dtype=dtype, device=image.device))


def _clip_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _clip_backward(operators, ctx, grad_row_lse, grad_col_lse):
    image, text, scale, row_lse, col_lse = ctx.saved_tensors
    grad_row_lse = torch.zeros_like(row_lse) if grad_row_lse is None else grad_row_lse.contiguous()
    grad_col_lse = torch.zeros_like(col_lse) if grad_col_lse is None else grad_col_lse.contiguous()
    grad_image, grad_text, grad_scale = operators.clip_backward(image, text, scale, row_lse, col_lse, grad_row_lse,
                                                                grad_col_lse)
    return grad_image.to(image.dtype), grad_text.to(text.dtype), grad_scale.to(scale.dtype)


def _siglip_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _siglip_backward(operators, ctx, grad_row_loss):
    image, text, scale, bias, groups = ctx.saved_tensors
    grad_image, grad_text, grad_scale, grad_bias = operators.siglip_backward(image, text, scale, bias, groups,
                                                                             grad_row_loss.contiguous())
    return (grad_image.to(image.dtype), grad_text.to(text.dtype), grad_scale.to(scale.dtype),
            grad_bias.to(bias.dtype), None)


def similarity(image: Tensor, text: Tensor) -> Tensor:
    """S = x y^T (B, B) in the statistics dtype, differentiable: the dense formulas' start (second derivatives)."""
    dtype = statistics_dtype(image)
    return image.to(dtype) @ text.to(dtype).T


def _clip_formula(ctx):
    """(row_lse, col_lse) from the saved inputs, dense and differentiable."""
    image, text, scale, _, _ = ctx.saved_tensors
    logits_similarity = similarity(image, text)
    s = scale.to(logits_similarity.dtype)
    return ((torch.logsumexp(s[:, None] * logits_similarity, dim=1),
             torch.logsumexp(s[None, :] * logits_similarity, dim=0)), (image, text, scale))


def _siglip_formula(ctx):
    """row_loss from the saved inputs, dense and differentiable."""
    image, text, scale, bias, groups = ctx.saved_tensors
    logits_similarity = similarity(image, text)
    dtype = logits_similarity.dtype
    signs = torch.where(groups[:, None] == groups[None, :], 1.0, -1.0).to(dtype)
    logits = scale.to(dtype) * logits_similarity + bias.to(dtype)
    return (torch.nn.functional.softplus(-signs * logits).sum(dim=1),), (image, text, scale, bias, groups)


CONTRASTIVE = OpFamily(
    name="contrastive",
    description="blockwise CLIP and SigLIP losses (leanops.clip_loss, leanops.siglip_loss)",
    operators=(
        Operator("clip_forward(Tensor image, Tensor text, Tensor scale) -> (Tensor row_lse, Tensor col_lse)",
                 _fake_clip_forward, Autograd(_clip_setup, _clip_backward, _clip_formula)),
        Operator("clip_backward(Tensor image, Tensor text, Tensor scale, Tensor row_lse, Tensor col_lse, "
                 "Tensor row_weight, Tensor col_weight) -> (Tensor grad_image, Tensor grad_text, Tensor grad_scale)",
                 _fake_clip_backward),
        Operator("siglip_forward(Tensor image, Tensor text, Tensor scale, Tensor bias, Tensor groups) -> "
                 "Tensor row_loss", _fake_siglip_forward,
                 Autograd(_siglip_setup, _siglip_backward, _siglip_formula)),
        Operator("siglip_backward(Tensor image, Tensor text, Tensor scale, Tensor bias, Tensor groups, "
                 "Tensor row_weight) -> (Tensor grad_image, Tensor grad_text, Tensor grad_scale, Tensor grad_bias)",
                 _fake_siglip_backward),
    ),
    providers=standard_providers("contrastive"),
    # On a GPU: Triton first until the H100 benchmark (`leanops bench clip`) has measured both GPU providers; the
    # faster one goes first then (benchmarks/results/contrastive.md).
    preference={"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")},
).register()
