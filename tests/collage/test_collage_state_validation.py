"""CollageAdamW is never silently wrong about its state (issue 15): a state dict it cannot use (another optimizer's,
missing or extra keys, tensors of another shape or dtype, bad step counts, groups that do not match) is refused at
``load_state_dict`` with an error naming the parameter and the key, and the optimizer is left exactly as it was (its
state dict, and the result of the next step); a refused step changes nothing either; channels-last (dense,
non-overlapping) parameters are stepped in place with the bits of the same values laid out contiguously; and
``split_state_dict`` refuses values beyond the 16-bit range instead of turning them into inf.

The fuzz test draws corruptions with hypothesis: ``LEANOPS_FUZZ_EXAMPLES`` examples (default 20), derandomized."""
import copy
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import leanops
from helpers import assert_same_state, provider_cases
from leanops import ops
from leanops.optim import FRUGAL, CollageAdamW, collage

FUZZ_EXAMPLES = int(os.environ.get("LEANOPS_FUZZ_EXAMPLES", "20"))
SHAPES = ((4, 6), (5,), (2, 3, 2))
STEPS_BEFORE = 2
KERNELS = provider_cases(ops.COLLAGE, backends_=("reference", "cpu", "cuda", "triton"))


def _gradients(step: int, shapes=SHAPES, dtype=torch.bfloat16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]


def _run(parameters, optimizer, steps, start=0) -> None:
    for step in range(start, start + steps):
        for parameter, gradient in zip(parameters, _gradients(step, [p.shape for p in parameters])):
            parameter.grad = gradient.to(memory_format=torch.contiguous_format)
        optimizer.step()


def _make(mode="plus", backend="reference", steps=STEPS_BEFORE):
    """Parameters and a CollageAdamW (two groups: plus/light, and a weight-decayed light one) after `steps` steps."""
    generator = torch.Generator().manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(shape, generator=generator).bfloat16()) for shape in SHAPES]
    optimizer = CollageAdamW([{"params": parameters[:2], "mode": mode},
                              {"params": parameters[2:], "mode": "light", "weight_decay": 0.1}],
                             lr=1e-2, backend=backend)
    _run(parameters, optimizer, steps)
    return parameters, optimizer


def assert_refused_and_unchanged(bad_state_dict, match: str, make=_make) -> None:
    """`bad_state_dict` is refused (ValueError or TypeError matching `match`); the optimizer's state dict is what it
    was, and its next step gives the bits of a twin that never saw the bad load."""
    parameters, optimizer = make()
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        optimizer.load_state_dict(bad_state_dict)
    assert_same_state(optimizer.state_dict(), before)
    twin_parameters, twin = make()
    _run(parameters, optimizer, 1, start=STEPS_BEFORE)
    _run(twin_parameters, twin, 1, start=STEPS_BEFORE)
    for ours, theirs in zip(parameters, twin_parameters):
        assert torch.equal(ours, theirs)
    assert_same_state(optimizer.state_dict(), twin.state_dict())


def _good_state_dict() -> dict:
    return copy.deepcopy(_make()[1].state_dict())


# ---------------------------------------------------------------------------------------------------------------
# Another optimizer's state dict.

def test_load_state_dict_refuses_torch_adamw_state():
    generator = torch.Generator().manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(shape, generator=generator).bfloat16()) for shape in SHAPES]
    adamw = torch.optim.AdamW([{"params": parameters[:2]}, {"params": parameters[2:]}], lr=1e-2)
    _run(parameters, adamw, 2)
    assert_refused_and_unchanged(adamw.state_dict(),
                                 r"CollageAdamW.load_state_dict.*parameter group 0 lacks 'mode'.*torch\.optim\.AdamW")


def test_load_state_dict_refuses_frugal_state():
    generator = torch.Generator().manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(shape, generator=generator).bfloat16()) for shape in SHAPES]
    frugal = FRUGAL([{"params": parameters[:2]}, {"params": parameters[2:]}], lr=1e-2, backend="reference")
    _run(parameters, frugal, 2)
    assert_refused_and_unchanged(frugal.state_dict(), r"CollageAdamW.load_state_dict.*leanops\.optim\.FRUGAL")


