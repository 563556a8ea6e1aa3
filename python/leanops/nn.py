"""torch.nn modules around the leanops losses: ``ClipLoss``, ``SigLipLoss``, ``CoCaLoss`` and ``DistillClipLoss``
with open_clip's constructors and forward signatures (so they drop into open_clip training code unchanged:
``leanops.integrations.open_clip.patch()`` swaps them into ``open_clip.create_loss``), and
``LinearCrossEntropyLoss``.

open_clip's distributed options (``world_size > 1``) map onto leanops' distributed modes; every combination open_clip
supports gives open_clip's loss value on every rank and open_clip's gradients on every rank (before DDP's average),
except where the table says otherwise:

==========================================  ==================================================================
open_clip                                   leanops
==========================================  ==================================================================
ClipLoss gather_with_grad + local_loss      distributed="gather" (or "ring"), each rank's mean over its own
                                            anchors (reduction "none", then the mean): open_clip's local value
                                            and feature gradients; a learnable scale's gradient is split over
                                            the ranks otherwise (a column's term counts on the rank holding the
                                            rows, open_clip's on the rank holding the column), with the same sum,
                                            so the same gradient after DDP's average
ClipLoss gather_with_grad, not local_loss   distributed="gather" (or "ring"), the whole batch's mean; the
                                            scale's gradient averaged over the ranks (open_clip's: every rank
                                            differentiates the whole loss)
ClipLoss neither (open_clip's default)      as above, and the features' gradients divided by the world size
                                            (open_clip differentiates only the local copy of the features)
ClipLoss local_loss, not gather_with_grad   this rank's rows against every rank's features gathered without
                                            gradient, on the blockwise primitives (b x b blocks; O(B D) memory)
ClipLoss use_horovod=True                   refused: leanops runs on torch.distributed
SigLipLoss dist_impl bidir / shift / reduce distributed="ring" (the neighbour exchange), this rank's images
            / None                          against every text, divided by the local batch: open_clip's value
SigLipLoss dist_impl gather                 distributed="gather"
==========================================  ==================================================================

``distributed=`` passed with ``world_size > 1`` chooses the transport ("ring": O(b D) per rank; "gather": one
all-gather) with open_clip's semantics above; with ``world_size == 1`` (the default) it keeps leanops' own
semantics (leanops.distributed_contrastive: the value of the whole batch on every rank, feature gradients P times
their share, for DDP).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import contrastive, cross_entropy, distill, distributed_contrastive, distributed_cross_entropy

Tensor = torch.Tensor

SIGLIP_DIST_IMPLS = {"bidir": "ring", "shift": "ring", "reduce": "ring", "gather": "gather"}


# ---------------------------------------------------------------------------------------------------------------
# Gradient plumbing for open_clip's distributed semantics.

class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by `factor`."""

    @staticmethod
    def forward(ctx, tensor, factor):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _average_gradient_over_ranks(tensor: Tensor, group) -> Tensor:
    """Identity forward; the gradient averaged over the ranks of `group` (every rank runs this backward): the sum
    over the ranks (distributed_cross_entropy.SameOnEveryRank), divided by their number."""
    return _ScaleGradient.apply(distributed_cross_entropy.SameOnEveryRank.apply(tensor, group),
                                1.0 / dist.get_world_size(group))


def _all_gather_without_grad(tensor: Tensor, group) -> Tensor:
    """(P, *tensor.shape): every rank's tensor, no gradient (open_clip's dist.all_gather)."""
    world = dist.get_world_size(group)
    out = tensor.new_empty((world,) + tuple(tensor.shape))
    dist.all_gather(list(out.unbind(0)), tensor.detach().contiguous(), group=group)
    return out


def gather_features(image_features: Tensor, text_features: Tensor, local_loss: bool, gather_with_grad: bool,
                    rank: int, world_size: int, group=None) -> tuple[Tensor, Tensor]:
    """open_clip's ``gather_features`` (torch.distributed, no Horovod): the (B, D) features of every rank, with
    open_clip's gradients (all of them with ``gather_with_grad``; this rank's slice alone without it and without
    ``local_loss``; none without either). O(B D): used by ``DistillClipLoss``."""
    if gather_with_grad:
        from torch.distributed import nn as distributed_nn  # the collectives with gradients

        return (torch.cat(distributed_nn.all_gather(image_features, group=group or dist.group.WORLD)),
                torch.cat(distributed_nn.all_gather(text_features, group=group or dist.group.WORLD)))
    images = list(_all_gather_without_grad(image_features, group).unbind(0))
    texts = list(_all_gather_without_grad(text_features, group).unbind(0))
    if not local_loss:
        images[rank], texts[rank] = image_features, text_features
    return torch.cat(images), torch.cat(texts)


