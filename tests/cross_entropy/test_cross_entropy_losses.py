"""Linear cross-entropy on every provider of leanops.ops.CROSS_ENTROPY: parity with the dense float64 oracle
(tests/oracles.py; loss and the gradients of hidden, weight and bias) for every option and their combinations, at
awkward sizes (N = 1, V = 1, V and D no multiple of any block, every token ignored); the low-precision error rule;
reductions; bad input; the module; the chunked reference across several chunks."""
import itertools
import math

import pytest
import torch

import leanops
import oracles
from helpers import (INTERPRETER_BFLOAT16, interpreted, marked, provider_cases, provider_dtype_cases,
                     slow_when_interpreted)
from leanops import cross_entropy
from leanops.ops import CROSS_ENTROPY
from leanops.reference import cross_entropy as reference

CASES = provider_cases(CROSS_ENTROPY)
OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 4.0},
    "squentropy": {"squentropy": True},
    "everything": {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 3.0, "squentropy": True},
}
# (N, V, D): single token and class, sizes no multiple of any block (GPU blocks 64/128, CPU blocks larger), several
# vocabulary blocks, D over one gradient column chunk.
SIZES = [(1, 1, 1), (1, 7, 3), (37, 70, 13), (50, 300, 40)]
# Under Triton's interpreter (16 x 16 tiles, 32 gradient columns), N = 20 is two token blocks, V = 40 three
# vocabulary blocks, D = 33 three feature slices and two gradient column chunks, each of them partial: every code
# path at a twentieth of the work of (50, 300, 40). The larger sizes run there too, marked slow.
INTERPRETER_SIZES = [(1, 1, 1), (1, 7, 3), (20, 40, 33)]
PARITY_CASES = (provider_dtype_cases(CROSS_ENTROPY, [torch.float32], {"reference": SIZES, "cpu": SIZES,
                                                                      "cuda": SIZES, "triton": INTERPRETER_SIZES})
                + marked(provider_dtype_cases(CROSS_ENTROPY, [torch.float32], {"triton": SIZES[2:]},
                                              devices=("cpu",)), pytest.mark.slow))


def _require(backend: str, device: str, dtype: torch.dtype = torch.float32) -> None:
    if interpreted(backend, device) and dtype == torch.bfloat16:
        pytest.skip(INTERPRETER_BFLOAT16)


def _inputs(tokens, vocabulary, dim, dtype, device, generator, *, bias=True, ignored_every=4, trained_like=False):
    """hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) with every ignored_every-th token ignored.

    trained_like: each token's hidden state leans towards its target's weight row, so the target logit stands out
    (loss ~ 2-3, as after training) rather than every logit being about equal (random initialisation)."""
    weight = torch.randn(vocabulary, dim, generator=generator, dtype=torch.float64) / dim**0.5
    targets = torch.randint(0, vocabulary, (tokens,), generator=generator)
    hidden = torch.randn(tokens, dim, generator=generator, dtype=torch.float64)
    if trained_like:
        # Target logit ~ log(V) - 2.5 above the rest: the loss comes out near 2.5.
        lift = max(math.log(vocabulary) - 2.5, 1.0)
        hidden = 0.5 * hidden / dim**0.5 + lift * weight[targets] / weight[targets].norm(dim=1, keepdim=True)
    bias_values = 0.1 * torch.randn(vocabulary, generator=generator, dtype=torch.float64) if bias else None
    if ignored_every:
        targets[::ignored_every] = -100
    convert = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return convert(hidden), convert(weight), targets.to(device), convert(bias_values)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert not bool(torch.isnan(actual).any()), "NaN in the result"
    # The floor keeps a loss that is exactly 0 (V = 1: lse = the target logit) from dividing by ~0: there float32
    # leaves a rounding residue of the size of the logits' ulp.
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-2)).item()


def _loss_and_grads(loss_fn, hidden, weight, bias):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    loss = loss_fn(*leaves)
    differentiable = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss.sum(), differentiable)
    return loss, grads


def _ours(backend, targets, reduction="mean", **options):
    def loss_fn(hidden, weight, bias):
        return leanops.linear_cross_entropy(hidden, weight, targets, bias=bias, reduction=reduction,
                                            backend=backend, **options)
    return loss_fn


