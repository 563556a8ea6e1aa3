"""The chunked linear cross-entropy primitives (linear_ce_forward, linear_ce_backward; csrc/ops.cpp states their
contract) of every provider of ``leanops.ops.CROSS_ENTROPY``, called directly through
``CROSS_ENTROPY.provider(backend).operators``, against the dense formulas of that contract evaluated in float64 (this
module's ``*_dense`` functions, on ``oracles.capped_logits``: the only place the N x V logits are built).

Tolerance: ``helpers.assert_flash_attention_rule``, the same for every provider. The four statistics are float32 and
accumulate in float32 whatever the input dtype (16-bit products are exact in float32): at most max(1e-5, 2 x the
error of the same dense formula run in plain float32 PyTorch), relative to the largest expected magnitude. Gradients
come back in the input dtype, rounded once from float32: ``gradient_floor`` allows that rounding on top.

Sizes per provider (``SIZES``, (N, V, D)): N = 1, V = 1 and D = 1 against moderate others, N, V, D no multiple of
any block: the C++ CPU kernels tile 128 tokens x 512 classes (N = 130 and 300 span two and three token blocks,
V = 1000 and 1100 two and three vocabulary blocks), the CUDA kernels 64-row tiles (D = 520 and 1096: two and three
column chunks of the backward, multiples of 8 for their cp.async path), the interpreter 16 x 16 tiles and 32 gradient
columns (N = 37: three token blocks, V = 50: four vocabulary blocks, D = 40: two column chunks), the reference
chunks of rows (shrunk to 16 here: several token and vocabulary chunks).
"""
import math

import pytest
import torch

import oracles
from helpers import (DTYPES, assert_flash_attention_rule, assert_layouts_give_the_same_bits,
                     assert_same_bits_on_every_call_and_stream, interpreted, provider_cases,
                     provider_dtype_cases, slow_when_interpreted, unit_roundoff)
from leanops.ops import CROSS_ENTROPY
from leanops.reference import cross_entropy as reference

CASES = provider_cases(CROSS_ENTROPY)
COMPILED_CASES = provider_cases(CROSS_ENTROPY, backends_=("cpu", "cuda"))

SIZES = {
    "reference": [(1, 1, 1), (1, 300, 7), (37, 1, 20), (37, 50, 40), (130, 70, 3)],
    "cpu": [(1, 1, 1), (1, 300, 70), (37, 1, 70), (37, 300, 70), (37, 300, 1), (130, 1000, 33), (300, 1100, 16)],
    "cuda": [(1, 300, 70), (37, 1, 70), (37, 300, 1), (37, 300, 70), (300, 1000, 520), (65, 130, 1096)],
    "triton": [(1, 1, 1), (1, 50, 20), (37, 1, 20), (37, 50, 40), (20, 70, 1)],
}
# Logits near 1e3 (features of norm 30), far beyond exp's float32 range without a running max.
LARGE_SIZES = {"reference": [(37, 50, 40)], "cpu": [(200, 700, 70)], "cuda": [(37, 300, 70), (300, 1000, 520)],
               "triton": [(37, 50, 40)]}
# For the gradients past float16's range, above and below.
RANGE_SIZES = {"reference": [(37, 65, 40)], "cpu": [(37, 300, 70)], "cuda": [(37, 300, 70)], "triton": [(37, 65, 40)]}
# (with_bias, softcap): each combination of the kernels' two switches (HAS_BIAS, HAS_SOFTCAP). Under Triton's
# interpreter the two mixed ones are slow: "neither" and "both" already take each branch of each switch.
OPTIONS = [(False, 0.0, "no-bias"), (True, 0.0, "bias"), (False, 5.0, "no-bias-softcap5"), (True, 5.0, "bias-softcap5")]
MATCH_CASES = [pytest.param(*case.values, with_bias, softcap, id=f"{case.id}-{name}", marks=list(case.marks) + (
                   [pytest.mark.slow] if interpreted(*case.values[:2]) and with_bias != (softcap > 0) else []))
               for case in provider_dtype_cases(CROSS_ENTROPY, DTYPES, SIZES) for with_bias, softcap, name in OPTIONS]

