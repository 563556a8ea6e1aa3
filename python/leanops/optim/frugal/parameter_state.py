"""What FRUGAL keeps per parameter (``optimizer.state[parameter]``), on this rank, as plain tensors:

- ``"step"`` (int): the state-full steps since the moments started (the bias correction's t);
- ``"exp_avg"``, ``"exp_avg_sq"`` (float32): the moments m, v, of the shape of what is state-full on this rank:
  the parameter's local shape for AdamW on the whole tensor (unsplit groups, active blocks), (rows, k) / (k, columns)
  for columns / rows (k: the subspace's indices in this rank's range), (r, columns) / (rows, r) for random / svd;
- ``"indices"`` (int32, sorted; columns/rows) or ``"projector"`` (float32, s x r; random/svd): the subspace,
  the same on every rank;
- ``"param_lo"`` (the parameter's dtype): the Collage compensation theta_lo under precision="collage".

A parameter with none of these has no entry: the moments of a block leaving the active set are dropped, its
compensation stays.
"""
import torch

from .. import _distributed

Tensor = torch.Tensor

MOMENTS = ("exp_avg", "exp_avg_sq")


def zero_moments(state: dict, shape, device) -> None:
    """Start the moments afresh: zeros of `shape` (float32) and step count 0."""
    state["step"] = 0
    state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=device)
    state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=device)


def whole_moments(state: dict, layout: _distributed.Layout) -> None:
    """Moments for AdamW on the whole tensor (this rank's piece), zeros when there are none yet."""
    if "exp_avg" not in state:
        zero_moments(state, layout.tensor.shape, layout.tensor.device)


def subspace_moments(state: dict, layout: _distributed.Layout, projection: str, count: int) -> None:
    """Zero moments of a columns/rows/random/svd subspace, of this rank's shape: `count` is the subspace size on
    this rank (columns/rows) or the rank r of the projector (random/svd)."""
    local_rows, local_columns = layout.local_shape
    if projection == "columns":
        shape = (local_rows, count)
    elif projection == "rows":
        shape = (count, local_columns)
    else:  # random / svd, on the smaller side of the whole matrix
        shape = (count, local_columns) if layout.rows <= layout.columns else (local_rows, count)
    zero_moments(state, shape, layout.tensor.device)


def forget_moments(states: dict, parameter: Tensor) -> None:
    """Drop a parameter's moments (a block leaving the active set); its Collage compensation stays."""
    state = states.get(parameter)
    if state is None:
        return
    for key in [key for key in state if key != "param_lo"]:
        del state[key]
    if not state:
        del states[parameter]


def compensation(state: dict, layout: _distributed.Layout) -> Tensor:
    """The Collage compensation theta_lo of (this rank's piece of) a 16-bit parameter (zeros at first)."""
    if "param_lo" not in state:
        state["param_lo"] = torch.zeros_like(layout.tensor, memory_format=torch.contiguous_format)
    return state["param_lo"]


def advance(group: dict, state: dict) -> tuple[float, float]:
    """Count a state-full step; return its (step_size, bias_correction2_root) as torch.optim.AdamW computes them,
    in float64 on the host:

        step_size = lr * state_full_lr_scale / (1 - beta1^t),   bias_correction2_root = sqrt(1 - beta2^t)
    """
    beta1, beta2 = group["betas"]
    state["step"] += 1
    step = float(state["step"])
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    return group["lr"] * group["state_full_lr_scale"] / bias_correction1, bias_correction2 ** 0.5
