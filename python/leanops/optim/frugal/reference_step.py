"""FRUGAL's step in plain PyTorch: what ``backend="reference"`` means for the optimizer.

The state-full part is torch.optim.AdamW's own operations (foreach=False), in its order, in float32:

    theta <- theta * (1 - lr * weight_decay)                       (skipped when weight_decay is 0)
    m.lerp_(g, 1 - beta1);  v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = sqrt(v) / sqrt(1 - beta2^t) + eps;   theta.addcdiv_(m, denom, value=-lr_full / (1 - beta1^t))

so a group that is not split, an active block, or a density-1 columns/rows subspace gets AdamW's bits. The
state-free remainder R then takes ``theta -= lr_free * sign(R)`` (signsgd) or ``theta -= lr_free * R`` (sgd).
A 16-bit parameter is stepped in float32 and rounded back (precision="fp32") or, with its compensation theta_lo
(precision="collage"), takes the step's change by Collage's Grow.

This is not the oracle of the fused kernels: their split-step primitive has its own reference,
python/leanops/reference/frugal.py (one float32 operation at a time, in the kernels' order), which the C++, CUDA and
Triton kernels match bit for bit; it and this step agree to float32 rounding.
"""
import torch

from .. import _distributed
from ...reference import frugal as reference_frugal
from ...reference import mcf as reference_mcf
from .options import OPERATION, SUBSPACE_DIM, is_compensated
from .parameter_state import advance, compensation, whole_moments
from .subspaces import localize, project

Tensor = torch.Tensor


def step_parameter(states: dict, group: dict, parameter: Tensor, how: str, precision: str) -> None:
    """One parameter's step (on this rank's piece of it). `states`: the optimizer's state (parameter -> dict);
    `how`: subspaces.treatment's "adamw", "free" or "split"."""
    layout = _distributed.Layout(parameter, OPERATION)
    theta = layout.tensor
    compensated = is_compensated(precision, theta.dtype)
    if compensated:
        low = compensation(states[parameter], layout)
        before = theta.detach().to(torch.float32) + low.to(torch.float32)  # exact: a 16-bit pair
        work = before.clone(memory_format=torch.contiguous_format)
    elif theta.dtype == torch.float32 and theta.is_contiguous():
        work = theta
    else:
        work = theta.detach().to(torch.float32, memory_format=torch.contiguous_format)
    gradient = _distributed.local(parameter.grad).to(torch.float32, memory_format=torch.contiguous_format)
    if group["weight_decay"] != 0:
        work.mul_(1 - group["lr"] * group["weight_decay"])
    if how == "adamw":
        _adamw(group, states[parameter], layout, work, gradient)
    elif how == "free":
        _state_free(group, work, gradient)
    else:
        _split_update(group, states[parameter], layout, work, gradient)
    if compensated:
        # The step's change (exact: work and before are within a factor 2) goes into the pair by Grow.
        high, low_part = reference_mcf.grow(theta.detach(), low, (work - before).to(theta.dtype))
        theta.copy_(high)
        low.copy_(low_part)
    elif work is not theta:
        theta.copy_(work)


def _moments_step(group: dict, state: dict, gradient: Tensor) -> tuple[float, Tensor]:
    """Advance m, v with the (subspace) gradient; return (step_size, denom) as torch.optim.AdamW computes them."""
    beta1, beta2 = group["betas"]
    step_size, bias_correction2_root = advance(group, state)
    state["exp_avg"].lerp_(gradient, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
    denom = (state["exp_avg_sq"].sqrt() / bias_correction2_root).add_(group["eps"])
    return step_size, denom


def _adamw(group: dict, state: dict, layout: _distributed.Layout, work: Tensor, gradient: Tensor) -> None:
    """Plain AdamW on the whole tensor (not split, or an active block)."""
    whole_moments(state, layout)
    step_size, denom = _moments_step(group, state, gradient)
    work.addcdiv_(state["exp_avg"], denom, value=-step_size)


def _state_free(group: dict, work: Tensor, remainder: Tensor) -> None:
    """The state-free update of the remainder R: -lr_free * sign(R) (signsgd), -lr_free * R (sgd), or none."""
    rule = group["state_free"]
    rate = group["lr"] * group["state_free_lr_scale"]
    if rule == "signsgd":
        work.add_(reference_frugal.sign(remainder), alpha=-rate)  # NaN stays NaN (torch.sign(nan) is 0)
    elif rule == "sgd":
        work.add_(remainder, alpha=-rate)


def _split_update(group: dict, state: dict, layout: _distributed.Layout, work: Tensor, gradient: Tensor) -> None:
    """AdamW on a columns/rows/random/svd subspace of the (local) matrix, the state-free update on the rest."""
    local_rows, local_columns = layout.local_shape
    matrix = work.view(local_rows, local_columns)
    gradient = gradient.view(local_rows, local_columns)
    if group["projection"] in SUBSPACE_DIM:
        dim = SUBSPACE_DIM[group["projection"]]
        indices = localize(state["indices"], layout.local_range(dim)).long()
        if state["indices"].numel():
            # Gather, update with exactly AdamW's operations, scatter back: the subspace coordinates get the bits
            # AdamW on the submatrix would give. (A rank whose range holds none of a sharded dimension's subspace
            # still counts the step: the step count is the subspace's.)
            sub = matrix.index_select(dim, indices)
            step_size, denom = _moments_step(group, state, gradient.index_select(dim, indices))
            sub.addcdiv_(state["exp_avg"], denom, value=-step_size)
            matrix.index_copy_(dim, indices, sub)
        if group["state_free"] != "none" and indices.numel() < matrix.shape[dim]:
            _state_free(group, matrix, gradient.clone().index_fill_(dim, indices, 0))
        return
    projector = state["projector"]
    left = layout.rows <= layout.columns
    if projector.shape[1]:
        # G_full = back(g_S): P (P^T G) for m <= n, (G P) P^T for m > n; AdamW's update goes back the same way.
        basis, projected = project(layout, projector, gradient, left)
        step_size, denom = _moments_step(group, state, projected)
        direction = state["exp_avg"] / denom
        matrix.add_(basis @ direction if left else direction @ basis.T, alpha=-step_size)
        remainder = gradient - (basis @ projected if left else projected @ basis.T)
    else:
        remainder = gradient
    _state_free(group, matrix, remainder)
