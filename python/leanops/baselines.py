"""Plain PyTorch as users write it today: open_clip's ``ClipLoss`` / ``SigLipLoss``, which build the B x B logits.
``leanops bench clip|siglip`` and ``leanops demo clip`` compare leanops against these. No leanops op uses them, and
the tests hold every provider to their own float64 oracle (tests/oracles.py).
"""
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale) -> Tensor:
    """open_clip's ClipLoss (one device): the mean of the image->text and text->image cross-entropies."""
    logits_per_image = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias) -> Tensor:
    """open_clip's SigLipLoss (one device): -sum_ij log sigmoid(label_ij (s <x_i, y_j> + b)) / B, label +1 on the
    diagonal and -1 elsewhere."""
    logits = logit_scale * image_features @ text_features.T + logit_bias
    batch = logits.shape[0]
    labels = 2 * torch.eye(batch, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / batch

