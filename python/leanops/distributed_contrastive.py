"""CLIP and SigLIP losses across the ranks of a torch.distributed process group (``clip_loss(..., distributed=...)``).

Each of the P ranks holds b image and b text features (the same b on every rank); the loss is the single-device
loss of the concatenated batch (B = P b), in rank order. Rank p computes the b x B block row (its images against
every text) with the blockwise primitives of its backend, tile by tile, on square b x b blocks (p, q):

- ``"ring"``: the text blocks travel around the ring (rank p sends to p + 1 and receives from p - 1) with
  point-to-point sends, the next block's transfer overlapping the current block's tiles. What belongs to a text
  block (its column statistics forward, its gradient backward) travels with it and comes home after P steps. No rank
  holds more than two text blocks: memory O(b D) per rank (Inf-CL's ring; SigLIP's neighbour exchange).
- ``"gather"``: every rank all-gathers the text features once (O(B D) per rank, one collective), computes its block
  row, and the per-column results (CLIP's column log-sum-exp, the text gradients) are reduced across ranks.

CLIP per block, with S = x_p y_q^T: the primitive gives the row log-sum-exp of the local images over block q and
the column log-sum-exp of block q's texts over the local images; they are merged over blocks with logaddexp. The
positive terms (the diagonal, or every pair with equal group ``labels``, which may sit on different ranks) are
sums of dot products, accumulated per block through per-label sums of features (O(b D), no b x b mask): with
labels None the labels are the global sample indices. Per-anchor scales use each side's own anchors' scales (two
primitive calls per block instead of one).

SigLIP per block: the primitive's labels come from one group vector shared by rows and columns, so it is called
with the diagonal as positives (groups = arange(b)) and corrected with softplus(-z) = softplus(z) - z: a block's
row sums are primitive + z_ii - sum over the block's true positives of z_ij, the corrections being O(b D) dot
products (the same per-label sums as CLIP's).

Scaling for DistributedDataParallel. The returned value is the single-device loss of the concatenated batch (the
same on every rank; ``reduction="none"``: this rank's b per-anchor values). Its backward gives each rank P times
its share of the single-device gradient: DDP averages gradients over the P ranks, so after DDP's all-reduce every
parameter (towers, logit_scale, logit_bias) holds the single-device gradient; no double averaging. The feature
gradients of rank p are P times the single-device gradient of its slice (``reduction="none"``: the gradients of
the sum over ranks of what each rank does with its values, unscaled). As with open_clip's local loss.
"""
import torch
import torch.distributed as dist

from .ops.registry import refuse_second_derivative

Tensor = torch.Tensor

MODES = ("gather", "ring")


# ---------------------------------------------------------------------------------------------------------------
# Per-label sums: the positive terms without a b x b mask.

class _LabelSums:
    """Sums of the rows of `values` (n, D) per label of `labels` (n,): lookup(query) gives, for each query label,
    the sum of the rows with that label (zeros if none) and their count."""

    def __init__(self, values: Tensor, labels: Tensor):
        self.keys, inverse = torch.unique(labels, return_inverse=True)
        self.sums = values.new_zeros((self.keys.numel(), values.shape[1])).index_add_(0, inverse, values)
        self.counts = torch.bincount(inverse, minlength=self.keys.numel())

    def lookup(self, query: Tensor) -> tuple[Tensor, Tensor]:
        position = torch.searchsorted(self.keys, query).clamp_(max=self.keys.numel() - 1)
        found = self.keys[position] == query
        return self.sums[position] * found[:, None], self.counts[position] * found


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Communication.

class _Ring:
    """Point-to-point exchanges with the ring neighbours of this rank in `group`."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world) if group is not None else \
            (self.rank + 1) % self.world
        self.previous = dist.get_global_rank(group, (self.rank - 1) % self.world) if group is not None else \
            (self.rank - 1) % self.world

    def start(self, tensors: list[Tensor]) -> tuple[list, list[Tensor]]:
        """Send `tensors` to the next rank and receive the previous rank's (same shapes) without waiting."""
        received = [torch.empty_like(t) for t in tensors]
        operations = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group) for t in tensors]
        operations += [dist.P2POp(dist.irecv, r, self.previous, self.group) for r in received]
        return dist.batch_isend_irecv(operations), received

    @staticmethod
    def finish(pending: tuple[list, list[Tensor]]) -> list[Tensor]:
        requests, received = pending
        for request in requests:
            request.wait()
        return received

    def shift(self, tensors: list[Tensor]) -> list[Tensor]:
        return self.finish(self.start(tensors))


