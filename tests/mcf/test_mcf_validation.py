"""Bad input gets a clear TypeError/ValueError naming the argument, before any kernel runs; asking for a backend
that cannot serve the call says which and why."""
import pytest
import torch

import leanops
from helpers import provider_cases
from leanops.ops import MCF

CASES = provider_cases(MCF)

mcf = leanops.mcf


def _pair(dtype=torch.bfloat16, n=8, device="cpu"):
    return torch.randn(n, device=device).to(dtype), torch.randn(n, device=device).to(dtype)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("op", ["two_sum", "fast_two_sum", "two_prod"])
def test_binary_ops_name_the_bad_argument(backend, device, op):
    fn = getattr(mcf, op)
    a, b = _pair(device=device)
    with pytest.raises(TypeError, match=r"argument 'a' must be a torch.Tensor"):
        fn(1.0, b, backend=backend)
    with pytest.raises(TypeError, match=r"argument 'b' must be a torch.Tensor"):
        fn(a, [1.0], backend=backend)
    with pytest.raises(TypeError, match=r"argument 'a' has dtype torch.int32"):
        fn(a.to(torch.int32), b, backend=backend)
    with pytest.raises(TypeError, match=r"argument 'b' has dtype torch.float16 but 'a' has dtype torch.bfloat16"):
        fn(a, b.half(), backend=backend)
    with pytest.raises(ValueError, match=r"argument 'b' has shape \(7,\) but 'a' has shape \(8,\)"):
        fn(a, b[:7], backend=backend)
    with pytest.raises(ValueError, match=r"argument 'b' is on meta but 'a' is on"):
        fn(a, b.to("meta"), backend=backend)


def test_pair_ops_name_the_bad_argument():
    hi, lo = _pair()
    with pytest.raises(ValueError, match=r"leanops.mcf.grow: argument 'v' has shape"):
        mcf.grow(hi, lo, hi[:3])
    with pytest.raises(TypeError, match=r"leanops.mcf.grow_: argument 'lo' has dtype torch.float32"):
        mcf.grow_(hi, lo.float(), hi)
    with pytest.raises(ValueError, match=r"leanops.mcf.scale: argument 'b_lo' has shape \(2,\) .* single element"):
        mcf.scale(hi, lo, hi[:1], lo[:2])
    with pytest.raises(ValueError, match=r"argument 'b_hi'=0.999 is not exactly representable in torch.bfloat16"):
        mcf.scale(hi, lo, 0.999, 0.0)
    with pytest.raises(TypeError, match=r"leanops.mcf.split: argument 'x' has dtype torch.bfloat16"):
        mcf.split(hi)
    with pytest.raises(TypeError, match=r"leanops.mcf.split: argument 'dtype' must be one of"):
        mcf.split(hi.float(), torch.int8)
    with pytest.raises(TypeError, match=r"leanops.mcf.merge: argument 'hi' has dtype torch.float64"):
        mcf.merge(hi.double(), lo.double())


def test_scale_accepts_exact_python_numbers():
    hi, lo = _pair()
    expected = mcf.scale(hi, lo, torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(-0.0009765625,
                                                                                      dtype=torch.bfloat16))
    actual = mcf.scale(hi, lo, 1.0, -0.0009765625)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


@pytest.mark.parametrize("backend,device", CASES)
def test_in_place_grow_refuses_overlapping_outputs(backend, device):
    buffer = torch.randn(16, device=device).to(torch.bfloat16)
    v = torch.randn(8, device=device).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"'hi' and 'lo' must not share memory"):
        mcf.grow_(buffer[:8], buffer[4:12], v, backend=backend)
    with pytest.raises(ValueError, match=r"'hi' and 'lo' must not share memory"):
        mcf.grow_(buffer[:8], buffer[:8], v, backend=backend)


def test_unknown_backend_is_a_value_error():
    a, b = _pair()
    with pytest.raises(ValueError, match=r"argument 'backend' must be one of .* got 'fastest'"):
        mcf.two_sum(a, b, backend="fastest")
    with pytest.raises(TypeError, match=r"argument 'backend' must be a string"):
        mcf.two_sum(a, b, backend=None)


def test_a_backend_that_cannot_serve_says_why():
    a, b = _pair()
    if not torch.cuda.is_available():
        with pytest.raises(leanops.BackendUnavailableError, match=r"backend 'cuda' cannot serve .* CUDA tensors"):
            mcf.two_sum(a, b, backend="cuda")
    with pytest.raises(leanops.BackendUnavailableError, match=r"backend 'cpu' cannot serve .* not torch.float64"):
        mcf.two_sum(a.double(), b.double(), backend="cpu")
    # auto falls back to the reference for a dtype no kernel supports
    s, e = mcf.two_sum(a.double(), b.double())
    assert s.dtype == torch.float64


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a, b = _pair()
    if not leanops.backends.triton_installed():
        pytest.skip("triton is not installed")
    with pytest.raises(leanops.BackendUnavailableError, match=r"TRITON_INTERPRET=1"):
        mcf.two_sum(a, b, backend="triton")
