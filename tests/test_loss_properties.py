"""Property tests of the losses (issue 15): random awkward shapes, dtypes, options and special values (NaN, +-inf,
huge, tiny, masked classes, every token ignored) on every CPU provider (Triton under its interpreter), against the
dense float64 oracle (tests/oracles.py), with one rule: **right, or a clear error — never silently different**.

For each drawn case the provider either raises a ValueError/TypeError naming an argument, or returns a loss and
gradients that

- are non-finite exactly where the float64 oracle is, with two allowances: where plain float32 PyTorch (the oracle
  in float32, what the user would otherwise run, its gradients in the input dtype) overflows too, the provider may
  give a non-finite value as well; and where the oracle's loss is non-finite, the gradients are not compared;
- where finite, are within max(1e-4, 4 x plain float32's error, 2 unit roundoffs of the result's dtype: a 16-bit
  gradient is rounded once) of the float64 oracle, relative to the largest magnitude of the value (for 16-bit
  inputs both see the same 16-bit values).

A NaN or inf must never become a finite number, nor a finite result a NaN. The example budget is fixed and the
draws derandomized so CI stays fast and reproducible: LEANOPS_PROPERTY_EXAMPLES (default 40 per test and provider)
raises it, e.g. LEANOPS_PROPERTY_EXAMPLES=500 for a long sweep.
"""
import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import leanops  # noqa: E402
import oracles  # noqa: E402
from helpers import interpreted, provider_cases, require_backend  # noqa: E402
from leanops.ops import CONTRASTIVE, CROSS_ENTROPY  # noqa: E402

EXAMPLES = int(os.environ.get("LEANOPS_PROPERTY_EXAMPLES", "40"))
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(HealthCheck))
FLOAT32_ROUNDOFF = torch.finfo(torch.float32).eps / 2
SPECIAL_VALUES = [math.nan, math.inf, -math.inf, 3e4, -3e4, 1e-30, 0.0]


def _dtypes(backend: str, device: str) -> list:
    dtypes = [torch.float32, torch.float16]
    if not interpreted(backend, device):  # the interpreter's bfloat16 tl.dot is wrong (helpers.INTERPRETER_BFLOAT16)
        dtypes.append(torch.bfloat16)
    return dtypes


