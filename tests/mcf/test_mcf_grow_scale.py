"""Grow, scale, split and merge: accumulation and decay that plain low precision cannot do, normalisation, and
bit-for-bit agreement of every backend with the reference."""
import pytest
import torch

import leanops
from helpers import DTYPES, assert_bitwise_equal, provider_cases, slow_when_interpreted, spread_values, ulp
from leanops.ops import MCF

CASES = provider_cases(MCF)
# 1,000 launches in a row: under Triton's interpreter each test takes half a minute (slow there). Every Triton kernel
# is held bit for bit to the reference by test_pair_ops_match_the_reference_bit_for_bit, so step by step it
# accumulates exactly as the reference does.
LOOP_CASES = slow_when_interpreted(CASES)


def _generator(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() + offset)


@pytest.mark.parametrize("backend,device", LOOP_CASES)
def test_grow_accumulates_what_bfloat16_rounds_away(backend, device):
    """1,000 updates of relative size about 1e-4 (a fresh magnitude in [0.5e-4, 1.5e-4] each step, as gradients
    vary in training): the pair realises the float64 change within 1%; plain bfloat16 addition realises none of it
    (each update is below half an ulp)."""
    generator = _generator()
    start = spread_values(4096, -3, 3, generator).to(torch.bfloat16)
    hi, lo = start.clone().to(device), torch.zeros_like(start).to(device)
    plain = start.clone()
    intended = torch.zeros_like(start, dtype=torch.float64)
    for _ in range(1000):
        update = (start.double() * 1e-4 * (0.5 + torch.rand(4096, generator=generator))).to(torch.bfloat16)
        leanops.mcf.grow_(hi, lo, update.to(device), backend=backend)
        plain = plain + update
        intended += update.double()
    realised = (hi.double() + lo.double()).cpu() - start.double()
    relative_miss = ((realised - intended).abs() / intended.abs()).max().item()
    assert relative_miss <= 0.01, f"grow realised the intended change only within {relative_miss:.3%}"
    assert torch.equal(plain, start), "plain bfloat16 accumulation was expected to realise none of the change"
    assert bool((lo.double().abs().cpu() <= ulp(hi.cpu()) / 2).all()), "|lo| <= ulp(hi) / 2"


@pytest.mark.parametrize("backend,device", LOOP_CASES)
def test_grow_with_a_constant_update_stays_within_its_rounding_bound(backend, device):
    """The adversarial case: the same update 1,000 times. A bfloat16 pair resolves hi + lo only to ulp(lo)/2, up to
    2^-17 of hi, and with a constant update that rounding error repeats with the same sign step after step, so the
    realised change can miss by a few percent for unlucky starting values (3.5% is the worst seen; varied updates,
    above, average it out). It must still land within 5%, where plain bfloat16 realises nothing."""
    start = spread_values(4096, -3, 3, _generator(9)).to(torch.bfloat16)
    update = (start.double() * 1e-4).to(torch.bfloat16)
    hi, lo = start.clone().to(device), torch.zeros_like(start).to(device)
    for _ in range(1000):
        leanops.mcf.grow_(hi, lo, update.to(device), backend=backend)
    realised = (hi.double() + lo.double()).cpu() - start.double()
    intended = 1000 * update.double()
    relative_miss = ((realised - intended).abs() / intended.abs()).max().item()
    assert relative_miss <= 0.05, f"grow realised the intended change only within {relative_miss:.3%}"


@pytest.mark.parametrize("backend,device", LOOP_CASES)
def test_scale_decays_by_split_beta2(backend, device):
    """beta2 = 0.999 rounds to 1.0 in bfloat16, so plain bfloat16 never decays; the split pair decays 1,000 times
    within 2e-3 relative of float64."""
    start = spread_values(4096, -10, 10, _generator(1)).to(torch.bfloat16)
    b_hi, b_lo = leanops.mcf.split(torch.tensor(0.999, device=device), torch.bfloat16, backend=backend)
    assert b_hi.item() == 1.0 and b_lo.item() < 0
    hi, lo = start.clone().to(device), torch.zeros_like(start).to(device)
    plain = start.clone()
    for _ in range(1000):
        hi, lo = leanops.mcf.scale(hi, lo, b_hi, b_lo, backend=backend)
        plain = plain * torch.tensor(0.999).to(torch.bfloat16)
    expected = start.double() * 0.999 ** 1000
    relative_error = (((hi.double() + lo.double()).cpu() - expected).abs() / expected.abs()).max().item()
    assert relative_error <= 2e-3, f"pair decayed with relative error {relative_error:.2e}"
    assert torch.equal(plain, start), "plain bfloat16 was expected not to decay"


