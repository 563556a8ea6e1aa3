"""torch.optim.AdamW's signature, as CollageAdamW and FRUGAL take it.

Both optimizers accept every argument of ``torch.optim.AdamW`` with its default (``inspect.signature``:
lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *, maximize=False, foreach=None,
capturable=False, differentiable=False, fused=None):

- ``lr`` and each of ``betas`` may be a Python number or a one-element tensor (read with ``float()`` at every step;
  a scheduler that writes a tensor lr in place, or a number, works);
- ``maximize=True`` steps along +gradient (the step of minimizing -f, bit for bit);
- ``foreach`` / ``fused``: None, True or False, not both True (as torch); kept in the groups. The kernels are always
  fused multi-tensor steps, so the value changes nothing there; CollageAdamW passes both to torch's AdamW for its
  float32 / float64 parameters;
- ``amsgrad=True``, ``capturable=True`` and ``differentiable=True`` are refused by name (ValueError, REFUSED says why).

The flags live in every parameter group (``GROUP_FLAGS``), as torch.optim keeps them; ``amsgrad`` does not (it is
always False, and an "amsgrad" group key is what marks torch.optim.AdamW's state dicts: ``_state_checks``).
"""
import torch

from . import _distributed

Tensor = torch.Tensor

# The per-group flags of torch.optim.AdamW that the groups carry, with their defaults.
GROUP_FLAGS = {"maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None}

# Why each refused option is refused.
REFUSED = {
    "amsgrad": "AMSGrad keeps a running maximum of v (max_exp_avg_sq), which neither the kernels nor the state "
               "carry; use amsgrad=False",
    "capturable": "the step reads the step count and the learning rate on the host (bias corrections in float64, "
                  "Python floats handed to the kernels) and chooses kernels per call, so it cannot be captured in a "
                  "CUDA graph; use capturable=False",
    "differentiable": "the step runs under torch.no_grad with in-place kernels: no autograd graph goes through it; "
                      "use differentiable=False",
}


def as_number(value) -> float | None:
    """`value` as a Python float if it is a real number or a one-element real tensor (lr, betas may be tensors, as
    in torch.optim); None otherwise (bool included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if (isinstance(value, Tensor) and not _distributed.is_dtensor(value) and value.numel() == 1
            and not value.is_complex() and value.dtype != torch.bool):
        return float(value.detach().reshape(()).item())
    return None


def check_amsgrad(operation: str, amsgrad, where: str = "") -> None:
    """ValueError unless `amsgrad` is False (named, and why: REFUSED)."""
    if not isinstance(amsgrad, bool):
        raise ValueError(f"{operation}: argument 'amsgrad'{where} must be a bool, got {amsgrad!r}")
    if amsgrad:
        raise ValueError(f"{operation}: argument 'amsgrad'{where}=True is not supported: {REFUSED['amsgrad']}")


def check_flags(operation: str, group: dict, where: str = "") -> None:
    """ValueError naming the flag unless `group`'s maximize is a bool, foreach and fused are None or bools (not both
    True), and capturable and differentiable are False (REFUSED says why). A missing flag counts as its default."""
    values = {name: group.get(name, default) for name, default in GROUP_FLAGS.items()}
    if not isinstance(values["maximize"], bool):
        raise ValueError(f"{operation}: argument 'maximize'{where} must be a bool, got {values['maximize']!r}")
    for name in ("foreach", "fused"):
        if values[name] is not None and not isinstance(values[name], bool):
            raise ValueError(f"{operation}: argument '{name}'{where} must be None or a bool, got {values[name]!r}")
    if values["foreach"] and values["fused"]:
        raise ValueError(f"{operation}: arguments 'foreach' and 'fused'{where} cannot both be True")
    for name in ("capturable", "differentiable"):
        if not isinstance(values[name], bool):
            raise ValueError(f"{operation}: argument '{name}'{where} must be a bool, got {values[name]!r}")
        if values[name]:
            raise ValueError(f"{operation}: argument '{name}'{where}=True is not supported: {REFUSED[name]}")
    if "amsgrad" in group:
        check_amsgrad(operation, group["amsgrad"], where)


def fill_flags(groups: list[dict], defaults: dict) -> None:
    """Give every group the flags it lacks (a state dict saved before they existed), from `defaults`."""
    for group in groups:
        for name, default in GROUP_FLAGS.items():
            group.setdefault(name, defaults.get(name, default))


def numeric_group(group: dict) -> dict:
    """`group` itself, or, where lr or a beta is a tensor, a shallow copy with those as Python floats (what the
    kernels and the host arithmetic take)."""
    betas = group["betas"]
    if not isinstance(group["lr"], Tensor) and not any(isinstance(beta, Tensor) for beta in betas):
        return group
    return {**group, "lr": float(group["lr"]), "betas": tuple(float(beta) for beta in betas)}
