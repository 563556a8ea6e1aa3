"""The MCF operations under torch.compile(fullgraph=True), on every provider of leanops.ops.MCF. (Their opcheck:
tests/test_registry.py, for every operator of every provider.)"""
import pytest
import torch

import leanops
from helpers import provider_cases
from leanops.ops import MCF

CASES = provider_cases(MCF)


def _collage_step(hi, lo, v_hi, v_lo, grad, b_hi, b_lo, backend, in_place):
    """A miniature Collage-style update: decay a pair, grow it by a gradient term, add it into another pair."""
    v_hi, v_lo = leanops.mcf.scale(v_hi, v_lo, b_hi, b_lo, backend=backend)
    v_hi, v_lo = leanops.mcf.grow(v_hi, v_lo, grad * grad, backend=backend)
    if in_place:
        leanops.mcf.grow_(hi, lo, -grad, backend=backend)
    else:
        hi, lo = leanops.mcf.grow(hi, lo, -grad, backend=backend)
    s, e = leanops.mcf.two_sum(hi, v_hi, backend=backend)
    return leanops.mcf.merge(s, e, backend=backend), v_hi, v_lo, hi, lo


@pytest.mark.parametrize("in_place", [False, True], ids=["grow", "grow_"])
@pytest.mark.parametrize("backend,device", CASES)
def test_torch_compile_full_graph(backend, device, in_place):
    """Every op in one compiled function gives the eager bits; grow_ updates its arguments in place there too."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(1)
    hi = torch.randn(64, generator=generator).to(torch.bfloat16).to(device)
    lo = torch.zeros_like(hi)
    v_hi = torch.rand(64, generator=generator).to(torch.bfloat16).to(device)
    v_lo = torch.zeros_like(v_hi)
    grad = (torch.randn(64, generator=generator) * 1e-2).to(torch.bfloat16).to(device)
    b_hi, b_lo = leanops.mcf.split(torch.tensor(0.999, device=device), torch.bfloat16, backend=backend)

    eager_state = (hi.clone(), lo.clone())
    expected = _collage_step(*eager_state, v_hi, v_lo, grad, b_hi, b_lo, backend, in_place)
    compiled = torch.compile(_collage_step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    compiled_state = (hi.clone(), lo.clone())
    actual = compiled(*compiled_state, v_hi, v_lo, grad, b_hi, b_lo, backend, in_place)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)
    assert torch.equal(compiled_state[0], eager_state[0]) and torch.equal(compiled_state[1], eager_state[1])