def _oracle(targets, reduction="mean", **options):
    def loss_fn(hidden, weight, bias):
        return oracles.linear_cross_entropy(hidden.double(), weight.double(), targets,
                                              None if bias is None else bias.double(), reduction=reduction,
                                              **options)
    return loss_fn


def _plain_float32_errors(targets, reduction, options, hidden, weight, bias, expected, expected_grads):
    """The error of plain float32 PyTorch on the same inputs, for the loss and each gradient."""
    def plain(h, w, b):
        return oracles.linear_cross_entropy(h.float(), w.float(), targets, None if b is None else b.float(),
                                              reduction=reduction, **options)

    loss, grads = _loss_and_grads(plain, hidden, weight, bias)
    return [_relative_error(loss, expected)] + [_relative_error(a, e) for a, e in zip(grads, expected_grads)]


def _assert_float32_parity(backend, targets, reduction, options, hidden, weight, bias):
    """Loss within max(1e-5, 2x plain float32 PyTorch's error) of float64, gradients within max(3e-5, 2x plain's):
    the loss and its gradients are sums of O(logit) terms that cancel (at V = 1 the loss is exactly 0 and the
    gradient a difference of its options' terms), a float32 residue no implementation avoids, and where plain
    PyTorch happens to round luckily the floor decides."""
    expected, expected_grads = _loss_and_grads(_oracle(targets, reduction, **options), hidden, weight, bias)
    actual, actual_grads = _loss_and_grads(_ours(backend, targets, reduction, **options), hidden, weight, bias)
    plain_errors = _plain_float32_errors(targets, reduction, options, hidden, weight, bias, expected,
                                         expected_grads)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    for name, value, reference_value, plain_error in zip(("loss", "hidden", "weight", "bias"),
                                                         [actual, *actual_grads], [expected, *expected_grads],
                                                         plain_errors):
        error = _relative_error(value, reference_value)
        floor = 1e-5 if name == "loss" else 3e-5
        assert error <= max(floor, 2 * plain_error), f"{name} ({options}, {reduction}): {error:.3g}"
    for grad, leaf in zip(actual_grads, [t for t in (hidden, weight, bias) if t is not None]):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape


@pytest.mark.parametrize("backend,device,dtype,size", PARITY_CASES)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float32_parity_with_float64(backend, device, dtype, size, option, reduction):
    tokens, vocabulary, dim = size
    generator = torch.Generator().manual_seed(torch.seed())
    with_bias = option != "plain"  # the plain case runs without a bias, every other with one
    hidden, weight, targets, bias = _inputs(tokens, vocabulary, dim, torch.float32, device, generator,
                                            bias=with_bias, ignored_every=3 if tokens > 1 else 0)
    _assert_float32_parity(backend, targets, reduction, OPTIONS[option], hidden, weight, bias)


@pytest.mark.parametrize("backend,device", slow_when_interpreted(CASES))
@pytest.mark.gpu_check
def test_leading_dimensions_and_every_option_combination(backend, device):
    """hidden (batch, sequence, D) with targets (batch, sequence): each subset of the options, one draw each. (The
    options combine on O(N) statistics in Python, the same for every provider; each option alone runs on Triton's
    interpreter in test_float32_parity_with_float64, this combination there only in the slow run.)"""
    generator = torch.Generator().manual_seed(torch.seed())
    hidden, weight, targets, bias = _inputs(18, 45, 11, torch.float32, device, generator)
    hidden, targets = hidden.reshape(2, 9, 11), targets.reshape(2, 9)
    switches = {"label_smoothing": 0.3, "z_loss": 1e-2, "softcap": 2.5, "squentropy": True}
    for chosen in itertools.chain.from_iterable(itertools.combinations(switches, k) for k in range(5)):
        options = {name: switches[name] for name in chosen}
        for reduction in ("mean", "none"):
            _assert_float32_parity(backend, targets, reduction, options, hidden, weight, bias)