def _all_gather(tensor: Tensor, group) -> Tensor:
    """(P, *tensor.shape): every rank's tensor, in rank order."""
    world = dist.get_world_size(group)
    out = tensor.new_empty((world,) + tuple(tensor.shape))
    dist.all_gather(list(out.unbind(0)), tensor.contiguous(), group=group)
    return out


def _reduce_to_owner(per_rank: Tensor, group) -> Tensor:
    """per_rank (P, ...): every rank's contributions to every rank's slice; returns this rank's slice summed over
    the ranks (a reduce-scatter; gloo has none, so an all-reduce there)."""
    rank = dist.get_rank(group)
    if dist.get_backend(group) == "nccl":
        out = per_rank.new_empty(per_rank.shape[1:])
        dist.reduce_scatter_tensor(out, per_rank.contiguous(), group=group)
        return out
    total = per_rank.contiguous()
    dist.all_reduce(total, group=group)
    return total[rank]


def _logsumexp_to_owner(per_rank: Tensor, group) -> Tensor:
    """per_rank (P, b): partial log-sum-exps of every rank's columns from this rank's rows; returns the complete
    log-sum-exp of this rank's columns."""
    rank = dist.get_rank(group)
    top = per_rank.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(per_rank - top)
    dist.all_reduce(total, group=group)
    return (top + torch.log(total))[rank]


def check_batches(op: str, image_features: Tensor, group) -> None:
    """Every rank must hold the same number of samples and feature width (the blocks are b x b)."""
    shape = torch.tensor(list(image_features.shape), dtype=torch.int64, device=image_features.device)
    shapes = _all_gather(shape, group)
    if not bool((shapes == shape).all()):
        listed = ", ".join(f"rank {rank}: {tuple(s.tolist())}" for rank, s in enumerate(shapes))
        raise ValueError(f"{op}: argument 'image_features' must have the same shape (b, D) on every rank of the "
                         f"group; got {listed}")


# ---------------------------------------------------------------------------------------------------------------
# CLIP.

def _clip_block_forward(ops, x, y, row_scale, col_scale, per_anchor):
    """Row lse of x over the block's texts y, column lse of y over x."""
    if not per_anchor:
        return ops.clip_forward(x, y, row_scale)
    return ops.clip_forward(x, y, row_scale)[0], ops.clip_forward(x, y, col_scale)[1]


def _clip_block_backward(ops, x, y, row_scale, col_scale, row_lse, col_lse, row_weight, col_weight, per_anchor):
    """(grad x, grad y, grad of the row anchors' scales, grad of the column anchors' scales) of the block's part of
    sum_i row_weight_i row_lse_i + sum_j col_weight_j col_lse_j. With one shared scale, its whole gradient is in
    the third output."""
    if not per_anchor:
        grad_x, grad_y, grad_scale = ops.clip_backward(x, y, row_scale, row_lse, col_lse, row_weight, col_weight)
        return grad_x, grad_y, grad_scale, torch.zeros_like(grad_scale)
    zeros = torch.zeros_like(row_weight)
    grad_x, grad_y, grad_row = ops.clip_backward(x, y, row_scale, row_lse, col_lse, row_weight, zeros)
    grad_x2, grad_y2, grad_col = ops.clip_backward(x, y, col_scale, row_lse, col_lse, zeros, col_weight)
    return grad_x + grad_x2, grad_y + grad_y2, grad_row, grad_col


