"""Drawing FRUGAL's subspaces, and what the moments do when one changes (the package docstring states the math).

k = round(density * size), Python's round. The draws come from the optimizer's torch.Generator (never the global RNG),
in group order, parameter by parameter; under torch.distributed every rank then takes the first rank's draw
(``from_rank_zero``). Per projection:

- blockwise: the active set of a group, sorted int32 positions of k of its n tensors (random: ``randperm(n)[:k]``;
  ascending / descending: a window of k consecutive positions moving on by k at every switch, wrapping around).
- columns / rows: ``state["indices"]``, k sorted int32 indices of the (m x n) matrix's columns / rows
  (``randperm(size)[:k]``); on a rank holding a range of the sharded dimension, the moments are those of the
  indices in that range (``localize``).
- random: ``state["projector"]`` P (s x r), s = min(m, n), r = round(density * s): the Q of the QR of an s x r
  standard Gaussian. svd: the top-r left (m <= n) or right (m > n) singular vectors of the gradient (GaLore).
  At r = s (the whole space) both take P = I, drawing nothing: the subspace is then the parameter's own
  coordinates and the step is AdamW's (to float32 rounding: the update goes through P U).

On a switch (on_switch): "reset" zeroes the moments and the step count; "project" keeps the moments of the
coordinates (blocks) that stay, zeros for new ones, and for random/svd mixes them with C = P_new^T P_old (r x r):
m' = C m, v' = (C * C) v (m <= n), m' = m C^T, v' = v (C * C)^T (m > n); the step count goes on.
"""
import torch
import torch.distributed as dist

from .. import _distributed
from .options import OPERATION, SUBSPACE_DIM
from .parameter_state import MOMENTS, forget_moments, subspace_moments

Tensor = torch.Tensor


def subspace_size(density: float, size: int) -> int:
    """k = round(density * size), within [0, size]."""
    return min(size, max(0, round(density * size)))


def from_rank_zero(drawn: Tensor, group=None) -> Tensor:
    """Under torch.distributed, every rank of `group` (a DTensor parameter's device-mesh group; None: the default
    group) takes the subspace the group's first rank drew (broadcast): ranks must agree on it, and a shared seed is not
    trusted to ensure that (a rank may have been seeded differently, or an svd may differ in its last bits). Without
    a process group of more than one rank, `drawn` itself. NCCL moves CUDA tensors only."""
    return _distributed.broadcast_from_first(drawn, group)


def localize(indices: Tensor, span: tuple[int, int] | None) -> Tensor:
    """The subspace indices that fall in this rank's range `span` of a sharded dimension, relative to its start
    (all of them when the dimension is whole)."""
    if span is None:
        return indices
    start, stop = span
    return indices[(indices >= start) & (indices < stop)] - start


def is_blockwise(group: dict) -> bool:
    """Whether `group` is split by whole tensors (its subspace is an active set of blocks)."""
    return group["split"] and group["projection"] == "blockwise"


def treatment(group: dict, position: int, active: set | None) -> str:
    """What the parameter at `position` of `group` gets this step: "adamw" (a group that is not split, or an active
    block: AdamW on the whole tensor), "free" (an inactive block: the state-free update only) or "split" (a
    columns/rows/random/svd subspace: AdamW on it, the state-free update on the rest). `active`: the group's active
    blocks (None unless blockwise)."""
    if not group["split"] or (active is not None and position in active):
        return "adamw"
    if active is not None:
        return "free"
    return "split"


