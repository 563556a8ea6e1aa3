"""FRUGAL's step through the fused split-step kernels (backends "cpu", "cuda", "triton").

The parameters of a group that share a backend, device and dtype are stepped by one call of the FRUGAL family's
operator ``frugal_split_step_`` (python/leanops/ops/frugal.py declares it; python/leanops/reference/frugal.py states
its per-element math, which every kernel matches bit for bit). Each tensor goes in one mode:

- ADAMW: a group that is not split, or an active block (moments of the tensor's shape);
- FREE: an inactive block (the state-free update only);
- COLUMNS / ROWS: with ``positions``, the inverse of the subspace indices on this rank (``KernelPositions``);
- random / svd: two calls around torch matmuls. First an ADAMW-mode call on zeroed float32 scratch of the projected
  gradient g_S's shape (P^T G: r x n, or G P: m x r; decay 1, no state-free update) leaves -step_size m / denom in
  the scratch; then back(scratch) (P U or U P^T) is the addend, and the remainder G - back(g_S) the gradient, of a
  FREE-mode entry in the main call.

The kernels take contiguous tensors: a non-contiguous parameter is stepped in a contiguous copy that is copied
back.
"""
import torch

from .. import _distributed
from ...ops import FRUGAL as FRUGAL_FAMILY
from ...reference import frugal as split_step
from .options import OPERATION, SUBSPACE_DIM, is_compensated
from .parameter_state import advance, compensation, whole_moments
from .subspaces import localize, project

Tensor = torch.Tensor

# The operator's list arguments, in its order.
LISTS = ("params", "params_lo", "exp_avgs", "exp_avg_sqs", "grads", "positions", "addends", "modes", "step_sizes",
         "roots")
# What the subspace AdamW call of random/svd entries needs per tensor (its "params" are the zeroed scratch).
PROJECTED_LISTS = ("params", "exp_avgs", "exp_avg_sqs", "grads", "step_sizes", "roots")


class KernelPositions:
    """The kernels' inverse of each columns/rows parameter's int32 subspace indices on this rank: int32, one entry per
    local column (dim 1) or row (dim 0), its position in this rank's part of the subspace, -1 outside. Kept (it is
    state: ``FRUGAL.state_bytes`` counts it) until the parameter's indices change."""

    def __init__(self):
        self._cache: dict[Tensor, tuple[Tensor, Tensor]] = {}  # parameter -> (indices, positions)

    def of(self, parameter: Tensor, indices: Tensor, layout: _distributed.Layout, dim: int) -> Tensor:
        cached = self._cache.get(parameter)
        if cached is not None and cached[0] is indices:
            return cached[1]
        local_indices = localize(indices, layout.local_range(dim)).long()
        device = layout.tensor.device
        positions = torch.full((layout.local_shape[dim],), -1, dtype=torch.int32, device=device)
        positions[local_indices] = torch.arange(local_indices.numel(), dtype=torch.int32, device=device)
        self._cache[parameter] = (indices, positions)
        return positions

    def clear(self) -> None:
        self._cache.clear()

    def nbytes(self) -> int:
        return sum(positions.numel() * positions.element_size() for _, positions in self._cache.values())