# ---------------------------------------------------------------------------------------------------------------
# Corruptions of a CollageAdamW state dict, one regression test each; each names the parameter and the key.

def _corrupt(change):
    state_dict = _good_state_dict()
    change(state_dict)
    return state_dict


def test_load_state_dict_refuses_missing_key():
    bad = _corrupt(lambda sd: sd["state"][1].pop("exp_avg"))
    assert_refused_and_unchanged(bad, r"parameter 1 of group 0: state lacks 'exp_avg'")


def test_load_state_dict_refuses_extra_key():
    bad = _corrupt(lambda sd: sd["state"][2].update(max_exp_avg_sq=torch.zeros(2, 3, 2, dtype=torch.bfloat16)))
    assert_refused_and_unchanged(bad, r"parameter 0 of group 1: unexpected state 'max_exp_avg_sq'")


def test_load_state_dict_refuses_wrong_shape_with_the_same_element_count():
    bad = _corrupt(lambda sd: sd["state"][0].update(param_lo=sd["state"][0]["param_lo"].reshape(3, 8)))
    assert_refused_and_unchanged(bad, r"parameter 0 of group 0: state 'param_lo' has shape \(3, 8\), expected "
                                      r"\(4, 6\)")


def test_load_state_dict_refuses_wrong_dtype():
    bad = _corrupt(lambda sd: sd["state"][0].update(exp_avg_sq=sd["state"][0]["exp_avg_sq"].float()))
    assert_refused_and_unchanged(bad, r"parameter 0 of group 0: state 'exp_avg_sq' has dtype torch.float32, "
                                      r"expected torch.bfloat16")


def test_load_state_dict_refuses_tensor_and_negative_step():
    bad = _corrupt(lambda sd: sd["state"][1].update(step=torch.tensor(2.0)))
    assert_refused_and_unchanged(bad, r"parameter 1 of group 0: state 'step' must be an int")
    bad = _corrupt(lambda sd: sd["state"][1].update(step=-1))
    assert_refused_and_unchanged(bad, r"parameter 1 of group 0: state 'step' must be >= 0")


def test_load_state_dict_refuses_mismatched_groups_and_bad_options():
    bad = _corrupt(lambda sd: sd["param_groups"].pop())
    assert_refused_and_unchanged(bad, r"has 1 parameter groups, this optimizer 2")
    bad = _corrupt(lambda sd: sd["param_groups"][0]["params"].pop())
    assert_refused_and_unchanged(bad, r"parameter group 0 of argument 'state_dict' lists 1 parameters")
    bad = _corrupt(lambda sd: sd["param_groups"][1].update(mode="heavy"))
    assert_refused_and_unchanged(bad, r"argument 'mode' \(parameter group 1 of argument 'state_dict'\)")
    bad = _corrupt(lambda sd: sd["state"].update({7: {}}))
    assert_refused_and_unchanged(bad, r"parameter id 7, which no parameter group lists")