@st.composite
def _matrix(draw, rows: int, columns: int, seed: int, scale: float = 1.0):
    """A float64 (rows, columns) matrix of random values, some entries replaced by special values."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, columns, dtype=torch.float64, generator=generator) * scale
    for _ in range(draw(st.integers(0, 2)) if draw(st.booleans()) else 0):
        values[draw(st.integers(0, rows - 1)), draw(st.integers(0, columns - 1))] = draw(
            st.sampled_from(SPECIAL_VALUES))
    return values


def _outcome(function, inputs):
    """(loss, gradients) of `function` on fresh leaves of `inputs`, or the exception it raised."""
    leaves = [t.detach().clone().requires_grad_(t.dtype.is_floating_point) for t in inputs]
    try:
        loss = function(*leaves)
        floating = [leaf for leaf in leaves if leaf.requires_grad]
        gradients = torch.autograd.grad(loss.sum(), floating, allow_unused=True)
    except (ValueError, TypeError) as error:
        return error
    return loss.detach(), [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(floating, gradients)]


def _largest(t: torch.Tensor) -> float:
    """max |t| over its finite entries (0 if none)."""
    finite = t[torch.isfinite(t)]
    return finite.abs().max().item() if finite.numel() else 0.0


def _assert_matches(what: str, actual: torch.Tensor, expected: torch.Tensor, plain: torch.Tensor,
                    magnitude: float, logit: float) -> None:
    # A gradient comes back rounded once to its input's dtype: two unit roundoffs of it are allowed beside.
    rounding = 2 * torch.finfo(actual.dtype).eps / 2
    # Plain PyTorch hands a gradient back in its input's dtype: where that rounding overflows, so may the provider.
    overflow_allowed = ~torch.isfinite(plain.to(actual.dtype)).cpu()
    actual, expected, plain = actual.double(), expected.double(), plain.double()
    finite_expected = torch.isfinite(expected)
    # Non-finite where the oracle is (NaN stays NaN, inf stays inf or becomes NaN), finite elsewhere unless plain
    # float32 overflows there too. Whole-tensor for the reduced and gradient tensors: a NaN anywhere upstream may
    # spread through a sum, as in plain PyTorch.
    if not bool(finite_expected.all()):
        assert not bool(torch.isfinite(actual).all()), f"{what}: finite where the float64 oracle is not: {actual} " \
                                                        f"against {expected}"
        return
    bad = ~torch.isfinite(actual) & ~overflow_allowed
    assert not bool(bad.any()), f"{what}: non-finite where the float64 oracle and plain float32 are finite"
    both = torch.isfinite(actual) & ~overflow_allowed
    if not bool(both.any()):
        return
    size = max(expected[both].abs().max().item(), magnitude, 1e-30)
    error = (actual[both] - expected[both]).abs().max().item() / size
    plain_error = (plain[both] - expected[both]).abs().max().item() / size
    # A float32 logit of size L is off by ~L u: a softmax weight or sigmoid moves by that much, relatively.
    tolerance = max(1e-4, rounding, 4 * plain_error, 8 * logit * FLOAT32_ROUNDOFF)
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:.3g} (plain float32: {plain_error:.3g})"


def _check_rule(provider_function, oracle_function, inputs, magnitudes, logit):
    """The rule (module docstring): `inputs` in the provider's dtype; the oracle runs on them upcast to float64 and
    in plain float32. `magnitudes`: for the loss and each input's gradient, the size of the terms that their sums
    cancel (e.g. s |y| for a CLIP feature gradient, where s p y and s y cancel for a confident pair): the error is
    relative to it, as float32 arithmetic on those terms errs relative to it whatever the formulation. `logit`: the
    largest |logit| (float32 logits err by |logit| u, and the probabilities with them)."""
    got = _outcome(provider_function, inputs)
    if isinstance(got, Exception):
        assert "argument '" in str(got), f"an error that names no argument: {got!r}"
        return
    expected = _outcome(oracle_function, [t.double() if t.dtype.is_floating_point else t for t in inputs])
    plain = _outcome(oracle_function, [t.float() if t.dtype.is_floating_point else t for t in inputs])
    assert not isinstance(expected, Exception) and not isinstance(plain, Exception)
    _assert_matches("loss", got[0], expected[0], plain[0], magnitudes[0], logit)
    if not bool(torch.isfinite(expected[0]).all()):
        return  # a non-finite loss is loud already (and matched above): its gradients may be anything non-finite
    for index, (g, e, p) in enumerate(zip(got[1], expected[1], plain[1])):
        _assert_matches(f"gradient of input {index}", g, e, p, magnitudes[1 + index], logit)


# ---------------------------------------------------------------------------------------------------------------

@st.composite
def _features(draw, backend: str, device: str):
    """(image, text): (B, D) features of one drawn dtype, B in [1, 9], D in [1, 7], with special values."""
    batch, dim = draw(st.integers(1, 9)), draw(st.integers(1, 7))
    dtype = draw(st.sampled_from(_dtypes(backend, device)))
    seed = draw(st.integers(0, 2 ** 31))
    return draw(_matrix(batch, dim, seed)).to(dtype), draw(_matrix(batch, dim, seed + 1)).to(dtype)


@st.composite
def _labels_and_reduction(draw, batch: int):
    """(labels: None or (B,) group ids, reduction)."""
    labels = None
    if draw(st.booleans()):
        labels = torch.tensor(draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch)))
    return labels, draw(st.sampled_from(["mean", "sum", "none"]))


def _feature_magnitudes(image, text) -> tuple[float, float, float]:
    """The largest finite |x|, |y| and |<x_i, y_j>|: the sizes of the terms a contrastive gradient cancels."""
    return _largest(image.double()), _largest(text.double()), _largest(image.double() @ text.double().T)


@pytest.mark.parametrize("backend,device", provider_cases(CONTRASTIVE, devices=("cpu",)))
def test_clip_property(backend, device):
    require_backend(backend, device)

    @PROPERTY_SETTINGS
    @given(data=st.data())
    def check(data):
        image, text = data.draw(_features(backend, device))
        scale = torch.tensor(data.draw(st.sampled_from([1.0, 14.3, 100.0, 1e-3])), dtype=torch.float64)
        labels, reduction = data.draw(_labels_and_reduction(image.shape[0]))
        inputs = [image, text, scale.float()]
        x, y, similarity = _feature_magnitudes(image, text)
        s = scale.item()
        _check_rule(lambda x, y, s: leanops.clip_loss(x, y, s, labels=labels, reduction=reduction, backend=backend),
                    lambda x, y, s: oracles.clip_loss(x, y, s, labels=labels, reduction=reduction), inputs,
                    [s * similarity, s * y, s * x, similarity], s * similarity)

    check()


@pytest.mark.parametrize("backend,device", provider_cases(CONTRASTIVE, devices=("cpu",)))
def test_siglip_property(backend, device):
    require_backend(backend, device)

    @PROPERTY_SETTINGS
    @given(data=st.data())
    def check(data):
        image, text = data.draw(_features(backend, device))
        scale = torch.tensor(data.draw(st.sampled_from([1.0, 10.0, 100.0])), dtype=torch.float32)
        bias = torch.tensor(data.draw(st.sampled_from([-10.0, 0.0, 3.5])), dtype=torch.float32)
        labels, reduction = data.draw(_labels_and_reduction(image.shape[0]))
        batch = image.shape[0]
        inputs = [image, text, scale, bias]
        x, y, similarity = _feature_magnitudes(image, text)
        logit = scale.item() * similarity + abs(bias.item())
        _check_rule(lambda x, y, s, b: leanops.siglip_loss(x, y, s, b, labels=labels, reduction=reduction,
                                                           backend=backend),
                    lambda x, y, s, b: oracles.siglip_loss(x, y, s, b, labels=labels, reduction=reduction),
                    inputs, [batch * logit, batch * scale.item() * y, batch * scale.item() * x, batch * similarity,
                             batch], logit)

    check()


# "auto" too: on the CPU it takes the dense small-logits path (leanops.plans.dense_logits_chosen) at these sizes.
@pytest.mark.parametrize("backend,device", provider_cases(CROSS_ENTROPY, devices=("cpu",))
                         + [pytest.param("auto", "cpu", id="auto-cpu")])
def test_linear_cross_entropy_property(backend, device):
    if backend != "auto":
        require_backend(backend, device)

    @PROPERTY_SETTINGS
    @given(data=st.data())
    def check(data):
        tokens, dim, vocabulary = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 7)), data.draw(
            st.integers(1, 13))
        dtype = data.draw(st.sampled_from(_dtypes(backend, device)))
        seed = data.draw(st.integers(0, 2 ** 31))
        hidden = data.draw(_matrix(tokens, dim, seed))
        weight = data.draw(_matrix(vocabulary, dim, seed + 1, scale=0.5))
        inputs = [hidden.to(dtype), weight.to(dtype)]
        with_bias = data.draw(st.booleans())
        if with_bias:
            bias = torch.randn(vocabulary, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 2))
            for index in data.draw(st.lists(st.integers(0, vocabulary - 1), max_size=2)):
                bias[index] = -math.inf  # a masked class
            inputs.append(bias.to(dtype))
        ignore_index = data.draw(st.sampled_from([-100, 0, vocabulary - 1]))
        all_ignored = data.draw(st.integers(0, 9)) == 0
        targets = torch.full((tokens,), ignore_index) if all_ignored else torch.tensor(
            data.draw(st.lists(st.sampled_from(list(range(vocabulary)) + [ignore_index]), min_size=tokens,
                               max_size=tokens)))
        options = dict(ignore_index=ignore_index, reduction=data.draw(st.sampled_from(["mean", "sum", "none"])),
                       label_smoothing=data.draw(st.sampled_from([0.0, 0.0, 0.1])),
                       z_loss=data.draw(st.sampled_from([0.0, 0.0, 1e-4])),
                       softcap=data.draw(st.sampled_from([None, None, 5.0])),
                       squentropy=data.draw(st.sampled_from([False, False, True])))

        def run(h, w, b=None):
            return leanops.linear_cross_entropy(h, w, targets, bias=b, backend=backend, **options)

        def oracle(h, w, b=None):
            return oracles.linear_cross_entropy(h, w, targets, bias=b, **options)

        h, w = _largest(inputs[0].double()), _largest(inputs[1].double())
        logit = _largest(oracles.capped_logits(inputs[0].double(), inputs[1].double(),
                                               inputs[2].double() if with_bias else None, options["softcap"]))
        square_terms = options["z_loss"] + options["squentropy"]
        per_logit = 1 + options["label_smoothing"] + 2 * square_terms * logit  # |dL/dz| over a token's terms
        magnitudes = [tokens * logit * (1 + square_terms * logit), per_logit * w * vocabulary, per_logit * h * tokens,
                      per_logit * tokens]
        _check_rule(run, oracle, inputs, magnitudes[:1 + len(inputs)], logit)

    check()
