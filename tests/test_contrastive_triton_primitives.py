"""The Triton contrastive primitives (triton_kernels/contrastive.py) against a float64 plain-PyTorch evaluation of
the same formulas, which builds the small B x B similarity matrix (the kernels never do).

On a machine without a GPU the kernels run under Triton's interpreter on CPU tensors (float32, float16); bfloat16
runs only on CUDA (the interpreter's bfloat16 tl.dot is wrong). Sizes cover B = 1, 2, B and D not multiples of any
block, D = 1 and 3, and large unnormalised features with scale 100 (logits ~ 1e5).

Tolerances, relative to the largest entry of each output: the 16-bit inputs are exact in float32 and S accumulates
exact products in float32, so the forward statistics are as accurate as for float32 inputs. In the backward the
float32 tile (G or D) is rounded to the input dtype before its product with the features, as in FlashAttention: the
gradients carry a few units of that dtype's rounding. With logits ~ 1e5 the backward is ill-conditioned in float32
(an absolute error of one float32 ulp of the logit, ~0.008, is a relative error of ~1% in exp(logit - lse)), so
there the tolerance is the flash-attention rule: twice the error of the same formula evaluated by plain PyTorch in
float32.
"""
import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

from leanops.triton_kernels import contrastive as kernels  # noqa: E402
from leanops.triton_kernels import tiles  # noqa: E402


def _case(dtype, device):
    marks = []
    if device == "cuda":
        marks = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
    return pytest.param(dtype, device, marks=marks, id=f"{str(dtype).removeprefix('torch.')}-{device}")


CASES = [_case(torch.float32, "cpu"), _case(torch.float16, "cpu"),
         _case(torch.float32, "cuda"), _case(torch.float16, "cuda"), _case(torch.bfloat16, "cuda")]

# (B, D): single rows, tiny features, sizes that are no multiple of any block (interpreter blocks are 16, gradient
# column chunks 32; GPU blocks 64/128), several gradient column chunks (D = 70).
SIZES = [(1, 1), (2, 3), (37, 70), (130, 3), (19, 1)]

FORWARD_TOLERANCE = 2e-6
BACKWARD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}


def _features(batch, dim, dtype, device, generator, magnitude=1.0):
    """Image and text features whose matching rows are correlated (as after training), unnormalised.

    magnitude scales the row norms: with magnitude 30, |S| reaches ~1e3."""
    image = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    text = image + 0.5 * torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    factor = magnitude / dim**0.5
    return (image * factor).to(dtype).to(device), (text * factor).to(dtype).to(device)


def _check(name, actual, expected, tolerance):
    assert actual.dtype == torch.float32, f"{name}: {actual.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    error = (actual.double().cpu() - expected).abs().max().item()
    size = max(expected.abs().max().item(), 1e-30)
    assert error <= tolerance * size, f"{name}: max error {error:.3g} > {tolerance:.1g} x {size:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# References, building S: float64 (the oracle), or float32 (what plain PyTorch achieves, for the ill-conditioned
# cases). Every output is float64 on the CPU.

def _cpu(*tensors, precision=torch.float64):
    return tuple(t.cpu().to(precision) for t in tensors)


def _clip_forward_reference(image, text, scale, precision=torch.float64):
    image, text, scale = _cpu(image, text, scale, precision=precision)
    similarity = image @ text.T
    return (torch.logsumexp(scale[:, None] * similarity, dim=1).double(),
            torch.logsumexp(scale[None, :] * similarity, dim=0).double())


def _clip_backward_reference(image, text, scale, row_lse, col_lse, row_weight, col_weight, precision=torch.float64):
    image, text, scale, row_lse, col_lse, row_weight, col_weight = _cpu(
        image, text, scale, row_lse, col_lse, row_weight, col_weight, precision=precision)
    similarity = image @ text.T
    p = torch.exp(scale[:, None] * similarity - row_lse[:, None])
    q = torch.exp(scale[None, :] * similarity - col_lse[None, :])
    g = (row_weight * scale)[:, None] * p + (col_weight * scale)[None, :] * q
    grad_scale = row_weight * (p * similarity).sum(dim=1) + col_weight * (q * similarity).sum(dim=0)
    return tuple(t.double() for t in (g @ text, g.T @ image, grad_scale))


def _siglip_logits(image, text, scale, bias, groups):
    similarity = image @ text.T
    label = torch.where(groups.cpu()[:, None] == groups.cpu()[None, :], 1.0, -1.0).to(similarity.dtype)
    return similarity, label, scale * similarity + bias


