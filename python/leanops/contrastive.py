"""Blockwise contrastive (CLIP / InfoNCE) and sigmoid (SigLIP) losses with O(B·D) memory.

Both losses look at all B x B image-text pairs. Plain PyTorch builds that similarity matrix (48 GiB at B=65536 in
bf16 for SigLIP); here it never exists, forward or backward: the kernels walk it in tiles, keeping per-row
statistics (a running max and log-sum-exp in float32), and the backward pass recomputes the tiles from them.

CLIP (open_clip's ``ClipLoss``, Radford et al. 2021), with S[i, j] = <x_i, y_j> and per-anchor scales s:

    l_i2t[i] = logsumexp_j(s_i S[i, j]) - mean_{j in P(i)} s_i S[i, j]
    l_t2i[j] = logsumexp_i(s_j S[i, j]) - mean_{i in P(j)} s_j S[i, j]
    loss     = 1/2 (mean_i l_i2t[i] + mean_j l_t2i[j])

where P(i) are i's positives: i itself, or (with group ``labels``) every sample of its group, the target distribution
being uniform over them (soft-target cross-entropy; duplicate captions). The positive terms are O(B·D) work beside
the kernels, done in row chunks inside one operator with them (leanops/ops/clip_per_anchor.py).

SigLIP (open_clip's ``SigLipLoss``, Zhai et al. 2023): z = s S + b, label +1 for positives and -1 otherwise,

    loss = -sum_ij log sigmoid(label_ij z_ij) / B,

with the gradients of s and b reduced inside the kernels.
"""
import math

import torch

from . import _validation, distributed_contrastive
from .ops import CONTRASTIVE
from .ops.clip_per_anchor import clip_per_anchor
from .ops.registry import REFERENCE_DTYPES, Provider

Tensor = torch.Tensor

FEATURE_DTYPES = REFERENCE_DTYPES
REDUCTIONS = ("mean", "sum", "none")


def _check_features(op: str, image_features, text_features) -> None:
    _validation.check_tensor(op, "image_features", image_features, FEATURE_DTYPES)
    _validation.check_like(op, "text_features", text_features, "image_features", image_features)
    if image_features.dim() != 2:
        raise ValueError(f"{op}: argument 'image_features' must be 2-D (B, D), got shape "
                         f"{tuple(image_features.shape)}")
    if image_features.shape[0] == 0:
        raise ValueError(f"{op}: argument 'image_features' is an empty batch (B = 0): the loss is undefined")
    if image_features.shape[1] == 0:
        raise ValueError(f"{op}: argument 'image_features' has no feature dimension (D = 0)")


