"""The Triton linear cross-entropy primitives (triton_kernels/cross_entropy.py) called directly: every GPU tile
candidate the tuner may pick (forced one at a time, on the GPU), the zero-padding of D that the GPU launchers
apply (forced under the interpreter), and float16's tile scaling, which keeps tiny gradients from flushing to
zero. The public-API tests (test_cross_entropy.py) cover the options and sizes."""
import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

from leanops.reference import cross_entropy as reference  # noqa: E402
from leanops.triton_kernels import cross_entropy as kernels  # noqa: E402
from leanops.triton_kernels import tiles  # noqa: E402


def _inputs(tokens, vocabulary, dim, dtype, device, seed, gradient_scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocabulary, dim, generator=generator, dtype=torch.float64) / dim**0.5
    bias = 0.1 * torch.randn(vocabulary, generator=generator, dtype=torch.float64)
    targets = torch.randint(-1, vocabulary, (tokens,), generator=generator)
    grads = [gradient_scale * torch.randn(tokens, generator=generator, dtype=torch.float64) for _ in range(4)]
    grads[3] = grads[3] / vocabulary  # squentropy's gradient is O(1 / V)
    convert = lambda t: t.to(dtype).to(device)  # noqa: E731
    return convert(hidden), convert(weight), convert(bias), targets.to(device), [g.float().to(device) for g in grads]


def _check(name, actual, expected, tolerance):
    assert actual.shape == expected.shape, name
    assert bool(torch.isfinite(actual).all()), f"{name}: not finite"
    error = (actual.double().cpu() - expected.cpu()).abs().max().item()
    size = max(expected.abs().max().item(), 1e-30)
    assert error <= tolerance * size, f"{name}: max error {error:.3g} > {tolerance:.1g} x {size:.3g}"


TOLERANCE = {torch.float32: 2e-5, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}


def _check_against_reference(hidden, weight, bias, targets, grads, softcap, dtype):
    statistics = kernels.linear_ce_forward(hidden, weight, bias, targets, softcap)
    high = [t.double().cpu() for t in (hidden, weight, bias)]
    expected = reference.linear_ce_forward(*high, targets.cpu(), softcap)
    for name, actual, reference_value in zip(("lse", "target_logit", "logit_sum", "logit_square_sum"), statistics,
                                             expected):
        _check(name, actual, reference_value, 2e-6)
    gradients = kernels.linear_ce_backward(hidden, weight, bias, targets, softcap, statistics[0], *grads)
    expected = reference.linear_ce_backward(*high, targets.cpu(), softcap, expected[0],
                                            *[g.double().cpu() for g in grads])
    for name, actual, reference_value in zip(("grad_hidden", "grad_weight", "grad_bias"), gradients, expected):
        assert actual.dtype == dtype
        _check(name, actual, reference_value, TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_tile_candidate_is_correct(dtype, monkeypatch):
    tokens, vocabulary, dim = 300, 1000, 520  # several blocks of every candidate; D splits into column chunks
    cuda = torch.device("cuda")
    forward = kernels.forward_tile_candidates(cuda, dtype)
    backward = kernels.backward_tile_candidates(cuda, dtype, dim)
    for index in range(max(len(forward), len(backward))):
        chosen_forward, chosen_backward = forward[index % len(forward)], backward[index % len(backward)]
        monkeypatch.setattr(kernels, "forward_tile_candidates", lambda *_: (chosen_forward,))
        monkeypatch.setattr(kernels, "backward_tile_candidates", lambda *_: (chosen_backward,))
        for softcap in (0.0, 5.0):
            _check_against_reference(*_inputs(tokens, vocabulary, dim, dtype, "cuda", seed=index), softcap, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_padded_feature_dimension_gives_the_same_results(dtype, monkeypatch):
    """The GPU launchers pad D to a multiple of 16; forced here under the interpreter, D = 21 (padded to 32)."""
    if torch.cuda.is_available():
        pytest.skip("the GPU runs the padded path in every test")
    monkeypatch.setattr(tiles, "feature_alignment", lambda _device: 16)
    _check_against_reference(*_inputs(37, 50, 21, dtype, "cpu", seed=1), 0.0, dtype)


def test_float16_tiny_gradients_do_not_flush_to_zero():
    """A mean over many tokens makes grad_lse ~2e-5; times softmax weights ~1/V = 1e-3 the G entries are ~2e-8,
    below float16's smallest subnormal (6e-8). Summed over 128 tokens whose hidden states agree they make a normal
    grad_weight (~1.2e-4), which the tile scaling keeps and a plain float16 cast of G would round to zero."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(3)
    tokens, vocabulary, dim = 128, 1000, 16
    hidden = (48.0 + 0.1 * torch.randn(tokens, dim, generator=generator)).half().to(device)
    weight = (0.001 * torch.randn(vocabulary, dim, generator=generator)).half().to(device)
    bias = torch.empty(0, dtype=torch.float16, device=device)
    targets = torch.full((tokens,), -1, device=device)
    grads = [torch.full((tokens,), 2e-5, device=device)] + [torch.zeros(tokens, device=device) for _ in range(3)]
    lse = kernels.linear_ce_forward(hidden, weight, bias, targets, 0.0)[0]
    grad_weight = kernels.linear_ce_backward(hidden, weight, bias, targets, 0.0, lse, *grads)[1]
    high = [t.double().cpu() for t in (hidden, weight, bias)]
    expected_lse = reference.linear_ce_forward(*high, targets.cpu(), 0.0)[0]
    expected = reference.linear_ce_backward(*high, targets.cpu(), 0.0, expected_lse,
                                            *[g.double().cpu() for g in grads])[1]
    assert expected.abs().min() > torch.finfo(torch.float16).tiny  # every entry is a normal float16 number
    _check("grad_weight", grad_weight, expected, TOLERANCE[torch.float16])
