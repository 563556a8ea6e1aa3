"""Checking a FRUGAL state dict before ``load_state_dict`` changes anything (the first of its two passes; the second,
``checkpoint.unpack_states``, checks the pieces this rank keeps against their local shapes).

Refused, with the optimizer, the parameter (group and index in it) and the key named: another optimizer's state dict
(torch.optim.AdamW's, CollageAdamW's: its groups lack FRUGAL's options and the "frugal" entry), groups that do not
match this optimizer's, invalid group options, a "frugal" entry that is not {"steps_taken": int >= 0, "generator":
a CPU generator state, "active_blocks": None or sorted distinct positions in the group}, and per parameter: an
unexpected or missing key, a step count that is not an int >= 0, tensors of the wrong dtype or shape (for a DTensor
its global shape), subspace indices that are not sorted, distinct and inside the matrix, a projector that is not
(min(m, n), r) with r <= min(m, n), and a Collage compensation under precision "fp32".
"""
import torch

from .. import _distributed, _state_checks
from .checkpoint import EXTRA_KEY
from .options import OPERATION, SUBSPACE_DIM, check_group, is_compensated
from .parameter_state import MOMENTS
from .subspaces import localize

Tensor = torch.Tensor

LOAD = f"{OPERATION}.load_state_dict"
# The options every FRUGAL group carries (the constructor's defaults).
GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "density", "update_gap", "projection", "block_order",
              "state_free", "state_free_lr_scale", "state_full_lr_scale", "on_switch", "split")
EXTRA_KEYS = ("steps_taken", "generator", "active_blocks")


def check_state_dict(state_dict, param_groups: list, precision: str) -> tuple[list, dict, dict]:
    """(saved groups, saved state, {saved id: (group index, position, parameter)}) once every check of the module
    docstring but the local-shape ones has passed; raises ValueError / TypeError otherwise."""
    saved_groups, saved_state, where = _state_checks.check_structure(LOAD, state_dict, param_groups)
    _state_checks.check_kind(LOAD, saved_groups, param_groups, GROUP_KEYS + (EXTRA_KEY,),
                             own_keys=GROUP_KEYS + (EXTRA_KEY,))
    for group_index, saved in enumerate(saved_groups):
        check_group(saved, f" (parameter group {group_index} of argument 'state_dict')")
        _check_extra(group_index, saved)
    for saved_id, entry in saved_state.items():
        group_index, position, parameter = where[saved_id]
        _check_parameter_state(saved_groups[group_index], _state_checks.parameter_name(group_index, position),
                               parameter, entry, precision)
    return saved_groups, saved_state, where