def _siglip_forward_reference(image, text, scale, bias, groups, precision=torch.float64):
    image, text, scale, bias = _cpu(image, text, scale, bias, precision=precision)
    _, label, logits = _siglip_logits(image, text, scale, bias, groups)
    return torch.nn.functional.softplus(-label * logits).sum(dim=1).double()


def _siglip_backward_reference(image, text, scale, bias, groups, row_weight, precision=torch.float64):
    image, text, scale, bias, row_weight = _cpu(image, text, scale, bias, row_weight, precision=precision)
    similarity, label, logits = _siglip_logits(image, text, scale, bias, groups)
    d = -row_weight[:, None] * label * torch.sigmoid(-label * logits)
    return tuple(t.double() for t in (scale * (d @ text), scale * (d.T @ image), (d * similarity).sum(), d.sum()))


def _relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _flash_attention_tolerances(dtype, expected, reference, *arguments):
    """Per output: the dtype's tolerance, or twice plain PyTorch's float32 error on the same formula if larger."""
    float32 = reference(*arguments, precision=torch.float32)
    return [max(BACKWARD_TOLERANCE[dtype], 2 * _relative_error(a, e)) for a, e in zip(float32, expected)]


# ---------------------------------------------------------------------------------------------------------------
# Inputs.

def _clip_inputs(batch, dim, dtype, device, seed, magnitude=1.0, max_scale=20.0):
    generator = torch.Generator().manual_seed(seed)
    image, text = _features(batch, dim, dtype, device, generator, magnitude)
    # Per-anchor scales, including the extremes.
    scale = (1.0 + (max_scale - 1.0) * torch.rand(batch, generator=generator))
    scale[0] = max_scale
    return image, text, scale.to(device)


def _weights(batch, device, seed):
    generator = torch.Generator().manual_seed(seed)
    # Signed weights (any upstream gradient), one zero.
    weight = torch.randn(batch, generator=generator)
    weight[-1] = 0.0 if batch > 1 else weight[-1]
    return weight.to(device)


def _siglip_inputs(batch, dim, dtype, device, seed, magnitude=1.0, scale=10.0, bias=-10.0):
    generator = torch.Generator().manual_seed(seed)
    image, text = _features(batch, dim, dtype, device, generator, magnitude)
    # Repeated group ids give several positives per row; B = 1 is its own positive.
    groups = torch.randint(0, max(1, batch // 2), (batch,), generator=generator).to(device)
    return (image, text, torch.tensor(scale, device=device), torch.tensor(bias, device=device), groups)


# ---------------------------------------------------------------------------------------------------------------
# CLIP.

@pytest.mark.parametrize("dtype,device", CASES)
@pytest.mark.parametrize("batch,dim", SIZES)
def test_clip_forward(dtype, device, batch, dim):
    image, text, scale = _clip_inputs(batch, dim, dtype, device, seed=batch * 1000 + dim)
    row_lse, col_lse = kernels.clip_forward(image, text, scale)
    expected_row, expected_col = _clip_forward_reference(image, text, scale)
    _check("row_lse", row_lse, expected_row, FORWARD_TOLERANCE)
    _check("col_lse", col_lse, expected_col, FORWARD_TOLERANCE)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "two-launches"])
