"""The C++ CPU kernels of the chunked linear cross-entropy primitives, called directly through torch.ops.leanops
(linear_ce_forward, linear_ce_backward; csrc/ops.cpp states their contract), against the plain-PyTorch version of
the same contract (python/leanops/reference/cross_entropy.py) run in float64 on the same (upcast) values.

Tolerance: every statistic is fp32 and every reduction accumulates in fp32 whatever the input dtype, so the bar is
the same for bf16/fp16 inputs as for fp32 ones: the largest error, relative to the largest magnitude of the expected
tensor, must be at most 1e-5, or twice the error of the same reference run in plain fp32 PyTorch where that is larger
(with logits near 1e3, the fp32 rounding of <h, w> alone moves the softmax weights by ~1e-4). Gradients come back in
the input dtype, rounded once: for bf16/fp16 that rounding (2^-9 / 2^-11 of an element's magnitude) is allowed on
top, twice over.
"""
import math

import pytest
import torch

import leanops  # noqa: F401  (loads leanops._C, which registers the ops)
from leanops.reference import cross_entropy as reference

if not hasattr(torch.ops.leanops, "linear_ce_forward") or not torch._C._dispatch_has_kernel_for_dispatch_key(
        "leanops::linear_ce_forward", "CPU"):
    pytest.skip("leanops._C has no CPU kernels of linear_ce_forward/linear_ce_backward", allow_module_level=True)

ops = torch.ops.leanops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Unit roundoff of each gradient dtype: the one rounding of an fp32-reduced gradient.
ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -11}
# (N, V, D): N = 1, V = 1 and D = 1 edge cases; the kernels tile 128 tokens x 512 classes, so N = 130 and 300 span
# two and three token blocks, V = 1000 and 1100 two and three vocabulary blocks, none of them whole.
SIZES = [(1, 1, 1), (1, 300, 70), (37, 1, 70), (37, 300, 70), (37, 300, 1), (130, 1000, 33), (300, 1100, 16)]
STATISTICS = ("lse", "target_logit", "logit_sum", "logit_square_sum")
GRADIENTS = ("grad_hidden", "grad_weight", "grad_bias")


# ---------------------------------------------------------------------------------------------------------------
# Inputs and comparisons.