def _check_reduction(op: str, reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: argument 'reduction' must be one of {REDUCTIONS}, got {reduction!r}")


def _check_labels(op: str, labels, batch: int, device: torch.device) -> None:
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise TypeError(f"{op}: argument 'labels' must be a torch.Tensor of int64 group ids, got "
                        f"{type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{op}: argument 'labels' must have dtype torch.int64, got {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"{op}: argument 'labels' must have shape ({batch},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{op}: argument 'labels' is on {labels.device} but 'image_features' is on {device}")


def _scalar_parameter(op: str, name: str, value, like: Tensor, allow_vector: bool, positive: bool) -> Tensor:
    """`value` (a number, a 0-dim tensor, or, where allowed, a (B,) tensor) as a float32 tensor on like's device,
    keeping its autograd history. Non-finite (and, where `positive`, non-positive) values are refused."""
    batch = like.shape[0]
    requirement = "finite and positive" if positive else "finite"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or (positive and value <= 0):
            raise ValueError(f"{op}: argument '{name}' must be {requirement}, got {value!r}")
        return torch.full((), float(value), dtype=torch.float32, device=like.device)
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a number or a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{op}: argument '{name}' must be a floating tensor, got dtype {value.dtype}")
    shapes = "a 0-dim tensor or a (B,) tensor" if allow_vector else "a 0-dim tensor"
    if not (value.dim() == 0 or (allow_vector and value.shape == (batch,))):
        raise ValueError(f"{op}: argument '{name}' must be {shapes} (B = {batch}), got shape {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{op}: argument '{name}' is on {value.device} but 'image_features' is on {like.device}")
    bad = ~torch.isfinite(value)
    if positive:
        bad |= value <= 0
    if _validation.values_checkable(value) and bool(bad.any()):
        raise ValueError(f"{op}: argument '{name}' must be {requirement}, got {value.detach().cpu()}")
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    # Inside a compiled graph the check above cannot raise: a bad value becomes NaN, so the loss and every gradient
    # are NaN rather than a plausible number (the same graph, no sync).
    return torch.where(bad, math.nan, value.to(dtype))


def reduce(per_anchor: Tensor, reduction: str) -> Tensor:
    """The mean, the sum, or (reduction="none") the per-anchor vector itself."""
    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor


def _clip_from_primitives(provider: Provider, image, text, scale: Tensor, labels, reduction: str) -> Tensor:
    """The CLIP loss from `provider`'s blockwise primitives plus the positive terms, computed in row chunks inside
    one operator (leanops/ops/clip_per_anchor.py: its docstring says why)."""
    per_anchor_scale = scale.expand(image.shape[0]).contiguous()
    per_anchor, _, _ = clip_per_anchor(image, text, per_anchor_scale, labels, provider.backend)
    return reduce(per_anchor, reduction)


def _siglip_from_primitives(provider: Provider, image, text, scale: Tensor, bias: Tensor, labels,
                            reduction: str) -> Tensor:
    groups = torch.arange(image.shape[0], device=image.device) if labels is None else labels
    per_image = provider.operators.siglip_forward(image, text, scale, bias, groups)
    return reduce(per_image, reduction)


def _clip_arguments(op: str, image_features, text_features, logit_scale, labels, reduction) -> Tensor:
    """Check every CLIP argument (before any kernel runs); return the scale as a float32 (float64) tensor."""
    _check_features(op, image_features, text_features)
    _check_reduction(op, reduction)
    _check_labels(op, labels, image_features.shape[0], image_features.device)
    return _scalar_parameter(op, "logit_scale", logit_scale, image_features, allow_vector=True, positive=True)


def _siglip_arguments(op: str, image_features, text_features, logit_scale, logit_bias, labels,
                      reduction) -> tuple[Tensor, Tensor]:
    """Check every SigLIP argument; return the scale and bias as float32 (float64) 0-dim tensors."""
    _check_features(op, image_features, text_features)
    _check_reduction(op, reduction)
    _check_labels(op, labels, image_features.shape[0], image_features.device)
    scale = _scalar_parameter(op, "logit_scale", logit_scale, image_features, allow_vector=False, positive=True)
    bias = _scalar_parameter(op, "logit_bias", logit_bias, image_features, allow_vector=False, positive=False)
    return scale, bias


def _resolve(op: str, backend: str, features: Tensor) -> Provider:
    return CONTRASTIVE.resolve(op, backend, features.device, features.dtype)


def _check_distributed(op: str, distributed, group, image_features: Tensor) -> None:
    """distributed: None (this device's batch only), "ring" or "gather" over `group` (None: the default group)."""
    if distributed is None:
        if group is not None:
            raise ValueError(f"{op}: argument 'group' is given but 'distributed' is None; pass distributed='ring' "
                             f"or 'gather' to compute the loss across the group's ranks")
        return
    if distributed not in distributed_contrastive.MODES:
        raise ValueError(f"{op}: argument 'distributed' must be None or one of {distributed_contrastive.MODES}, "
                         f"got {distributed!r}")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(f"{op}: distributed={distributed!r} needs an initialised torch.distributed process group "
                           f"(torch.distributed.init_process_group, e.g. under torchrun)")
    distributed_contrastive.check_batches(op, image_features, group)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, *, labels: Tensor | None = None,
              reduction: str = "mean", backend: str = "auto", distributed: str | None = None,
              group=None) -> Tensor:
    """CLIP / InfoNCE loss, 1/2 (image->text + text->image cross-entropy), without the B x B logits.

    Args:
        image_features, text_features: (B, D) tensors of one dtype (bfloat16, float16, float32; float64 on the
            reference), B >= 1, D >= 1; normalised or not.
        logit_scale: the multiplier itself (open_clip passes ``logit_scale.exp()``): a number, a 0-dim tensor
            (learnable: it gets a gradient), or a (B,) tensor of per-anchor scales (each row of both directions
            uses its anchor's scale).
        labels: None (i pairs with i), or (B,) int64 group ids: all pairs with equal ids are positives and each
            row's target is uniform over its positives.
        reduction: "mean" (open_clip's value), "sum", or "none" for the (B,) vector 1/2 (l_i2t + l_t2i).
        distributed: None, or "ring" / "gather": the features (and labels, per-anchor scales) are this rank's b
            samples, and the loss is that of the batch concatenated over the ranks of `group` (default: the whole
            world), with gradients scaled for DistributedDataParallel (leanops.distributed_contrastive).
        group: the torch.distributed process group (with `distributed`).
    Returns:
        The loss in float32 (float64 for float64 features). Gradients flow to both features and the scale.
    """
    op = "leanops.clip_loss"
    scale = _clip_arguments(op, image_features, text_features, logit_scale, labels, reduction)
    _check_distributed(op, distributed, group, image_features)
    provider = _resolve(op, backend, image_features)
    if distributed is not None:
        return distributed_contrastive.clip_loss(image_features, text_features, scale, labels, reduction,
                                                 provider.operators, distributed, group)
    return _clip_from_primitives(provider, image_features, text_features, scale, labels, reduction)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, *,
                labels: Tensor | None = None, reduction: str = "mean", backend: str = "auto",
                distributed: str | None = None, group=None) -> Tensor:
    """SigLIP loss, -sum_ij log sigmoid(label_ij (s <x_i, y_j> + b)) / B, without the B x B logits.

    Args:
        image_features, text_features: (B, D) tensors of one dtype, B >= 1, D >= 1.
        logit_scale, logit_bias: numbers or 0-dim tensors (learnable: their gradients are reduced in the kernels).
        labels: None (the diagonal is positive) or (B,) int64 group ids (equal ids are positives).
        reduction: "mean" (open_clip's value: the sum over pairs divided by B), "sum", or "none" for the (B,)
            per-image sums.
        distributed, group: as clip_loss's (this rank's b samples; the loss of the concatenated batch).
    """
    op = "leanops.siglip_loss"
    scale, bias = _siglip_arguments(op, image_features, text_features, logit_scale, logit_bias, labels, reduction)
    _check_distributed(op, distributed, group, image_features)
    provider = _resolve(op, backend, image_features)
    if distributed is not None:
        return distributed_contrastive.siglip_loss(image_features, text_features, scale, bias, labels, reduction,
                                                   provider.operators, distributed, group)
    return _siglip_from_primitives(provider, image_features, text_features, scale, bias, labels, reduction)


def clip_loss_blockwise(image_features: Tensor, text_features: Tensor, logit_scale, *,
                        labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """``clip_loss`` through the blockwise plain-PyTorch primitives: O(block x B) memory, any device."""
    scale = _clip_arguments("leanops.clip_loss_blockwise", image_features, text_features, logit_scale, labels,
                            reduction)
    return _clip_from_primitives(CONTRASTIVE.provider("reference"), image_features, text_features, scale, labels,
                                 reduction)


def siglip_loss_blockwise(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, *,
                          labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """``siglip_loss`` through the blockwise plain-PyTorch primitives: O(block x B) memory, any device."""
    scale, bias = _siglip_arguments("leanops.siglip_loss_blockwise", image_features, text_features, logit_scale,
                                    logit_bias, labels, reduction)
    return _siglip_from_primitives(CONTRASTIVE.provider("reference"), image_features, text_features, scale, bias,
                                   labels, reduction)
