"""FRUGAL is never silently wrong about its state (issue 15): a state dict it cannot use (another optimizer's,
missing or extra keys, moments of another shape, indices outside the matrix, negative, unsorted or repeated,
projectors of another shape, a bad "frugal" entry, a Collage compensation under precision "fp32") is refused at
``load_state_dict`` with an error naming the parameter and the key, and the optimizer is left exactly as it was (its
state dict, and the result of the next step).

The fuzz test draws corruptions with hypothesis: ``LEANOPS_FUZZ_EXAMPLES`` examples (default 20), derandomized."""
import copy
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_same_state
from leanops.optim import FRUGAL, CollageAdamW

FUZZ_EXAMPLES = int(os.environ.get("LEANOPS_FUZZ_EXAMPLES", "20"))
# (4, 10): the parameter of the issue; a tall one for the other side of random/svd; 1-D; blockwise needs several.
SHAPES = ((4, 10), (9, 3), (7,))
STEPS_BEFORE = 2
PROJECTIONS = ("blockwise", "columns", "rows", "random", "svd")


def _gradients(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def _run(parameters, optimizer, steps, start=0) -> None:
    for step in range(start, start + steps):
        for parameter, gradient in zip(parameters, _gradients(step)):
            parameter.grad = gradient.to(parameter.dtype)
        optimizer.step()


def _maker(projection="columns", precision="fp32", dtype=torch.float32):
    def make(steps=STEPS_BEFORE):
        generator = torch.Generator().manual_seed(0)
        parameters = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]
        optimizer = FRUGAL([{"params": parameters[:2]}, {"params": parameters[2:], "split": False}], lr=1e-2,
                           density=0.5, update_gap=3, projection=projection, precision=precision, seed=1,
                           backend="reference")
        _run(parameters, optimizer, steps)
        return parameters, optimizer
    return make


def assert_refused_and_unchanged(bad_state_dict, match: str, make) -> None:
    """Refused (ValueError or TypeError matching `match`); the state dict unchanged, and the next step (a switch for
    update_gap 3 after 2 steps... the third step: same subspace) gives a twin's bits."""
    parameters, optimizer = make()
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        optimizer.load_state_dict(bad_state_dict)
    assert_same_state(optimizer.state_dict(), before)
    twin_parameters, twin = make()
    _run(parameters, optimizer, 2, start=STEPS_BEFORE)  # the second one switches (update_gap 3)
    _run(twin_parameters, twin, 2, start=STEPS_BEFORE)
    for ours, theirs in zip(parameters, twin_parameters):
        assert torch.equal(ours, theirs)
    assert_same_state(optimizer.state_dict(), twin.state_dict())


def _good(make) -> dict:
    return copy.deepcopy(make()[1].state_dict())


# ---------------------------------------------------------------------------------------------------------------
# Another optimizer's state dict.

def _two_groups(parameters):
    return [{"params": parameters[:2]}, {"params": parameters[2:]}]


def test_load_state_dict_refuses_torch_adamw_state():
    make = _maker()
    parameters = make(steps=0)[0]
    adamw = torch.optim.AdamW(_two_groups(parameters), lr=1e-2)
    _run(parameters, adamw, 2)
    assert_refused_and_unchanged(adamw.state_dict(), r"FRUGAL.load_state_dict.*parameter group 0 lacks 'density'.*"
                                                     r"torch\.optim\.AdamW", make)


def test_load_state_dict_refuses_collage_state():
    make = _maker(precision="collage", dtype=torch.bfloat16)
    parameters = make(steps=0)[0]
    collage = CollageAdamW(_two_groups(parameters), lr=1e-2, backend="reference")
    _run(parameters, collage, 2)
    assert_refused_and_unchanged(collage.state_dict(), r"parameter group 0 lacks .*'frugal'.*CollageAdamW", make)


def test_load_state_dict_refuses_another_projections_state():
    """A columns state loaded where the saved group says rows: the moments are (4, k) where rows needs (k, 10)."""
    make = _maker("columns")
    bad = _good(make)
    bad["param_groups"][0]["projection"] = "rows"
    assert_refused_and_unchanged(bad, r"parameter 0 of group 0: state 'indices' must lie in \[0, 4\)|"
                                      r"parameter 0 of group 0: state 'exp_avg' has shape", make)


# ---------------------------------------------------------------------------------------------------------------
# Corruptions, one regression test each.

def test_load_state_dict_refuses_moments_of_another_shape():
    """Moments shaped (8, k) for a (4, 10) parameter (columns: (4, k) or the matrix (4, 10))."""
    make = _maker("columns")
    bad = _good(make)
    count = bad["state"][0]["indices"].numel()
    bad["state"][0]["exp_avg"] = torch.zeros(8, count)
    assert_refused_and_unchanged(bad, rf"parameter 0 of group 0: state 'exp_avg' has shape \(8, {count}\), expected "
                                      rf"\(4, {count}\) or \(4, 10\)", make)