class _DistributedClip(torch.autograd.Function):
    """Forward: (image (b, D), text (b, D), scale (0-dim or (b,)), labels (b,) int64 group ids or None for the
    diagonal, ...) -> the loss (reduction applied; module docstring for the scaling of the gradients)."""

    @staticmethod
    def forward(ctx, image, text, scale, labels, ops, mode, group, reduction):
        ring = _Ring(group)
        dtype = scale.dtype
        per_anchor = scale.dim() == 1
        batch = image.shape[0]
        scale_vector = scale.detach().expand(batch).contiguous()
        row_lse = torch.full((batch,), -torch.inf, dtype=dtype, device=image.device)
        grouped = labels is not None
        if grouped:
            x32 = image.to(dtype)
            positive_rows = torch.zeros(batch, dtype=dtype, device=image.device)
            counts = torch.zeros(batch, dtype=torch.int64, device=image.device)
            local_images = _LabelSums(x32, labels)
        else:
            # Diagonal positives: both directions' positive sum of anchor i is <x_i, y_i>, on this rank.
            positive_rows = _row_dot(image.to(dtype), text.to(dtype))
            counts = torch.ones(batch, dtype=torch.int64, device=image.device)

        def block(col_lse_q, col_positive_q, owner, text_q, scale_q, labels_q=None):
            """Merges the block's column statistics into col_lse_q, col_positive_q and the rows' into theirs."""
            row_part, col_part = _clip_block_forward(ops, image, text_q, scale_vector, scale_q, per_anchor)
            torch.logaddexp(row_lse, row_part, out=row_lse)
            torch.logaddexp(col_lse_q, col_part, out=col_lse_q)
            if not grouped:
                return
            text32 = text_q.to(dtype)
            sums, found = _LabelSums(text32, labels_q).lookup(labels)
            positive_rows.add_(_row_dot(x32, sums))
            counts.add_(found)
            col_positive_q.add_(_row_dot(text32, local_images.lookup(labels_q)[0]))

        col_lse, col_positives = _for_each_text_block(
            ring, mode, group, [text, scale_vector] + ([labels] if grouped else []), block,
            (torch.full((batch,), -torch.inf, dtype=dtype, device=image.device),
             torch.zeros(batch if grouped else 0, dtype=dtype, device=image.device)),
            (_logsumexp_to_owner, _reduce_to_owner))
        positive_cols = col_positives if grouped else positive_rows
        counts = counts.to(dtype)
        image_to_text = row_lse - scale_vector * positive_rows / counts
        text_to_image = col_lse - scale_vector * positive_cols / counts
        per_anchor_loss = 0.5 * (image_to_text + text_to_image)
        ctx.save_for_backward(image, text, scale_vector, labels, row_lse, col_lse, positive_rows, positive_cols,
                              counts)
        ctx.settings = (ops, mode, group, reduction, per_anchor, tuple(scale.shape))
        return _reduce(per_anchor_loss, reduction, group)

    @staticmethod
    def backward(ctx, grad_output):
        refuse_second_derivative("clip_loss(distributed=...)")
        image, text, scale_vector, labels, row_lse, col_lse, positive_rows, positive_cols, counts = ctx.saved_tensors
        ops, mode, group, reduction, per_anchor, scale_shape = ctx.settings
        ring = _Ring(group)
        dtype = scale_vector.dtype
        batch = image.shape[0]
        grouped = labels is not None
        weight = _anchor_weights(grad_output, reduction, batch, group, dtype)
        half = 0.5 * weight  # each direction's weight
        # The positive terms -c_i <x_i, sum of y_j over P(i)> (image->text) and -c_j <y_j, sum of x_i over P(j)>
        # (text->image), c = (w / 2) s / |P|, for this rank's anchors.
        coefficient = half * scale_vector / counts
        grad_image = torch.zeros(image.shape, dtype=dtype, device=image.device)
        grad_row_scale = torch.zeros_like(scale_vector)
        if grouped:
            x32 = image.to(dtype)
            local_images = _LabelSums(x32, labels)
            weighted_images = _LabelSums(x32 * coefficient[:, None], labels)
            del x32

        def block(grad_text_q, grad_cols_q, owner, text_q, scale_q, col_lse_q, col_weight_q, coefficient_q,
                  labels_q=None):
            """Adds the block's text and column-scale gradients into grad_text_q, grad_cols_q (in place) and the
            image-side ones into grad_image, grad_row_scale."""
            grad_x, grad_y, grad_rows, grad_cols = _clip_block_backward(
                ops, image, text_q, scale_vector, scale_q, row_lse, col_lse_q, half, col_weight_q, per_anchor)
            grad_image.add_(grad_x)
            grad_text_q.add_(grad_y)
            del grad_x, grad_y
            grad_row_scale.add_(grad_rows)
            grad_cols_q.add_(grad_cols)
            if not grouped:
                return
            text32 = text_q.to(dtype)
            texts_by_label, _ = _LabelSums(text32, labels_q).lookup(labels)
            grad_image.sub_(coefficient[:, None] * texts_by_label)
            del texts_by_label
            weighted_texts, _ = _LabelSums(text32 * coefficient_q[:, None], labels_q).lookup(labels)
            grad_image.sub_(weighted_texts)
            del weighted_texts
            images_by_label, _ = local_images.lookup(labels_q)
            grad_text_q.sub_(coefficient_q[:, None] * images_by_label)
            del images_by_label
            grad_text_q.sub_(weighted_images.lookup(labels_q)[0])

        grad_text, grad_col_scale = _for_each_text_block(
            ring, mode, group, [text, scale_vector, col_lse, half, coefficient] + ([labels] if grouped else []),
            block, (torch.zeros(text.shape, dtype=dtype, device=text.device), torch.zeros_like(scale_vector)),
            (_reduce_to_owner, _reduce_to_owner))
        if not grouped:
            # Diagonal positives, both directions: -(c_i + c_i) <x_i, y_i>.
            grad_image.sub_((2 * coefficient)[:, None] * text.to(dtype))
            grad_text.sub_((2 * coefficient)[:, None] * image.to(dtype))
        # d/ds of the positive terms: - w/2 (positive sum) / count, for both directions of each local anchor.
        grad_scale = grad_row_scale + grad_col_scale - half * (positive_rows + positive_cols) / counts
        grad_scale = grad_scale if per_anchor else grad_scale.sum().reshape(scale_shape)
        return (grad_image.to(image.dtype), grad_text.to(text.dtype), grad_scale, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------------------
# SigLIP.

class _DistributedSigLip(torch.autograd.Function):
    """Forward: (image (b, D), text (b, D), scale (0-dim), bias (0-dim), labels (b,) global ids or None for the
    diagonal, ...) -> the loss."""

    @staticmethod
    def _setup(image, scale, group):
        """(ring, statistics dtype, b, the primitive's groups: the block diagonal as positives)."""
        batch = image.shape[0]
        return _Ring(group), scale.dtype, batch, torch.arange(batch, device=image.device)

    @staticmethod
    def forward(ctx, image, text, scale, bias, labels, ops, mode, group, reduction):
        ring, dtype, batch, diagonal = _DistributedSigLip._setup(image, scale, group)
        grouped = labels is not None
        row_loss = torch.zeros(batch, dtype=dtype, device=image.device)

        def block(owner, text_q, labels_q=None):
            """The primitive counts the block's diagonal as positive: it is made negative (+ z_ii), and the true
            positives' softplus(-z) = softplus(z) - z (- z_ij), so that each pair counts with its real label."""
            row_loss.add_(ops.siglip_forward(image, text_q, scale, bias, diagonal))
            if grouped:
                x32, text32 = image.to(dtype), text_q.to(dtype)
                positives, found = _LabelSums(text32, labels_q).lookup(labels)
                row_loss.add_(scale * (_row_dot(x32, text32) - _row_dot(x32, positives)) + bias * (1 - found))
            elif owner != ring.rank:  # without labels only this rank's own block holds positives: its diagonal
                row_loss.add_(scale * _row_dot(image.to(dtype), text_q.to(dtype)) + bias)

        _for_each_text_block(ring, mode, group, [text] + ([labels] if grouped else []), block)
        ctx.save_for_backward(image, text, scale, bias, labels)
        ctx.settings = (ops, mode, group, reduction)
        return _reduce(row_loss, reduction, group)

    @staticmethod
    def backward(ctx, grad_output):
        refuse_second_derivative("siglip_loss(distributed=...)")
        image, text, scale, bias, labels = ctx.saved_tensors
        ops, mode, group, reduction = ctx.settings
        ring, dtype, batch, diagonal = _DistributedSigLip._setup(image, scale, group)
        grouped = labels is not None
        weight = _anchor_weights(grad_output, reduction, batch, group, dtype)
        grad_image = torch.zeros(image.shape, dtype=dtype, device=image.device)
        grad_scale = torch.zeros((), dtype=dtype, device=image.device)
        grad_bias = torch.zeros((), dtype=dtype, device=image.device)
        if grouped:
            weighted_images = _LabelSums(image.to(dtype) * weight[:, None], labels)

        def block(grad_text_q, owner, text_q, labels_q=None):
            """Adds the block's text gradient into grad_text_q and the rest into grad_image, grad_scale, grad_bias:
            the primitive's, and the corrections' (+ w_i z_ii - w_i sum over the true positives of z_ij)."""
            nonlocal grad_scale, grad_bias
            grad_x, grad_y, grad_s, grad_b = ops.siglip_backward(image, text_q, scale, bias, diagonal, weight)
            grad_image.add_(grad_x)
            grad_text_q.add_(grad_y)
            del grad_x, grad_y
            grad_scale = grad_scale + grad_s
            grad_bias = grad_bias + grad_b
            if not grouped and owner == ring.rank:
                return
            x32, text32 = image.to(dtype), text_q.to(dtype)
            grad_image.add_((weight * scale)[:, None] * text32)
            grad_text_q.add_(scale * (x32 * weight[:, None]))
            grad_scale = grad_scale + (weight * _row_dot(x32, text32)).sum()
            grad_bias = grad_bias + weight.sum()
            if grouped:
                positives, found = _LabelSums(text32, labels_q).lookup(labels)
                grad_image.sub_((weight * scale)[:, None] * positives)
                grad_scale = grad_scale - (weight * _row_dot(x32, positives)).sum()
                grad_bias = grad_bias - (weight * found).sum()
                del positives
                grad_text_q.sub_(scale * weighted_images.lookup(labels_q)[0])

        (grad_text,) = _for_each_text_block(ring, mode, group, [text] + ([labels] if grouped else []), block,
                                            (torch.zeros(text.shape, dtype=dtype, device=text.device),),
                                            (_reduce_to_owner,))
        return (grad_image.to(image.dtype), grad_text.to(text.dtype), grad_scale, grad_bias, None, None, None, None,
                None)


def _for_each_text_block(ring: _Ring, mode: str, group, own: list[Tensor], block,
                         accumulators: tuple[Tensor, ...] = (), reducers: tuple = ()) -> list[Tensor]:
    """Calls block(*accumulators of the block, owner, *owner's block of `own`) for the text block of every rank,
    and returns this rank's accumulators, complete.

    `accumulators` are the initial values of what belongs to a block (its column statistics, its gradient), which
    `block` updates in place. ring: the blocks come by one after the other, each accumulator travelling with its
    block and coming home after the last step. gather: every block is all-gathered, each gets its own accumulators,
    and `reducers` (one per accumulator: _reduce_to_owner or _logsumexp_to_owner) combine the ranks'."""
    if mode == "ring":
        payload = own
        travelling = list(accumulators)
        for step in range(ring.world):
            pending = ring.start(payload) if step < ring.world - 1 else None
            block(*travelling, (ring.rank - step) % ring.world, *payload)
            if travelling and ring.world > 1:
                travelling = ring.shift(travelling)
            if pending is not None:
                payload = ring.finish(pending)
        return travelling
    gathered = [_all_gather(t, group) for t in own]
    per_block = [initial.expand((ring.world,) + tuple(initial.shape)).clone() for initial in accumulators]
    for q in range(ring.world):
        block(*(stacked[q] for stacked in per_block), q, *(g[q] for g in gathered))
    del gathered
    return [reduce(stacked, group) for reduce, stacked in zip(reducers, per_block)]


# ---------------------------------------------------------------------------------------------------------------
# Reductions and their gradients' scaling.

def _reduce(per_anchor: Tensor, reduction: str, group) -> Tensor:
    """The single-device reduction of the concatenated per-anchor values: mean and sum all-reduce this rank's sum
    (the value is the same on every rank); "none" returns this rank's values."""
    if reduction == "none":
        return per_anchor
    total = per_anchor.sum()
    dist.all_reduce(total, group=group)
    if reduction == "sum":
        return total
    return total / (per_anchor.shape[0] * dist.get_world_size(group))


def _anchor_weights(grad_output: Tensor, reduction: str, batch: int, group, dtype) -> Tensor:
    """d(this rank's objective)/d(per-anchor value), P times the single-device share for mean and sum so that
    DDP's average over P ranks gives the single-device gradient."""
    if reduction == "none":
        return grad_output.to(dtype).contiguous()
    world = dist.get_world_size(group)
    scale = world / (batch * world) if reduction == "mean" else world
    return (grad_output.to(dtype) * scale).expand(batch).contiguous()


def clip_loss(image_features, text_features, scale, labels, reduction, operators, mode, group) -> Tensor:
    """The CLIP loss of the concatenated batch (module docstring); arguments already checked."""
    return _DistributedClip.apply(image_features.contiguous(), text_features.contiguous(), scale, labels, operators,
                                  mode, group, reduction)


def siglip_loss(image_features, text_features, scale, bias, labels, reduction, operators, mode, group) -> Tensor:
    """The SigLIP loss of the concatenated batch (module docstring); arguments already checked."""
    return _DistributedSigLip.apply(image_features.contiguous(), text_features.contiguous(), scale, bias, labels,
                                    operators, mode, group, reduction)
