"""Exactness of the error-free transformations: results are exact, not merely close, on every backend and dtype.

For random operands spread over many binades, with mixed signs and heavy cancellation, s + e equals a + b exactly
(compared through float64 canonical sums), s is the correctly rounded sum, and every backend gives the reference's
bits.
"""
import pytest
import torch

import leanops
from helpers import (DTYPES, assert_bitwise_equal, assert_same_real, hard_sum_operands, provider_cases, spread_values,
                     ulp)
from leanops.ops import MCF

CASES = provider_cases(MCF)

# Binary exponent ranges that keep sums and products (and their error terms) inside each format's normal range.
SUM_BINADES = {torch.bfloat16: 40, torch.float16: 7, torch.float32: 40}
PRODUCT_EXPONENTS = {torch.bfloat16: (-30, 30), torch.float16: (-1, 6), torch.float32: (-30, 30)}
SIZES = [1, 1000, 4099]


def _generator(seed_offset: int) -> torch.Generator:
    # Fresh inputs on every run; the seed is printed on failure through the test id's parameters.
    return torch.Generator().manual_seed(torch.seed() + seed_offset)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_two_sum_is_exact(backend, device, dtype, n):
    a, b = hard_sum_operands(n, dtype, _generator(n), SUM_BINADES[dtype])
    a, b = a.to(device), b.to(device)
    s, e = leanops.mcf.two_sum(a, b, backend=backend)
    assert s.dtype == dtype and e.dtype == dtype and s.shape == a.shape
    assert_same_real(a.cpu(), b.cpu(), s.cpu(), e.cpu(), f"two_sum {backend} {dtype}")
    assert_bitwise_equal(s, a + b, "s is the correctly rounded a + b")
    assert bool((e.double().abs() <= ulp(s) / 2).all()), "|e| <= ulp(s) / 2"
    ref_s, ref_e = leanops.mcf.two_sum(a.cpu(), b.cpu(), backend="reference")
    assert_bitwise_equal(e, ref_e, "error term matches the reference")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_fast_two_sum_is_exact_when_ordered(backend, device, dtype, n):
    a, b = hard_sum_operands(n, dtype, _generator(2 * n), SUM_BINADES[dtype])
    larger = torch.where(a.abs() >= b.abs(), a, b)
    smaller = torch.where(a.abs() >= b.abs(), b, a)
    s, e = leanops.mcf.fast_two_sum(larger.to(device), smaller.to(device), backend=backend)
    assert_same_real(larger, smaller, s.cpu(), e.cpu(), f"fast_two_sum {backend} {dtype}")
    assert_bitwise_equal(s.cpu(), larger + smaller, "s is the correctly rounded sum")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_two_prod_is_exact(backend, device, dtype, n):
    generator = _generator(3 * n)
    low, high = PRODUCT_EXPONENTS[dtype]
    a = spread_values(n, low, high, generator).to(dtype)
    b = spread_values(n, low, high, generator).to(dtype)
    p, e = leanops.mcf.two_prod(a.to(device), b.to(device), backend=backend)
    exact = a.double() * b.double()  # exact: at most 2 x 24 significant bits
    assert_same_real(exact, torch.zeros_like(exact), p.cpu(), e.cpu(), f"two_prod {backend} {dtype}")
    assert_bitwise_equal(p.cpu(), a * b, "p is the correctly rounded product")


@pytest.mark.parametrize("backend,device", CASES)
def test_float64_runs_on_the_reference_only(backend, device):
    generator = _generator(5)
    a, b = hard_sum_operands(1001, torch.float64, generator, 200)
    a, b = a.to(device), b.to(device)
    if backend != "reference":
        with pytest.raises(leanops.BackendUnavailableError, match="float64"):
            leanops.mcf.two_sum(a, b, backend=backend)
        return
    s, e = leanops.mcf.two_sum(a, b, backend=backend)
    assert_bitwise_equal(s, a + b, "float64 sum")
    p, pe = leanops.mcf.two_prod(a, b, backend=backend)
    # Dekker's product, checked against exact rational arithmetic on a sample.
    from fractions import Fraction
    for i in range(0, 1001, 97):
        exact = Fraction(a[i].item()) * Fraction(b[i].item())
        if abs(exact) > 1e-250:  # the error term of a tiny product underflows
            assert Fraction(p[i].item()) + Fraction(pe[i].item()) == exact


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.gpu_check
def test_strided_and_empty_inputs(backend, device, dtype):
    generator = _generator(7)
    a, b = hard_sum_operands(7 * 13 * 5, dtype, generator, SUM_BINADES[dtype])
    a = a.reshape(7, 13, 5).transpose(0, 2).to(device)  # non-contiguous
    b = b.reshape(7, 13, 5).transpose(0, 2).to(device)
    s, e = leanops.mcf.two_sum(a, b, backend=backend)
    assert s.shape == (5, 13, 7)
    assert_same_real(a.cpu(), b.cpu(), s.cpu(), e.cpu(), "strided two_sum")
    empty = torch.empty(0, 3, dtype=dtype, device=device)
    s, e = leanops.mcf.two_sum(empty, empty, backend=backend)
    assert s.shape == (0, 3) and e.shape == (0, 3)