@pytest.mark.parametrize("projection", ["columns", "rows"])
@pytest.mark.parametrize("corruption", ["negative", "beyond", "unsorted", "repeated", "dtype"])
def test_load_state_dict_refuses_bad_indices(projection, corruption):
    """Negative indices (which would wrap around), indices past the matrix, unsorted or repeated, not int32."""
    make = _maker(projection)
    bad = _good(make)
    indices = bad["state"][0]["indices"]
    size = 10 if projection == "columns" else 4
    if corruption == "negative":
        indices[0] = -1
        match = rf"state 'indices' must lie in \[0, {size}\) .*, got values from -1"
    elif corruption == "beyond":
        indices[-1] = size
        match = rf"state 'indices' must lie in \[0, {size}\)"
    elif corruption == "unsorted":
        bad["state"][0]["indices"] = indices.flip(0)
        match = "state 'indices' must be sorted and distinct"
    elif corruption == "repeated":
        indices[1] = indices[0]
        match = "state 'indices' must be sorted and distinct"
    else:
        bad["state"][0]["indices"] = indices.long()
        match = "state 'indices' must be a 1-D int32 tensor"
    assert_refused_and_unchanged(bad, "parameter 0 of group 0: " + match, make)


@pytest.mark.parametrize("projection", ["random", "svd"])
def test_load_state_dict_refuses_projectors_and_moments_of_another_shape(projection):
    make = _maker(projection)
    bad = _good(make)
    bad["state"][1]["projector"] = torch.zeros(9, 2)  # (9, 3): the side is 3
    assert_refused_and_unchanged(bad, r"parameter 1 of group 0: state 'projector' must be a float32 \(3, r\)", make)
    bad = _good(make)
    bad["state"][0]["exp_avg_sq"] = bad["state"][0]["exp_avg_sq"].t().contiguous()  # (10, 2) for (2, 10)
    assert_refused_and_unchanged(bad, r"parameter 0 of group 0: state 'exp_avg_sq' has shape \(10, 2\), expected "
                                      r"\(2, 10\)", make)


def test_load_state_dict_refuses_bad_frugal_entries():
    make = _maker("blockwise")
    bad = _good(make)
    bad["param_groups"][0]["frugal"]["active_blocks"] = [0, 2]
    assert_refused_and_unchanged(bad, r"frugal\['active_blocks'\] of parameter group 0 must be sorted distinct "
                                      r"positions in \[0, 2\)", make)
    bad = _good(make)
    bad["param_groups"][1]["frugal"]["active_blocks"] = [0]
    assert_refused_and_unchanged(bad, r"active_blocks'\] of parameter group 1 must be None", make)
    bad = _good(make)
    bad["param_groups"][0]["frugal"]["generator"] = torch.zeros(7, dtype=torch.uint8)
    assert_refused_and_unchanged(bad, r"frugal\['generator'\] of parameter group 0 is not a CPU torch.Generator",
                                 make)
    bad = _good(make)
    bad["param_groups"][0]["frugal"]["steps_taken"] = -2
    assert_refused_and_unchanged(bad, r"frugal\['steps_taken'\] of parameter group 0 must be an int >= 0", make)
    bad = _good(make)
    del bad["param_groups"][1]["frugal"]
    assert_refused_and_unchanged(bad, r"parameter group 1 lacks 'frugal'", make)


def test_load_state_dict_refuses_compensation_under_fp32_precision():
    collage_make = _maker(precision="collage", dtype=torch.bfloat16)
    fp32_make = _maker(precision="fp32", dtype=torch.bfloat16)
    assert_refused_and_unchanged(_good(collage_make), r"parameter 0 of group 0: state 'param_lo' \(a Collage "
                                                      r"compensation\) cannot load: this optimizer's precision is "
                                                      r"'fp32'", fp32_make)


def test_load_state_dict_refuses_missing_and_extra_keys_and_bad_steps():
    make = _maker("columns")
    bad = _good(make)
    del bad["state"][0]["indices"]
    assert_refused_and_unchanged(bad, r"parameter 0 of group 0: state lacks 'indices'", make)
    bad = _good(make)
    bad["state"][2]["projector"] = torch.zeros(1, 1)  # an unsplit group keeps no subspace
    assert_refused_and_unchanged(bad, r"parameter 0 of group 1: unexpected state 'projector'", make)
    bad = _good(make)
    bad["state"][1]["step"] = torch.tensor(2.0)
    assert_refused_and_unchanged(bad, r"parameter 1 of group 0: state 'step' must be an int", make)
    bad = _good(make)
    bad["param_groups"][0]["density"] = 3.0
    assert_refused_and_unchanged(bad, r"'density' \(parameter group 0 of argument 'state_dict'\)", make)


# ---------------------------------------------------------------------------------------------------------------
# The fuzz test, over every projection.