def step_group(states: dict, positions: KernelPositions, group: dict, entries: list[tuple[str, Tensor]],
               backend: str, precision: str) -> None:
    """The step of a group's parameters of one device and dtype (`entries`: (subspaces.treatment, parameter) pairs),
    on this rank's pieces, with `backend`'s kernel. `states`: the optimizer's state (parameter -> dict)."""
    operator = FRUGAL_FAMILY.provider(backend).operators.frugal_split_step_
    device = entries[0][1].device
    compensated = is_compensated(precision, entries[0][1].dtype)
    no_tensor = torch.empty(0, device=device)
    call = {key: [] for key in LISTS}
    projected = {key: [] for key in PROJECTED_LISTS}
    projected_entries = []  # (index in call, float32 gradient matrix, basis, left, g_S) per random/svd entry
    copies_back = []
    for how, parameter in entries:
        state = states[parameter]
        layout = _distributed.Layout(parameter, OPERATION)
        theta = layout.tensor
        target = theta
        if not theta.is_contiguous():
            target = theta.detach().contiguous()
            copies_back.append((theta, target))
        gradient = _distributed.local(parameter.grad)
        if gradient.dtype not in (theta.dtype, torch.float32):
            gradient = gradient.to(torch.float32)
        gradient = gradient.contiguous()
        moments, indices = (no_tensor, no_tensor), no_tensor
        step_size, root = 0.0, 1.0
        if how == "adamw":
            mode = split_step.ADAMW
            whole_moments(state, layout)
            moments = (state["exp_avg"], state["exp_avg_sq"])
            step_size, root = advance(group, state)
        elif how == "free":
            mode = split_step.FREE
        elif group["projection"] in SUBSPACE_DIM:
            mode = split_step.COLUMNS if group["projection"] == "columns" else split_step.ROWS
            indices = positions.of(parameter, state["indices"], layout, SUBSPACE_DIM[group["projection"]])
            moments = (state["exp_avg"], state["exp_avg_sq"])
            if state["indices"].numel():
                step_size, root = advance(group, state)
        else:  # random / svd: AdamW on g_S first, in `projected`; this entry gets the rest.
            mode = split_step.FREE
            projector = state["projector"]
            if projector.shape[1]:
                matrix = gradient.to(torch.float32).view(layout.local_shape)
                left = layout.rows <= layout.columns
                basis, small = project(layout, projector, matrix, left)
                size, root_size = advance(group, state)
                projected_entries.append((len(call["params"]), matrix, basis, left, small))
                for key, value in zip(PROJECTED_LISTS, (torch.zeros_like(small), state["exp_avg"],
                                                        state["exp_avg_sq"], small, size, root_size)):
                    projected[key].append(value)
        call["params"].append(target)
        if compensated:
            call["params_lo"].append(compensation(state, layout))
        call["exp_avgs"].append(moments[0])
        call["exp_avg_sqs"].append(moments[1])
        call["grads"].append(gradient)
        call["positions"].append(indices)
        call["addends"].append(no_tensor)
        call["modes"].append(mode)
        call["step_sizes"].append(step_size)
        call["roots"].append(root)
    if projected_entries:
        _subspace_adamw(operator, group, projected, no_tensor)
        for (index, matrix, basis, left, small), update in zip(projected_entries, projected["params"]):
            call["addends"][index] = (basis @ update if left else update @ basis.T).contiguous()
            call["grads"][index] = matrix - (basis @ small if left else small @ basis.T)
        # One gradient dtype per call: the remainders are float32, so every gradient goes as float32 (exact).
        call["grads"] = [gradient.to(torch.float32) for gradient in call["grads"]]
    # An empty shard (FSDP2's last ranks when dim 0 is short) has nothing to update.
    kept = [index for index, target in enumerate(call["params"]) if target.numel()]
    if kept:
        call = {key: (values if key == "params_lo" and not compensated else [values[index] for index in kept])
                for key, values in call.items()}
        _invoke(operator, group, call, 1 - group["lr"] * group["weight_decay"],
                group["lr"] * group["state_free_lr_scale"], split_step.STATE_FREE_CODES[group["state_free"]])
    for theta, target in copies_back:
        theta.copy_(target)


def _subspace_adamw(operator, group: dict, projected: dict, no_tensor: Tensor) -> None:
    """AdamW on the random/svd entries' g_S: each scratch in projected["params"] becomes -step_size * m / denom
    (an empty g_S, an empty shard's, is left out of the call)."""
    kept = [index for index, small in enumerate(projected["grads"]) if small.numel()]
    if not kept:
        return
    call = {key: [values[index] for index in kept] for key, values in projected.items()}
    count = len(kept)
    call.update(params_lo=[], positions=[no_tensor] * count, addends=[no_tensor] * count,
                modes=[split_step.ADAMW] * count)
    _invoke(operator, group, call, 1.0, 0.0, split_step.NONE)


def _invoke(operator, group: dict, call: dict, decay, free_lr, state_free: int) -> None:
    beta1, beta2 = group["betas"]
    operator(*(call[key] for key in LISTS), float(beta1), float(beta2), float(group["eps"]), decay, free_lr,
             state_free)