@pytest.mark.triton
def test_load_state_dict_refuses_wrong_shape_on_triton():
    """The (3, 8) state of a (4, 6) parameter: the Triton launcher compares element counts only, so it must never get
    there."""
    reason = ops.COLLAGE.unavailable_reason("triton", torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    make = lambda: _make(backend="triton")  # noqa: E731
    bad = copy.deepcopy(make()[1].state_dict())
    bad["state"][0]["exp_avg"] = bad["state"][0]["exp_avg"].reshape(3, 8)
    assert_refused_and_unchanged(bad, r"parameter 0 of group 0: state 'exp_avg' has shape \(3, 8\)", make=make)


# ---------------------------------------------------------------------------------------------------------------
# The fuzz test: random corruptions, each refused with the parameter and the key named, nothing changed.

def _mutations(state_dict: dict, data) -> tuple[dict, str]:
    """One corruption of `state_dict` (in place) drawn from `data`; returns (state_dict, the message's pattern)."""
    kind = data.draw(st.sampled_from(["drop", "extra", "shape", "dtype", "step", "group_key", "group_value",
                                      "foreign"]), label="kind")
    ids = sorted(state_dict["state"])
    saved_id = data.draw(st.sampled_from(ids), label="parameter")
    group_index = next(index for index, group in enumerate(state_dict["param_groups"]) if saved_id in group["params"])
    position = state_dict["param_groups"][group_index]["params"].index(saved_id)
    entry = state_dict["state"][saved_id]
    name = re.escape(f"parameter {position} of group {group_index}")
    tensor_keys = sorted(key for key in entry if isinstance(entry[key], torch.Tensor))
    if kind == "drop":
        key = data.draw(st.sampled_from(["step", "param_lo", "exp_avg", "exp_avg_sq"]), label="key")
        del entry[key]
        return state_dict, f"{name}: state lacks '{key}'"
    if kind == "extra":
        key = data.draw(st.sampled_from(["max_exp_avg_sq", "exp_avg_lo", "indices"]), label="key")
        entry[key] = torch.zeros(1)
        return state_dict, f"{name}: unexpected state '{key}'"
    if kind == "shape":
        key = data.draw(st.sampled_from(tensor_keys), label="key")
        value = entry[key]
        shapes = [(value.numel(),), (1,) + tuple(value.shape), tuple(value.shape[:-1]) + (value.shape[-1] + 1,)]
        shapes = [shape for shape in shapes if shape != tuple(value.shape)]
        shape = data.draw(st.sampled_from(shapes), label="shape")
        entry[key] = torch.zeros(shape, dtype=value.dtype)
        return state_dict, f"{name}: state '{key}' has shape"
    if kind == "dtype":
        key = data.draw(st.sampled_from(tensor_keys), label="key")
        dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int32]), label="dtype")
        entry[key] = entry[key].to(dtype)
        return state_dict, f"{name}: state '{key}' has dtype"
    if kind == "step":
        entry["step"] = data.draw(st.sampled_from([torch.tensor(2.0), -3, 2.0, None, True]), label="step")
        return state_dict, f"{name}: state 'step' must be"
    group = state_dict["param_groups"][group_index]
    if kind == "group_key":
        key = data.draw(st.sampled_from(["lr", "betas", "eps", "weight_decay", "mode"]), label="key")
        del group[key]
        return state_dict, f"parameter group {group_index} lacks '{key}'"
    if kind == "group_value":
        key, value = data.draw(st.sampled_from([("lr", -1.0), ("betas", (0.9, 1.5)), ("eps", float("nan")),
                                                ("weight_decay", "x"), ("mode", None)]), label="option")
        group[key] = value
        return state_dict, f"argument '{key}' \\(parameter group {group_index} of argument 'state_dict'\\)"
    key = data.draw(st.sampled_from(["amsgrad", "density", "frugal", "momentum"]), label="key")
    group[key] = 0
    return state_dict, f"parameter group {group_index} has '{key}'"


@settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_state_dict_fuzz_is_refused_and_leaves_the_optimizer_unchanged(data):
    bad, match = _mutations(_good_state_dict(), data)
    assert_refused_and_unchanged(bad, match)


def test_valid_state_dicts_still_load():
    """The state dict of a run, a light-mode state in a plus group (exp_avg_sq_lo starts at zero), empty entries."""
    state_dict = _good_state_dict()
    parameters, optimizer = _make(steps=0)
    optimizer.load_state_dict(state_dict)
    assert_same_state(optimizer.state_dict(), state_dict)
    state_dict["state"][0].pop("exp_avg_sq_lo")
    state_dict["state"][1] = {}
    optimizer.load_state_dict(state_dict)
    _run(parameters, optimizer, 1, start=STEPS_BEFORE)
    assert optimizer.state[parameters[0]]["exp_avg_sq_lo"].shape == parameters[0].shape
    assert optimizer.state[parameters[1]]["step"] == 1


# ---------------------------------------------------------------------------------------------------------------
# A refused step changes nothing.