def draw_blocks(group: dict, generator: torch.Generator, steps_taken: int, process_group) -> Tensor:
    """The group's new active set (sorted int32 positions), as the first rank of `process_group` drew it."""
    count = len(group["params"])
    active = subspace_size(group["density"], count)
    order = group["block_order"]
    if order == "random":
        chosen = torch.randperm(count, generator=generator)[:active].tolist()
    else:
        start = (steps_taken // group["update_gap"]) * active
        chosen = [(start + j) % count for j in range(active)] if count else []
        if order == "descending":
            chosen = [count - 1 - position for position in chosen]
    return from_rank_zero(torch.tensor(sorted(chosen), dtype=torch.int32), process_group)


def switch_blocks(states: dict, group: dict, old: Tensor | None, new: Tensor) -> None:
    """Move the group's moments from the active set `old` (None: none yet) to `new`: nothing if it is unchanged;
    else every tensor forgets its moments, except, with on_switch="project", those active in both."""
    if old is not None and torch.equal(old, new):
        return
    stay = (set(old.tolist()) & set(new.tolist()) if old is not None and group["on_switch"] == "project"
            else set())
    for position, parameter in enumerate(group["params"]):
        if position not in stay:
            forget_moments(states, parameter)


def draw_subspace(state: dict, group: dict, parameter: Tensor, generator: torch.Generator) -> None:
    """A new subspace for one parameter of a columns/rows/random/svd group, moving its moments (on_switch). An svd
    subspace needs the gradient: without one, nothing is drawn."""
    layout = _distributed.Layout(parameter, OPERATION)
    if group["projection"] in SUBSPACE_DIM:
        _draw_indices(state, group, layout, generator)
    else:
        _draw_projector(state, group, parameter, layout, generator)


def _draw_indices(state: dict, group: dict, layout: _distributed.Layout, generator: torch.Generator) -> None:
    projection = group["projection"]
    dim = SUBSPACE_DIM[projection]
    size = layout.columns if projection == "columns" else layout.rows
    count = subspace_size(group["density"], size)
    new = torch.randperm(size, generator=generator)[:count].sort().values.to(torch.int32)
    new = from_rank_zero(new.to(layout.tensor.device), layout.group)
    old = state.get("indices")
    state["indices"] = new
    span = layout.local_range(dim)
    new_local = localize(new, span)
    if old is not None and torch.equal(old, new):
        return  # an unchanged subspace keeps its moments, whatever on_switch says
    if old is None or group["on_switch"] != "project":
        subspace_moments(state, layout, projection, new_local.numel())
        return
    # Position of each new index among the old ones, -1 for a coordinate that is new (this rank's range of a sharded
    # dimension: its moments are those of the subspace coordinates in it).
    device = layout.tensor.device
    old_local = localize(old, span)
    where_old = torch.full((layout.local_shape[dim],), -1, dtype=torch.long, device=device)
    where_old[old_local.long()] = torch.arange(old_local.numel(), device=device)
    source = where_old[new_local.long()]
    keep = source >= 0
    for key in MOMENTS:
        shape = list(state[key].shape)
        shape[dim] = new_local.numel()
        moved = state[key].new_zeros(shape)
        kept = state[key].index_select(dim, source[keep])
        moved.index_copy_(dim, keep.nonzero().flatten(), kept)
        state[key] = moved


def _draw_projector(state: dict, group: dict, parameter: Tensor, layout: _distributed.Layout,
                    generator: torch.Generator) -> None:
    # P on the smaller side of the whole matrix, replicated on every rank.
    rows, columns = layout.rows, layout.columns
    side = min(rows, columns)
    rank = subspace_size(group["density"], side)
    if rank == side:
        # The whole space (density 1): the identity, so that AdamW's per-coordinate second moment stays on the
        # parameter's own coordinates (any other orthonormal basis would be AdamW in rotated coordinates, not AdamW).
        # Nothing is drawn: the generator and the gradient are not needed.
        new = torch.eye(side, dtype=torch.float32, device=layout.tensor.device)
    elif group["projection"] == "random":
        gaussian = torch.randn(side, rank, generator=generator, dtype=torch.float32)
        new = torch.linalg.qr(gaussian).Q if rank else gaussian
        new = new.to(layout.tensor.device).contiguous()
    else:
        if parameter.grad is None:
            return  # drawn when a gradient is there (the optimizer's step)
        gradient = parameter.grad
        if _distributed.is_dtensor(gradient):
            # The whole gradient (an all-gather at each switch); only the first rank's singular vectors count.
            gradient = gradient.full_tensor()
        gradient = gradient.reshape(rows, columns).to(torch.float32)
        if rank == 0:
            new = gradient.new_zeros(side, 0)
        elif layout.mesh is not None and _distributed.distributed(layout.group) and dist.get_rank(
                layout.group) != 0:
            new = gradient.new_zeros(side, rank)  # receives the first rank's
        else:
            left, _, right_t = torch.linalg.svd(gradient, full_matrices=False)
            new = (left[:, :rank] if rows <= columns else right_t[:rank].T).contiguous()
    new = from_rank_zero(new, layout.group)
    old = state.get("projector")
    state["projector"] = new
    if old is not None and old.shape == new.shape and torch.equal(old, new) and "exp_avg" in state:
        return  # an unchanged subspace (density 1: the identity) keeps its moments, whatever on_switch says
    if old is None or group["on_switch"] != "project":
        subspace_moments(state, layout, group["projection"], rank)
        return
    mixing = new.T @ old  # C = P_new^T P_old, r x r
    if rows <= columns:
        state["exp_avg"] = mixing @ state["exp_avg"]
        state["exp_avg_sq"] = (mixing * mixing) @ state["exp_avg_sq"]
    else:
        state["exp_avg"] = state["exp_avg"] @ mixing.T
        state["exp_avg_sq"] = state["exp_avg_sq"] @ (mixing * mixing).T


def project(layout: _distributed.Layout, projector: Tensor, matrix: Tensor, left: bool) -> tuple[Tensor, Tensor]:
    """(this rank's rows of the projector, the projected gradient): P^T G (left, m <= n: r x n) or G P (m x r).
    For a matrix sharded by rows, P^T G sums over the ranks' rows: an all-reduce of the r x n result over the mesh."""
    if not left:
        return projector, matrix @ projector
    basis = layout.narrow(projector, 0) if layout.axis == 0 else projector
    small = basis.T @ matrix
    if layout.axis == 0:
        _distributed.all_reduce_sum(small, layout.group)
    return basis, small