@pytest.mark.parametrize("dtype,device", CASES)
@pytest.mark.parametrize("batch,dim", SIZES)
def test_clip_backward(dtype, device, batch, dim, deterministic):
    image, text, scale = _clip_inputs(batch, dim, dtype, device, seed=batch * 1000 + dim + 1)
    row_lse, col_lse = (t.float().to(device) for t in _clip_forward_reference(image, text, scale))
    row_weight, col_weight = _weights(batch, device, seed=1), _weights(batch, device, seed=2)
    arguments = (image, text, scale, row_lse, col_lse, row_weight, col_weight)
    grads = kernels.clip_backward(*arguments, deterministic=deterministic)
    expected = _clip_backward_reference(*arguments)
    for name, actual, reference in zip(("grad_image", "grad_text", "grad_scale"), grads, expected):
        _check(name, actual, reference, BACKWARD_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype,device", CASES)
def test_clip_large_logits(dtype, device):
    """|S| ~ 1e3 and scale 100: logits ~ 1e5, far beyond exp's float32 range; running maxima keep it finite."""
    batch, dim = 37, 70
    image, text, scale = _clip_inputs(batch, dim, dtype, device, seed=7, magnitude=30.0, max_scale=100.0)
    scale[:] = 100.0
    assert (image.double() @ text.double().T).abs().max() > 500
    row_lse, col_lse = kernels.clip_forward(image, text, scale)
    expected_row, expected_col = _clip_forward_reference(image, text, scale)
    _check("row_lse", row_lse, expected_row, FORWARD_TOLERANCE)
    _check("col_lse", col_lse, expected_col, FORWARD_TOLERANCE)
    weight = torch.full((batch,), 0.5 / batch, device=device)
    arguments = (image, text, scale, row_lse, col_lse, weight, weight)
    expected = _clip_backward_reference(*arguments)
    tolerances = _flash_attention_tolerances(dtype, expected, _clip_backward_reference, *arguments)
    for deterministic in (False, True):
        grads = kernels.clip_backward(*arguments, deterministic=deterministic)
        for name, actual, reference, tolerance in zip(("grad_image", "grad_text", "grad_scale"), grads, expected,
                                                      tolerances):
            _check(name, actual, reference, tolerance)


def test_clip_backward_deterministic_mode():
    """Two launches are bitwise reproducible, and torch.use_deterministic_algorithms(True) overrides a request for
    atomics."""
    image, text, scale = _clip_inputs(37, 20, torch.float32, "cpu", seed=11)
    row_lse, col_lse = kernels.clip_forward(image, text, scale)
    weight = _weights(37, "cpu", seed=3)
    arguments = (image, text, scale, row_lse, col_lse, weight, weight)
    first = kernels.clip_backward(*arguments)
    for a, b in zip(first, kernels.clip_backward(*arguments, deterministic=True)):
        assert torch.equal(a, b)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        forced = kernels.clip_backward(*arguments, deterministic=False)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, forced):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# SigLIP.

@pytest.mark.parametrize("dtype,device", CASES)
@pytest.mark.parametrize("batch,dim", SIZES)
def test_siglip_forward(dtype, device, batch, dim):
    inputs = _siglip_inputs(batch, dim, dtype, device, seed=batch * 1000 + dim + 2)
    _check("row_loss", kernels.siglip_forward(*inputs), _siglip_forward_reference(*inputs), FORWARD_TOLERANCE)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "two-launches"])
@pytest.mark.parametrize("dtype,device", CASES)
@pytest.mark.parametrize("batch,dim", SIZES)
def test_siglip_backward(dtype, device, batch, dim, deterministic):
    inputs = _siglip_inputs(batch, dim, dtype, device, seed=batch * 1000 + dim + 3)
    row_weight = _weights(batch, device, seed=4)
    grads = kernels.siglip_backward(*inputs, row_weight, deterministic=deterministic)
    expected = _siglip_backward_reference(*inputs, row_weight)
    for name, actual, reference in zip(("grad_image", "grad_text", "grad_scale", "grad_bias"), grads, expected):
        _check(name, actual, reference, BACKWARD_TOLERANCE[dtype])
    assert grads[2].dim() == 0 and grads[3].dim() == 0


@pytest.mark.parametrize("dtype,device", CASES)
def test_siglip_large_logits(dtype, device):
    """|scale S + bias| ~ 1e5: softplus and sigmoid stay finite and accurate."""
    batch, dim = 37, 70
    inputs = _siglip_inputs(batch, dim, dtype, device, seed=8, magnitude=30.0, scale=100.0, bias=-10.0)
    assert (inputs[0].double() @ inputs[1].double().T).abs().max() > 500
    _check("row_loss", kernels.siglip_forward(*inputs), _siglip_forward_reference(*inputs), FORWARD_TOLERANCE)
    row_weight = torch.full((batch,), 1.0 / batch, device=device)
    expected = _siglip_backward_reference(*inputs, row_weight)
    tolerances = _flash_attention_tolerances(dtype, expected, _siglip_backward_reference, *inputs, row_weight)
    for deterministic in (False, True):
        grads = kernels.siglip_backward(*inputs, row_weight, deterministic=deterministic)
        for name, actual, reference, tolerance in zip(("grad_image", "grad_text", "grad_scale", "grad_bias"), grads,
                                                      expected, tolerances):
            _check(name, actual, reference, tolerance)


def test_siglip_forward_separated_pairs():
    """Every pair far on its correct side: each softplus term is tiny (exp(-20) or less) and must not round to 0."""
    batch, dim = 5, 3
    image = torch.eye(batch, dim) * 4.0 + 0.0
    image[3:] = torch.tensor([[0.0, 0.0, -4.0], [-4.0, 0.0, 0.0]])
    groups = torch.arange(batch)
    scale, bias = torch.tensor(3.0), torch.tensor(-20.0)
    inputs = (image, image.clone(), scale, bias, groups)
    expected = _siglip_forward_reference(*inputs)
    actual = kernels.siglip_forward(*inputs)
    assert (expected > 0).all() and (expected < 1e-6).all()
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Every tile candidate the GPU tuner may pick gives correct results (each is forced in turn).

