"""FRUGAL's state dict: the per-parameter state packed for saving, unpacked on loading, and the "frugal" entry.

``state_dict()["state"][i]`` is parameter i's state (parameter_state's entries), packed so that its shapes do not
depend on the draw (torch.distributed.checkpoint loads in place into the fresh optimizer's tensors):

- blockwise groups carry zero moments (step 0) for their inactive tensors too (``pack_group``);
- for a DTensor parameter, what is sharded is a DTensor (every rank's piece is saved), what is replicated a plain
  tensor (one copy): the moments of a whole tensor are Shard(0) like the parameter; columns/rows moments along the
  sharded dimension (rows of a Shard(0) matrix, columns of a sharded 1-D parameter) go in the parameter's matrix
  shape, zeros outside the subspace, Shard(dim); across it, (rows, k) / (k, columns) sharded like the parameter;
  random/svd moments are sharded when the sharded dimension is theirs (G P of a row-sharded matrix), plain when
  P^T G contracts over it (replicated r x n); indices and projectors are plain (the same on every rank). The
  moments and compensation of a Replicate DTensor parameter are Replicate DTensors.

``unpack`` inverts ``pack``; a plain tensor where a DTensor piece is expected is a whole one (a single-device
checkpoint, or DCP's ``full_state_dict``) and is cut to this rank's piece.

Every parameter group carries the entry "frugal" (``EXTRA_KEY``): {"steps_taken": int, "generator": the
generator's state (uint8), "active_blocks": the group's sorted active positions (blockwise; else None)}. It sits in
the groups because DCP's ``get_state_dict`` / ``set_state_dict`` keep "state" and "param_groups" only.
"""
import torch

from .. import _distributed
from .options import OPERATION, SUBSPACE_DIM
from .parameter_state import MOMENTS, zero_moments
from .subspaces import is_blockwise, localize

Tensor = torch.Tensor

EXTRA_KEY = "frugal"


def moment_layout(group: dict, layout: _distributed.Layout, state: dict) -> tuple:
    """How a parameter's moments are held: ("whole",) for AdamW on the whole tensor (the parameter's shape);
    ("subspace", dim, k) for columns/rows (dim the subspace's matrix dimension, k its global size);
    ("projected", left, r) for random/svd."""
    projection = group["projection"]
    if not group["split"] or projection == "blockwise":
        return ("whole",)
    if projection in SUBSPACE_DIM:
        return ("subspace", SUBSPACE_DIM[projection], state["indices"].numel())
    return ("projected", layout.rows <= layout.columns, state["projector"].shape[1])


def pack(group: dict, parameter: Tensor, layout: _distributed.Layout, state: dict) -> dict:
    """A parameter's state as the state dict carries it (the module docstring)."""
    packed = dict(state)
    if not layout.sharded and layout.mesh is None:
        return packed
    parameter_shape = tuple(parameter.shape)
    if "param_lo" in state:
        packed["param_lo"] = layout.wrap(state["param_lo"], 0, parameter_shape)
    if "exp_avg" not in state:
        return packed
    kind = moment_layout(group, layout, state)
    for key in MOMENTS:
        value = state[key]
        if kind[0] == "whole":
            packed[key] = layout.wrap(value, 0, parameter_shape)
        elif kind[0] == "subspace":
            _, dim, count = kind
            if layout.axis == dim:
                local_rows, local_columns = layout.local_shape
                expanded = value.new_zeros(local_rows, local_columns)
                span = layout.local_range(dim)
                expanded.index_copy_(dim, localize(state["indices"], span).long(), value)
                packed[key] = layout.wrap(expanded, dim, (layout.rows, layout.columns))
            else:
                shape = (layout.rows, count) if dim == 1 else (count, layout.columns)
                packed[key] = layout.wrap(value, layout.axis, shape)
        else:
            _, left, rank = kind
            shape = (rank, layout.columns) if left else (layout.rows, rank)
            sharded_dim = 1 if left else 0
            if layout.axis == sharded_dim or (layout.axis is None and layout.mesh is not None):
                packed[key] = layout.wrap(value, sharded_dim, shape)
            # else: the contraction runs over the sharded dimension: the moments are replicated, plain.
    return packed


def unpack(group: dict, layout: _distributed.Layout, saved: dict) -> dict:
    """The inverse of pack: this rank's pieces, as plain tensors on the parameter's device. A plain tensor where
    a DTensor piece is expected is a whole one (e.g. from a single-device checkpoint): it is cut to this rank's
    piece."""
    device = layout.tensor.device
    state, whole = {}, {}
    for key, value in saved.items():
        if isinstance(value, Tensor):
            whole[key] = not _distributed.is_dtensor(value)
            value = _distributed.local(value).to(device=device).clone()
        state[key] = value
    if not layout.sharded:
        if "exp_avg" in state and group["split"] and group["projection"] in SUBSPACE_DIM:
            # The matrix-shaped form of a sharded run's columns/rows moments, gathered (a full state dict).
            dim, indices = SUBSPACE_DIM[group["projection"]], state["indices"]
            for key in MOMENTS:
                if state[key].shape[dim] != indices.numel():
                    state[key] = state[key].index_select(dim, indices.long()).contiguous()
        return state
    if whole.get("param_lo"):
        state["param_lo"] = layout.narrow(state["param_lo"], 0).contiguous()
    if "exp_avg" not in state:
        return state
    kind = moment_layout(group, layout, state)
    for key in MOMENTS:
        value, is_whole = state[key], whole[key]
        if kind[0] == "whole":
            if is_whole:
                value = layout.narrow(value, 0)
        elif kind[0] == "subspace":
            _, dim, count = kind
            span = layout.local_range(dim)
            if layout.axis == dim:
                indices = state["indices"]
                if is_whole and value.shape[dim] == count:  # the compact moments of the whole subspace
                    value = value.index_select(dim, ((indices >= span[0]) & (indices < span[1])).nonzero()
                                               .flatten())
                else:  # the matrix-shaped form of pack (whole, or this rank's rows)
                    if is_whole:
                        value = layout.narrow(value, dim)
                    value = value.index_select(dim, localize(indices, span).long())
            elif is_whole:
                value = layout.narrow(value, layout.axis)
        else:
            _, left, _ = kind
            sharded_dim = 1 if left else 0
            if is_whole and layout.axis == sharded_dim:
                value = layout.narrow(value, sharded_dim)
        state[key] = value.contiguous()
    return state


