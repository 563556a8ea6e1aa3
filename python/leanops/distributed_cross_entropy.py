"""Vocabulary-parallel linear cross-entropy (``linear_cross_entropy(..., group=...)``).

Rank r of the group holds rows [offset_r, offset_r + V_r) of the (V, D) classifier (and of its bias), in rank
order; the hidden states h (N, D) and the targets (global class indices) are the same on every rank, as in
Megatron-style tensor parallelism. Each rank runs the chunked primitive on its slice, with its own targets
(t - offset_r where t falls in its slice, else none), which gives per-token statistics of its logits:
lse_r, z_t (0 unless the target is on rank r), sum_j z_j and sum_j z_j^2. The global statistics are

    lse = log sum_r exp(lse_r)    (all-reduces of the max and of the rescaled sums: 2 N floats)
    z_t, sum z, sum z^2 = sum over r of the ranks' values    (all-reduces of N floats each)

and the loss is assembled from them exactly as on one device (label smoothing, z-loss, softcap, squentropy with
the global V). No rank holds more than one chunk of its N x V_r logits. Every rank computes the same loss; the
autograd of the reductions is therefore local (the gradient of lse_r is g_lse exp(lse_r - lse), that of a summed
statistic is its own gradient), and the only collective of the backward pass is the all-reduce of the hidden
states' gradient, sum_r G_r W_r: hidden's gradient is the whole single-device one on every rank, the weight's and
bias's gradients are each rank's slices of the single-device ones.
"""
import torch
import torch.distributed as dist

from .ops.registry import refuse_second_derivative

Tensor = torch.Tensor


class SameOnEveryRank(torch.autograd.Function):
    """Identity forward; the backward all-reduces (sums) the gradient over the group: for an input that every rank
    holds and each rank's slice of the computation uses (the hidden states of a vocabulary-parallel head)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        refuse_second_derivative("a loss over ranks (all-reduced gradient)")  # the all-reduce is not differentiable
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverRanks(torch.autograd.Function):
    """The sum over the group's ranks of each rank's tensor. Every rank goes on to compute the same loss from the
    sum, so the gradient of its own term is the sum's gradient, unchanged (no collective)."""

    @staticmethod
    def forward(ctx, tensor, group):
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _LogSumExpOverRanks(torch.autograd.Function):
    """log sum_r exp(x_r) over the group's ranks; the gradient of x_r is g exp(x_r - result) (local, as above)."""

    @staticmethod
    def forward(ctx, local, group):
        top = local.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = torch.exp(local - top)
        dist.all_reduce(total, group=group)
        result = top + torch.log(total)
        ctx.save_for_backward(local, result)
        return result

    @staticmethod
    def backward(ctx, grad):
        local, result = ctx.saved_tensors
        return grad * torch.exp(local - result), None


def _slice_sizes(weight: Tensor, hidden: Tensor, group) -> Tensor:
    """(P, 2) int64: every rank's (V_r, D), and the hidden states' (N, D) check in the same collective."""
    mine = torch.tensor([weight.shape[0], weight.shape[1], hidden.numel() // max(hidden.shape[-1], 1),
                         hidden.shape[-1]], dtype=torch.int64, device=weight.device)
    everyone = mine.new_empty((dist.get_world_size(group), mine.numel()))
    dist.all_gather(list(everyone.unbind(0)), mine, group=group)
    return everyone


def check_and_count(op: str, hidden: Tensor, weight: Tensor, group) -> int:
    """Checks that every rank holds the same hidden-state shape and feature width; returns the total V."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{op}: argument 'group' needs an initialised torch.distributed process group "
                           f"(torch.distributed.init_process_group, e.g. under torchrun)")
    sizes = _slice_sizes(weight, hidden, group)
    if not bool((sizes[:, 1:] == sizes[0, 1:]).all()):
        listed = ", ".join(f"rank {r}: weight D {int(s[1])}, hidden ({int(s[2])} tokens, D {int(s[3])})"
                           for r, s in enumerate(sizes))
        raise ValueError(f"{op}: with 'group', every rank must pass the same hidden states and a weight slice of the "
                         f"same width D; got {listed}")
    return int(sizes[:, 0].sum())


def statistics(operators, hidden: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, softcap: float,
               group) -> tuple[int, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """(V, (lse, target logit, logit sum, logit square sum)) of the whole vocabulary, each (N,), differentiable.

    hidden (N, D), weight (V_r, D), bias (V_r,) or empty, targets (N,) global class indices or -1 (none)."""
    sizes = _slice_sizes(weight, hidden, group)[:, 0]
    rank = dist.get_rank(group)
    offset = int(sizes[:rank].sum())
    mine = (targets >= offset) & (targets < offset + weight.shape[0])
    local_targets = torch.where(mine, targets - offset, -1)
    shared_hidden = SameOnEveryRank.apply(hidden.contiguous(), group)
    lse, target_logit, logit_sum, logit_square_sum = operators.linear_ce_forward(
        shared_hidden, weight.contiguous(), bias.contiguous(), local_targets, softcap)
    return int(sizes.sum()), (_LogSumExpOverRanks.apply(lse, group), _SumOverRanks.apply(target_logit, group),
                              _SumOverRanks.apply(logit_sum, group), _SumOverRanks.apply(logit_square_sum, group))
