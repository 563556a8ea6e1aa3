"""The MCF ops as torch.library operators: opcheck (schema, fake kernel, aliasing) and torch.compile tracing."""
import pytest
import torch

import leanops
from helpers import KERNEL_BACKEND_CASES, require_backend

# Sample arguments for every op.
def _samples(device: str):
    generator = torch.Generator().manual_seed(0)
    hi = torch.randn(37, generator=generator).to(torch.bfloat16).to(device)
    lo = (torch.randn(37, generator=generator) * 1e-3).to(torch.bfloat16).to(device)
    b_hi = torch.ones((), dtype=torch.bfloat16, device=device)
    b_lo = torch.full((), -0.0009765625, dtype=torch.bfloat16, device=device)
    x = torch.randn(5, 7, generator=generator).to(device)
    return {
        "two_sum": (hi, lo),
        "fast_two_sum": (hi, lo),
        "two_prod": (hi.float(), lo.float()),
        "grow": (hi, lo, lo),
        "grow_": (hi.clone(), lo.clone(), lo),
        "scale": (hi, lo, b_hi, b_lo),
        "split": (x, torch.float16),
        "merge": (hi, lo),
    }


def _namespace(backend: str):
    return torch.ops.leanops_triton if backend == "triton" else torch.ops.leanops


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_CASES)
@pytest.mark.parametrize("op", ["two_sum", "fast_two_sum", "two_prod", "grow", "grow_", "scale", "split", "merge"])
def test_opcheck(backend, device, op):
    require_backend(backend, device)
    args = _samples(device)[op]
    torch.library.opcheck(getattr(_namespace(backend), op).default, args)


def _collage_step(hi, lo, v_hi, v_lo, grad, b_hi, b_lo, backend):
    """A miniature Collage-style update: decay a pair, grow it by a gradient term, add it into another pair."""
    v_hi, v_lo = leanops.mcf.scale(v_hi, v_lo, b_hi, b_lo, backend=backend)
    v_hi, v_lo = leanops.mcf.grow(v_hi, v_lo, grad * grad, backend=backend)
    leanops.mcf.grow_(hi, lo, -grad, backend=backend)
    s, e = leanops.mcf.two_sum(hi, v_hi, backend=backend)
    return leanops.mcf.merge(s, e, backend=backend), v_hi, v_lo


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_CASES)
def test_torch_compile_full_graph(backend, device):
    require_backend(backend, device)
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(1)
    hi = torch.randn(64, generator=generator).to(torch.bfloat16).to(device)
    lo = torch.zeros_like(hi)
    v_hi = torch.rand(64, generator=generator).to(torch.bfloat16).to(device)
    v_lo = torch.zeros_like(v_hi)
    grad = (torch.randn(64, generator=generator) * 1e-2).to(torch.bfloat16).to(device)
    b_hi, b_lo = leanops.mcf.split(torch.tensor(0.999, device=device), torch.bfloat16, backend=backend)

    eager_state = (hi.clone(), lo.clone())
    expected = _collage_step(*eager_state, v_hi, v_lo, grad, b_hi, b_lo, backend)
    compiled = torch.compile(_collage_step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    compiled_state = (hi.clone(), lo.clone())
    actual = compiled(*compiled_state, v_hi, v_lo, grad, b_hi, b_lo, backend)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)
    assert torch.equal(compiled_state[0], eager_state[0]) and torch.equal(compiled_state[1], eager_state[1])
