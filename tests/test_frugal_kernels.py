"""FRUGAL's fused split-step kernels: the C++ CPU kernel, the Triton kernel (under the interpreter on a CPU-only
machine) and the CUDA kernel (with a GPU).

1. The primitive ``frugal_split_step_`` gives the oracle's bits (python/leanops/reference/frugal.py) for every
   state tensor, step after step: every mode, parameter dtype, gradient dtype, compensation and state-free rule, at
   awkward sizes (one element, one row, one column, a subspace of size 0, an empty tensor, more than one chunk).
2. Bad arguments get an error naming them, before anything is written.
3. The optimizer on each kernel backend follows the reference backend over many steps and subspace switches, for
   every projection (to float32 rounding: the reference is torch.optim.AdamW's own operations), keeps ρ=0 signSGD
   and "none" exact, and resumes from a checkpoint bit for bit across a switch.
"""
import io

import pytest
import torch

import leanops
from leanops import backends
from leanops.optim import FRUGAL
from leanops.optim import frugal as frugal_module
from leanops.reference import frugal as oracle

ADAMW, FREE, COLUMNS, ROWS = oracle.ADAMW, oracle.FREE, oracle.COLUMNS, oracle.ROWS


def _backend_param(backend: str, device: str):
    reason = (None if backend in frugal_module.IMPLEMENTED_BACKENDS else f"this build has no {backend} kernel")
    reason = reason or backends.unavailable_reason(backend, torch.device(device))
    if backend == "triton" and device == "cuda" and backends.triton_interpreter_enabled():
        reason = "Triton's interpreter is on: the Triton kernel runs on CPU tensors"
    marks = [pytest.mark.skipif(reason is not None, reason=reason or "")]
    if backend == "triton":
        marks.append(pytest.mark.triton)
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    return pytest.param(backend, device, marks=marks, id=f"{backend}-{device}")


BACKENDS = [_backend_param("cpu", "cpu"), _backend_param("triton", "cpu"), _backend_param("triton", "cuda"),
            _backend_param("cuda", "cuda")]


def _operator(backend: str):
    return getattr(torch.ops, backends.operator_namespace(backend)).frugal_split_step_


# ---------------------------------------------------------------------------------------------------------------
# 1. The primitive against the oracle.

# (shape, mode, subspace indices of the columns / rows): awkward on purpose.
TENSORS = [
    ((1,), ADAMW, None),
    ((3, 4, 5), ADAMW, None),
    ((67, 131), FREE, None),          # 8777 elements: more than one chunk of every kernel
    ((0, 5), FREE, None),             # empty
    ((9, 13), COLUMNS, [0, 4, 12]),
    ((1, 7), COLUMNS, [6]),
    ((5, 1), COLUMNS, []),            # a subspace of size 0: every element state-free
    ((11, 6), ROWS, [1, 2, 10]),
    ((7, 1), ROWS, [0, 3, 4, 5, 6]),
    ((71, 130), COLUMNS, list(range(0, 130, 3))),  # 9230 elements: several chunks, rows cut by chunk ends
    ((130, 71), ROWS, list(range(1, 130, 4))),
    ((4, 6), FREE, None),             # with an addend below
]
ADDEND_INDEX = len(TENSORS) - 1


