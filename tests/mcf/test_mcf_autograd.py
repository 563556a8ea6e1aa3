"""Gradients through the MCF arithmetic (issue 15: second derivatives per op and provider, never silently missing):
the reference differentiates with torch autograd (first and second derivatives, float64 gradcheck / gradgradcheck);
the kernels have no gradient, so a kernel backend named explicitly refuses inputs that require grad (while grad mode
is on), and ``auto`` takes the reference for them."""
import pytest
import torch

import leanops
from helpers import provider_cases
from leanops.ops import MCF

KERNELS = [case for case in provider_cases(MCF, devices=("cpu",)) if case.values[0] != "reference"]
BINARY = ["two_sum", "fast_two_sum", "two_prod"]


def _operands(requires_grad=True, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    a = (torch.randn(7, dtype=torch.float64, generator=generator) * 4).to(dtype)
    b = torch.randn(7, dtype=torch.float64, generator=generator).to(dtype)
    return a.requires_grad_(requires_grad), b.requires_grad_(requires_grad)


@pytest.mark.parametrize("op", BINARY)
def test_reference_first_and_second_derivatives(op):
    a, b = _operands()
    function = getattr(leanops.mcf, op)

    def value(a, b):
        hi, lo = function(a, b, backend="reference")
        return hi + lo  # a + b (or a * b) exactly: smooth in a and b

    assert torch.autograd.gradcheck(value, (a, b))
    assert torch.autograd.gradgradcheck(value, (a, b))


@pytest.mark.parametrize("op", BINARY)
def test_auto_differentiates_through_the_reference(op):
    a, b = _operands(dtype=torch.float32)
    hi, lo = getattr(leanops.mcf, op)(a, b)
    (hi + lo).sum().backward()
    expected_a = torch.ones_like(a) if op != "two_prod" else b.detach()
    assert torch.allclose(a.grad, expected_a)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("op", BINARY + ["grow", "scale", "split", "merge"])
def test_kernels_refuse_inputs_that_require_grad(backend, device, op):
    a, b = _operands(dtype=torch.float32)
    arguments = {"grow": (a, b, b), "scale": (a, b, 1.0, 0.0), "split": (a,), "merge": (a, b)}.get(op, (a, b))
    function = getattr(leanops.mcf, op)
    with pytest.raises(RuntimeError, match=rf"leanops.mcf.{op}: an input requires grad, and backend '{backend}' "
                                           r"has no gradient"):
        function(*arguments, backend=backend)
    with torch.no_grad():  # the optimizer's use: no graph, no refusal
        function(*arguments, backend=backend)
    function(*(t.detach() if isinstance(t, torch.Tensor) else t for t in arguments), backend=backend)
