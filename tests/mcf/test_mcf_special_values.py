"""Special values on every provider: NaN, infinities, signed zeros, overflowing sums and products and huge finite
operands give the reference's results (python/leanops/mcf.py states the semantics), and the in-place op refuses
what torch's in-place operators refuse.

NaN payloads are not compared (torch.equal never equates NaNs): a NaN must be a NaN at the same place, every other
value the same bits (zeros' signs included).
"""
import math

import pytest
import torch

import leanops
from helpers import DTYPES, provider_cases
from leanops.ops import MCF

# Triton's interpreter computes with numpy, which warns about the overflows and NaNs these tests are made of.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")

CASES = provider_cases(MCF)
KERNEL_CASES = [case for case in CASES if case.values[0] != "reference"]

mcf = leanops.mcf


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """NaN where the expected result is NaN; elsewhere the same bits (+0 and -0 differ)."""
    actual = actual.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{what}: NaN at other places"
    integer = {torch.float32: torch.int32, torch.float64: torch.int64}.get(expected.dtype, torch.int16)
    differ = (actual.view(integer) != expected.view(integer)) & ~nan
    assert not bool(differ.any()), (f"{what}: {int(differ.sum())} values differ, e.g. {actual[differ][:4].tolist()} "
                                    f"vs {expected[differ][:4].tolist()}")


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """NaN, the infinities, signed zeros, the largest finite values and their neighbours, the smallest normal and
    subnormal values, and ordinary numbers, in `dtype`."""
    info = torch.finfo(dtype)
    values = [math.nan, math.inf, -math.inf, 0.0, -0.0, info.max, -info.max, info.max / 2, info.max / 3,
              info.smallest_normal, info.tiny / 4 if dtype == torch.float32 else info.smallest_normal / 8,
              1.0, -1.5, 3.0, 1e3 if dtype != torch.float16 else 300.0, -7.25]
    if dtype != torch.float16:
        values += [8.5e34, -1e35, 3e37, 1.5e19]  # above 8e34 a Dekker split of float32 overflows
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def all_pairs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair of special values (a, b), flattened: a few hundred elements."""
    x = special_values(dtype)
    a, b = torch.meshgrid(x, x, indexing="ij")
    return a.reshape(-1).contiguous(), b.reshape(-1).contiguous()


@pytest.mark.parametrize("backend,device", KERNEL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["two_sum", "fast_two_sum", "two_prod"])
def test_binary_ops_special_values_same_on_every_provider(backend, device, dtype, op):
    a, b = all_pairs(dtype)
    expected = getattr(mcf, op)(a, b, backend="reference")
    actual = getattr(mcf, op)(a.to(device), b.to(device), backend=backend)
    for name, want, got in zip(("hi", "lo"), expected, actual):
        assert_same_values(got, want, f"{op} {backend} {dtype} {name}")


@pytest.mark.parametrize("backend,device", KERNEL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pair_ops_special_values_same_on_every_provider(backend, device, dtype):
    a, b = all_pairs(dtype)
    lo = torch.roll(b, 7) * torch.tensor(2.0 ** -10, dtype=dtype)  # NaN, infinities and ordinary low parts too
    grown = mcf.grow(a, lo, b, backend="reference")
    actual = mcf.grow(a.to(device), lo.to(device), b.to(device), backend=backend)
    for name, want, got in zip(("hi", "lo"), grown, actual):
        assert_same_values(got, want, f"grow {backend} {dtype} {name}")
    hi_in, lo_in = a.clone().to(device), lo.clone().to(device)
    mcf.grow_(hi_in, lo_in, b.to(device), backend=backend)
    assert_same_values(hi_in, grown[0], f"grow_ {backend} {dtype} hi")
    assert_same_values(lo_in, grown[1], f"grow_ {backend} {dtype} lo")
    b_lo = torch.roll(a, 3) * torch.tensor(2.0 ** -10, dtype=dtype)
    scaled = mcf.scale(a, lo, b, b_lo, backend="reference")
    actual = mcf.scale(a.to(device), lo.to(device), b.to(device), b_lo.to(device), backend=backend)
    for name, want, got in zip(("hi", "lo"), scaled, actual):
        assert_same_values(got, want, f"scale {backend} {dtype} {name}")
    merged = mcf.merge(a, lo, backend="reference")
    assert_same_values(mcf.merge(a.to(device), lo.to(device), backend=backend), merged, f"merge {backend} {dtype}")


@pytest.mark.parametrize("backend,device", KERNEL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_special_values_same_on_every_provider(backend, device, dtype):
    x = torch.cat([special_values(torch.float32), torch.tensor([3.4e38, -3.39e38, 7e4, 65519.0, 65520.0])])
    expected = mcf.split(x, dtype, backend="reference")
    actual = mcf.split(x.to(device), dtype, backend=backend)
    for name, want, got in zip(("hi", "lo"), expected, actual):
        assert_same_values(got, want, f"split {backend} {dtype} {name}")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_two_prod_overflow_gives_minus_p_as_error_term(backend, device, dtype):
    """The semantics stated in leanops.mcf.two_prod: an overflowing product of finite operands gives p = +-inf and
    e = -p (for bfloat16 the float32 product overflows too; it once gave NaN on the reference); an infinite
    operand gives e = NaN."""
    big = torch.finfo(dtype).max
    a = torch.tensor([big, -big, big, math.inf, 2.0], dtype=dtype)
    b = torch.tensor([2.0, 3.0, -big, 2.0, -math.inf], dtype=dtype)
    p, e = mcf.two_prod(a.to(device), b.to(device), backend=backend)
    assert p.cpu().tolist() == [math.inf, -math.inf, -math.inf, math.inf, -math.inf]
    assert e.cpu()[:3].tolist() == [-math.inf, math.inf, math.inf]
    assert bool(torch.isnan(e.cpu()[3:]).all())


@pytest.mark.parametrize("backend,device", CASES)
def test_two_prod_large_float32_operands_triton(backend, device):
    """Finite float32 operands above 8e34 (where a Dekker split overflows: Triton's interpreter once gave NaN) give
    the exact product on every provider, and scale with them the right pair."""
    generator = torch.Generator().manual_seed(torch.seed())
    a = (1 + torch.rand(257, generator=generator, dtype=torch.float64)) * 1e35
    b = (1 + torch.rand(257, generator=generator, dtype=torch.float64)) * 1e-3
    a, b = a.float(), b.float()
    p, e = mcf.two_prod(a.to(device), b.to(device), backend=backend)
    assert bool(torch.isfinite(p).all() and torch.isfinite(e).all())
    assert torch.equal(p.cpu(), a * b)
    exact = a.double() * b.double()
    assert torch.equal(p.cpu().double() + e.cpu().double(), exact), "p + e is the exact product"
    hi, lo = mcf.scale(a.to(device), torch.zeros_like(a).to(device), b.to(device), torch.zeros_like(b).to(device),
                       backend=backend)
    want_hi, want_lo = mcf.scale(a, torch.zeros_like(a), b, torch.zeros_like(b), backend="reference")
    assert bool(torch.isfinite(hi).all())
    assert_same_values(hi, want_hi, "scale hi")
    assert_same_values(lo, want_lo, "scale lo")


# ---------------------------------------------------------------------------------------------------------------
# In place: torch's own refusals, on every provider, before any kernel runs.

@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("which", ["hi", "lo"])
def test_grow_refuses_leaf_requiring_grad(backend, device, which):
    hi = torch.randn(8, device=device)
    lo = torch.zeros(8, device=device)
    v = torch.randn(8, device=device)
    target = hi if which == "hi" else lo
    target.requires_grad_()
    untouched = (hi.detach().clone(), lo.detach().clone())
    with pytest.raises(RuntimeError, match=rf"argument '{which}': a leaf Variable that requires grad is being used "
                                           r"in an in-place operation\."):
        mcf.grow_(hi, lo, v, backend=backend)
    assert torch.equal(hi.detach(), untouched[0]) and torch.equal(lo.detach(), untouched[1]), "a refused call wrote"
    base = torch.randn(16, device=device, requires_grad=True)
    view = base[:8]
    with pytest.raises(RuntimeError, match=r"a view of a leaf Variable that requires grad is being used"):
        mcf.grow_(view, lo.detach(), v, backend=backend)
    with torch.no_grad():  # as torch's in-place operators: allowed without grad mode
        mcf.grow_(hi, lo, v, backend=backend)
    expected = mcf.grow(untouched[0], untouched[1], v, backend="reference")
    assert torch.equal(hi.detach(), expected[0]) and torch.equal(lo.detach(), expected[1])