def test_step_not_incremented_when_step_raises():
    parameters, optimizer = _make()
    before = copy.deepcopy(optimizer.state_dict())
    # A parameter that is not dense (a strided view): refused, naming it; nothing counted.
    strided = torch.nn.Parameter(torch.zeros(4, 6, dtype=torch.bfloat16)[:, ::2])
    optimizer.add_param_group({"params": [strided]})
    for parameter, gradient in zip(parameters, _gradients(STEPS_BEFORE)):
        parameter.grad = gradient
    strided.grad = torch.ones_like(strided)
    with pytest.raises(ValueError, match=r"parameter 0 of group 2 .*overlaps itself or has gaps"):
        optimizer.step()
    assert_same_state(optimizer.state_dict()["state"], before["state"])
    assert strided not in optimizer.state
    # A sparse gradient.
    strided.grad = None
    parameters[2].grad = _gradients(STEPS_BEFORE)[2].to_sparse()
    with pytest.raises(ValueError, match=r"parameter 0 of group 1: sparse gradients are not supported"):
        optimizer.step()
    assert_same_state(optimizer.state_dict()["state"], before["state"])
    # State set by hand to another shape (same element count).
    parameters[2].grad = _gradients(STEPS_BEFORE)[2]
    saved = optimizer.state[parameters[1]]["exp_avg"]
    optimizer.state[parameters[1]]["exp_avg"] = saved.reshape(1, 5)
    with pytest.raises(ValueError, match=r"parameter 1 of group 0: state 'exp_avg' is \(1, 5\)"):
        optimizer.step()
    optimizer.state[parameters[1]]["exp_avg"] = saved
    assert_same_state(optimizer.state_dict()["state"], before["state"])
    # A backend that cannot serve.
    if not torch.cuda.is_available():
        cuda = CollageAdamW([parameters[0]], backend="cuda")
        with pytest.raises(leanops.BackendUnavailableError):
            cuda.step()
        assert not cuda.state
    # And the step then goes on as if nothing had happened.
    twin_parameters, twin = _make()
    optimizer.param_groups.pop()
    _run(parameters, optimizer, 1, start=STEPS_BEFORE)
    _run(twin_parameters, twin, 1, start=STEPS_BEFORE)
    for ours, theirs in zip(parameters, twin_parameters):
        assert torch.equal(ours, theirs)
    assert [optimizer.state[p]["step"] for p in parameters] == [STEPS_BEFORE + 1] * 3


# ---------------------------------------------------------------------------------------------------------------
# Channels-last parameters.

@pytest.mark.parametrize("backend, device", KERNELS)
@pytest.mark.parametrize("mode", ["light", "plus"])
@pytest.mark.gpu_check
def test_channels_last_parameters(backend, device, mode):
    """bf16 conv weights (one with 1 x 1 kernels) stepped channels-last equal, bit for bit, the same values stepped
    contiguous; the state shares the parameter's strides; a contiguous
    checkpoint loads into the channels-last optimizer, and a parameter turned channels-last mid-run carries on."""
    shapes = ((6, 3, 3, 5), (2, 4, 1, 1))
    generator = torch.Generator().manual_seed(3)
    starts = [torch.randn(shape, generator=generator).bfloat16().to(device) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator).bfloat16().to(device) for shape in shapes] for _ in range(4)]

    def run(channels_last: bool, steps=range(4), parameters=None, optimizer=None):
        if parameters is None:
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            parameters = [torch.nn.Parameter(start.clone().to(memory_format=memory_format)) for start in starts]
            optimizer = CollageAdamW(parameters, lr=1e-2, weight_decay=0.1, mode=mode, backend=backend)
        for step in steps:
            for parameter, grad in zip(parameters, grads[step]):
                parameter.grad = grad.clone()  # contiguous: the step puts it in the parameter's layout
            optimizer.step()
        return parameters, optimizer

    contiguous, contiguous_optimizer = run(False)
    channels_last, channels_last_optimizer = run(True)
    for ours, theirs in zip(channels_last, contiguous):
        assert ours.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(ours, theirs)
        for key, value in contiguous_optimizer.state[theirs].items():
            mine = channels_last_optimizer.state[ours][key]
            if isinstance(value, torch.Tensor):
                assert mine.stride() == ours.stride(), key
                assert torch.equal(mine, value), key
            else:
                assert mine == value
    # A contiguous checkpoint taken after 2 steps, loaded into a channels-last optimizer, then 2 more steps.
    first, first_optimizer = run(False, steps=range(2))
    resumed = [torch.nn.Parameter(p.detach().clone().to(memory_format=torch.channels_last)) for p in first]
    resumed_optimizer = CollageAdamW(resumed, lr=1e-2, weight_decay=0.1, mode=mode, backend=backend)
    resumed_optimizer.load_state_dict(first_optimizer.state_dict())
    run(True, steps=range(2, 4), parameters=resumed, optimizer=resumed_optimizer)
    # A parameter turned channels-last after 2 steps (its state was made contiguous).
    turned, turned_optimizer = run(False, steps=range(2))
    for parameter in turned:
        parameter.data = parameter.data.to(memory_format=torch.channels_last)
    run(True, steps=range(2, 4), parameters=turned, optimizer=turned_optimizer)
    for parameters, optimizer in ((resumed, resumed_optimizer), (turned, turned_optimizer)):
        for ours, theirs in zip(parameters, contiguous):
            assert torch.equal(ours, theirs)
            for key, value in contiguous_optimizer.state[theirs].items():
                if isinstance(value, torch.Tensor):
                    assert optimizer.state[ours][key].stride() == ours.stride(), key
                    assert torch.equal(optimizer.state[ours][key], value), key


