"""torch.nn modules around the leanops losses: ``ClipLoss`` and ``SigLipLoss`` with open_clip's forward signatures
(so they drop into open_clip training code unchanged), and ``LinearCrossEntropyLoss``."""
import torch

from . import contrastive, cross_entropy


class _ContrastiveLoss(torch.nn.Module):
    """The options both contrastive modules keep: the reduction, the backend, and the distributed mode and group."""

    def __init__(self, reduction: str = "mean", backend: str = "auto", distributed: str | None = None, group=None):
        super().__init__()
        self.reduction = reduction
        self.backend = backend
        self.distributed = distributed
        self.group = group


class ClipLoss(_ContrastiveLoss):
    """CLIP loss without the B x B logits; ``forward(image_features, text_features, logit_scale, output_dict=False)``
    as open_clip's ``ClipLoss`` (``logit_scale`` is the multiplier, open_clip's ``logit_scale.exp()``).

    ``labels`` (group ids for duplicate captions) may be passed to forward; see ``leanops.clip_loss``.
    ``distributed="ring" | "gather"`` (and ``group``): each rank passes its own features and the loss is that of
    the batch concatenated over the ranks (open_clip's ``gather_with_grad`` + ``local_loss``, without the logits).
    """

    def forward(self, image_features, text_features, logit_scale, output_dict: bool = False, labels=None):
        loss = contrastive.clip_loss(image_features, text_features, logit_scale, labels=labels,
                                     reduction=self.reduction, backend=self.backend, distributed=self.distributed,
                                     group=self.group)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(_ContrastiveLoss):
    """SigLIP loss without the B x B logits; ``forward(image_features, text_features, logit_scale, logit_bias,
    output_dict=False)`` as open_clip's ``SigLipLoss``. ``distributed`` and ``group`` as ``ClipLoss``'s (the
    neighbour exchange of open_clip's SigLipLoss is ``distributed="ring"``)."""

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False,
                labels=None):
        if logit_bias is None:
            logit_bias = 0.0
        loss = contrastive.siglip_loss(image_features, text_features, logit_scale, logit_bias, labels=labels,
                                       reduction=self.reduction, backend=self.backend,
                                       distributed=self.distributed, group=self.group)
        return {"contrastive_loss": loss} if output_dict else loss


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