# ---------------------------------------------------------------------------------------------------------------
# Options.

def _check_open_clip_options(cls: str, rank, world_size, use_horovod, distributed, group, reduction) -> None:
    if use_horovod:
        raise ValueError(f"leanops.nn.{cls}: use_horovod=True is not supported: leanops' distributed losses run on "
                         f"torch.distributed; launch with torchrun (open_clip_train without --horovod) and pass "
                         f"use_horovod=False")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"leanops.nn.{cls}: argument 'world_size' must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(f"leanops.nn.{cls}: argument 'rank' must be an int in [0, world_size = {world_size}), got "
                         f"{rank!r}")
    if distributed is not None and distributed not in distributed_contrastive.MODES:
        raise ValueError(f"leanops.nn.{cls}: argument 'distributed' must be None or one of "
                         f"{distributed_contrastive.MODES}, got {distributed!r}")
    contrastive._check_reduction(f"leanops.nn.{cls}", reduction)
    if world_size > 1 and reduction != "mean":
        raise ValueError(f"leanops.nn.{cls}: argument 'reduction' must be 'mean' with open_clip's distributed "
                         f"options (world_size = {world_size}); got {reduction!r}. For other reductions across "
                         f"ranks leave world_size=1 and pass distributed='ring' or 'gather'")
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        _check_world(f"leanops.nn.{cls}", rank, world_size, group)  # again in forward, where it must be initialised