def _pair_inputs(n: int, dtype: torch.dtype, generator: torch.Generator):
    """A normalised pair (hi, lo), an addend v over several binades, and a multiplier pair."""
    wide = spread_values(n, -6, 6, generator).to(torch.float32)
    hi, lo = leanops.mcf.split(wide, dtype, backend="reference")
    v = (spread_values(n, -6, 6, generator) * torch.exp2(-torch.randint(0, 20, (n,), generator=generator))).to(dtype)
    b_hi, b_lo = leanops.mcf.split(torch.rand(n, generator=generator) + 0.5, dtype, backend="reference")
    return hi, lo, v, b_hi, b_lo


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 777, 5000])
@pytest.mark.gpu_check
def test_pair_ops_match_the_reference_bit_for_bit(backend, device, dtype, n):
    hi, lo, v, b_hi, b_lo = _pair_inputs(n, dtype, _generator(n))
    on = {name: t.to(device) for name, t in dict(hi=hi, lo=lo, v=v, b_hi=b_hi, b_lo=b_lo).items()}

    expected = leanops.mcf.grow(hi, lo, v, backend="reference")
    actual = leanops.mcf.grow(on["hi"], on["lo"], on["v"], backend=backend)
    for a, e, what in zip(actual, expected, ("grow hi", "grow lo")):
        assert_bitwise_equal(a.cpu(), e, what)
    assert bool((expected[1].double().abs() <= ulp(expected[0]) / 2).all()), "grow leaves |lo| <= ulp(hi) / 2"

    in_place_hi, in_place_lo = on["hi"].clone(), on["lo"].clone()
    leanops.mcf.grow_(in_place_hi, in_place_lo, on["v"], backend=backend)
    assert_bitwise_equal(in_place_hi.cpu(), expected[0], "grow_ hi")
    assert_bitwise_equal(in_place_lo.cpu(), expected[1], "grow_ lo")

    expected = leanops.mcf.scale(hi, lo, b_hi, b_lo, backend="reference")
    actual = leanops.mcf.scale(on["hi"], on["lo"], on["b_hi"], on["b_lo"], backend=backend)
    for a, e, what in zip(actual, expected, ("scale hi", "scale lo")):
        assert_bitwise_equal(a.cpu(), e, what)
    # A single-element multiplier broadcasts.
    expected = leanops.mcf.scale(hi, lo, b_hi[:1], b_lo[:1], backend="reference")
    actual = leanops.mcf.scale(on["hi"], on["lo"], on["b_hi"][:1], on["b_lo"][:1], backend=backend)
    for a, e, what in zip(actual, expected, ("scalar scale hi", "scalar scale lo")):
        assert_bitwise_equal(a.cpu(), e, what)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_and_merge(backend, device, dtype):
    # float16's narrow exponent range: keep lo = x - hi out of the subnormals, where it would lose precision.
    low, high = (-2, 12) if dtype == torch.float16 else (-12, 12)
    x = spread_values(3001, low, high, _generator(3)).to(torch.float32)
    hi, lo = leanops.mcf.split(x.to(device), dtype, backend=backend)
    hi, lo = hi.cpu(), lo.cpu()
    assert hi.dtype == dtype and lo.dtype == dtype
    assert_bitwise_equal(hi, x.to(dtype), "hi is x rounded to the dtype")
    assert_bitwise_equal(lo, (x.double() - hi.double()).to(dtype), "lo is the rest, rounded")
    merged = leanops.mcf.merge(hi.to(device), lo.to(device), backend=backend).cpu()
    assert merged.dtype == torch.float32
    assert_bitwise_equal(merged, (hi.double() + lo.double()).to(torch.float32), "merge is the nearest float32")
    if dtype == torch.float32:
        assert_bitwise_equal(merged, x, "a float32 pair gives x back")
    else:
        # A pair holds 2 x (format precision) significant bits of x.
        bits = 16 if dtype == torch.bfloat16 else 22
        assert bool(((merged.double() - x.double()).abs() <= x.double().abs() * 2.0 ** -bits).all())


@pytest.mark.parametrize("backend,device", CASES)
def test_grow_into_strided_destinations(backend, device):
    """In place through a non-contiguous view: the strided elements get the result, the others stay."""
    hi, lo, v, _, _ = _pair_inputs(64, torch.bfloat16, _generator(4))
    expected = leanops.mcf.grow(hi[::2], lo[::2], v[::2], backend="reference")
    hi_d, lo_d, v_d = hi.clone().to(device), lo.clone().to(device), v.to(device)
    leanops.mcf.grow_(hi_d[::2], lo_d[::2], v_d[::2], backend=backend)
    assert_bitwise_equal(hi_d[::2].cpu(), expected[0], "strided grow_ hi")
    assert_bitwise_equal(lo_d[::2].cpu(), expected[1], "strided grow_ lo")
    assert_bitwise_equal(hi_d[1::2].cpu(), hi[1::2], "untouched hi")
    assert_bitwise_equal(lo_d[1::2].cpu(), lo[1::2], "untouched lo")
