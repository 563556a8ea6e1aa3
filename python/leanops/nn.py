"""torch.nn modules around the leanops losses, with open_clip's forward signatures so they drop into open_clip
training code unchanged (``ClipLoss``, ``SigLipLoss``)."""
import torch

from . import contrastive


class ClipLoss(torch.nn.Module):
    """CLIP loss without the B x B logits; ``forward(image_features, text_features, logit_scale, output_dict=False)``
    as open_clip's ``ClipLoss`` (``logit_scale`` is the multiplier, open_clip's ``logit_scale.exp()``).

    ``labels`` (group ids for duplicate captions) may be passed to forward; see ``leanops.clip_loss``.
    """

    def __init__(self, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.reduction = reduction
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, output_dict: bool = False, labels=None):
        loss = contrastive.clip_loss(image_features, text_features, logit_scale, labels=labels,
                                     reduction=self.reduction, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(torch.nn.Module):
    """SigLIP loss without the B x B logits; ``forward(image_features, text_features, logit_scale, logit_bias,
    output_dict=False)`` as open_clip's ``SigLipLoss``."""

    def __init__(self, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.reduction = reduction
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False,
                labels=None):
        if logit_bias is None:
            logit_bias = 0.0
        loss = contrastive.siglip_loss(image_features, text_features, logit_scale, logit_bias, labels=labels,
                                       reduction=self.reduction, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