def _problem(dtype, grad_dtype, compensated, seed):
    """The primitive's arguments (lists of CPU tensors) for TENSORS, drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, scale=1.0):
        return torch.randn(shape, generator=generator) * scale

    arguments = {key: [] for key in ("params", "params_lo", "exp_avgs", "exp_avg_sqs", "grads", "positions",
                                     "addends", "modes", "step_sizes", "roots")}
    for index, (shape, mode, indices) in enumerate(TENSORS):
        numel = torch.Size(shape).numel()
        arguments["params"].append(normal(shape).to(dtype))
        if compensated:
            arguments["params_lo"].append(normal(shape, 1e-3).to(dtype))
        gradient = normal(shape)
        gradient.view(-1)[:: 7] = 0.0  # sign(0) = 0
        arguments["grads"].append(gradient.to(grad_dtype))
        positions, moments_shape = torch.empty(0, dtype=torch.int32), None
        if mode == ADAMW:
            moments_shape = shape
        elif mode in (COLUMNS, ROWS):
            rows, columns = shape
            size = columns if mode == COLUMNS else rows
            positions = torch.full((size,), -1, dtype=torch.int32)
            positions[torch.tensor(indices, dtype=torch.long)] = torch.arange(len(indices), dtype=torch.int32)
            moments_shape = (rows, len(indices)) if mode == COLUMNS else (len(indices), columns)
        if moments_shape is None:
            arguments["exp_avgs"].append(torch.empty(0))
            arguments["exp_avg_sqs"].append(torch.empty(0))
        else:
            arguments["exp_avgs"].append(normal(moments_shape, 0.1))
            arguments["exp_avg_sqs"].append(normal(moments_shape, 0.1).square())
        arguments["positions"].append(positions)
        arguments["addends"].append(normal(shape, 0.01) if index == ADDEND_INDEX else torch.empty(0))
        arguments["modes"].append(mode)
        arguments["step_sizes"].append(0.0 if mode == FREE else 1e-2 * (1 + index))
        arguments["roots"].append(1.0 if mode == FREE else 0.3 + 0.05 * index)
        assert numel == arguments["params"][-1].numel()
    return arguments


def _call(operator, arguments, rule):
    operator(arguments["params"], arguments["params_lo"], arguments["exp_avgs"], arguments["exp_avg_sqs"],
             arguments["grads"], arguments["positions"], arguments["addends"], arguments["modes"],
             arguments["step_sizes"], arguments["roots"], 0.9, 0.999, 1e-8, 1 - 1e-2 * 0.1, 3e-3, rule)


def _on(arguments, device):
    return {key: [t.to(device) for t in value] if key not in ("modes", "step_sizes", "roots") else list(value)
            for key, value in arguments.items()}


STATES = ("params", "params_lo", "exp_avgs", "exp_avg_sqs")
COMBINATIONS = [
    pytest.param(torch.float32, torch.float32, False, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, False, id="bf16"),
    pytest.param(torch.bfloat16, torch.bfloat16, True, id="bf16-compensated"),
    pytest.param(torch.bfloat16, torch.float32, True, id="bf16-compensated-fp32-grads"),
    pytest.param(torch.float16, torch.float16, True, id="fp16-compensated"),
    pytest.param(torch.float16, torch.float32, False, id="fp16-fp32-grads"),
]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype, grad_dtype, compensated", COMBINATIONS)
@pytest.mark.parametrize("rule", [oracle.SIGNSGD, oracle.SGD, oracle.NONE], ids=["signsgd", "sgd", "none"])
def test_primitive_gives_the_oracles_bits(backend, device, dtype, grad_dtype, compensated, rule):
    expected = _problem(dtype, grad_dtype, compensated, seed=7)
    actual = _on(expected, device)
    for step in range(3):  # the state evolves: each step starts from the last one's outputs
        fresh = _problem(dtype, grad_dtype, compensated, seed=100 + step)
        expected["grads"], actual["grads"] = fresh["grads"], _on(fresh, device)["grads"]
        oracle.frugal_split_step_(*[expected[key] for key in ("params", "params_lo", "exp_avgs", "exp_avg_sqs",
                                                              "grads", "positions", "addends", "modes",
                                                              "step_sizes", "roots")],
                                  0.9, 0.999, 1e-8, 1 - 1e-2 * 0.1, 3e-3, rule)
        _call(_operator(backend), actual, rule)
        for key in STATES:
            for index, (want, got) in enumerate(zip(expected[key], actual[key])):
                assert torch.equal(want, got.cpu()), f"step {step}, {key}[{index}] ({TENSORS[index][:2]})"


def test_the_oracle_is_adamw_and_signsgd_written_out():
    """The oracle itself, on one tensor per mode, against the formulas in float64 (rounded once at the end)."""
    arguments = _problem(torch.float32, torch.float32, False, seed=3)
    before = {key: [t.clone() for t in value] for key, value in arguments.items() if key in STATES + ("grads",)}
    _call(oracle.frugal_split_step_, arguments, oracle.SIGNSGD)
    decay, free_lr = 1 - 1e-2 * 0.1, 3e-3
    for index, (shape, mode, indices) in enumerate(TENSORS):
        theta = before["params"][index].double()
        g = before["grads"][index].double()
        expected = theta * decay
        full = torch.zeros(shape, dtype=torch.bool)
        if mode == ADAMW:
            full[...] = True
        elif mode == COLUMNS:
            full[:, indices] = True
        elif mode == ROWS:
            full[indices, :] = True
        if full.any():
            if mode == ADAMW:
                m, v = before["exp_avgs"][index].double(), before["exp_avg_sqs"][index].double()
                g_full = g
            else:
                dim = 1 if mode == COLUMNS else 0
                m, v = before["exp_avgs"][index].double(), before["exp_avg_sqs"][index].double()
                g_full = g.index_select(dim, torch.tensor(indices))
            m = 0.9 * m + 0.1 * g_full
            v = 0.999 * v + 0.001 * g_full * g_full
            step = arguments["step_sizes"][index] * m / (v.sqrt() / arguments["roots"][index] + 1e-8)
            if mode == ADAMW:
                expected = expected - step
            else:
                expected.index_add_(dim, torch.tensor(indices), -step)
            torch.testing.assert_close(arguments["exp_avgs"][index].double(), m, rtol=1e-6, atol=1e-7)
        if index == ADDEND_INDEX:
            expected = expected + arguments["addends"][index].double()  # the step does not write addends
        expected = torch.where(full, expected, expected - free_lr * torch.sign(g))
        torch.testing.assert_close(arguments["params"][index].double(), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 2. Bad arguments.

@pytest.mark.parametrize("backend, device", BACKENDS)
def test_primitive_bad_arguments_name_the_argument(backend, device):
    operator = _operator(backend)

    def attempt(change, match, error=(ValueError, TypeError, RuntimeError)):
        arguments = _on(_problem(torch.float32, torch.float32, False, seed=1), device)
        untouched = [t.clone() for t in arguments["params"]]
        change(arguments)
        with pytest.raises(error, match=match):
            _call(operator, arguments, oracle.SIGNSGD)
        for want, got in zip(untouched, arguments["params"]):
            if got.dtype == want.dtype and got.shape == want.shape:
                assert torch.equal(want, got), "a refused call wrote"

    attempt(lambda a: a["grads"].pop(), "'grads' has")
    attempt(lambda a: a["params"].__setitem__(1, a["params"][1].double()), r"params\[1\]")
    attempt(lambda a: a["grads"].__setitem__(2, a["grads"][2].t()), r"grads\[2\].*contiguous")
    attempt(lambda a: a["modes"].__setitem__(0, 7), r"modes\[0\]")
    attempt(lambda a: a["exp_avgs"].__setitem__(4, torch.zeros(25, device=device)), r"exp_avgs\[4\]")
    attempt(lambda a: a["positions"].__setitem__(7, a["positions"][7].long()), r"positions\[7\]")
    attempt(lambda a: a["addends"].__setitem__(ADDEND_INDEX, torch.zeros(3, device=device)),
            rf"addends\[{ADDEND_INDEX}\]")
    attempt(lambda a: a["params_lo"].extend(t.clone() for t in a["params"]), "'params_lo'")


# ---------------------------------------------------------------------------------------------------------------
# 3. The optimizer on the kernels.

SHAPES = ((13, 7), (6, 17), (5,), (9, 9), (1, 11), (2, 3, 4))


def _parameters(dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device=device, dtype=dtype))
            for shape in SHAPES]


def _run(optimizer, parameters, steps, start=0):
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(500 + step)
        for parameter in parameters:
            parameter.grad = torch.randn(parameter.shape, generator=generator).to(parameter)
        optimizer.step()


def _value(parameter, optimizer):
    """The parameter as float32, with its Collage compensation when it has one."""
    value = parameter.detach().float()
    low = optimizer.state.get(parameter, {}).get("param_lo")
    return value + low.float() if low is not None else value


PROJECTIONS = ("blockwise", "columns", "rows", "random", "svd")
PRECISIONS = [pytest.param(torch.float32, "fp32", id="fp32"),
              pytest.param(torch.bfloat16, "collage", id="bf16-collage")]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("dtype, precision", PRECISIONS)
def test_optimizer_follows_the_reference_across_switches(backend, device, projection, dtype, precision):
    for state_free, on_switch in (("signsgd", "reset"), ("sgd", "project")):
        options = dict(lr=1e-2, weight_decay=0.1, density=0.4, update_gap=3, projection=projection,
                       state_free=state_free, on_switch=on_switch, precision=precision, seed=5)
        mine = _parameters(dtype, device)
        theirs = _parameters(dtype, "cpu")
        kernel = FRUGAL(mine, backend=backend, **options)
        reference = FRUGAL(theirs, backend="reference", **options)
        _run(kernel, mine, 10)
        _run(reference, theirs, 10)
        for index, (a, b) in enumerate(zip(mine, theirs)):
            # float32 rounding apart (the reference is torch's AdamW operations, the kernels the oracle's order):
            # a few ulp of the parameters after 10 steps; compensated pairs carry float32-level values too.
            torch.testing.assert_close(_value(a, kernel).cpu(), _value(b, reference), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{state_free}/{on_switch} parameter {index}: {m}")
            for key in ("exp_avg", "exp_avg_sq", "step", "indices", "projector"):
                want = reference.state.get(b, {}).get(key)
                got = kernel.state.get(a, {}).get(key)
                assert (want is None) == (got is None), key
                if isinstance(want, torch.Tensor):
                    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
                else:
                    assert got == want


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_density_zero_is_signsgd_and_none_leaves_the_remainder(backend, device, projection):
    parameters = _parameters(torch.float32, device)
    initial = [p.detach().clone() for p in parameters]
    optimizer = FRUGAL(parameters, lr=1e-2, weight_decay=0.1, density=0.0, projection=projection, backend=backend)
    _run(optimizer, parameters, 1)
    generator = torch.Generator().manual_seed(500)
    for parameter, start in zip(parameters, initial):
        gradient = torch.randn(parameter.shape, generator=generator).to(device)
        expected = start * torch.tensor(1 - 1e-2 * 0.1) - torch.tensor(1e-2) * gradient.sign()
        assert torch.equal(parameter.detach(), expected)
    parameters = _parameters(torch.float32, device)
    initial = [p.detach().clone() for p in parameters]
    optimizer = FRUGAL(parameters, lr=1e-2, density=0.5, projection=projection, state_free="none", backend=backend)
    _run(optimizer, parameters, 2)
    for parameter, start in zip(parameters, initial):
        if projection == "blockwise":
            moved = parameter in optimizer.state and "exp_avg" in optimizer.state[parameter]
            assert torch.equal(parameter.detach(), start) != moved
        elif projection in ("columns", "rows"):
            dim = 1 if projection == "columns" else 0
            matrix, begin = parameter.detach().view(parameter.shape[0], -1), start.view(parameter.shape[0], -1)
            if parameter.dim() == 1:
                matrix, begin = parameter.detach().view(1, -1), start.view(1, -1)
            outside = torch.ones(matrix.shape[dim], dtype=torch.bool, device=device)
            outside[optimizer.state[parameter]["indices"].long()] = False
            assert torch.equal(matrix.index_select(dim, outside.nonzero().flatten()),
                               begin.index_select(dim, outside.nonzero().flatten()))


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("projection", ["blockwise", "columns", "svd"])
def test_checkpoint_resume_is_bit_exact_across_a_switch(backend, device, projection):
    options = dict(lr=1e-2, density=0.5, update_gap=3, projection=projection, precision="collage", seed=9,
                   backend=backend)
    straight = _parameters(torch.bfloat16, device)
    optimizer = FRUGAL(straight, **options)
    _run(optimizer, straight, 8)
    resumed = _parameters(torch.bfloat16, device)
    first = FRUGAL(resumed, **options)
    _run(first, resumed, 4)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = FRUGAL(resumed, **options)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    _run(second, resumed, 4, start=4)  # the switch at step 7 happens after the resume
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
        assert torch.equal(optimizer.state[a]["param_lo"], second.state[b]["param_lo"])


def test_auto_picks_the_cpu_kernel_and_float64_the_reference():
    if "cpu" not in frugal_module.IMPLEMENTED_BACKENDS:
        pytest.skip("this build has no CPU kernel")
    parameter = torch.nn.Parameter(torch.zeros(3))
    assert frugal_module._resolve_backend("auto", parameter) == "cpu"
    assert frugal_module._resolve_backend("auto", parameter.double()) == "reference"
    with pytest.raises(leanops.BackendUnavailableError, match="float64"):
        frugal_module._resolve_backend("cpu", parameter.double())
