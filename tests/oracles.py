"""The tests' oracle: the dense plain-PyTorch formulas that build the whole B x B similarity matrix or N x V logits
(O(B^2) / O(N V) memory), float64-capable. Every provider of leanops (the chunked reference included) is checked
against these; no production code uses them.

Contrastive: exactly open_clip's ``ClipLoss`` / ``SigLipLoss``, extended with group labels and per-anchor scales.
Linear cross-entropy: logits, then ``torch.nn.functional.cross_entropy`` plus the auxiliary terms.
"""
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def positive_mask(labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """(B, B) boolean: True where (i, j) is a positive pair (the diagonal, or equal group ids)."""
    if labels is None:
        return torch.eye(batch, dtype=torch.bool, device=device)
    return labels[:, None] == labels[None, :]


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, labels: Tensor | None = None,
              reduction: str = "mean") -> Tensor:
    """open_clip's ClipLoss: 1/2 (CE(image -> text) + CE(text -> image)).

    logits_i2t[i, j] = s_i <x_i, y_j>; logits_t2i[j, i] = s_j <y_j, x_i> (each row uses its anchor's scale). With
    group labels, each row's target distribution is uniform over its positives (soft-target cross-entropy).
    Returns the mean, the sum, or (reduction="none") the (B,) vector 1/2 (l_i2t[i] + l_t2i[i]).
    """
    batch = image_features.shape[0]
    similarity = image_features @ text_features.T
    scale = torch.as_tensor(logit_scale, dtype=similarity.dtype, device=similarity.device)
    row_scale = scale.reshape(-1, 1) if scale.dim() == 1 else scale
    logits_i2t = row_scale * similarity
    logits_t2i = row_scale * similarity.T
    if labels is None:
        targets = torch.arange(batch, device=similarity.device)
    else:
        mask = positive_mask(labels, batch, similarity.device).to(similarity.dtype)
        targets = mask / mask.sum(dim=1, keepdim=True)
    per_anchor = 0.5 * (F.cross_entropy(logits_i2t, targets, reduction="none")
                        + F.cross_entropy(logits_t2i, targets, reduction="none"))
    return apply_reduction(per_anchor, reduction)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """open_clip's SigLipLoss: -sum_ij log sigmoid(label_ij * (s <x_i, y_j> + b)) / B, label +1 for positives.

    reduction="none" gives the (B,) vector of per-image sums over j (its mean is the loss); "sum" their total.
    """
    batch = image_features.shape[0]
    logits = logit_scale * (image_features @ text_features.T) + logit_bias
    signs = 2 * positive_mask(labels, batch, logits.device).to(logits.dtype) - 1
    per_image = -F.logsigmoid(signs * logits).sum(dim=1)
    return apply_reduction(per_image, reduction)


def apply_reduction(per_anchor: Tensor, reduction: str) -> Tensor:
    """The mean, the sum, or (reduction="none") the per-anchor vector itself."""
    return {"mean": per_anchor.mean, "sum": per_anchor.sum}.get(reduction, lambda: per_anchor)()


def capped_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    """z' = softcap(h W^T + b), (N, V)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def per_token_loss(logits: Tensor, targets: Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                   z_loss: float = 0.0, squentropy: bool = False) -> Tensor:
    """(N,) losses from (N, V) logits: F.cross_entropy (with its label smoothing) + z_loss * lse^2 + (squentropy)
    sum_{j != t} z_j^2 / (V - 1); 0 at ignored tokens."""
    valid = targets != ignore_index
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="none")
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1) ** 2
    if squentropy:
        vocabulary = logits.shape[-1]
        off_target = torch.ones_like(logits, dtype=torch.bool)
        safe_targets = torch.where(valid, targets, 0)
        off_target[torch.arange(logits.shape[0], device=logits.device), safe_targets] = False
        # (masked before squaring: an ignored token's -inf logit must not turn its zero gradient into 0 * inf)
        squares = torch.where(off_target & valid[:, None], logits, 0).square().sum(dim=-1)
        loss = loss + (squares / (vocabulary - 1) if vocabulary > 1 else torch.zeros_like(squares))
    return torch.where(valid, loss, 0)


def reduce_tokens(per_token: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """"mean" over the valid tokens (0, not NaN, when there are none), "sum", or the (N,) vector itself."""
    count = max(int(valid.sum()), 1)
    return {"mean": lambda: per_token.sum() / count, "sum": per_token.sum}.get(reduction, lambda: per_token)()


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                         ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None, squentropy: bool = False, reduction: str = "mean") -> Tensor:
    """Cross-entropy of softcap(hidden @ weight^T + bias) against targets, built the plain way (hidden (..., D),
    targets (...); "none" returns the per-token losses in targets' shape)."""
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    logits = capped_logits(flat_hidden, weight, bias, softcap)
    per_token = per_token_loss(logits, flat_targets, ignore_index=ignore_index, label_smoothing=label_smoothing,
                               z_loss=z_loss, squentropy=squentropy)
    reduced = reduce_tokens(per_token, flat_targets != ignore_index, reduction)
    return reduced.reshape(targets.shape) if reduction == "none" else reduced