def _mutation(state_dict: dict, projection: str, data) -> str:
    """Corrupt `state_dict` in place (a choice drawn from `data`); return the pattern the error must match."""
    kinds = ["drop", "extra", "shape", "dtype", "step", "group_key", "foreign", "frugal"]
    if projection in ("columns", "rows"):
        kinds.append("indices")
    kind = data.draw(st.sampled_from(kinds), label="kind")
    groups = state_dict["param_groups"]
    if kind in ("group_key", "foreign", "frugal"):
        group_index = data.draw(st.integers(0, len(groups) - 1), label="group")
        group = groups[group_index]
        if kind == "group_key":
            key = data.draw(st.sampled_from(["lr", "density", "projection", "split", "update_gap", "frugal"]),
                            label="key")
            del group[key]
            return f"parameter group {group_index} lacks '{key}'"
        if kind == "foreign":
            key = data.draw(st.sampled_from(["mode", "amsgrad", "momentum"]), label="key")
            group[key] = 0
            return f"parameter group {group_index} has '{key}'"
        key, value = data.draw(st.sampled_from([("steps_taken", -1), ("steps_taken", 1.5), ("generator", None),
                                                ("generator", torch.zeros(3, dtype=torch.uint8)),
                                                ("active_blocks", [5])]), label="entry")
        group["frugal"][key] = value
        return re.escape(f"frugal['{key}'] of parameter group {group_index}")
    # Parameters with moments.
    needed = "indices" if kind == "indices" else "exp_avg"
    ids = sorted(saved_id for saved_id, entry in state_dict["state"].items() if needed in entry)
    saved_id = data.draw(st.sampled_from(ids), label="parameter")
    group_index = next(index for index, group in enumerate(groups) if saved_id in group["params"])
    name = re.escape(f"parameter {groups[group_index]['params'].index(saved_id)} of group {group_index}: ")
    entry = state_dict["state"][saved_id]
    split = groups[group_index]["split"] and projection != "blockwise"
    subspace_key = ("indices" if projection in ("columns", "rows") else "projector") if split else None
    if kind == "drop":
        key = data.draw(st.sampled_from(["step", "exp_avg", "exp_avg_sq"] + ([subspace_key] if split else [])),
                        label="key")
        del entry[key]
        return name + f"state lacks '{key}'"
    if kind == "extra":
        key = data.draw(st.sampled_from(["max_exp_avg_sq", "momentum_buffer"] + (["indices"] if not split else [])),
                        label="key")
        entry[key] = torch.zeros(1)
        return name + f"unexpected state '{key}'"
    if kind == "shape":
        key = data.draw(st.sampled_from(["exp_avg", "exp_avg_sq"]), label="key")
        value = entry[key]
        shape = data.draw(st.sampled_from([(value.numel() + 1,), (value.shape[0] + 4,) + tuple(value.shape[1:]),
                                           (1,) + tuple(value.shape)]), label="shape")
        entry[key] = torch.zeros(shape)
        return name + f"state '{key}' has shape"
    if kind == "dtype":
        key = data.draw(st.sampled_from(["exp_avg", "exp_avg_sq"]), label="key")
        dtype = data.draw(st.sampled_from([torch.float64, torch.bfloat16, torch.int32]), label="dtype")
        entry[key] = entry[key].to(dtype)
        return name + f"state '{key}' has dtype"
    if kind == "step":
        entry["step"] = data.draw(st.sampled_from([torch.tensor(1), -1, 1.0, "2", False]), label="step")
        return name + "state 'step' must be"
    # indices
    indices = entry["indices"]
    change = data.draw(st.sampled_from(["negative", "beyond", "repeated"]), label="indices")
    if change == "negative":
        indices[0] = -data.draw(st.integers(1, 20), label="how negative")
        return name + "state 'indices' must lie in"
    if change == "beyond":
        indices[-1] = 10_000
        return name + "state 'indices' must lie in"
    if indices.numel() < 2:
        entry["indices"] = torch.tensor([-1], dtype=torch.int32)
        return name + "state 'indices' must lie in"
    indices[1] = indices[0]
    return name + "state 'indices' must be sorted and distinct"


@settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(projection=st.sampled_from(PROJECTIONS), data=st.data())
def test_state_dict_fuzz_is_refused_and_leaves_the_optimizer_unchanged(projection, data):
    make = _maker(projection)
    bad = _good(make)
    match = _mutation(bad, projection, data)
    assert_refused_and_unchanged(bad, match, make)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_valid_state_dicts_still_load(projection):
    """Round trip into a fresh optimizer of another seed, and the matrix-shaped columns/rows moments of a gathered
    sharded run (zeros outside the subspace)."""
    make = _maker(projection)
    state_dict = _good(make)
    parameters, optimizer = make(steps=0)
    optimizer.load_state_dict(state_dict)
    assert_same_state(optimizer.state_dict(), state_dict)
    if projection in ("columns", "rows"):
        dim = 1 if projection == "columns" else 0
        entry = state_dict["state"][0]
        for key in ("exp_avg", "exp_avg_sq"):
            expanded = torch.zeros(4, 10).index_copy_(dim, entry["indices"].long(), entry[key])
            entry[key] = expanded
        optimizer.load_state_dict(state_dict)
        assert optimizer.state_dict()["state"][0]["exp_avg"].shape == (
            (4, entry["indices"].numel()) if dim == 1 else (entry["indices"].numel(), 10))