STATISTICS = ("lse", "target_logit", "logit_sum", "logit_square_sum")
GRADIENTS = ("grad_hidden", "grad_weight", "grad_bias")


def gradient_floor(backend: str, dtype: torch.dtype) -> float:
    """The floor of the tolerance for a provider's gradients (statistics: 1e-5 everywhere). Each gradient is
    reduced in float32 and rounded once to the input dtype: that rounding is allowed twice over. The GPU kernels
    (Triton, CUDA) reduce in tiles of tensor-core products (2e-5 for float32 inputs); the Triton kernels also round
    the float32 G tile to the input dtype before its product (four units of that rounding in all)."""
    if dtype == torch.float64:
        return 1e-12
    if backend in ("triton", "cuda"):
        return 2e-5 if dtype == torch.float32 else 4 * unit_roundoff(dtype)
    return 1e-5 + (0.0 if dtype == torch.float32 else 2 * unit_roundoff(dtype))


@pytest.fixture(autouse=True)
def _reference_chunks_of_16_rows(request, monkeypatch):
    """The reference provider's chunks (512 rows) shrunk to 16 rows, so that both of its chunked passes (token
    chunks, vocabulary chunks) run over several chunks at the sizes tested here."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "reference":
        monkeypatch.setattr(reference, "CHUNK_ROWS", 16)


# ---------------------------------------------------------------------------------------------------------------
# The dense formulas of the contract (csrc/ops.cpp), on whatever dtype their arguments have: float64 for the
# oracle, float32 for plain PyTorch's error.

def _logits(hidden, weight, bias, softcap):
    return oracles.capped_logits(hidden, weight, bias if bias.numel() else None, softcap if softcap > 0 else None)


def linear_ce_forward_dense(hidden, weight, bias, targets, softcap):
    logits = _logits(hidden, weight, bias, softcap)
    picked = logits.gather(1, targets.clamp_min(0)[:, None])[:, 0]
    return (torch.logsumexp(logits, dim=1), torch.where(targets >= 0, picked, 0), logits.sum(dim=1),
            logits.square().sum(dim=1))


def linear_ce_backward_dense(hidden, weight, bias, targets, softcap, lse, grad_lse, grad_target, grad_sum,
                             grad_square_sum):
    logits = _logits(hidden, weight, bias, softcap)
    is_target = targets[:, None] == torch.arange(weight.shape[0])[None, :]
    g = (grad_lse[:, None] * torch.exp(logits - lse[:, None]) + grad_sum[:, None]
         + 2 * grad_square_sum[:, None] * logits + torch.where(is_target, grad_target[:, None], 0))
    if softcap > 0:
        g = g * (1 - (logits / softcap).square())
    return g @ weight, g.T @ hidden, g.sum(dim=0) if bias.numel() else g.sum(dim=0)[:0]


# ---------------------------------------------------------------------------------------------------------------
# Checks.

def _converted(arguments, precision=torch.float64):
    """Floating-point tensors converted to `precision` on the CPU; targets moved only; softcap as it is."""
    return tuple((a.detach().cpu().to(precision) if a.is_floating_point() else a.detach().cpu())
                 if isinstance(a, torch.Tensor) else a for a in arguments)


def compare(names, actual, formula, arguments, floor, dtype, only=None):
    """Each output of a provider against formula(arguments) in float64 with the flash-attention rule (float64
    inputs: against float64 alone); `only`: the names of the outputs compared (the others are checked for dtype,
    device and finiteness)."""
    expected = formula(*_converted(arguments, torch.float64))
    plain = expected if dtype == torch.float64 else formula(*_converted(arguments, torch.float32))
    assert len(actual) == len(expected) == len(names)
    for name, a, e, p in zip(names, actual, expected, plain):
        if only is None or name in only:
            assert_flash_attention_rule(name, a, e, p, floor=floor, dtype=dtype, device=arguments[0].device)
        else:
            assert a.dtype == dtype and a.device == arguments[0].device and bool(torch.isfinite(a).all()), name


def check(backend, hidden, weight, bias, targets, softcap, statistic_gradients, only=None):
    """Both primitives of `backend` against the dense formulas; the backward takes the forward's own lse, as in
    training. Returns (statistics, gradients)."""
    operators = CROSS_ENTROPY.provider(backend).operators
    forward_arguments = (hidden, weight, bias, targets, softcap)
    statistics = operators.linear_ce_forward(*forward_arguments)
    statistics_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    compare(STATISTICS, statistics, linear_ce_forward_dense, forward_arguments,
            gradient_floor(backend, torch.float64) if hidden.dtype == torch.float64 else 1e-5, statistics_dtype)
    assert bool((statistics[1][targets < 0] == 0).all()), "target_logit must be exactly 0 where the target is -1"
    arguments = forward_arguments + (statistics[0],) + tuple(statistic_gradients)
    gradients = operators.linear_ce_backward(*arguments)
    compare(GRADIENTS, gradients, linear_ce_backward_dense, arguments, gradient_floor(backend, hidden.dtype),
            hidden.dtype, only)
    assert gradients[2].shape == bias.shape
    return statistics, gradients


# ---------------------------------------------------------------------------------------------------------------
# Inputs.

def make_problem(tokens, classes, dim, dtype, device, seed, *, bias=True, norm=None, hidden_scale=1.0,
                 weight_scale=1.0):
    """(hidden, weight, bias, targets): logits of order 1, or rows of hidden and weight rescaled to `norm` (logits up
    to norm^2), times hidden_scale * weight_scale; about a fifth of the targets are -1 (no target), token 1 targets
    the last class."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(classes, dim, generator=generator, dtype=torch.float64) / math.sqrt(max(dim, 1))
    if norm is not None:
        hidden = hidden / hidden.norm(dim=1, keepdim=True) * norm
        weight = weight / weight.norm(dim=1, keepdim=True) * norm
    bias_tensor = (torch.randn(classes, generator=generator, dtype=torch.float64) if bias
                   else torch.zeros(0, dtype=torch.float64))
    targets = torch.randint(0, classes, (tokens,), generator=generator)
    targets[torch.rand(tokens, generator=generator) < 0.2] = -1
    if tokens > 1:
        targets[1] = classes - 1
    convert = lambda t: t.to(dtype).to(device)  # noqa: E731
    return (convert(hidden * hidden_scale), convert(weight * weight_scale), convert(bias_tensor),
            targets.to(device))


