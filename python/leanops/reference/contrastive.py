"""Contrastive (CLIP / InfoNCE) and sigmoid (SigLIP) losses in plain PyTorch.

Two versions of each:

- ``clip_loss`` / ``siglip_loss``: the textbook computation that builds the B x B logits, exactly open_clip's
  ``ClipLoss`` / ``SigLipLoss`` (extended with group labels and per-anchor scales). float64-capable: the oracle of the
  tests. Memory O(B^2).
- ``clip_forward`` / ``clip_backward`` / ``siglip_forward`` / ``siglip_backward``: the blockwise primitives that the
  Triton, CUDA and C++ kernels implement, in plain PyTorch over row blocks: memory O(block x B). With
  ``python/leanops/contrastive.py`` they give ``clip_loss_blockwise`` / ``siglip_loss_blockwise``.

Notation: x = image features, y = text features, both (B, D); S[i, j] = <x_i, y_j>; s = per-anchor logit scales.
"""
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Rows per block of the blockwise primitives: a (block x B) float32 tile is the largest temporary.
BLOCK_ROWS = 1024


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
    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor


# ---------------------------------------------------------------------------------------------------------------
# Blockwise primitives (the kernels' contract; see csrc/ops.cpp). All statistics and gradients are float32 (float64
# for float64 features).

def _accumulation_dtype(features: Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _row_blocks(batch: int):
    for start in range(0, batch, BLOCK_ROWS):
        yield slice(start, min(start + BLOCK_ROWS, batch))


def clip_forward(image: Tensor, text: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """row_lse[i] = logsumexp_j(scale[i] S[i, j]); col_lse[j] = logsumexp_i(scale[j] S[i, j]).

    One pass over row blocks; the column statistics are combined across blocks with a running max and sum.
    """
    dtype = _accumulation_dtype(image)
    x, y, s = image.to(dtype), text.to(dtype), scale.to(dtype)
    batch = x.shape[0]
    row_lse = torch.empty(batch, dtype=dtype, device=x.device)
    col_max = torch.full((batch,), -torch.inf, dtype=dtype, device=x.device)
    col_sum = torch.zeros(batch, dtype=dtype, device=x.device)
    for rows in _row_blocks(batch):
        similarity = x[rows] @ y.T  # (block, B)
        row_lse[rows] = torch.logsumexp(s[rows, None] * similarity, dim=1)
        column_logits = s[None, :] * similarity
        block_max = column_logits.amax(dim=0)
        new_max = torch.maximum(col_max, block_max)
        col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(column_logits - new_max).sum(dim=0)
        col_max = new_max
    return row_lse, col_max + torch.log(col_sum)


def clip_backward(image: Tensor, text: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor,
                  row_weight: Tensor, col_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i row_weight[i] row_lse[i] + sum_j col_weight[j] col_lse[j] (see csrc/ops.cpp)."""
    dtype = _accumulation_dtype(image)
    x, y, s = image.to(dtype), text.to(dtype), scale.to(dtype)
    grad_image = torch.empty_like(x)
    grad_text = torch.zeros_like(y)
    grad_scale = torch.zeros_like(s)
    for rows in _row_blocks(x.shape[0]):
        similarity = x[rows] @ y.T
        p = torch.exp(s[rows, None] * similarity - row_lse[rows, None])  # row softmax
        q = torch.exp(s[None, :] * similarity - col_lse[None, :])  # column softmax (this block's rows)
        row_term = (row_weight[rows] * s[rows])[:, None] * p
        col_term = (col_weight * s)[None, :] * q
        g = row_term + col_term
        grad_image[rows] = g @ y
        grad_text += g.T @ x[rows]
        grad_scale[rows] += row_weight[rows] * (p * similarity).sum(dim=1)
        grad_scale += col_weight * (q * similarity).sum(dim=0)
    return grad_image, grad_text, grad_scale


def _signed_logits(x_rows: Tensor, y: Tensor, scale: Tensor, bias: Tensor, groups: Tensor, rows: slice):
    similarity = x_rows @ y.T
    signs = torch.where(groups[rows, None] == groups[None, :], 1.0, -1.0).to(similarity.dtype)
    return similarity, signs, signs * (scale * similarity + bias)


def siglip_forward(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, groups: Tensor) -> Tensor:
    """row_loss[i] = sum_j softplus(-label[i, j] (scale S[i, j] + bias)), label +1 where groups match."""
    dtype = _accumulation_dtype(image)
    x, y = image.to(dtype), text.to(dtype)
    row_loss = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    for rows in _row_blocks(x.shape[0]):
        _, _, signed = _signed_logits(x[rows], y, scale.to(dtype), bias.to(dtype), groups, rows)
        row_loss[rows] = F.softplus(-signed).sum(dim=1)
    return row_loss


def siglip_backward(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, groups: Tensor,
                    row_weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sum_i row_weight[i] row_loss[i] for image, text, scale and bias (see csrc/ops.cpp)."""
    dtype = _accumulation_dtype(image)
    x, y, s, b = image.to(dtype), text.to(dtype), scale.to(dtype), bias.to(dtype)
    grad_image = torch.empty_like(x)
    grad_text = torch.zeros_like(y)
    grad_scale = torch.zeros((), dtype=dtype, device=x.device)
    grad_bias = torch.zeros((), dtype=dtype, device=x.device)
    for rows in _row_blocks(x.shape[0]):
        similarity, signs, signed = _signed_logits(x[rows], y, s, b, groups, rows)
        d = -row_weight[rows, None] * signs * torch.sigmoid(-signed)  # d(loss) / d(logit)
        grad_image[rows] = s * (d @ y)
        grad_text += s * (d.T @ x[rows])
        grad_scale += (d * similarity).sum()
        grad_bias += d.sum()
    return grad_image, grad_text, grad_scale, grad_bias