def _check_world(op: str, rank: int, world_size: int, group) -> None:
    """open_clip's rank and world_size must be this process's in torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{op}: world_size={world_size} needs an initialised torch.distributed process group "
                           f"(torch.distributed.init_process_group, e.g. under torchrun)")
    actual_world, actual_rank = dist.get_world_size(group), dist.get_rank(group)
    if (actual_world, actual_rank) != (world_size, rank):
        raise ValueError(f"{op}: arguments 'rank' = {rank} and 'world_size' = {world_size} disagree with "
                         f"torch.distributed (rank {actual_rank} of {actual_world})")


def _check_features_for_open_clip(op: str, image_features, text_features, logit_scale) -> None:
    contrastive._check_features(op, image_features, text_features)
    if isinstance(logit_scale, Tensor) and logit_scale.dim() != 0:
        raise ValueError(f"{op}: argument 'logit_scale' must be a number or a 0-dim tensor with open_clip's "
                         f"distributed options, got shape {tuple(logit_scale.shape)} (per-anchor scales across "
                         f"ranks: leave world_size=1 and pass distributed='ring' or 'gather')")


def _zero_gradient_term(logit_bias) -> Tensor | float:
    """0 x logit_bias: CLIP's softmax ignores a bias added to every logit (its gradient is zero), but a learnable
    bias must still take part in the graph (DistributedDataParallel expects a gradient for every parameter)."""
    if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
        return (logit_bias * 0).sum()
    return 0.0


class _ContrastiveLoss(torch.nn.Module):
    """The options both contrastive modules keep: open_clip's rank and world size, the reduction, the backend,
    and the distributed mode and group."""

    def __init__(self, rank: int, world_size: int, reduction: str, backend: str, distributed: str | None, group):
        super().__init__()
        self.rank = rank
        self.world_size = world_size
        self.reduction = reduction
        self.backend = backend
        self.distributed = distributed
        self.group = group


class ClipLoss(_ContrastiveLoss):
    """CLIP loss without the B x B logits, a drop-in for open_clip's ``ClipLoss``.

    ``ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
    use_horovod=False)`` as open_clip's, and
    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``: ``logit_scale`` is
    the multiplier (open_clip's ``logit_scale.exp()``); a ``logit_bias`` added to every logit changes neither the
    value nor any gradient of the softmax (as in open_clip; it gets a zero gradient). ``output_dict=True`` returns
    ``{"contrastive_loss": loss}``.

    With ``world_size > 1`` the features are this rank's and the value and gradients are open_clip's for the same
    ``local_loss`` / ``gather_with_grad`` (the table in this module's docstring); ``rank`` and ``world_size`` must
    match torch.distributed (checked in forward). ``cache_labels`` is accepted and has no effect (leanops builds no
    label tensor). ``use_horovod=True`` is refused.

    leanops' own options, keyword only: ``reduction`` ("mean", "sum", "none"; "mean" only with world_size > 1),
    ``backend``, ``distributed`` ("ring" | "gather"; with world_size == 1: leanops' semantics, the loss of the
    batch concatenated over the ranks, see ``leanops.clip_loss``; with world_size > 1: the transport), ``group``;
    and forward's ``labels`` (group ids for duplicate captions, see ``leanops.clip_loss``).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, reduction: str = "mean",
                 backend: str = "auto", distributed: str | None = None, group=None):
        _check_open_clip_options(type(self).__name__, rank, world_size, use_horovod, distributed, group, reduction)
        super().__init__(rank, world_size, reduction, backend, distributed, group)
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
        self.cache_labels = cache_labels
        self.use_horovod = use_horovod

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False, *,
                labels=None):
        loss = self._contrastive(image_features, text_features, logit_scale, labels) + _zero_gradient_term(logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _contrastive(self, image_features, text_features, logit_scale, labels=None) -> Tensor:
        if self.world_size == 1:
            return contrastive.clip_loss(image_features, text_features, logit_scale, labels=labels,
                                         reduction=self.reduction, backend=self.backend,
                                         distributed=self.distributed, group=self.group)
        op = f"leanops.nn.{type(self).__name__}"
        _check_features_for_open_clip(op, image_features, text_features, logit_scale)
        _check_world(op, self.rank, self.world_size, self.group)
        mode = self.distributed or "gather"
        if self.local_loss and not self.gather_with_grad:
            if labels is not None:
                raise ValueError(f"{op}: argument 'labels' is not supported with local_loss=True and "
                                 f"gather_with_grad=False")
            return self._local_loss_without_gathered_gradients(op, image_features, text_features, logit_scale)
        if self.local_loss:
            # Each rank's mean over its own anchors; the "none" gradients are those of the sum of the ranks'
            # objectives, as open_clip's all_gather with gradients gives them.
            return contrastive.clip_loss(image_features, text_features, logit_scale, labels=labels, reduction="none",
                                         backend=self.backend, distributed=mode, group=self.group).mean()
        if isinstance(logit_scale, Tensor) and logit_scale.requires_grad:
            # Every open_clip rank differentiates the whole loss: the scale's gradient is the whole one on each
            # (leanops' is this rank's share times P: their average).
            logit_scale = _average_gradient_over_ranks(logit_scale, self.group)
        if not self.gather_with_grad:
            # Without gather_with_grad open_clip differentiates only the local copy of each rank's features: the
            # single-device gradient of its slice, 1/P of what leanops gives DDP.
            factor = 1.0 / self.world_size
            image_features = _ScaleGradient.apply(image_features, factor)
            text_features = _ScaleGradient.apply(text_features, factor)
        return contrastive.clip_loss(image_features, text_features, logit_scale, labels=labels, reduction="mean",
                                     backend=self.backend, distributed=mode, group=self.group)

    def _local_loss_without_gathered_gradients(self, op, image_features, text_features, logit_scale) -> Tensor:
        """open_clip's local loss over features gathered without gradients: this rank's image rows against every
        rank's texts and its text rows against every rank's images, the gradients reaching this rank's rows only.
        The row log-sum-exps come from the blockwise primitive on b x b blocks (its column statistics unused)."""
        scale = contrastive._clip_arguments(op, image_features, text_features, logit_scale, None, "mean")
        distributed_contrastive.check_batches(op, image_features, self.group)
        provider = contrastive._resolve(op, self.backend, image_features)
        scale_vector = scale.expand(image_features.shape[0]).contiguous()
        dtype = scale.dtype

        def one_direction(rows: Tensor, columns: Tensor) -> Tensor:
            gathered = _all_gather_without_grad(columns, self.group)
            row_lse = None
            for block in gathered.unbind(0):
                part = provider.operators.clip_forward(rows, block, scale_vector)[0]
                row_lse = part if row_lse is None else torch.logaddexp(row_lse, part)
            positives = (rows.to(dtype) * gathered[self.rank].to(dtype)).sum(dim=1)
            return (row_lse - scale_vector * positives).mean()

        return 0.5 * (one_direction(image_features.contiguous(), text_features)
                      + one_direction(text_features.contiguous(), image_features))

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, reduction={self.reduction!r}, backend={self.backend!r}, "
                f"distributed={self.distributed!r}")