def statistic_gradients(tokens, device, seed, scale=1.0):
    """(grad_lse, grad_target, grad_sum, grad_square_sum), float32, all nonzero, of the signs a cross-entropy with
    label smoothing, z-loss and squentropy gives (times `scale`)."""
    generator = torch.Generator().manual_seed(seed)
    grad_lse = torch.rand(tokens, generator=generator) + 0.1
    grad_target = -(torch.rand(tokens, generator=generator) + 0.1)
    grad_sum = 0.1 * torch.randn(tokens, generator=generator)
    grad_square_sum = 0.01 * torch.randn(tokens, generator=generator)
    return tuple((scale * t).to(device) for t in (grad_lse, grad_target, grad_sum, grad_square_sum))


# ---------------------------------------------------------------------------------------------------------------
# Every provider: accuracy.

@pytest.mark.parametrize("backend,device,dtype,size,with_bias,softcap", MATCH_CASES)
def test_matches_float64(backend, device, dtype, size, with_bias, softcap):
    tokens, classes, dim = size
    seed = tokens * 1_000_000 + classes * 100 + dim
    check(backend, *make_problem(tokens, classes, dim, dtype, device, seed, bias=with_bias), softcap,
          statistic_gradients(tokens, device, seed))


@pytest.mark.parametrize("softcap", [0.0, 50.0], ids=["uncapped", "softcap50"])
@pytest.mark.parametrize("backend,device,dtype,size", provider_dtype_cases(CROSS_ENTROPY, DTYPES, LARGE_SIZES))
@pytest.mark.gpu_check
def test_large_logits_stay_finite_and_accurate(backend, device, dtype, size, softcap):
    """Features of norm 30: logits up to ~900, which only a max-subtracted (online) log-sum-exp survives (with a
    softcap of 50, dz'/dz is small almost everywhere)."""
    tokens, classes, dim = size
    problem = make_problem(tokens, classes, dim, dtype, device, seed=17, norm=30.0)
    statistics, _ = check(backend, *problem, softcap, statistic_gradients(tokens, device, seed=18))
    largest = float(statistics[0].abs().max())
    assert largest > (40.0 if softcap else 200.0), f"the test meant large logits, got lse up to {largest}"


