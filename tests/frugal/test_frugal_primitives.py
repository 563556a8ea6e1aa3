"""FRUGAL's fused split step ``frugal_split_step_`` on every kernel provider of ops.FRUGAL (the C++ CPU kernel, the
CUDA kernel with a GPU, the Triton kernel: under Triton's interpreter on CPU tensors on a machine without a GPU).

1. Each gives the oracle's bits (the reference provider, python/leanops/reference/frugal.py) for every state tensor,
   step after step: every mode, parameter dtype, gradient dtype, compensation and state-free rule, at awkward sizes
   (one element, one row, one column, a subspace of size 0, an empty tensor, more than one chunk).
2. Bad arguments get an error naming them, before anything is written.

tests/frugal/test_frugal_optimizer.py holds the optimizer on each kernel to the reference backend.
"""
import math

import pytest
import torch

from helpers import interpreted, provider_cases, provider_grid
from leanops import ops
from leanops.reference import frugal as oracle

ADAMW, FREE, COLUMNS, ROWS = oracle.ADAMW, oracle.FREE, oracle.COLUMNS, oracle.ROWS
KERNELS = provider_cases(ops.FRUGAL, backends_=("cpu", "cuda", "triton"))


def _operator(backend: str):
    return ops.FRUGAL.provider(backend).operators.frugal_split_step_


ORACLE = _operator("reference")


# ---------------------------------------------------------------------------------------------------------------
# 1. The primitive against the oracle.

# The large tensors' (rows, columns), beyond two chunks of each kernel: the C++ kernels' 16384 elements (in the
# matrix modes the CPU kernel's blocks of 16384 // columns rows), the Triton interpreter's 8192 (and so its GPU
# kernel's 1024).
LARGE = {"cpu": (129, 257), "cuda": (129, 257), "triton": (67, 131)}


def tensors(large=LARGE["triton"]):
    """(shape, mode, subspace indices of the columns / rows) of each tensor: awkward on purpose."""
    rows, columns = large
    return [
        ((1,), ADAMW, None),
        ((3, 4, 5), ADAMW, None),
        ((rows, columns), FREE, None),    # several chunks
        ((0, 5), FREE, None),             # empty
        ((9, 13), COLUMNS, [0, 4, 12]),
        ((1, 7), COLUMNS, [6]),
        ((5, 1), COLUMNS, []),            # a subspace of size 0: every element state-free
        ((11, 6), ROWS, [1, 2, 10]),
        ((7, 1), ROWS, [0, 3, 4, 5, 6]),
        ((rows, columns), COLUMNS, list(range(0, columns, 3))),  # several chunks, rows cut by chunk ends
        ((columns, rows), ROWS, list(range(1, columns, 4))),
        ((4, 6), FREE, None),             # with an addend below
    ]


TENSORS = tensors()
ADDEND_INDEX = len(TENSORS) - 1


def _problem(dtype, grad_dtype, compensated, seed, layout=TENSORS):
    """The primitive's arguments (lists of CPU tensors) for the tensors of `layout`, drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, scale=1.0):
        return torch.randn(shape, generator=generator) * scale

    arguments = {key: [] for key in ("params", "params_lo", "exp_avgs", "exp_avg_sqs", "grads", "positions",
                                     "addends", "modes", "step_sizes", "roots")}
    for index, (shape, mode, indices) in enumerate(layout):
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
    """A copy of the arguments on `device`: a copy on the CPU too (Tensor.to returns the tensor itself when nothing
    changes, and the kernel would then step the oracle's own tensors, comparing them with themselves)."""
    return {key: [t.to(device, copy=True) for t in value] if key not in ("modes", "step_sizes", "roots") else list(value)
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


RULES = ((oracle.SIGNSGD, "signsgd"), (oracle.SGD, "sgd"), (oracle.NONE, "none"))
POINTS = [pytest.param(*combination.values, rule, id=f"{combination.id}-{name}")
          for combination in COMBINATIONS for rule, name in RULES]


def _off_the_diagonal(backend, device, dtype, grad_dtype, compensated, rule):
    """The interpreter's cases but six, the combinations i and rules j with i = j mod 3: every parameter dtype,
    gradient dtype, compensation and rule (every variant of the kernel) stays in the quick run."""
    combination = [c.values for c in COMBINATIONS].index((dtype, grad_dtype, compensated))
    return interpreted(backend, device) and (combination - [r for r, _ in RULES].index(rule)) % 3 != 0


@pytest.mark.parametrize("backend, device, dtype, grad_dtype, compensated, rule",
                         provider_grid(KERNELS, POINTS, slow=_off_the_diagonal))
@pytest.mark.gpu_check
def test_primitive_gives_the_oracles_bits(backend, device, dtype, grad_dtype, compensated, rule):
    layout = tensors(LARGE[backend])
    expected = _problem(dtype, grad_dtype, compensated, seed=7, layout=layout)
    actual = _on(expected, device)
    for step in range(3):  # the state evolves: each step starts from the last one's outputs
        fresh = _problem(dtype, grad_dtype, compensated, seed=100 + step, layout=layout)
        expected["grads"], actual["grads"] = fresh["grads"], _on(fresh, device)["grads"]
        _call(ORACLE, expected, rule)
        _call(_operator(backend), actual, rule)
        for key in STATES:
            for index, (want, got) in enumerate(zip(expected[key], actual[key])):
                assert torch.equal(want, got.cpu()), f"step {step}, {key}[{index}] ({layout[index][:2]})"


def test_the_oracle_is_adamw_and_signsgd_written_out():
    """The oracle itself, on one tensor per mode, against the formulas in float64 (rounded once at the end)."""
    arguments = _problem(torch.float32, torch.float32, False, seed=3)
    before = {key: [t.clone() for t in value] for key, value in arguments.items() if key in STATES + ("grads",)}
    _call(ORACLE, arguments, oracle.SIGNSGD)
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

@pytest.mark.parametrize("backend, device", KERNELS)
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
# 3. Special values: NaN in gives NaN out on every provider (the oracle's sign(NaN) is NaN, not torch.sign's 0).

def _with_special_values(arguments, dtype):
    """Put NaN, infinities, signed zeros and huge values into the gradients, and -0, infinities and NaN into the
    parameters, at a few places of every tensor (a -0 parameter with a -0 gradient tells sign(-0) = +0 from -0)."""
    specials = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, torch.finfo(dtype).max, -1e30, math.nan])
    for index, (theta, g) in enumerate(zip(arguments["params"], arguments["grads"])):
        flat_g, flat_theta = g.view(-1), theta.view(-1)
        count = min(flat_g.numel(), specials.numel())
        flat_g[:count] = specials[:count].to(g.dtype)
        if flat_theta.numel() > 4:
            flat_theta[3] = -0.0  # with g = -0: work = -0 - free_lr * sign(-0)
            flat_theta[4] = math.inf if index % 2 else math.nan
    return arguments