def make_problem(tokens, classes, dim, dtype, generator, *, bias=True, norm=None):
    """(hidden, weight, bias, targets): logits of order 1, or rows of hidden and weight rescaled to `norm` (logits up
    to norm^2); about a fifth of the targets are -1 (no target)."""
    hidden = torch.randn(tokens, dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(classes, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    if norm is not None:
        hidden = hidden / hidden.norm(dim=1, keepdim=True) * norm
        weight = weight / weight.norm(dim=1, keepdim=True) * norm
    bias_tensor = (torch.randn(classes, generator=generator, dtype=torch.float64) if bias
                   else torch.zeros(0, dtype=torch.float64))
    targets = torch.randint(0, classes, (tokens,), generator=generator)
    targets[torch.rand(tokens, generator=generator) < 0.2] = -1
    return hidden.to(dtype), weight.to(dtype), bias_tensor.to(dtype), targets


def make_statistic_gradients(tokens, generator):
    """(grad_lse, grad_target, grad_sum, grad_square_sum), float32, all nonzero."""
    grad_lse = torch.rand(tokens, generator=generator) + 0.1
    grad_target = -(torch.rand(tokens, generator=generator) + 0.1)
    grad_sum = 0.1 * torch.randn(tokens, generator=generator)
    grad_square_sum = 0.01 * torch.randn(tokens, generator=generator)
    return grad_lse, grad_target, grad_sum, grad_square_sum


def relative_error(actual, expected):
    if expected.numel() == 0:
        return 0.0
    magnitude = expected.abs().max().clamp_min(1e-30)
    return float((actual.double() - expected).abs().max() / magnitude)


def assert_close(what, actual, expected, baseline, dtype):
    """`actual` (the kernel's, in `dtype`) against `expected` (float64); `baseline` is plain fp32 PyTorch's."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values in the result"
    error = relative_error(actual, expected)
    baseline_error = relative_error(baseline, expected)
    tolerance = max(1e-5, 2.0 * baseline_error) + 2.0 * ROUNDING[dtype]
    assert error <= tolerance, (f"{what}: relative error {error:.3g} > {tolerance:.3g} "
                                f"(plain fp32 PyTorch: {baseline_error:.3g})")


def check(hidden, weight, bias, targets, softcap, statistic_gradients):
    """Both kernels against the float64 reference; returns the kernels' outputs."""
    statistics = ops.linear_ce_forward(hidden, weight, bias, targets, softcap)
    upcast = [t.double() for t in (hidden, weight, bias)]
    single = [t.float() for t in (hidden, weight, bias)]
    expected = reference.linear_ce_forward(*upcast, targets, softcap)
    baseline = reference.linear_ce_forward(*single, targets, softcap)
    for name, a, e, b in zip(STATISTICS, statistics, expected, baseline):
        assert_close(name, a, e, b, torch.float32)
    assert bool((statistics[1][targets < 0] == 0).all()), "target_logit must be exactly 0 where the target is -1"

    # The backward takes the kernel's own lse, as in training; G is defined by whatever lse it is given.
    lse = statistics[0]
    gradients = ops.linear_ce_backward(hidden, weight, bias, targets, softcap, lse, *statistic_gradients)
    expected = reference.linear_ce_backward(*upcast, targets, softcap, lse.double(),
                                            *[g.double() for g in statistic_gradients])
    baseline = reference.linear_ce_backward(*single, targets, softcap, lse, *statistic_gradients)
    for name, a, e, b in zip(GRADIENTS, gradients, expected, baseline):
        assert_close(name, a, e, b, hidden.dtype)
    assert gradients[2].shape == bias.shape
    return statistics, gradients


# ---------------------------------------------------------------------------------------------------------------
# Against float64.

@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["uncapped", "softcap5"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,classes,dim", SIZES)
def test_matches_float64(tokens, classes, dim, dtype, with_bias, softcap):
    generator = torch.Generator().manual_seed(tokens * 1_000_000 + classes * 100 + dim)
    hidden, weight, bias, targets = make_problem(tokens, classes, dim, dtype, generator, bias=with_bias)
    check(hidden, weight, bias, targets, softcap, make_statistic_gradients(tokens, generator))


@pytest.mark.parametrize("softcap", [0.0, 50.0], ids=["uncapped", "softcap50"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_stay_finite_and_accurate(dtype, softcap):
    """Features of norm 30: logits up to ~900, which only a max-subtracted (online) log-sum-exp survives."""
    generator = torch.Generator().manual_seed(17)
    hidden, weight, bias, targets = make_problem(200, 700, 70, dtype, generator, norm=30.0)
    statistics, _ = check(hidden, weight, bias, targets, softcap, make_statistic_gradients(200, generator))
    largest = float(statistics[0].abs().max())
    assert largest > (40.0 if softcap else 200.0), f"the test meant large logits, got lse up to {largest}"


def test_backward_is_the_gradient_of_the_statistics():
    """The contract itself, independently of the reference's chunked backward: float64 autograd through the dense
    logits of sum_n (a lse + b target_logit + c logit_sum + d logit_square_sum)."""
    generator = torch.Generator().manual_seed(23)
    hidden, weight, bias, targets = make_problem(70, 600, 24, torch.float32, generator)
    grads = make_statistic_gradients(70, generator)
    for softcap in (0.0, 3.0):
        h, w, b = (t.double().requires_grad_() for t in (hidden, weight, bias))
        logits = reference.capped_logits(h, w, b, softcap if softcap > 0 else None)
        picked = logits.gather(1, targets.clamp_min(0)[:, None])[:, 0]
        target_logit = torch.where(targets >= 0, picked, 0)
        objective = sum((g.double() * s).sum() for g, s in zip(
            grads, (torch.logsumexp(logits, 1), target_logit, logits.sum(1), logits.square().sum(1))))
        objective.backward()
        lse = ops.linear_ce_forward(hidden, weight, bias, targets, softcap)[0]
        actual = ops.linear_ce_backward(hidden, weight, bias, targets, softcap, lse, *grads)
        for name, a, e in zip(GRADIENTS, actual, (h.grad, w.grad, b.grad)):
            assert relative_error(a, e) <= 1e-5, f"{name} (softcap {softcap}): {relative_error(a, e):.3g}"


def test_matches_float64_for_strided_inputs():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 150, generator=generator).T  # (150, 40), column-major
    weight = (torch.randn(700, 80, generator=generator) / 6)[:, ::2]
    bias = torch.randn(1400, generator=generator)[::2]
    targets = torch.randint(-1, 700, (300,), generator=generator)[::2]
    assert not (hidden.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
    check(hidden, weight, bias, targets, 4.0, make_statistic_gradients(150, generator))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_thread_count_gives_the_same_bits(threads):
    """Every output has one owner that reduces it in a fixed order, so the thread count changes nothing; a race
    between tasks would show as a difference (N = 300: three token blocks; V = 1100: three vocabulary blocks)."""
    generator = torch.Generator().manual_seed(11)
    hidden, weight, bias, targets = make_problem(300, 1100, 20, torch.float32, generator)
    grads = make_statistic_gradients(300, generator)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = check(hidden, weight, bias, targets, 2.0, grads)
        torch.set_num_threads(threads)
        actual = check(hidden, weight, bias, targets, 2.0, grads)
    finally:
        torch.set_num_threads(previous)
    for name, a, e in zip(STATISTICS + GRADIENTS, actual[0] + actual[1], expected[0] + expected[1]):
        assert torch.equal(a, e), f"{name} differs between 1 and {threads} threads"


def test_no_tokens():
    hidden, weight, bias = torch.zeros(0, 5), torch.randn(7, 5), torch.randn(7)
    targets = torch.zeros(0, dtype=torch.int64)
    statistics = ops.linear_ce_forward(hidden, weight, bias, targets, 0.0)
    assert [tuple(s.shape) for s in statistics] == [(0,)] * 4
    empty = torch.zeros(0)
    grad_hidden, grad_weight, grad_bias = ops.linear_ce_backward(hidden, weight, bias, targets, 0.0, empty, empty,
                                                                 empty, empty, empty)
    assert grad_hidden.shape == (0, 5)
    assert torch.equal(grad_weight, torch.zeros(7, 5)) and torch.equal(grad_bias, torch.zeros(7))


def test_no_features():
    """D = 0: the logits are the bias alone (the public API refuses D = 0; the primitives define it)."""
    generator = torch.Generator().manual_seed(5)
    hidden, weight, bias, targets = make_problem(9, 600, 0, torch.float32, generator)
    check(hidden, weight, bias, targets, 0.0, make_statistic_gradients(9, generator))
    lse = ops.linear_ce_forward(hidden, weight, bias, targets, 0.0)[0]
    torch.testing.assert_close(lse, torch.logsumexp(bias, 0).expand(9))


def test_nan_reaches_its_row_only():
    generator = torch.Generator().manual_seed(13)
    hidden, weight, bias, targets = make_problem(140, 600, 16, torch.float32, generator)
    hidden[5, 3] = float("nan")
    statistics = ops.linear_ce_forward(hidden, weight, bias, targets, 0.0)
    for name, s in zip(STATISTICS, statistics):
        others = torch.cat([s[:5], s[6:]])
        assert bool(torch.isfinite(others).all()), f"{name}: a NaN leaked into other rows"
        if name != "target_logit" or targets[5] >= 0:
            assert bool(s[5].isnan()), f"{name}: the NaN row came out as {float(s[5])}"
    grads = ops.linear_ce_backward(hidden, weight, bias, targets, 0.0, statistics[0],
                                   *make_statistic_gradients(140, generator))
    assert bool(grads[0][5].isnan().all()) and bool(torch.isfinite(torch.cat([grads[0][:5], grads[0][6:]])).all())
    assert bool(grads[1].isnan().any()) and bool(grads[2].isnan().any())


# ---------------------------------------------------------------------------------------------------------------
# Bad input: TypeError / ValueError naming the argument, before any work.

def _args(tokens=4, classes=6, dim=3, dtype=torch.float32):
    return {"hidden": torch.randn(tokens, dim).to(dtype), "weight": torch.randn(classes, dim).to(dtype),
            "bias": torch.randn(classes).to(dtype), "targets": torch.tensor([0, 5, -1, 2]), "softcap": 0.0,
            "lse": torch.zeros(tokens), "grad_lse": torch.ones(tokens), "grad_target": torch.ones(tokens),
            "grad_sum": torch.ones(tokens), "grad_square_sum": torch.ones(tokens)}


PER_TOKEN = ("lse", "grad_lse", "grad_target", "grad_sum", "grad_square_sum")


def _forward(args):
    return ops.linear_ce_forward(*(args[n] for n in ("hidden", "weight", "bias", "targets", "softcap")))


def _backward(args):
    return ops.linear_ce_backward(*(args[n] for n in ("hidden", "weight", "bias", "targets", "softcap") + PER_TOKEN))


OPS = [("linear_ce_forward", _forward), ("linear_ce_backward", _backward)]


def _expect(error, pattern, call, args):
    with pytest.raises(error, match=pattern):
        call(args)


@pytest.mark.parametrize("op,call", OPS, ids=[case[0] for case in OPS])
def test_bad_dtypes_name_the_argument(op, call):
    for bad in (torch.int32, torch.float64):
        args = _args()
        for name in ("hidden", "weight", "bias"):
            args[name] = args[name].to(bad)
        _expect(TypeError, rf"leanops.{op}: argument 'hidden' has dtype {bad}; the kernels support torch.bfloat16, "
                           r"torch.float16 and torch.float32", call, args)
    for name in ("weight", "bias"):
        args = _args()
        args[name] = args[name].half()
        _expect(TypeError, rf"leanops.{op}: argument '{name}' has dtype torch.float16 but 'hidden' has dtype "
                           r"torch.float32", call, args)
    args = _args()
    args["targets"] = args["targets"].int()
    _expect(TypeError, rf"leanops.{op}: argument 'targets' has dtype torch.int32; expected torch.int64", call, args)


@pytest.mark.parametrize("op,call", OPS, ids=[case[0] for case in OPS])
def test_bad_shapes_name_the_argument(op, call):
    cases = [
        ("hidden", torch.randn(3), r"argument 'hidden' must be 2-D"),
        ("weight", torch.randn(6, 2), r"argument 'weight' must be \(V, D\) with D = 3"),
        ("weight", torch.randn(0, 3), r"argument 'weight' has no classes"),
        ("bias", torch.randn(5), r"argument 'bias' must be \(V,\) = \(6,\) or empty"),
        ("targets", torch.tensor([0, 1, 2]), r"argument 'targets' has shape \[3\]; expected \(4,\)"),
    ]
    for name, value, pattern in cases:
        args = _args()
        args[name] = value
        _expect(ValueError, rf"leanops.{op}: {pattern}", call, args)
    for bad_target in (6, -2, 100):
        args = _args()
        args["targets"] = torch.tensor([0, bad_target, -1, 2])
        _expect(ValueError, rf"leanops.{op}: argument 'targets' holds {bad_target} at index 1; expected class "
                            r"indices in \[0, 6\) or -1", call, args)


@pytest.mark.parametrize("name", PER_TOKEN)
def test_bad_per_token_inputs_name_the_argument(name):
    args = _args()
    args[name] = args[name].double()
    _expect(TypeError, rf"leanops.linear_ce_backward: argument '{name}' has dtype torch.float64; expected "
                       r"torch.float32", _backward, args)
    for bad_shape in ((5,), (4, 1)):
        args = _args()
        args[name] = torch.ones(bad_shape)
        _expect(ValueError, rf"leanops.linear_ce_backward: argument '{name}' has shape", _backward, args)