def test_permuted_dense_parameters_are_stepped_and_overlapping_ones_refused():
    """Any order of the dimensions is dense (a transposed weight); an expanded (overlapping) one is refused."""
    start = torch.randn(5, 7).bfloat16()
    grad = torch.randn(5, 7).bfloat16()
    transposed = torch.nn.Parameter(start.t().contiguous().t())
    plain = torch.nn.Parameter(start.clone())
    for parameter in (transposed, plain):
        parameter.grad = grad.clone()
    first, second = CollageAdamW([transposed], backend="reference"), CollageAdamW([plain], backend="reference")
    first.step()
    second.step()
    assert torch.equal(transposed, plain) and transposed.stride() == (1, 5)
    expanded = torch.nn.Parameter(torch.zeros(1, 7, dtype=torch.bfloat16).expand(5, 7))
    expanded.grad = grad.clone()
    with pytest.raises(ValueError, match="parameter 0 of group 0 .*overlaps itself"):
        CollageAdamW([expanded], backend="reference").step()


# ---------------------------------------------------------------------------------------------------------------
# fp32 interchange.

def test_split_state_dict_refuses_values_beyond_the_16_bit_range():
    state = {"weight": torch.tensor([1.0, 70000.0, -2.0]), "bias": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"tensor 'weight' holds 1 finite values beyond torch.float16's range"):
        collage.split_state_dict(state, dtype=torch.float16)
    huge = torch.tensor([3.3e38, torch.finfo(torch.float32).max])
    with pytest.raises(ValueError, match=r"tensor 'huge' holds 1 finite values beyond torch.bfloat16's range"):
        collage.split_state_dict({"huge": huge})
    split = collage.split_state_dict(state, dtype=torch.bfloat16)  # bfloat16 reaches float32's range
    assert torch.isfinite(split["model"]["weight"]).all() and torch.isfinite(split["compensation"]["weight"]).all()


def test_split_state_dict_keeps_infinite_mask_values():
    """A mask buffer's -inf stays -inf with a zero low part (hi - hi would be NaN), and merges back to -inf."""
    mask = torch.tensor([0.0, float("-inf"), 1.0 / 3.0, float("inf")])
    split = collage.split_state_dict({"mask": mask})
    assert torch.equal(split["compensation"]["mask"][1:4:2], torch.zeros(2, dtype=torch.bfloat16))
    merged = collage.merge_state_dict(split)["mask"]
    assert torch.equal(merged[[0, 1, 3]], mask[[0, 1, 3]])
    assert abs(merged[2].item() - 1 / 3) < 2.0 ** -16


def test_load_compensation_state_checks_every_entry_first():
    model = torch.nn.Linear(3, 2).bfloat16()
    optimizer = CollageAdamW(model.parameters(), backend="reference")
    compensation = {"weight": torch.ones(2, 3, dtype=torch.bfloat16), "bias": torch.ones(2)}
    with pytest.raises(ValueError, match=r"'bias' has dtype torch.float32 but its parameter has torch.bfloat16"):
        optimizer.load_compensation_state(model.named_parameters(), compensation)
    assert not optimizer.state  # the weight's entry was not installed either