@pytest.mark.parametrize("backend,device", CASES)
def test_all_tokens_ignored_gives_zero_not_nan(backend, device):
    generator = torch.Generator().manual_seed(0)
    hidden, weight, _, bias = _inputs(6, 10, 5, torch.float32, device, generator)
    targets = torch.full((6,), -100, device=device)
    for reduction in ("mean", "sum"):
        loss, grads = _loss_and_grads(_ours(backend, targets, reduction), hidden, weight, bias)
        assert loss.item() == 0.0
        assert all(bool((g == 0).all()) for g in grads)
    per_token = leanops.linear_cross_entropy(hidden, weight, targets, reduction="none", backend=backend)
    assert per_token.shape == (6,) and bool((per_token == 0).all())


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_batch_gives_zero(backend, device):
    hidden = torch.zeros(0, 4, device=device, requires_grad=True)
    weight = torch.randn(5, 4, device=device, requires_grad=True)
    loss = leanops.linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.int64, device=device),
                                        backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and bool((weight.grad == 0).all())


@pytest.mark.parametrize("backend,device", CASES)
def test_ignore_index_may_be_a_class_index(backend, device):
    """ignore_index=0: class 0 is never a target, and its tokens contribute nothing."""
    generator = torch.Generator().manual_seed(1)
    hidden, weight, targets, bias = _inputs(20, 9, 6, torch.float32, device, generator, ignored_every=0)
    expected = _oracle(targets, ignore_index=0)(hidden, weight, bias)
    actual = leanops.linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=0, backend=backend)
    assert _relative_error(actual, expected) < 1e-5


def _plain_dtype_error(hidden, weight, targets, bias, options):
    """The error plain PyTorch makes in the inputs' own dtype (logits in that dtype, F.cross_entropy), against
    float64, for the loss and each gradient."""
    def plain(h, w, b):
        return oracles.linear_cross_entropy(h, w, targets, b, **options)

    low, low_grads = _loss_and_grads(plain, hidden, weight, bias)
    high, high_grads = _loss_and_grads(_oracle(targets, **options), hidden, weight, bias)
    return ([_relative_error(low, high)] + [_relative_error(a, e) for a, e in zip(low_grads, high_grads)],
            high, high_grads)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("option", ["plain", "everything"])
@pytest.mark.gpu_check
def test_low_precision_error_is_at_most_twice_plain_pytorch(backend, device, dtype, option):
    """The flash-attention rule, on trained-like logits: in bfloat16/float16 leanops' error against float64 is at
    most 2x the error plain PyTorch makes in the same dtype, for the loss and every gradient."""
    tokens, vocabulary, dim = (40, 200, 32) if interpreted(backend, device) else (256, 1000, 64)
    _require(backend, device, dtype)
    generator = torch.Generator().manual_seed(torch.seed())
    hidden, weight, targets, bias = _inputs(tokens, vocabulary, dim, dtype, device, generator, trained_like=True)
    plain_errors, high, high_grads = _plain_dtype_error(hidden, weight, targets, bias, OPTIONS[option])
    actual, actual_grads = _loss_and_grads(_ours(backend, targets, **OPTIONS[option]), hidden, weight, bias)
    errors = [_relative_error(actual, high)] + [_relative_error(a, e) for a, e in zip(actual_grads, high_grads)]
    for name, error, plain_error in zip(("loss", "hidden", "weight", "bias"), errors, plain_errors):
        assert error <= 2 * plain_error, f"{name}: {error:.3g} > 2 x plain {plain_error:.3g}"
    assert all(g.dtype == dtype for g in actual_grads)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.gpu_check
def test_large_logits_stay_finite(backend, device):
    """Hidden states of norm ~300: logits ~1e3, far beyond exp's float32 range without the running max."""
    generator = torch.Generator().manual_seed(2)
    hidden, weight, targets, bias = _inputs(20, 40, 8, torch.float32, device, generator)
    hidden = hidden * 100
    expected, expected_grads = _loss_and_grads(_oracle(targets, z_loss=1e-4), hidden, weight, bias)
    actual, actual_grads = _loss_and_grads(_ours(backend, targets, z_loss=1e-4), hidden, weight, bias)
    assert torch.isfinite(actual) and _relative_error(actual, expected) < 1e-5
    for grad, reference_grad in zip(actual_grads, expected_grads):
        assert _relative_error(grad, reference_grad) < 1e-4


