"""FRUGAL's options: the accepted values, their validation, and the backend that steps a parameter.

Every option except ``precision``, ``seed`` and ``backend`` can be set per parameter group, so the group options are
checked on the defaults, on every group the constructor builds, and again on the groups a state dict loads.
"""
import math

import torch

from ... import backends
from ...ops import FRUGAL as FRUGAL_FAMILY
from .. import _distributed, _torch_options

Tensor = torch.Tensor

OPERATION = "leanops.optim.FRUGAL"
PROJECTIONS = ("blockwise", "columns", "rows", "random", "svd")
BLOCK_ORDERS = ("random", "ascending", "descending")
STATE_FREE = ("signsgd", "sgd", "none")
ON_SWITCH = ("reset", "project")
PRECISIONS = ("fp32", "collage")
# precision="collage" keeps a compensation theta_lo for parameters of these dtypes only (float32 has no need of it).
COMPENSATED_DTYPES = (torch.bfloat16, torch.float16)
# The matrix dimension that the "columns" / "rows" projections draw their indices along.
SUBSPACE_DIM = {"columns": 1, "rows": 0}


def in_group(index: int) -> str:
    """The suffix that names parameter group `index` in an error message."""
    return f" (parameter group {index})"


def _check_number(name, value, *, low=0.0, high=math.inf, where=""):
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not low <= value <= high):
        bounds = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ValueError(f"{OPERATION}: argument '{name}'{where} must be a finite number {bounds}, got {value!r}")


def _check_choice(name, value, choices, where=""):
    if value not in choices:
        raise ValueError(f"{OPERATION}: argument '{name}'{where} must be one of {choices}, got {value!r}")


def check_group(group: dict, where: str = "") -> None:
    """ValueError unless every per-group option of `group` is valid; `where` names the group in the message. lr and
    each beta may be one-element tensors; torch.optim.AdamW's flags are checked by _torch_options.check_flags."""
    lr = _torch_options.as_number(group["lr"])
    if lr is None or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{OPERATION}: argument 'lr'{where} must be a finite number >= 0 or a one-element tensor, "
                         f"got {group['lr']!r}")
    for name in ("eps", "weight_decay", "state_free_lr_scale", "state_full_lr_scale"):
        _check_number(name, group[name], where=where)
    betas = group["betas"]
    numbers = [_torch_options.as_number(b) for b in betas] if isinstance(betas, (tuple, list)) else []
    if len(numbers) != 2 or not all(b is not None and 0.0 <= b < 1.0 for b in numbers):
        raise ValueError(f"{OPERATION}: argument 'betas'{where} must be two numbers in [0, 1), got {betas!r}")
    _torch_options.check_flags(OPERATION, group, where)
    _check_number("density", group["density"], high=1.0, where=where)
    gap = group["update_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"{OPERATION}: argument 'update_gap'{where} must be an integer >= 1, got {gap!r}")
    _check_choice("projection", group["projection"], PROJECTIONS, where)
    _check_choice("block_order", group["block_order"], BLOCK_ORDERS, where)
    _check_choice("state_free", group["state_free"], STATE_FREE, where)
    _check_choice("on_switch", group["on_switch"], ON_SWITCH, where)
    if not isinstance(group["split"], bool):
        raise ValueError(f"{OPERATION}: argument 'split'{where} must be a bool, got {group['split']!r}")


def check_optimizer_options(precision, seed, backend) -> None:
    """ValueError (TypeError for a backend that is not a string) unless the optimizer-wide options are valid."""
    _check_choice("precision", precision, PRECISIONS)
    if not isinstance(backend, str):
        raise TypeError(f"{OPERATION}: argument 'backend' must be a string, got {type(backend).__name__}")
    if backend != backends.AUTO and backend not in backends.BACKENDS:
        raise ValueError(f"{OPERATION}: argument 'backend' must be one of {(backends.AUTO,) + backends.BACKENDS}, "
                         f"got {backend!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{OPERATION}: argument 'seed' must be an integer, got {seed!r}")


def check_parameters(group: dict, group_index: int, backend: str) -> None:
    """Refuse, before any step, a parameter of `group` that FRUGAL cannot step: not floating-point, a backend that
    cannot serve it (BackendUnavailableError), or a DTensor layout that is not supported (NotImplementedError)."""
    for parameter_index, parameter in enumerate(group["params"]):
        if not parameter.is_floating_point():
            raise ValueError(f"{OPERATION}: parameter {parameter_index} of group {group_index} has dtype "
                             f"{parameter.dtype}; FRUGAL updates floating-point parameters")
        resolve_backend(backend, parameter)
        _distributed.Layout(parameter, OPERATION)


def resolve_backend(backend: str, parameter: Tensor) -> str:
    """The backend that steps `parameter` (BackendUnavailableError if the named one cannot)."""
    return FRUGAL_FAMILY.resolve(OPERATION, backend, parameter.device, parameter.dtype).backend


def is_compensated(precision: str, dtype: torch.dtype) -> bool:
    """Whether a parameter of `dtype` carries a Collage compensation theta_lo under `precision`."""
    return precision == "collage" and dtype in COMPENSATED_DTYPES