@pytest.mark.parametrize("backend,device", CASES)
def test_backward_is_the_gradient_of_the_statistics(backend, device):
    """The contract itself, independently of the dense backward formula: float64 autograd through the dense logits
    of sum_n (a lse + b target_logit + c logit_sum + d logit_square_sum)."""
    operators = CROSS_ENTROPY.provider(backend).operators
    size = (37, 50, 20) if interpreted(backend, device) else (70, 600, 24)
    hidden, weight, bias, targets = make_problem(*size, torch.float32, device, seed=23)
    grads = statistic_gradients(size[0], device, seed=24)
    for softcap in (0.0, 3.0):
        h, w, b = (t.detach().double().cpu().requires_grad_() for t in (hidden, weight, bias))
        statistics = linear_ce_forward_dense(h, w, b, targets.cpu(), softcap)
        sum((g.double().cpu() * s).sum() for g, s in zip(grads, statistics)).backward()
        lse = operators.linear_ce_forward(hidden, weight, bias, targets, softcap)[0]
        actual = operators.linear_ce_backward(hidden, weight, bias, targets, softcap, lse, *grads)
        for name, a, e in zip(GRADIENTS, actual, (h.grad, w.grad, b.grad)):
            assert_flash_attention_rule(f"{name} (softcap {softcap})", a, e, e, floor=gradient_floor(
                backend, torch.float32))