def _assert_same_values(want, got, what):
    """NaN where the oracle has NaN; elsewhere the same bits (zeros' signs included)."""
    got = got.cpu()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN at other places"
    integer = torch.int32 if want.dtype == torch.float32 else torch.int16
    differ = (want.view(integer) != got.view(integer)) & ~nan
    assert not bool(differ.any()), f"{what}: {int(differ.sum())} values differ"


SPECIAL_COMBINATIONS = [COMBINATIONS[0], COMBINATIONS[2], COMBINATIONS[5]]


@pytest.mark.parametrize("backend, device", KERNELS)
@pytest.mark.parametrize("dtype, grad_dtype, compensated", SPECIAL_COMBINATIONS)
@pytest.mark.parametrize("rule", [oracle.SIGNSGD, oracle.SGD])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_signsgd_nan_gradient_same_on_every_provider(backend, device, dtype, grad_dtype, compensated, rule):
    layout = tensors((5, 19))  # small: the special values are what matters
    expected = _with_special_values(_problem(dtype, grad_dtype, compensated, seed=11, layout=layout), dtype)
    actual = _on(expected, device)
    _call(ORACLE, expected, rule)
    _call(_operator(backend), actual, rule)
    for key in STATES:
        for index, (want, got) in enumerate(zip(expected[key], actual[key])):
            _assert_same_values(want, got, f"{key}[{index}] ({layout[index][:2]})")
    # The semantics: a NaN gradient of a state-free element makes its parameter NaN (FREE tensor 2, element 0).
    assert math.isnan(expected["params"][2].view(-1)[0].item()), "signSGD dropped a NaN gradient"


def test_oracle_sign_keeps_nan_and_gives_positive_zero():
    g = torch.tensor([math.nan, -0.0, 0.0, 2.5, -1e-30, math.inf, -math.inf])
    s = oracle.sign(g)
    assert math.isnan(s[0].item())
    assert s[1:].tolist() == [0.0, 0.0, 1.0, -1.0, 1.0, -1.0]
    assert s[1:3].view(torch.int32).tolist() == [0, 0], "sign(+-0) is +0"


@pytest.mark.parametrize("backend, device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compensated", [False, True], ids=["plain", "compensated"])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_every_16bit_parameter_same_on_every_provider(backend, device, dtype, compensated):
    """Every one of the 65,536 bit patterns as a parameter (subnormals, infinities, NaNs included), stepped by SGD
    with weight decay: each kernel's conversions and roundings give the oracle's values."""
    generator = torch.Generator().manual_seed(5)
    theta = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    arguments = {"params": [theta.clone()], "params_lo": [], "exp_avgs": [torch.empty(0)],
                 "exp_avg_sqs": [torch.empty(0)], "grads": [torch.randn(256, 256, generator=generator).to(dtype)],
                 "positions": [torch.empty(0, dtype=torch.int32)], "addends": [torch.empty(0)], "modes": [FREE],
                 "step_sizes": [0.0], "roots": [1.0]}
    if compensated:
        arguments["params_lo"] = [(theta.float() * 2.0 ** -9 * torch.rand(256, 256, generator=generator)).to(dtype)]
    actual = _on(arguments, device)
    _call(ORACLE, arguments, oracle.SGD)
    _call(_operator(backend), actual, oracle.SGD)
    for key in ("params", "params_lo"):
        for want, got in zip(arguments[key], actual[key]):
            _assert_same_values(want, got, key)