def _gpu_dtype_cases():
    return [case for case in CASES if case.values[1] == "cuda"]


@pytest.mark.parametrize("dtype,device", _gpu_dtype_cases())
def test_every_tile_candidate_is_correct(dtype, device, monkeypatch):
    batch, dim = 300, 520  # several row blocks of every candidate; D over 512 so that the column chunks split
    cuda = torch.device(device)
    forward = kernels.forward_tile_candidates(cuda, dtype)
    for atomics in (False, True):
        backward = kernels.backward_tile_candidates(cuda, dtype, dim, atomics)
        for index in range(max(len(forward), len(backward))):
            chosen_forward, chosen_backward = forward[index % len(forward)], backward[index % len(backward)]
            monkeypatch.setattr(kernels, "forward_tile_candidates", lambda *_: (chosen_forward,))
            monkeypatch.setattr(kernels, "backward_tile_candidates", lambda *_: (chosen_backward,))
            image, text, scale = _clip_inputs(batch, dim, dtype, device, seed=index)
            row_lse, col_lse = kernels.clip_forward(image, text, scale)
            for name, actual, expected in zip(("row_lse", "col_lse"), (row_lse, col_lse),
                                              _clip_forward_reference(image, text, scale)):
                _check(name, actual, expected, FORWARD_TOLERANCE)
            weights = _weights(batch, device, seed=1), _weights(batch, device, seed=2)
            grads = kernels.clip_backward(image, text, scale, row_lse, col_lse, *weights,
                                          deterministic=not atomics)
            expected = _clip_backward_reference(image, text, scale, row_lse, col_lse, *weights)
            for name, actual, reference in zip(("grad_image", "grad_text", "grad_scale"), grads, expected):
                _check(name, actual, reference, BACKWARD_TOLERANCE[dtype])
            inputs = _siglip_inputs(batch, dim, dtype, device, seed=index)
            _check("row_loss", kernels.siglip_forward(*inputs), _siglip_forward_reference(*inputs),
                   FORWARD_TOLERANCE)
            grads = kernels.siglip_backward(*inputs, weights[0], deterministic=not atomics)
            expected = _siglip_backward_reference(*inputs, weights[0])
            for name, actual, reference in zip(("grad_image", "grad_text", "grad_scale", "grad_bias"), grads,
                                               expected):
                _check(name, actual, reference, BACKWARD_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype,device", [case for case in CASES if case.values[1] == "cpu"])
def test_zero_padded_feature_dimension_gives_the_same_results(dtype, device, monkeypatch):
    """The GPU launchers pad D to a multiple of 16; forced here under the interpreter, D = 21 (padded to 32)."""
    monkeypatch.setattr(tiles, "feature_alignment", lambda _device: 16)
    batch, dim = 37, 21
    image, text, scale = _clip_inputs(batch, dim, dtype, device, seed=5)
    row_lse, col_lse = kernels.clip_forward(image, text, scale)
    for name, actual, expected in zip(("row_lse", "col_lse"), (row_lse, col_lse),
                                      _clip_forward_reference(image, text, scale)):
        _check(name, actual, expected, FORWARD_TOLERANCE)
    weights = _weights(batch, device, seed=1), _weights(batch, device, seed=2)
    for deterministic in (False, True):
        grads = kernels.clip_backward(image, text, scale, row_lse, col_lse, *weights, deterministic=deterministic)
        expected = _clip_backward_reference(image, text, scale, row_lse, col_lse, *weights)
        for name, actual, reference in zip(("grad_image", "grad_text", "grad_scale"), grads, expected):
            _check(name, actual, reference, BACKWARD_TOLERANCE[dtype])
            assert actual.is_contiguous()
    inputs = _siglip_inputs(batch, dim, dtype, device, seed=6)
    _check("row_loss", kernels.siglip_forward(*inputs), _siglip_forward_reference(*inputs), FORWARD_TOLERANCE)
    for deterministic in (False, True):
        grads = kernels.siglip_backward(*inputs, weights[0], deterministic=deterministic)
        expected = _siglip_backward_reference(*inputs, weights[0])
        for name, actual, reference in zip(("grad_image", "grad_text", "grad_scale", "grad_bias"), grads, expected):
            _check(name, actual, reference, BACKWARD_TOLERANCE[dtype])