def _check_extra(group_index: int, saved: dict) -> None:
    name = f"parameter group {group_index}"
    extra = _state_checks.check_mapping(LOAD, saved[EXTRA_KEY], f"the {EXTRA_KEY!r} entry of {name}")
    for key in extra:
        if key not in EXTRA_KEYS:
            raise ValueError(f"{LOAD}: the {EXTRA_KEY!r} entry of {name} has the unexpected key {key!r}")
    for key in EXTRA_KEYS:
        if key not in extra:
            raise ValueError(f"{LOAD}: the {EXTRA_KEY!r} entry of {name} lacks {key!r}")
    steps = extra["steps_taken"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{LOAD}: {EXTRA_KEY}['steps_taken'] of {name} must be an int >= 0, got {steps!r}")
    generator = extra["generator"]
    if not isinstance(generator, Tensor) or generator.dtype != torch.uint8 or generator.dim() != 1:
        described = (f"{generator.dtype} {tuple(generator.shape)}" if isinstance(generator, Tensor)
                     else type(generator).__name__)
        raise ValueError(f"{LOAD}: {EXTRA_KEY}['generator'] of {name} must be a 1-D uint8 tensor (a CPU "
                         f"torch.Generator's state), got {described}")
    try:
        torch.Generator(device="cpu").set_state(_distributed.local(generator).to("cpu").clone())
    except RuntimeError as error:
        raise ValueError(f"{LOAD}: {EXTRA_KEY}['generator'] of {name} is not a CPU torch.Generator's state: "
                         f"{error}") from None
    blocks = extra["active_blocks"]
    if blocks is None:
        return
    if not (saved["split"] and saved["projection"] == "blockwise"):
        raise ValueError(f"{LOAD}: {EXTRA_KEY}['active_blocks'] of {name} must be None: the group is not split "
                         f"blockwise")
    count = len(saved["params"])
    if (not isinstance(blocks, (list, tuple)) or any(isinstance(b, bool) or not isinstance(b, int) for b in blocks)
            or any(not 0 <= b < count for b in blocks) or any(a >= b for a, b in zip(blocks, blocks[1:]))):
        raise ValueError(f"{LOAD}: {EXTRA_KEY}['active_blocks'] of {name} must be sorted distinct positions in "
                         f"[0, {count}), got {blocks!r}")


def _check_parameter_state(group: dict, name: str, parameter: Tensor, entry: dict, precision: str) -> None:
    """One parameter's saved (packed) state against the options of its saved group."""
    if not entry:
        return
    if "param_lo" in entry and not is_compensated(precision, parameter.dtype):
        raise ValueError(f"{LOAD}: {name}: state 'param_lo' (a Collage compensation) cannot load: this optimizer's "
                         f"precision is {precision!r} and the parameter is {parameter.dtype}")
    projection = group["projection"]
    subspace_key = None
    if group["split"] and projection != "blockwise":
        subspace_key = "indices" if projection in SUBSPACE_DIM else "projector"
    allowed = ("step",) + MOMENTS + ((subspace_key,) if subspace_key else ()) + ("param_lo",)
    _state_checks.check_keys(LOAD, name, entry, allowed)
    moments = [key for key in ("step",) + MOMENTS if key in entry]
    if moments or (subspace_key and subspace_key in entry):
        required = ("step",) + MOMENTS + ((subspace_key,) if subspace_key else ())
        _state_checks.check_keys(LOAD, name, entry, allowed, required=required)
    layout = _distributed.Layout(parameter, LOAD)
    rows, columns = layout.rows, layout.columns
    if "param_lo" in entry:
        _state_checks.check_tensor(LOAD, name, "param_lo", entry["param_lo"], parameter.dtype, [parameter.shape],
                                   parameter)
    if not moments:
        return
    _state_checks.check_step_count(LOAD, name, "step", entry["step"])
    if subspace_key is None:
        shapes = [parameter.shape]
    elif subspace_key == "indices":
        dim = SUBSPACE_DIM[projection]
        count = _check_indices(name, entry["indices"], columns if dim == 1 else rows, projection)
        shapes = [(rows, count) if dim == 1 else (count, columns), (rows, columns)]
    else:
        rank = _check_projector(name, entry["projector"], min(rows, columns))
        shapes = [(rank, columns) if rows <= columns else (rows, rank)]
    for key in MOMENTS:
        _state_checks.check_tensor(LOAD, name, key, entry[key], torch.float32, shapes, parameter)


def _replicated(name: str, key: str, value: Tensor) -> Tensor:
    """Indices and projectors are the same on every rank: a plain tensor (or a DTensor holding it whole)."""
    if _distributed.is_dtensor(value) and tuple(value.to_local().shape) != tuple(value.shape):
        raise ValueError(f"{LOAD}: {name}: state {key!r} is a sharded DTensor; it is the same on every rank and "
                         f"goes whole")
    return _distributed.local(value)


def _check_indices(name: str, indices, size: int, projection: str) -> int:
    if not isinstance(indices, Tensor):
        raise TypeError(f"{LOAD}: {name}: state 'indices' must be a tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int32 or indices.dim() != 1:
        raise ValueError(f"{LOAD}: {name}: state 'indices' must be a 1-D int32 tensor, got {indices.dtype} of shape "
                         f"{tuple(indices.shape)}")
    values = _replicated(name, "indices", indices)
    if values.numel():
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= size:
            raise ValueError(f"{LOAD}: {name}: state 'indices' must lie in [0, {size}) (the matrix's {projection}), "
                             f"got values from {low} to {high}")
        if values.numel() > 1 and not bool((values[1:] > values[:-1]).all()):
            raise ValueError(f"{LOAD}: {name}: state 'indices' must be sorted and distinct")
    return values.numel()


def _check_projector(name: str, projector, side: int) -> int:
    if not isinstance(projector, Tensor):
        raise TypeError(f"{LOAD}: {name}: state 'projector' must be a tensor, got {type(projector).__name__}")
    if projector.dtype != torch.float32 or projector.dim() != 2 or projector.shape[0] != side or (
            projector.shape[1] > side):
        raise ValueError(f"{LOAD}: {name}: state 'projector' must be a float32 ({side}, r) matrix with r <= {side} "
                         f"(the parameter's smaller matrix side), got {projector.dtype} of shape "
                         f"{tuple(projector.shape)}")
    _replicated(name, "projector", projector)
    return projector.shape[1]


def expected_local_shapes(group: dict, layout: _distributed.Layout, state: dict) -> dict:
    """{key: shape} of what this rank keeps of an unpacked state (parameter_state's docstring)."""
    shapes = {}
    if "param_lo" in state:
        shapes["param_lo"] = tuple(layout.tensor.shape)
    if "exp_avg" not in state:
        return shapes
    local_rows, local_columns = layout.local_shape
    projection = group["projection"]
    if not group["split"] or projection == "blockwise":
        moment = tuple(layout.tensor.shape)
    elif projection in SUBSPACE_DIM:
        dim = SUBSPACE_DIM[projection]
        count = localize(state["indices"], layout.local_range(dim)).numel()
        moment = (local_rows, count) if dim == 1 else (count, local_columns)
    else:
        rank = state["projector"].shape[1]
        moment = (rank, local_columns) if layout.rows <= layout.columns else (local_rows, rank)
    shapes.update({key: moment for key in MOMENTS})
    return shapes