def test_chunked_reference_matches_the_plain_one_across_chunks(monkeypatch):
    """The chunked plain-PyTorch version with chunks smaller than N and V (several of each), float64."""
    monkeypatch.setattr(reference, "CHUNK_ROWS", 7)
    generator = torch.Generator().manual_seed(torch.seed())
    hidden, weight, targets, bias = _inputs(30, 50, 9, torch.float64, "cpu", generator)
    options = OPTIONS["everything"]
    expected, expected_grads = _loss_and_grads(_oracle(targets, **options), hidden, weight, bias)

    def chunked(h, w, b):
        return cross_entropy.linear_cross_entropy_chunked(h, w, targets, bias=b, **options)

    actual, actual_grads = _loss_and_grads(chunked, hidden, weight, bias)
    assert _relative_error(actual, expected) < 1e-12
    for grad, reference_grad in zip(actual_grads, expected_grads):
        assert _relative_error(grad, reference_grad) < 1e-12


def test_module_matches_the_function():
    generator = torch.Generator().manual_seed(3)
    hidden, weight, targets, bias = _inputs(12, 20, 6, torch.float32, "cpu", generator)
    module = leanops.nn.LinearCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, squentropy=True,
                                               reduction="sum")
    expected = leanops.linear_cross_entropy(hidden, weight, targets, bias=bias, label_smoothing=0.1, z_loss=1e-3,
                                            softcap=5.0, squentropy=True, reduction="sum")
    assert torch.equal(module(hidden, weight, targets, bias), expected)
    assert "squentropy=True" in repr(module)


def test_bad_input_names_the_argument():
    h, w, t = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 4])
    call = leanops.linear_cross_entropy
    with pytest.raises(TypeError, match=r"argument 'hidden' must be a torch.Tensor"):
        call([1.0], w, t)
    with pytest.raises(TypeError, match=r"argument 'weight' has dtype torch.float16 but 'hidden'"):
        call(h, w.half(), t)
    with pytest.raises(ValueError, match=r"argument 'weight' has D = 4 but 'hidden' has D = 3"):
        call(h, torch.randn(5, 4), t)
    with pytest.raises(ValueError, match=r"argument 'weight' must be 2-D"):
        call(h, w[0], t)
    with pytest.raises(ValueError, match=r"argument 'weight' has no classes"):
        call(h, w[:0], t)
    with pytest.raises(ValueError, match=r"argument 'bias' must be a \(5,\) tensor"):
        call(h, w, t, bias=torch.zeros(4))
    with pytest.raises(TypeError, match=r"argument 'targets' must have dtype torch.int64"):
        call(h, w, t.int())
    with pytest.raises(ValueError, match=r"argument 'targets' must have shape \(4,\)"):
        call(h, w, t[:3])
    with pytest.raises(ValueError, match=r"argument 'targets' holds class indices outside \[0, 5\)"):
        call(h, w, torch.tensor([0, 1, 5, -100]))
    with pytest.raises(ValueError, match=r"argument 'targets' holds class indices outside"):
        call(h, w, torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match=r"argument 'label_smoothing' must be a finite number in \[0, 1\]"):
        call(h, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"argument 'z_loss' must be a finite number"):
        call(h, w, t, z_loss=float("nan"))
    with pytest.raises(ValueError, match=r"argument 'softcap' must be a finite number"):
        call(h, w, t, softcap=float("inf"))
    with pytest.raises(ValueError, match=r"argument 'softcap' must be positive"):
        call(h, w, t, softcap=0.0)
    with pytest.raises(TypeError, match=r"argument 'squentropy' must be a bool"):
        call(h, w, t, squentropy=1)
    with pytest.raises(ValueError, match=r"argument 'reduction' must be one of"):
        call(h, w, t, reduction="avg")
    with pytest.raises(TypeError, match=r"argument 'ignore_index' must be an int"):
        call(h, w, t, ignore_index=1.0)
    with pytest.raises(leanops.BackendUnavailableError, match=r"CUDA|cuda"):
        call(h, w, t, backend="cuda")
