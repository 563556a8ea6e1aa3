"""The reference provider of the contrastive family: the blockwise CLIP and SigLIP primitives in plain PyTorch.

``clip_forward`` / ``clip_backward`` / ``siglip_forward`` / ``siglip_backward`` are the primitives that the Triton,
CUDA and C++ kernels implement (csrc/ops.cpp states their contract), here over row blocks with torch's own operators:
memory O(block x B), any device, float64 too. With ``python/leanops/contrastive.py`` they give ``clip_loss`` /
``siglip_loss`` with ``backend="reference"`` (and ``clip_loss_blockwise`` / ``siglip_loss_blockwise``). The dense
O(B^2) formulas are the tests' oracle (tests/oracles.py), not a provider.

Notation: x = image features, y = text features, both (B, D); S[i, j] = <x_i, y_j>; s = per-anchor logit scales.
"""
import torch
import torch.nn.functional as F

from ._chunks import accumulation_dtype, row_slices

Tensor = torch.Tensor

# Rows per block of the blockwise primitives: a (block x B) float32 tile is the largest temporary.
BLOCK_ROWS = 1024


# All statistics and gradients are float32 (float64 for float64 features).



def clip_forward(image: Tensor, text: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """row_lse[i] = logsumexp_j(scale[i] S[i, j]); col_lse[j] = logsumexp_i(scale[j] S[i, j]).

    One pass over row blocks; the column statistics are combined across blocks with a running max and sum.
    """
    dtype = accumulation_dtype(image)
    x, y, s = image.to(dtype), text.to(dtype), scale.to(dtype)
    batch = x.shape[0]
    row_lse = torch.empty(batch, dtype=dtype, device=x.device)
    col_max = torch.full((batch,), -torch.inf, dtype=dtype, device=x.device)
    col_sum = torch.zeros(batch, dtype=dtype, device=x.device)
    for rows in row_slices(batch, BLOCK_ROWS):
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
    dtype = accumulation_dtype(image)
    x, y, s = image.to(dtype), text.to(dtype), scale.to(dtype)
    grad_image = torch.empty_like(x)
    grad_text = torch.zeros_like(y)
    grad_scale = torch.zeros_like(s)
    for rows in row_slices(x.shape[0], BLOCK_ROWS):
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
    dtype = accumulation_dtype(image)
    x, y = image.to(dtype), text.to(dtype)
    row_loss = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    for rows in row_slices(x.shape[0], BLOCK_ROWS):
        _, _, signed = _signed_logits(x[rows], y, scale.to(dtype), bias.to(dtype), groups, rows)
        row_loss[rows] = F.softplus(-signed).sum(dim=1)
    return row_loss


def siglip_backward(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, groups: Tensor,
                    row_weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sum_i row_weight[i] row_loss[i] for image, text, scale and bias (see csrc/ops.cpp)."""
    dtype = accumulation_dtype(image)
    x, y, s, b = image.to(dtype), text.to(dtype), scale.to(dtype), bias.to(dtype)
    grad_image = torch.empty_like(x)
    grad_text = torch.zeros_like(y)
    grad_scale = torch.zeros((), dtype=dtype, device=x.device)
    grad_bias = torch.zeros((), dtype=dtype, device=x.device)
    for rows in row_slices(x.shape[0], BLOCK_ROWS):
        similarity, signs, signed = _signed_logits(x[rows], y, s, b, groups, rows)
        d = -row_weight[rows, None] * signs * torch.sigmoid(-signed)  # d(loss) / d(logit)
        grad_image[rows] = s * (d @ y)
        grad_text += s * (d.T @ x[rows])
        grad_scale += (d * similarity).sum()
        grad_bias += d.sum()
    return grad_image, grad_text, grad_scale, grad_bias
