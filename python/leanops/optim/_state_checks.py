"""Checks of an incoming optimizer state dict, shared by CollageAdamW and FRUGAL: each optimizer validates the whole
state dict (its kind, the groups, every parameter's keys, types, shapes, dtypes and index ranges) before it changes
anything, and refuses with an error that names the optimizer, the parameter (its group and its index in the group)
and the key.

Shapes: a DTensor value is compared by its global shape (``value.shape``), a plain tensor by its own; the optimizer
then cuts a whole (plain) tensor to this rank's piece and checks the pieces against the local shapes.
"""
from collections.abc import Mapping

import torch

from . import _distributed

Tensor = torch.Tensor

# Group keys that only another optimizer's groups carry, and the optimizer they point to.
FOREIGN_GROUP_KEYS = {
    "frugal": "leanops.optim.FRUGAL", "density": "leanops.optim.FRUGAL", "projection": "leanops.optim.FRUGAL",
    "update_gap": "leanops.optim.FRUGAL", "state_free": "leanops.optim.FRUGAL",
    "mode": "leanops.optim.CollageAdamW",
    "amsgrad": "torch.optim.AdamW (or Adam)", "momentum": "torch.optim.SGD", "nesterov": "torch.optim.SGD",
    "lr_decay": "torch.optim.Adagrad", "momentum_decay": "torch.optim.NAdam",
}


def parameter_name(group_index: int, position: int) -> str:
    return f"parameter {position} of group {group_index}"


def check_mapping(operation: str, value, what: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise TypeError(f"{operation}: {what} must be a dict, got {type(value).__name__}")
    return value


def check_kind(operation: str, saved_groups: list, param_groups: list, required_keys, own_keys=()) -> None:
    """ValueError if a saved group lacks one of `required_keys` (the optimizer's own options) or carries a key that
    only another optimizer's groups carry (FOREIGN_GROUP_KEYS, except `own_keys` and the keys the optimizer's own
    group `param_groups[i]` has: a user's custom group entry): the state dict is another optimizer's. The message
    names the group, the key and the optimizer the key points to."""
    for group_index, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        foreign = [key for key in saved if key in FOREIGN_GROUP_KEYS and key not in own_keys and key not in group]
        missing = [key for key in required_keys if key not in saved]
        if not foreign and not missing:
            continue
        kinds = sorted({FOREIGN_GROUP_KEYS[key] for key in foreign})
        guess = f" (it looks like a {' or '.join(kinds)} state dict)" if kinds else ""
        details = []
        if missing:
            details.append(f"lacks {', '.join(repr(key) for key in missing)}")
        if foreign:
            details.append(f"has {', '.join(repr(key) for key in foreign)}")
        raise ValueError(f"{operation}: argument 'state_dict' is not this optimizer's: parameter group {group_index} "
                         f"{' and '.join(details)}{guess}")


def check_structure(operation: str, state_dict, param_groups: list) -> tuple[list, Mapping, dict]:
    """(saved groups, saved state, {saved id: (group index, position, parameter)}) after checking that `state_dict` is
    {"state": {id: dict}, "param_groups": [{"params": [id, ...], ...}]} with as many groups as `param_groups`, each
    listing as many (distinct) ids as its counterpart, and state only for listed ids."""
    check_mapping(operation, state_dict, "argument 'state_dict'")
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"{operation}: argument 'state_dict' lacks the key {key!r}")
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, (list, tuple)):
        raise TypeError(f"{operation}: state_dict['param_groups'] must be a list, got {type(saved_groups).__name__}")
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"{operation}: argument 'state_dict' has {len(saved_groups)} parameter groups, this optimizer "
                         f"{len(param_groups)}")
    where = {}
    for group_index, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        check_mapping(operation, saved, f"parameter group {group_index} of argument 'state_dict'")
        ids = saved.get("params")
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"{operation}: parameter group {group_index} of argument 'state_dict' lacks its list "
                             f"'params'")
        if len(ids) != len(group["params"]):
            raise ValueError(f"{operation}: parameter group {group_index} of argument 'state_dict' lists {len(ids)} "
                             f"parameters, this optimizer's {len(group['params'])}")
        for position, (saved_id, parameter) in enumerate(zip(ids, group["params"])):
            try:
                duplicate = saved_id in where
            except TypeError:
                raise TypeError(f"{operation}: parameter {position} of group {group_index} of argument 'state_dict' "
                                f"has the id {saved_id!r}, which is not hashable") from None
            if duplicate:
                raise ValueError(f"{operation}: parameter id {saved_id!r} is listed twice in argument 'state_dict' "
                                 f"(again as parameter {position} of group {group_index})")
            where[saved_id] = (group_index, position, parameter)
    saved_state = check_mapping(operation, state_dict["state"], "state_dict['state']")
    for saved_id, entry in saved_state.items():
        if saved_id not in where:
            raise ValueError(f"{operation}: state_dict['state'] has an entry for the parameter id {saved_id!r}, "
                             f"which no parameter group lists")
        group_index, position, _ = where[saved_id]
        check_mapping(operation, entry, f"the state of {parameter_name(group_index, position)}")
    return list(saved_groups), saved_state, where


