"""The per-anchor CLIP loss as one torch.library operator, over any provider of the blockwise primitives.

With x = image features, y = text features (B, D), per-anchor scales s (B,), row/column log-sum-exps from the
``clip_forward`` primitive and group means Ybar_i, Xbar_i over i's positives (y_i, x_i without labels):

    per_anchor[i] = 1/2 (row_lse[i] - s_i <x_i, Ybar_i>) + 1/2 (col_lse[i] - s_i <y_i, Xbar_i>)

Its gradient is the ``clip_backward`` primitive's (weights g/2 on both log-sum-exps) minus the positive terms':

    grad_x_i -= 1/(2 n_i) [ w_i Ysum_i + sum_{j in group(i)} w_j y_j ]      w = g * s, n_i = size of i's group
    grad_y_i -= 1/(2 n_i) [ w_i Xsum_i + sum_{j in group(i)} w_j x_j ]
    grad_s_i -= g_i / (2 n_i) [ <x_i, Ysum_i> + <y_i, Xsum_i> ]

(without labels: grad_x_i -= w_i y_i, grad_y_i -= w_i x_i, grad_s_i -= g_i <x_i, y_i>).

Why one operator rather than plain torch ops around ``clip_forward``: the positive terms are computed in row
chunks with float32 (float64) accumulation, and their gradient is added to the primitive's float32 gradient before
the single rounding to the feature dtype. Plain autograd would keep float32 copies of both feature matrices until
the backward pass (2 x 256 MiB at B=131072, D=512) and round the two parts of the gradient to bf16 separately
before adding them, where they nearly cancel for confidently matched rows.
"""
import torch

from .contrastive import CONTRASTIVE, similarity
from .registry import Autograd, composite_operator, statistics_dtype

Tensor = torch.Tensor