def pack_group(states: dict, group: dict, saved_ids: list, active: Tensor | None) -> dict:
    """The packed states of a group's parameters, by their state-dict ids `saved_ids`. `active`: the group's active
    blocks (blockwise, once drawn; else None): the others get zero moments and step 0, a transient of AdamW's state
    size for those tensors while the state dict lives."""
    active_positions = set(active.tolist()) if active is not None else None
    packed = {}
    for position, (saved_id, parameter) in enumerate(zip(saved_ids, group["params"])):
        entry = states.get(parameter)
        layout = _distributed.Layout(parameter, OPERATION)
        if active_positions is not None and position not in active_positions:
            entry = dict(entry or {})
            zero_moments(entry, layout.tensor.shape, layout.tensor.device)
        if entry:
            packed[saved_id] = pack(group, parameter, layout, entry)
    return packed


def group_extra(steps_taken: int, generator_state: Tensor, active: Tensor | None) -> dict:
    """A group's "frugal" entry."""
    return {
        "steps_taken": steps_taken,
        "generator": generator_state.clone(),
        "active_blocks": active.tolist() if active is not None else None,
    }


def first_extra(saved_groups: list[dict]) -> dict:
    """The first "frugal" entry of a state dict's groups (every group's holds the same steps and generator);
    ValueError if there is none."""
    extra = next((saved[EXTRA_KEY] for saved in saved_groups if saved.get(EXTRA_KEY) is not None), None)
    if extra is None:
        raise ValueError(f"{OPERATION}.load_state_dict: argument 'state_dict' lacks the 'frugal' entries "
                         f"(not a FRUGAL state dict)")
    return extra


def without_extras(saved_groups: list[dict]) -> list[dict]:
    """The groups as torch.optim.Optimizer.load_state_dict takes them."""
    return [{key: value for key, value in saved.items() if key != EXTRA_KEY} for saved in saved_groups]


def saved_active_blocks(saved_groups: list[dict]) -> dict[int, Tensor]:
    """group index -> its saved active blocks (int32), for the groups that have them."""
    active_blocks = {}
    for group_index, saved in enumerate(saved_groups):
        extra = saved.get(EXTRA_KEY)
        if extra is not None and extra.get("active_blocks") is not None:
            active_blocks[group_index] = torch.tensor(list(extra["active_blocks"]), dtype=torch.int32)
    return active_blocks


def saved_generator_state(extra: dict) -> Tensor:
    """The generator state of a "frugal" entry, as torch.Generator.set_state takes it."""
    return _distributed.local(extra["generator"]).to("cpu", torch.uint8).clone()


def unpack_states(saved_states: dict, saved_groups: list[dict], param_groups: list[dict],
                  active_blocks: dict[int, Tensor]) -> dict:
    """parameter -> its state on this rank, from a state dict's "state" (by the ids of `saved_groups`; the options
    are the saved groups', the parameters `param_groups`'). The moments that an inactive block's entry carries
    (zeros) are dropped; its compensation stays. Pure (it changes nothing): ValueError, naming the parameter and the
    key, where a piece this rank would keep is not of its local shape."""
    from .state_checks import LOAD, expected_local_shapes

    where = {saved_id: (group_index, saved, position, parameter)
             for group_index, (saved, group) in enumerate(zip(saved_groups, param_groups))
             for position, (saved_id, parameter) in enumerate(zip(saved["params"], group["params"]))}
    states = {}
    for saved_id, saved_state in saved_states.items():
        group_index, group, position, parameter = where[saved_id]
        layout = _distributed.Layout(parameter, OPERATION)
        try:
            state = unpack(group, layout, saved_state)
        except (IndexError, RuntimeError) as error:
            raise ValueError(f"{LOAD}: parameter {position} of group {group_index}: its state does not cut to this "
                             f"rank's pieces: {error}") from None
        for key, shape in expected_local_shapes(group, layout, state).items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{LOAD}: parameter {position} of group {group_index}: state {key!r} gives this rank "
                                 f"a piece of shape {tuple(state[key].shape)}, expected {shape}")
        blocks = active_blocks.get(group_index)
        if is_blockwise(group) and (blocks is None or position not in set(blocks.tolist())):
            for key in ("step",) + MOMENTS:
                state.pop(key, None)
        if state:
            states[parameter] = state
    return states