def check_step_count(operation: str, name: str, key: str, value) -> None:
    """A step counter: a Python int >= 0 (torch.optim's tensor steps are another optimizer's)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{operation}: {name}: state {key!r} must be an int (a step count), got "
                        f"{type(value).__name__}{' ' + repr(value) if not isinstance(value, Tensor) else ''}")
    if value < 0:
        raise ValueError(f"{operation}: {name}: state {key!r} must be >= 0, got {value}")


def check_tensor(operation: str, name: str, key: str, value, dtype: torch.dtype, shapes, parameter: Tensor,
                 local_shape=None) -> None:
    """`value` must be a tensor of `dtype` whose shape (global for a DTensor) is one of `shapes`; a DTensor only for
    a DTensor parameter, on the parameter's mesh, and, `local_shape` given, with that local shape."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{operation}: {name}: state {key!r} must be a tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise ValueError(f"{operation}: {name}: state {key!r} has dtype {value.dtype}, expected {dtype}")
    if value.is_sparse or value.layout != torch.strided:
        raise ValueError(f"{operation}: {name}: state {key!r} must be a dense (strided) tensor, got {value.layout}")
    shapes = [tuple(shape) for shape in shapes]
    if tuple(value.shape) not in shapes:
        expected = " or ".join(str(shape) for shape in shapes)
        raise ValueError(f"{operation}: {name}: state {key!r} has shape {tuple(value.shape)}, expected {expected} "
                         f"(the parameter's shape is {tuple(parameter.shape)})")
    if _distributed.is_dtensor(value):
        if not _distributed.is_dtensor(parameter):
            raise ValueError(f"{operation}: {name}: state {key!r} is a DTensor but its parameter is a plain tensor")
        if value.device_mesh != parameter.device_mesh:
            raise ValueError(f"{operation}: {name}: state {key!r} is a DTensor on another device mesh than its "
                             f"parameter's")
        if local_shape is not None and tuple(value.to_local().shape) != tuple(local_shape):
            raise ValueError(f"{operation}: {name}: state {key!r} holds a local piece of shape "
                             f"{tuple(value.to_local().shape)} on this rank, expected {tuple(local_shape)} "
                             f"(placements {tuple(value.placements)}, the parameter's "
                             f"{tuple(parameter.placements)})")


def check_keys(operation: str, name: str, entry: Mapping, allowed, required=()) -> None:
    """ValueError naming a key of `entry` that is not in `allowed`, or one of `required` that is missing."""
    for key in entry:
        if key not in allowed:
            raise ValueError(f"{operation}: {name}: unexpected state {key!r} (this optimizer keeps "
                             f"{', '.join(repr(k) for k in allowed)})")
    for key in required:
        if key not in entry:
            raise ValueError(f"{operation}: {name}: state lacks {key!r}")