# Rows per chunk are chosen so that a chunk's float32 temporaries hold about this many elements (16 MiB).
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(batch: int, dim: int):
    rows = max(1, CHUNK_ELEMENTS // max(dim, 1))
    for start in range(0, batch, rows):
        yield slice(start, min(start + rows, batch))


class _Groups:
    """Group bookkeeping in static shapes: every sample points at the first sorted position of its group id (a
    representative in [0, B) shared by the group), so group sums are index_adds into a (B, ...) table."""

    def __init__(self, labels: Tensor, dtype: torch.dtype):
        sorted_labels, _ = torch.sort(labels)
        self.representative = torch.searchsorted(sorted_labels, labels)
        ones = torch.ones(labels.shape[0], dtype=dtype, device=labels.device)
        self.sizes = torch.zeros_like(ones).index_add_(0, self.representative, ones)[self.representative]

    def sum_table(self, features: Tensor, dtype: torch.dtype, row_weight: Tensor | None = None) -> Tensor:
        """(B, D) table whose row representative[i] is sum over i's group of row_weight_j * features_j (float32)."""
        table = torch.zeros(features.shape, dtype=dtype, device=features.device)
        for rows in _row_chunks(*features.shape):
            chunk = features[rows].to(dtype)
            if row_weight is not None:
                chunk = row_weight[rows, None] * chunk
            table.index_add_(0, self.representative[rows], chunk)
        return table


def _positive_dots(image: Tensor, text: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """(<x_i, Ybar_i>, <y_i, Xbar_i>) accumulated in float32 (float64), row chunk by row chunk."""
    dtype = statistics_dtype(image)
    batch, dim = image.shape
    if labels is None:
        dots = torch.empty(batch, dtype=dtype, device=image.device)
        for rows in _row_chunks(batch, dim):
            dots[rows] = torch.linalg.vecdot(image[rows].to(dtype), text[rows].to(dtype))
        return dots, dots
    groups = _Groups(labels, dtype)
    image_to_text = torch.empty(batch, dtype=dtype, device=image.device)
    text_to_image = torch.empty_like(image_to_text)
    text_sums, image_sums = groups.sum_table(text, dtype), groups.sum_table(image, dtype)
    for rows in _row_chunks(batch, dim):
        members = groups.representative[rows]
        image_to_text[rows] = torch.linalg.vecdot(image[rows].to(dtype), text_sums[members])
        text_to_image[rows] = torch.linalg.vecdot(text[rows].to(dtype), image_sums[members])
    return image_to_text / groups.sizes, text_to_image / groups.sizes


def _clip_per_anchor(image: Tensor, text: Tensor, scale: Tensor, labels: Tensor | None,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(per_anchor, row_lse, col_lse), each (B,) float32 (float64); `backend` names the provider of the blockwise
    primitives (reference, cpu, cuda, triton). The log-sum-exps are returned for the backward."""
    row_lse, col_lse = CONTRASTIVE.provider(backend).operators.clip_forward(image, text, scale)
    image_to_text, text_to_image = _positive_dots(image, text, labels)
    per_anchor = 0.5 * ((row_lse - scale * image_to_text) + (col_lse - scale * text_to_image))
    return per_anchor, row_lse, col_lse


def _fake(image, text, scale, labels, backend):
    batch = image.shape[0]
    return tuple(torch.empty(batch, dtype=statistics_dtype(image), device=image.device) for _ in range(3))


def _setup_context(ctx, inputs, output):
    image, text, scale, labels, backend = inputs
    _, row_lse, col_lse = output
    ctx.backend = backend
    ctx.save_for_backward(image, text, scale, labels, row_lse, col_lse)
    ctx.mark_non_differentiable(row_lse, col_lse)


def _subtract_positive_gradients(grad_image, grad_text, grad_scale, image, text, scale, labels, grad):
    """Subtract the positive terms' gradients (module docstring) in place, row chunk by row chunk."""
    dtype = grad_image.dtype
    batch, dim = image.shape
    weight = grad * scale
    if labels is None:
        for rows in _row_chunks(batch, dim):
            x, y = image[rows].to(dtype), text[rows].to(dtype)
            grad_image[rows] -= weight[rows, None] * y
            grad_text[rows] -= weight[rows, None] * x
            grad_scale[rows] -= grad[rows] * torch.linalg.vecdot(x, y)
        return
    groups = _Groups(labels, dtype)
    text_sums, image_sums = groups.sum_table(text, dtype), groups.sum_table(image, dtype)
    weighted_text_sums = groups.sum_table(text, dtype, row_weight=weight)
    weighted_image_sums = groups.sum_table(image, dtype, row_weight=weight)
    half_over_size = 0.5 / groups.sizes
    for rows in _row_chunks(batch, dim):
        members = groups.representative[rows]
        x, y, factor = image[rows].to(dtype), text[rows].to(dtype), half_over_size[rows, None]
        grad_image[rows] -= factor * (weight[rows, None] * text_sums[members] + weighted_text_sums[members])
        grad_text[rows] -= factor * (weight[rows, None] * image_sums[members] + weighted_image_sums[members])
        dots = torch.linalg.vecdot(x, text_sums[members]) + torch.linalg.vecdot(y, image_sums[members])
        grad_scale[rows] -= grad[rows] * half_over_size[rows] * dots


def _formula(ctx):
    """(per_anchor, row_lse, col_lse) from the saved inputs, dense and differentiable (second derivatives)."""
    image, text, scale, labels, _, _ = ctx.saved_tensors
    logits_similarity = similarity(image, text)
    s = scale.to(logits_similarity.dtype)
    row_lse = torch.logsumexp(s[:, None] * logits_similarity, dim=1)
    col_lse = torch.logsumexp(s[None, :] * logits_similarity, dim=0)
    if labels is None:
        image_to_text = text_to_image = logits_similarity.diagonal()
    else:
        positives = (labels[:, None] == labels[None, :]).to(logits_similarity.dtype)  # symmetric
        sizes = positives.sum(dim=1)
        image_to_text = (positives * logits_similarity).sum(dim=1) / sizes
        text_to_image = (positives * logits_similarity).sum(dim=0) / sizes
    per_anchor = 0.5 * ((row_lse - s * image_to_text) + (col_lse - s * text_to_image))
    return (per_anchor, row_lse, col_lse), (image, text, scale, labels, None)


def _backward(_operators, ctx, grad_per_anchor, _grad_row_lse, _grad_col_lse):
    """(``_operators``: None for a composite operator; ctx.backend names the provider.)"""
    image, text, scale, labels, row_lse, col_lse = ctx.saved_tensors
    grad = grad_per_anchor.contiguous()
    half = 0.5 * grad
    grad_image, grad_text, grad_scale = CONTRASTIVE.provider(ctx.backend).operators.clip_backward(
        image, text, scale, row_lse, col_lse, half, half)
    _subtract_positive_gradients(grad_image, grad_text, grad_scale, image, text, scale, labels, grad)
    return grad_image.to(image.dtype), grad_text.to(text.dtype), grad_scale.to(scale.dtype), None, None


clip_per_anchor = composite_operator(
    "clip_per_anchor(Tensor image, Tensor text, Tensor scale, Tensor? labels, str backend) -> "
    "(Tensor per_anchor, Tensor row_lse, Tensor col_lse)",
    _clip_per_anchor, _fake, Autograd(_setup_context, _backward, _formula))