class SigLipLoss(_ContrastiveLoss):
    """SigLIP loss without the B x B logits, a drop-in for open_clip's ``SigLipLoss``.

    ``SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None)`` as open_clip's, and
    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)`` (no bias: none
    added, as open_clip). With ``world_size > 1`` the value is open_clip's on every rank (this rank's images against
    every rank's texts, divided by the local batch) and so are the gradients; ``dist_impl`` "bidir" (None),
    "shift" and "reduce" map to leanops' ``distributed="ring"`` (the neighbour exchange), "gather" to
    ``distributed="gather"``; ``distributed=`` overrides the transport. ``cache_labels`` has no effect.
    Keyword-only options and ``labels`` as ``ClipLoss``'s.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 *, reduction: str = "mean", backend: str = "auto", distributed: str | None = None, group=None):
        _check_open_clip_options(type(self).__name__, rank, world_size, False, distributed, group, reduction)
        if dist_impl is not None and dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"leanops.nn.SigLipLoss: argument 'dist_impl' must be None or one of "
                             f"{tuple(SIGLIP_DIST_IMPLS)}, got {dist_impl!r}")
        super().__init__(rank, world_size, reduction, backend, distributed, group)
        self.cache_labels = cache_labels
        self.dist_impl = dist_impl or "bidir"

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False, *,
                labels=None):
        if logit_bias is None:
            logit_bias = 0.0
        if self.world_size == 1:
            loss = contrastive.siglip_loss(image_features, text_features, logit_scale, logit_bias, labels=labels,
                                           reduction=self.reduction, backend=self.backend,
                                           distributed=self.distributed, group=self.group)
        else:
            op = "leanops.nn.SigLipLoss"
            _check_features_for_open_clip(op, image_features, text_features, logit_scale)
            _check_world(op, self.rank, self.world_size, self.group)
            mode = self.distributed or SIGLIP_DIST_IMPLS[self.dist_impl]
            # This rank's per-image sums over every text; their mean is open_clip's per-rank value, and the "none"
            # gradients (of the sum of the ranks' objectives) are what open_clip's exchanges with gradients give.
            loss = contrastive.siglip_loss(image_features, text_features, logit_scale, logit_bias, labels=labels,
                                           reduction="none", backend=self.backend, distributed=mode,
                                           group=self.group).mean()
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}, distributed={self.distributed!r}")


class CoCaLoss(ClipLoss):
    """open_clip's ``CoCaLoss``: the CLIP loss (lean, as ``ClipLoss``) times ``clip_loss_weight`` and the caption
    cross-entropy (ignoring ``pad_id``, the mean over the other tokens) times ``caption_loss_weight``.

    ``CoCaLoss(caption_loss_weight, clip_loss_weight, pad_id=0, local_loss=False, gather_with_grad=False,
    cache_labels=False, rank=0, world_size=1, use_horovod=False)`` as open_clip's, and
    ``forward(image_features, text_features, logits, labels, logit_scale, output_dict=False)``: given the caption
    ``logits`` (N, L, V), exactly open_clip's (the logits exist already). The lean caption loss takes, instead of
    ``logits``, the text decoder's hidden states before its output projection, ``caption_hidden_states`` (N, L, D),
    and that projection, ``caption_projection`` (D, V: open_clip's ``text_decoder.text_projection``): the
    cross-entropy then goes through ``leanops.linear_cross_entropy`` and the N x L x V logits never exist.
    ``leanops.integrations.open_clip.lean_coca(model)`` makes a CoCa model's forward return those two instead of
    ``logits`` (so ``loss(**model_out)`` works unchanged). Returns ``(clip_loss, caption_loss)`` or
    ``{"contrastive_loss": ..., "caption_loss": ...}``; a ``logit_bias`` in ``model_out`` is accepted (CLIP ignores
    it). Where every token is padding, open_clip's mean is NaN and the lean one 0.
    """

    def __init__(self, caption_loss_weight, clip_loss_weight, pad_id: int = 0, local_loss: bool = False,
                 gather_with_grad: bool = False, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: str = "auto", distributed: str | None = None, group=None):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size, use_horovod=use_horovod, backend=backend,
                         distributed=distributed, group=group)
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.pad_id = pad_id

    def forward(self, image_features, text_features, logits=None, labels=None, logit_scale=None,
                output_dict: bool = False, *, logit_bias=None, caption_hidden_states=None, caption_projection=None):
        op = "leanops.nn.CoCaLoss"
        if labels is None:
            raise ValueError(f"{op}: argument 'labels' (the caption's target tokens) is required")
        if (logits is None) == (caption_hidden_states is None):
            raise ValueError(f"{op}: pass exactly one of 'logits' (open_clip's caption logits) and "
                             f"'caption_hidden_states' (with 'caption_projection': the lean caption loss)")
        if caption_hidden_states is not None and caption_projection is None:
            raise ValueError(f"{op}: argument 'caption_projection' (the decoder's text_projection, (D, V)) is "
                             f"required with 'caption_hidden_states'")
        device = (logits if logits is not None else caption_hidden_states).device
        if self.clip_loss_weight:
            if logit_scale is None:
                raise ValueError(f"{op}: argument 'logit_scale' is required when clip_loss_weight is nonzero")
            clip_loss = self.clip_loss_weight * (self._contrastive(image_features, text_features, logit_scale)
                                                 + _zero_gradient_term(logit_bias))
        else:
            clip_loss = torch.tensor(0, device=device)
        if logits is not None:
            caption_loss = F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=self.pad_id)
        else:
            if not isinstance(caption_projection, Tensor) or caption_projection.dim() != 2:
                raise TypeError(f"{op}: argument 'caption_projection' must be the (D, V) projection tensor, got "
                                f"{type(caption_projection).__name__}")
            caption_loss = cross_entropy.linear_cross_entropy(
                caption_hidden_states, caption_projection.T, labels, ignore_index=self.pad_id, backend=self.backend)
        caption_loss = caption_loss * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss


class DistillClipLoss(ClipLoss):
    """open_clip's ``DistillClipLoss`` without the B x B logits: the CLIP loss of the student plus the distillation
    toward the teacher's similarity distribution, 1/2 (dist(T, S) + dist(T^T, S^T)) with
    dist(T, S) = -mean_i sum_j softmax(T)_ij log_softmax(S)_ij (``leanops.distill``: row blocks, plain PyTorch in
    this first version).

    Constructor as ``ClipLoss``'s (open_clip's); ``forward(image_features, text_features, logit_scale,
    dist_image_features, dist_text_features, dist_logit_scale, output_dict=False)`` returns
    ``(contrastive_loss, distill_loss)`` or ``{"contrastive_loss": ..., "distill_loss": ...}``. The teacher's
    features may have another width. With ``world_size > 1`` the contrastive term is ``ClipLoss``'s and the
    distillation term gathers both models' features as open_clip's ``gather_features`` does (O(B D) per rank, the
    same gradients), over the local rows with ``local_loss``.
    """

    def forward(self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, output_dict: bool = False):
        if self.world_size == 1 and self.distributed is not None:
            raise ValueError("leanops.nn.DistillClipLoss: argument 'distributed' needs open_clip's world_size > 1 "
                             "(and rank): the distillation term follows open_clip's distributed options")
        contrastive_loss = self._contrastive(image_features, text_features, logit_scale)
        if self.world_size == 1:
            distill_loss = distill.distillation_loss(image_features, text_features, logit_scale,
                                                     dist_image_features, dist_text_features, dist_logit_scale)
        else:
            gather = dict(local_loss=self.local_loss, gather_with_grad=self.gather_with_grad, rank=self.rank,
                          world_size=self.world_size, group=self.group)
            all_images, all_texts = gather_features(image_features, text_features, **gather)
            all_teacher_images, all_teacher_texts = gather_features(dist_image_features, dist_text_features,
                                                                    **gather)
            if self.local_loss:
                rows = (image_features, text_features, dist_image_features, dist_text_features)
            else:
                rows = (all_images, all_texts, all_teacher_images, all_teacher_texts)
            image_to_text = distill.distillation_rows(rows[0], all_texts, logit_scale, rows[2], all_teacher_texts,
                                                      dist_logit_scale)
            text_to_image = distill.distillation_rows(rows[1], all_images, logit_scale, rows[3], all_teacher_images,
                                                      dist_logit_scale)
            distill_loss = 0.5 * (image_to_text.mean() + text_to_image.mean())
        if output_dict:
            return {"contrastive_loss": contrastive_loss, "distill_loss": distill_loss}
        return contrastive_loss, distill_loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """Cross-entropy of a linear classifier's logits without the N x V logits:
    ``forward(hidden, weight, targets, bias=None)``; the options are those of ``leanops.linear_cross_entropy``."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: float | None = None, squentropy: bool = False, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.squentropy = squentropy
        self.reduction = reduction
        self.backend = backend

    def forward(self, hidden, weight, targets, bias=None):
        return cross_entropy.linear_cross_entropy(
            hidden, weight, targets, bias=bias, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, squentropy=self.squentropy, reduction=self.reduction,
            backend=self.backend)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, squentropy={self.squentropy}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")