@pytest.mark.parametrize("backend,device", CASES)
def test_strided_inputs(backend, device):
    """Column-major hidden, every other column of weight and element of bias and targets: the same results."""
    tokens, classes, dim = (37, 50, 20) if interpreted(backend, device) else (150, 700, 40)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(dim, tokens, generator=generator).to(device).T
    weight = (torch.randn(classes, 2 * dim, generator=generator) / 6).to(device)[:, ::2]
    bias = torch.randn(2 * classes, generator=generator).to(device)[::2]
    targets = torch.randint(-1, classes, (2 * tokens,), generator=generator).to(device)[::2]
    assert not (hidden.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
    check(backend, hidden, weight, bias, targets, 4.0, statistic_gradients(tokens, device, seed=4))


@pytest.mark.parametrize("backend,device", CASES)
def test_targets_at_the_vocabulary_edges(backend, device):
    """Targets 0, V - 1 and -1 only, V = 65 one past a tile boundary of the GPU kernels (64) and of the interpreter
    (16): the last tile has a single valid class."""
    hidden, weight, bias, _ = make_problem(37, 65, 40, torch.float32, device, seed=17)
    targets = torch.tensor([0, 64, -1] * 13, device=device)[:37]
    check(backend, hidden, weight, bias, targets, 0.0, statistic_gradients(37, device, seed=18))


@pytest.mark.parametrize("backend,device,dtype,size", provider_dtype_cases(CROSS_ENTROPY, DTYPES, RANGE_SIZES))
def test_gradients_outside_float16_range(backend, device, dtype, size):
    """|G| past float16's 65504, with small features so that the gradients themselves stay in range (no bias: its
    gradient sum_n G would not): a float16 G tile must be scaled before the tensor cores."""
    tokens, classes, dim = size
    problem = make_problem(tokens, classes, dim, dtype, device, seed=13, bias=False, hidden_scale=1e-3,
                           weight_scale=1e-3)
    grads = statistic_gradients(tokens, device, seed=14, scale=2e5)
    lse = linear_ce_forward_dense(*_converted(problem + (0.0,)))[0]
    expected = linear_ce_backward_dense(*_converted(problem + (0.0, lse) + grads))
    assert expected[0].abs().max().item() < 3e4
    check(backend, *problem, 0.0, grads)


@pytest.mark.parametrize("backend,device,dtype,size", provider_dtype_cases(CROSS_ENTROPY, DTYPES, RANGE_SIZES))
def test_gradients_below_float16_range(backend, device, dtype, size):
    """|G| <= ~2e-7, most entries far below float16's smallest subnormal (6e-8), with a large weight so that
    grad_hidden = G W is a normal float16 (grad_weight = G^T h and grad_bias underflow in float16 and are only
    checked to be finite)."""
    tokens, classes, dim = size
    problem = make_problem(tokens, classes, dim, dtype, device, seed=15, hidden_scale=1e-3, weight_scale=1e3)
    grads = statistic_gradients(tokens, device, seed=16, scale=2e-7)
    lse = linear_ce_forward_dense(*_converted(problem + (0.0,)))[0]
    expected = linear_ce_backward_dense(*_converted(problem + (0.0, lse) + grads))
    assert expected[0].abs().max().item() > 1e-4
    check(backend, *problem, 0.0, grads, only=("grad_hidden",))


@pytest.mark.parametrize("backend,device", slow_when_interpreted(CASES))
def test_float16_tiny_gradients_do_not_flush_to_zero(backend, device):
    """A mean over many tokens makes grad_lse ~2e-5; times softmax weights ~1/V = 1e-3 the G entries are ~2e-8,
    below float16's smallest subnormal (6e-8). Summed over 128 tokens whose hidden states agree they make a normal
    grad_weight (~1.2e-4), which a plain float16 cast of G would round to zero. (Slow under the interpreter: the
    float16 tile scaling also runs, faster, in test_gradients_below_float16_range.)"""
    generator = torch.Generator().manual_seed(3)
    tokens, classes, dim = 128, 1000, 16
    hidden = (48.0 + 0.1 * torch.randn(tokens, dim, generator=generator)).half().to(device)
    weight = (0.001 * torch.randn(classes, dim, generator=generator)).half().to(device)
    bias = torch.empty(0, dtype=torch.float16, device=device)
    targets = torch.full((tokens,), -1, device=device)
    grads = (torch.full((tokens,), 2e-5, device=device),) + tuple(torch.zeros(tokens, device=device)
                                                                  for _ in range(3))
    lse = linear_ce_forward_dense(*_converted((hidden, weight, bias, targets, 0.0)))[0]
    expected = linear_ce_backward_dense(*_converted((hidden, weight, bias, targets, 0.0, lse) + grads))[1]
    assert expected.abs().min() > torch.finfo(torch.float16).tiny  # every entry is a normal float16 number
    check(backend, hidden, weight, bias, targets, 0.0, grads, only=("grad_weight",))


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("backend,device", CASES)
def test_no_tokens(backend, device, with_bias):
    """N = 0: empty statistics and grad_hidden; grad_weight and grad_bias are 0 (an empty sum)."""
    dtype = torch.float32 if interpreted(backend, device) else torch.bfloat16
    problem = make_problem(0, 70, 24, dtype, device, seed=23, bias=with_bias)
    statistics, gradients = check(backend, *problem, 0.0, statistic_gradients(0, device, seed=24))
    assert [tuple(t.shape) for t in statistics + gradients] == [(0,)] * 4 + [(0, 24), (70, 24),
                                                                           ((70,) if with_bias else (0,))]
    assert not gradients[1].any() and not gradients[2].any()


@pytest.mark.parametrize("backend,device", CASES)
def test_no_features(backend, device):
    """D = 0: the logits are the bias alone (the public function refuses D = 0; the primitives define it)."""
    hidden, weight, bias, targets = make_problem(9, 600, 0, torch.float32, device, seed=5)
    check(backend, hidden, weight, bias, targets, 2.0, statistic_gradients(9, device, seed=6))
    lse = CROSS_ENTROPY.provider(backend).operators.linear_ce_forward(hidden, weight, bias, targets, 0.0)[0]
    torch.testing.assert_close(lse, torch.logsumexp(bias, 0).expand(9))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("backend,device", CASES)
def test_nan_reaches_its_row_only(backend, device):
    operators = CROSS_ENTROPY.provider(backend).operators
    tokens, classes = (40, 50) if interpreted(backend, device) else (140, 600)
    hidden, weight, bias, targets = make_problem(tokens, classes, 16, torch.float32, device, seed=13)
    hidden[5, 3] = float("nan")
    statistics = operators.linear_ce_forward(hidden, weight, bias, targets, 0.0)
    for name, s in zip(STATISTICS, statistics):
        assert bool(torch.isfinite(torch.cat([s[:5], s[6:]])).all()), f"{name}: a NaN leaked into other rows"
        if name != "target_logit" or targets[5] >= 0:
            assert bool(s[5].isnan()), f"{name}: the NaN row came out as {float(s[5])}"
    grads = operators.linear_ce_backward(hidden, weight, bias, targets, 0.0, statistics[0],
                                         *statistic_gradients(tokens, device, seed=14))
    assert bool(grads[0][5].isnan().all()) and bool(torch.isfinite(torch.cat([grads[0][:5], grads[0][6:]])).all())
    assert bool(grads[1].isnan().any()) and bool(grads[2].isnan().any())


@pytest.mark.parametrize("backend,device", provider_cases(CROSS_ENTROPY, backends_=("reference",)))
def test_float64_inputs_give_float64_results(backend, device):
    """Only the reference serves float64 (the kernels refuse it: test_bad_dtypes_name_the_argument): statistics
    float64, gradients float64, as accurate as float64."""
    problem = make_problem(37, 50, 20, torch.float64, device, seed=19)
    check(backend, *problem, 3.0, tuple(g.double() for g in statistic_gradients(37, device, seed=20)))


# ---------------------------------------------------------------------------------------------------------------
# The C++ kernels (cpu, cuda): bad input is a TypeError / ValueError naming the argument, before any work. (The
# reference and Triton providers take arguments the public function has checked.)

PER_TOKEN = ("lse", "grad_lse", "grad_target", "grad_sum", "grad_square_sum")
ARGUMENTS = {"linear_ce_forward": ("hidden", "weight", "bias", "targets", "softcap"),
             "linear_ce_backward": ("hidden", "weight", "bias", "targets", "softcap") + PER_TOKEN}


def _args(device, tokens=4, classes=6, dim=3):
    args = {"hidden": torch.randn(tokens, dim), "weight": torch.randn(classes, dim), "bias": torch.randn(classes),
            "targets": torch.tensor([0, 5, -1, 2]), **{name: torch.ones(tokens) for name in PER_TOKEN}}
    return {**{name: t.to(device) for name, t in args.items()}, "softcap": 0.0}


def _call(backend, op, args):
    return getattr(CROSS_ENTROPY.provider(backend).operators, op)(*(args[name] for name in ARGUMENTS[op]))


@pytest.mark.parametrize("op", list(ARGUMENTS))
@pytest.mark.parametrize("backend,device", COMPILED_CASES)
def test_bad_dtypes_name_the_argument(backend, device, op):
    for bad in (torch.int32, torch.float64):
        args = _args(device)
        for name in ("hidden", "weight", "bias"):
            args[name] = args[name].to(bad)
        with pytest.raises(TypeError, match=rf"leanops.{op}: argument 'hidden' has dtype {bad}; the kernels support "
                                            r"torch.bfloat16, torch.float16 and torch.float32"):
            _call(backend, op, args)
    for name in ("weight", "bias"):
        args = _args(device)
        args[name] = args[name].half()
        with pytest.raises(TypeError, match=rf"leanops.{op}: argument '{name}' has dtype torch.float16 but 'hidden' "
                                            r"has dtype torch.float32"):
            _call(backend, op, args)
    args = _args(device)
    args["targets"] = args["targets"].int()
    with pytest.raises(TypeError, match=rf"leanops.{op}: argument 'targets' has dtype torch.int32; expected "
                                        r"torch.int64"):
        _call(backend, op, args)


@pytest.mark.parametrize("op", list(ARGUMENTS))
@pytest.mark.parametrize("backend,device", COMPILED_CASES)
def test_bad_shapes_name_the_argument(backend, device, op):
    cases = [
        ("hidden", torch.randn(3), r"argument 'hidden' must be 2-D"),
        ("weight", torch.randn(6, 2), r"argument 'weight' must be \(V, D\) with D = 3"),
        ("weight", torch.randn(0, 3), r"argument 'weight' has no classes"),
        ("bias", torch.randn(5), r"argument 'bias' must be \(V,\) = \(6,\) or empty"),
        ("targets", torch.tensor([0, 1, 2]), r"argument 'targets' has shape \[3\]; expected \(4,\)"),
    ]
    for name, value, pattern in cases:
        args = _args(device)
        args[name] = value.to(device)
        with pytest.raises(ValueError, match=rf"leanops.{op}: {pattern}"):
            _call(backend, op, args)
    for bad_target in (6, -2, 100):
        args = _args(device)
        args["targets"] = torch.tensor([0, bad_target, -1, 2], device=device)
        with pytest.raises(ValueError, match=rf"leanops.{op}: argument 'targets' holds {bad_target} at index 1; "
                                             r"expected class indices in \[0, 6\) or -1"):
            _call(backend, op, args)
    if device == "cuda":
        args = _args(device)
        args["targets"] = args["targets"].cpu()
        with pytest.raises(ValueError, match="'targets'"):
            _call(backend, op, args)


@pytest.mark.parametrize("name", PER_TOKEN)
@pytest.mark.parametrize("backend,device", COMPILED_CASES)
def test_bad_per_token_inputs_name_the_argument(backend, device, name):
    args = _args(device)
    args[name] = args[name].double()
    with pytest.raises(TypeError, match=rf"leanops.linear_ce_backward: argument '{name}' has dtype torch.float64; "
                                        r"expected torch.float32"):
        _call(backend, "linear_ce_backward", args)
    for bad_shape in ((5,), (4, 1)):
        args = _args(device)
        args[name] = torch.ones(bad_shape, device=device)
        with pytest.raises(ValueError, match=rf"leanops.linear_ce_backward: argument '{name}' has shape"):
            _call(backend, "linear_ce_backward", args)


# ---------------------------------------------------------------------------------------------------------------
# The C++ CPU kernels.

@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("backend,device", provider_cases(CROSS_ENTROPY, backends_=("cpu",)))
def test_cpu_kernels_any_thread_count_gives_the_same_bits(backend, device, threads):
    """Every output has one owner that reduces it in a fixed order, so the thread count changes nothing; a race
    between tasks would show as a difference (N = 300: three token blocks; V = 1100: three vocabulary blocks)."""
    problem = make_problem(300, 1100, 20, torch.float32, device, seed=11)
    grads = statistic_gradients(300, device, seed=12)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = check(backend, *problem, 2.0, grads)
        torch.set_num_threads(threads)
        actual = check(backend, *problem, 2.0, grads)
    finally:
        torch.set_num_threads(previous)
    for name, a, e in zip(STATISTICS + GRADIENTS, actual[0] + actual[1], expected[0] + expected[1]):
        assert torch.equal(a, e), f"{name} differs between 1 and {threads} threads"


# ---------------------------------------------------------------------------------------------------------------
# The Triton kernels: every GPU tile candidate, the zero-padding of D.

@pytest.mark.parametrize("backend,device,dtype,size", provider_dtype_cases(
    CROSS_ENTROPY, DTYPES, {"triton": [(300, 1000, 520)]}, backends_=("triton",), devices=("cuda",)))
def test_triton_every_tile_candidate_is_correct(backend, device, dtype, size, monkeypatch):
    """Each GPU tile candidate the tuner may pick, forced in turn: several blocks of every candidate, D = 520 several
    K slices. (The interpreter has one tile size.)"""
    from leanops.triton_kernels import cross_entropy as kernels
    tokens, classes, dim = size
    forward = kernels.forward_tile_candidates(torch.device(device), dtype)
    backward = kernels.backward_tile_candidates(torch.device(device), dtype)
    for index in range(max(len(forward), len(backward))):
        chosen_forward, chosen_backward = forward[index % len(forward)], backward[index % len(backward)]
        monkeypatch.setattr(kernels, "forward_tile_candidates", lambda *_: (chosen_forward,))
        monkeypatch.setattr(kernels, "backward_tile_candidates", lambda *_: (chosen_backward,))
        for softcap in (0.0, 5.0):
            check(backend, *make_problem(tokens, classes, dim, dtype, device, seed=index), softcap,
                  statistic_gradients(tokens, device, seed=index))


@pytest.mark.parametrize("backend,device,dtype,size", provider_dtype_cases(
    CROSS_ENTROPY, DTYPES, {"triton": [(37, 70, 20)]}, backends_=("triton",), devices=("cpu",)))
def test_triton_several_vocabulary_chunks(backend, device, dtype, size, monkeypatch):
    """A memory budget (MiB) small enough for several vocabulary chunks in the backward: grad_hidden summed over
    the chunks in float32, grad_weight and grad_bias complete per chunk; the same results, the same bits twice."""
    monkeypatch.setenv("LEANOPS_PANEL_BUDGET_MIB", "0.001")
    tokens, classes, dim = size
    for softcap in (0.0, 5.0):
        problem = make_problem(tokens, classes, dim, dtype, device, seed=3)
        upstream = statistic_gradients(tokens, device, seed=4)
        first = check(backend, *problem, softcap, upstream)
        second = check(backend, *problem, softcap, upstream)
        for a, b in zip(first[1], second[1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device,dtype,size", provider_dtype_cases(
    CROSS_ENTROPY, DTYPES, {"triton": [(37, 50, 21)]}, backends_=("triton",), devices=("cpu",)))
def test_triton_zero_padded_feature_dimension(backend, device, dtype, size, monkeypatch):
    """The GPU launchers pad D to a multiple of 16 (the GPU runs the padded path in every test); forced here under
    the interpreter, D = 21 (padded to 32): the same results, gradients of the caller's D."""
    from leanops.triton_kernels import tiles
    monkeypatch.setattr(tiles, "feature_alignment", lambda _device: 16)
    tokens, classes, dim = size
    _, gradients = check(backend, *make_problem(tokens, classes, dim, dtype, device, seed=1), 0.0,
                         statistic_gradients(tokens, device, seed=2))
    assert all(t.is_contiguous() for t in gradients)


# ---------------------------------------------------------------------------------------------------------------
# The CUDA kernels: layouts, reproducibility, streams.

CUDA_CASES = provider_cases(CROSS_ENTROPY, backends_=("cuda",))


def _both_primitives(backend, arguments):
    operators = CROSS_ENTROPY.provider(backend).operators
    return tuple(operators.linear_ce_forward(*arguments[:5])) + tuple(operators.linear_ce_backward(*arguments))


def _backward_arguments(backend, problem, softcap, device, seed):
    lse = CROSS_ENTROPY.provider(backend).operators.linear_ce_forward(*problem, softcap)[0]
    return tuple(problem) + (softcap, lse) + statistic_gradients(problem[0].shape[0], device, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", CUDA_CASES)
def test_cuda_layouts_give_bitwise_identical_results(backend, device, dtype):
    """Misaligned features (scalar instead of 16-byte loads) and non-contiguous inputs (copied) change nothing."""
    arguments = _backward_arguments(backend, make_problem(130, 300, 520, dtype, device, seed=19), 10.0, device, 20)
    assert_layouts_give_the_same_bits(lambda *variant: _both_primitives(backend, variant), list(arguments))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", CUDA_CASES)
def test_cuda_bitwise_reproducible_and_on_the_current_stream(backend, device, dtype):
    """No atomics: repeated calls agree bitwise, also when launched on a side stream."""
    arguments = _backward_arguments(backend, make_problem(300, 1000, 520, dtype, device, seed=21), 0.0, device, 22)
    assert_same_bits_on_every_call_and_stream(lambda: _both_primitives(backend, arguments))
