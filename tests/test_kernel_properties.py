"""Property tests of the non-loss families (issue 15): the MCF arithmetic (leanops.mcf), CollageAdamW's step and
FRUGAL's split step, on every CPU provider (Triton under its interpreter), with random awkward shapes, dtypes,
options and special values (NaN, +-inf, huge, tiny and subnormal, signed zeros), with one rule: **right, or a clear
error — never silently different**.

For each drawn case the call either raises a ValueError/TypeError naming an argument ("argument '...'"), or

- every kernel provider gives the reference provider's bits: NaN at the same places (any payload), every other value
  the same bits, signed zeros included (the "same bits" promise of leanops.mcf, leanops.reference.collage and
  leanops.reference.frugal). For the MCF ops and Collage this is checked through the public functions and the
  optimizer; for FRUGAL at the primitive ``frugal_split_step_`` (the optimizer on the kernels follows the reference
  backend, torch.optim.AdamW's operations, to float32 rounding only: README and leanops.optim.frugal's docstring),
  and the optimizer on the kernels is held to the reference backend within float32 rounding, non-finite exactly
  where it is non-finite, and to the other kernel bit for bit;
- the reference itself is right against exact (rational, through float64) arithmetic where python/leanops/mcf.py
  promises exactness (TwoSum, Fast2Sum under its contract |a| >= |b|, TwoProd unless its error term underflows,
  Grow, Scale, split, merge), and follows that docstring's stated semantics where the result overflows or an
  operand is not finite (NaN in gives NaN out; the sums' error term is NaN when the sum is infinite; two_prod's is
  -p for an overflowing product of finite operands; an overflowing Scale gives (NaN, NaN)).

Where the code differs from its documentation, the test says so next to the check and the difference is reported:
Fast2Sum and Grow overflowing in their final Fast2Sum give (+-inf, -+inf) (as mcf.py now states), the reference's
results follow torch's layout rules (only the kernels promise contiguous results), and the FRUGAL
reference backend's lerp turns an infinite moment into NaN where the kernels keep it infinite (the moments are held
to being non-finite at the same places).

The example budget is fixed and the draws derandomized so CI stays fast and reproducible: LEANOPS_PROPERTY_EXAMPLES
(default 20 per test and provider) raises it, e.g. LEANOPS_PROPERTY_EXAMPLES=500 for a long sweep.
"""
import math
import os
from fractions import Fraction

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import leanops  # noqa: E402
from helpers import provider_cases, require_backend  # noqa: E402
from leanops.ops import COLLAGE, FRUGAL, MCF  # noqa: E402
from leanops.reference import frugal as frugal_oracle  # noqa: E402

EXAMPLES = int(os.environ.get("LEANOPS_PROPERTY_EXAMPLES", "20"))
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(HealthCheck))

# Triton's interpreter computes with numpy, which warns about the overflows and NaNs these tests are made of.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

mcf = leanops.mcf
CPU_MCF = provider_cases(MCF, devices=("cpu",))
CPU_COLLAGE = provider_cases(COLLAGE, devices=("cpu",))
CPU_FRUGAL = provider_cases(FRUGAL, devices=("cpu",))
CPU_FRUGAL_KERNELS = provider_cases(FRUGAL, devices=("cpu",), backends_=("cpu", "triton"))
SIXTEEN_BIT = (torch.bfloat16, torch.float16)
# Significand bits (the implicit one included) of each dtype.
DIGITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}


# ---------------------------------------------------------------------------------------------------------------
# Shared draws and comparisons.

def _specials(dtype: torch.dtype) -> list:
    """NaN, the infinities, signed zeros, the largest finite values and a neighbour, the smallest normal, a
    subnormal, and a value just above the point where Dekker's splitting of a float32 overflows (8.5e34)."""
    info = torch.finfo(dtype)
    specials = [math.nan, math.inf, -math.inf, 0.0, -0.0, info.max, -info.max, info.max / 3, info.smallest_normal,
                -info.smallest_normal / 8]
    if dtype not in (torch.float16,):
        specials.append(-8.5e34)
    return specials


@st.composite
def _values(draw, shape, dtype: torch.dtype, specials: bool = True, binades: int = 12):
    """A tensor of `dtype` and `shape`: random signs, significands and binary exponents within +-`binades` of 1 (and
    of the exponent a draw picks), a few entries replaced by special values."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    n = math.prod(shape)
    center = draw(st.sampled_from([0, 0, -20, 20])) if dtype != torch.float16 else 0
    significand = 1.0 + torch.rand(n, dtype=torch.float64, generator=generator)
    exponent = torch.randint(-binades, binades + 1, (n,), generator=generator).double() + center
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    values = sign * significand * torch.exp2(exponent)
    if specials and n and draw(st.booleans()):
        table = _specials(dtype)
        for _ in range(draw(st.integers(1, 4))):
            values[draw(st.integers(0, n - 1))] = draw(st.sampled_from(table))
    return values.to(dtype).reshape(shape)


# Awkward shapes: 0-d, one element, lengths around the kernels' vector widths and blocks (8, 128, 1024), 2-d.
MCF_SHAPES = [(), (1,), (2,), (7,), (9,), (127,), (129,), (1025,), (3, 5), (1, 13), (17, 9), (2, 3, 4)]


def _layout(data, t: torch.Tensor) -> torch.Tensor:
    """`t` as it is, or a non-contiguous view with its values (every other element of a wider tensor, or a
    transpose), as the draw chooses."""
    t = t.clone()  # a view of t would not be a copy where a dimension has size 1
    if t.dim() == 0:
        return t
    kind = data.draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    if kind == "strided":
        wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    return t


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same dtype and shape, NaN where the expected result is NaN (any payload), elsewhere the same bits (+0 and -0
    differ)."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.reshape(-1), expected.reshape(-1)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), (f"{what}: NaN at other places: {actual[nan ^ torch.isnan(actual)]}"
                                                   f" against {expected[nan ^ torch.isnan(actual)]}")
    integer = {torch.float64: torch.int64, torch.float32: torch.int32}.get(expected.dtype, torch.int16)
    differ = (actual.view(integer) != expected.view(integer)) & ~nan
    assert not bool(differ.any()), (f"{what}: {int(differ.sum())} of {differ.numel()} values differ, e.g. "
                                    f"{actual[differ][:4].tolist()} vs {expected[differ][:4].tolist()}")


def _fractions(t: torch.Tensor) -> list:
    """The exact values of t's elements (None for a non-finite one)."""
    return [Fraction(x) if math.isfinite(x) else None for x in t.detach().double().reshape(-1).tolist()]


def _flat(t: torch.Tensor) -> list:
    return t.detach().double().reshape(-1).tolist()


def _rounded(value: Fraction, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype` (to nearest even). Python rounds a Fraction to float64 correctly; the values
    rounded here (a sum or product of two numbers of a <= 24-bit dtype) are exact in float64, or so far from a
    midpoint of the dtype that the second rounding cannot move them."""
    return torch.tensor(float(value), dtype=torch.float64).to(dtype).double().item()


def _ulp(x: float, dtype: torch.dtype) -> Fraction:
    """The unit in the last place of |x| in `dtype` (subnormal spacing below the normal range)."""
    info = torch.finfo(dtype)
    exponent = max(math.frexp(abs(x))[1] - 1, int(math.log2(info.smallest_normal))) if x else int(
        math.log2(info.smallest_normal))
    return Fraction(2) ** (exponent - DIGITS[dtype] + 1)


def _subnormal_unit(dtype: torch.dtype) -> Fraction:
    return Fraction(2) ** (int(math.log2(torch.finfo(dtype).smallest_normal)) - DIGITS[dtype] + 1)


def _mcf_dtypes(backend: str) -> list:
    """The dtypes `backend` serves (leanops.ops.MCF's declaration): float64 on the reference only."""
    return list(MCF.provider(backend).dtypes)


def _assert_nan_out(inputs: list, outputs: list, what: str) -> None:
    """NaN in gives NaN out: every output is NaN wherever an input is (inputs broadcast against the outputs)."""
    shape = outputs[0].shape
    nan_in = torch.zeros(shape, dtype=torch.bool)
    for t in inputs:
        nan_in |= torch.isnan(t.detach().cpu()).expand(shape) if t.dim() else torch.isnan(t).expand(shape)
    for index, out in enumerate(outputs):
        assert bool(torch.isnan(out.cpu())[nan_in].all()), f"{what}: output {index} is not NaN where an input is"


# ---------------------------------------------------------------------------------------------------------------
# MCF: two_sum, fast_two_sum, two_prod.

def _check_sum_math(op: str, a, b, s, e, ordered: bool) -> None:
    """The reference's (s, e) against exact arithmetic (module docstring of python/leanops/mcf.py)."""
    dtype = a.dtype
    for i, (x, y, sv, ev) in enumerate(zip(_fractions(a), _fractions(b), _flat(s), _flat(e))):
        if x is None or y is None:
            # An infinite or NaN operand: the leading result is +-inf or NaN, the error term NaN.
            assert not math.isfinite(sv) and math.isnan(ev), f"{op}: element {i} of a non-finite operand: {sv}, {ev}"
            continue
        exact = x + y
        if not math.isfinite(sv):
            # The sum overflows: +-inf, and the error term is NaN (the docstring's "inf - inf").
            assert abs(exact) >= Fraction(torch.finfo(dtype).max), f"{op}: element {i}: {sv} for a finite sum"
            assert math.isinf(sv), f"{op}: element {i}: an overflowing sum gives ({sv}, {ev})"
            if op == "two_sum":
                assert math.isnan(ev), f"two_sum: element {i}: an overflowing sum gives ({sv}, {ev})"
            else:
                # Fast2Sum's IEEE math, e = b - (s - a) = b - inf = -s (mcf.py: "the algorithms' own IEEE float
                # math, no special cases"); its special-values list says NaN for fast_two_sum too (reported).
                assert ev == -sv, f"fast_two_sum: element {i}: an overflowing sum gives ({sv}, {ev})"
            continue
        assert sv == _rounded(exact, dtype), f"{op}: element {i}: s = {sv} is not fl({float(x)} + {float(y)})"
        if op == "two_sum" or ordered:
            assert math.isfinite(ev) and Fraction(sv) + Fraction(ev) == exact, (
                f"{op}: element {i}: {float(x)!r} + {float(y)!r} != {sv!r} + {ev!r}")


def _check_product_math(a, b, p, e) -> None:
    dtype = a.dtype
    for i, (x, y, pv, ev) in enumerate(zip(_fractions(a), _fractions(b), _flat(p), _flat(e))):
        if x is None or y is None:
            assert math.isnan(ev), f"two_prod: element {i}: an infinite or NaN operand gives e = {ev}, not NaN"
            continue
        exact = x * y
        if not math.isfinite(pv):
            # Finite operands whose product overflows: p = +-inf and e = -p.
            assert math.isinf(pv) and ev == -pv, f"two_prod: element {i}: an overflowing product gives ({pv}, {ev})"
            continue
        if dtype != torch.float64:
            assert pv == _rounded(exact, dtype), f"two_prod: element {i}: p = {pv} is not fl({float(x)} * {float(y)})"
        assert math.isfinite(ev), f"two_prod: element {i}: e = {ev} for {float(x)!r} * {float(y)!r}"
        # e = a b - p exactly, unless it underflows (then within the subnormal spacing).
        error = abs(Fraction(pv) + Fraction(ev) - exact)
        assert error == 0 or error <= _subnormal_unit(dtype), (
            f"two_prod: element {i}: {float(x)!r} * {float(y)!r} != {pv!r} + {ev!r} (off by {float(error)})")


@pytest.mark.parametrize("backend,device", CPU_MCF)
def test_mcf_binary_ops_property(backend, device):
    require_backend(backend, device)

    @PROPERTY_SETTINGS
    @given(data=st.data())
    def check(data):
        op = data.draw(st.sampled_from(["two_sum", "fast_two_sum", "two_prod"]))
        dtype = data.draw(st.sampled_from(_mcf_dtypes(backend)))
        shape = data.draw(st.sampled_from(MCF_SHAPES))
        a, b = data.draw(_values(shape, dtype)), data.draw(_values(shape, dtype))
        # fast_two_sum's contract is |a| >= |b| (its error term may be inexact otherwise): ordered draws keep it.
        ordered = op == "fast_two_sum" and data.draw(st.booleans())
        if ordered:
            swap = a.abs() < b.abs()
            a, b = torch.where(swap, b, a), torch.where(swap, a, b)
        function = getattr(mcf, op)
        got = function(_layout(data, a), _layout(data, b), backend=backend)
        want = function(a.clone(), b.clone(), backend="reference")
        for name, g, w in zip(("hi", "lo"), got, want):
            assert_same_values(g, w, f"{op} {backend} {dtype} {tuple(shape)}: {name}")
        _assert_nan_out([a, b], list(want), op)
        if op == "two_prod":
            _check_product_math(a, b, *want)
        else:
            _check_sum_math(op, a, b, *want, ordered)

    check()


# ---------------------------------------------------------------------------------------------------------------
# MCF: grow, grow_, scale.

@st.composite
def _pair(draw, shape, dtype):
    """(hi, lo): a normalised pair (|lo| <= ulp(hi) / 2, the ends included), or, on some draws, an arbitrary one."""
    hi = draw(_values(shape, dtype))
    if draw(st.integers(0, 4)) == 0:
        return hi, draw(_values(shape, dtype)), False
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    half_ulp = torch.tensor([float(_ulp(x, dtype)) / 2 if math.isfinite(x) else 0.0 for x in _flat(hi)],
                            dtype=torch.float64).reshape(shape)
    fraction = torch.rand(shape, dtype=torch.float64, generator=generator) * 2 - 1
    if draw(st.booleans()):  # the ends: lo = +-ulp(hi) / 2 exactly
        fraction = torch.where(fraction > 0, 1.0, -1.0).double()
    lo = (half_ulp * fraction).to(dtype)
    return hi, lo, True


def _check_grow_math(hi, lo, v, new_hi, new_lo, normalized: bool) -> None:
    """Grow: (s, e) = TwoSum(hi, v); (hi', lo') = Fast2Sum(s, fl(e + lo)): hi' + lo' is hi + lo + v but for the one
    rounding of e + lo, and |lo'| <= ulp(hi') / 2; an infinite leading result has a NaN error term."""
    dtype = hi.dtype
    unit = Fraction(1, 2 ** DIGITS[dtype])
    for i, (h, l, w, nh, nl) in enumerate(zip(_fractions(hi), _fractions(lo), _fractions(v), _flat(new_hi),
                                              _flat(new_lo))):
        if h is None or l is None or w is None:
            assert not math.isfinite(nh) and math.isnan(nl), f"grow: element {i}: non-finite input gives {nh}, {nl}"
            continue
        if not (math.isfinite(nh) and math.isfinite(nl)):
            # An overflow of finite inputs, by the algorithm's IEEE math (mcf.py: "no special cases"): in TwoSum
            # (s = +-inf, e = NaN) it gives (NaN, NaN); in the final Fast2Sum (s + fl(e + lo) rounds past the
            # largest finite value) (+-inf, -+inf). (mcf.py's special-values list says "(+-inf, NaN)": reported.)
            assert abs(h + l + w) >= Fraction(torch.finfo(dtype).max) / 2, (
                f"grow: element {i}: ({float(h)!r}, {float(l)!r}) + {float(w)!r} gives ({nh}, {nl})")
            assert (math.isnan(nh) and math.isnan(nl)) or (math.isinf(nh) and nl == -nh), (
                f"grow: element {i}: ({float(h)!r}, {float(l)!r}) + {float(w)!r} overflows to ({nh}, {nl})")
            continue
        if not normalized:
            continue
        s = _rounded(h + w, dtype)
        e = h + w - Fraction(s)
        error = abs(Fraction(nh) + Fraction(nl) - (h + l + w))
        assert error <= unit * abs(e + l) + _subnormal_unit(dtype), (
            f"grow: element {i}: ({float(h)!r}, {float(l)!r}) + {float(w)!r} = ({nh!r}, {nl!r}) is off by "
            f"{float(error)}")
        assert abs(Fraction(nl)) <= _ulp(nh, dtype) / 2, f"grow: element {i}: |lo'| = {nl} > ulp({nh}) / 2"


def _check_scale_math(hi, lo, b_hi, b_lo, new_hi, new_lo, normalized: bool) -> None:
    """Scale (Dekker's mul2): (hi', lo') ~ (hi + lo)(b_hi + b_lo) without lo b_lo; an overflowing product hi b_hi of
    finite operands gives (NaN, NaN)."""
    dtype = hi.dtype
    unit = Fraction(1, 2 ** DIGITS[dtype])
    b_hi, b_lo = b_hi.expand(hi.shape), b_lo.expand(hi.shape)
    largest = Fraction(torch.finfo(dtype).max)
    for i, (h, l, bh, bl, nh, nl) in enumerate(zip(_fractions(hi), _fractions(lo), _fractions(b_hi), _fractions(b_lo),
                                                   _flat(new_hi), _flat(new_lo))):
        if None in (h, l, bh, bl):
            assert not (math.isfinite(nh) and math.isfinite(nl)), f"scale: element {i}: finite from non-finite"
            continue
        if abs(h * bh) >= largest + _ulp(float(largest), dtype) / 2:  # rounds to +-inf: the docstring's (NaN, NaN)
            assert math.isnan(nh) and math.isnan(nl), f"scale: element {i}: an overflowing product gives ({nh}, {nl})"
            continue
        if not (math.isfinite(nh) and math.isfinite(nl)):
            # Only where a product of the pairs' parts (an unnormalised pair's lo b_hi too) is about to overflow.
            assert max(abs(h * bh), abs(l * bh), abs(h * bl)) >= largest / 2, (
                f"scale: element {i}: ({float(h)!r}, {float(l)!r}) x ({float(bh)!r}, {float(bl)!r}) gives ({nh}, {nl})")
            continue
        if not normalized:
            continue
        p = Fraction(_rounded(h * bh, dtype))
        e = h * bh - p
        bound = abs(l * bl) + 4 * unit * (abs(e) + abs(h * bl) + abs(l * bh)) + 4 * _subnormal_unit(dtype)
        error = abs(Fraction(nh) + Fraction(nl) - (h + l) * (bh + bl))
        assert error <= bound, (f"scale: element {i}: ({float(h)!r}, {float(l)!r}) x ({float(bh)!r}, {float(bl)!r}) "
                                f"= ({nh!r}, {nl!r}) is off by {float(error)} > {float(bound)}")


@st.composite
def _multiplier(draw, shape, dtype):
    """(b_hi, b_lo, normalized): a split constant (0.999, 0.9, ... as Collage decays by), given as tensors of one
    element, tensors shaped like the pair, or exactly representable Python numbers; or special values."""
    kind = draw(st.sampled_from(["constant", "constant", "python", "tensor", "special"]))
    if kind == "tensor":
        b_hi, b_lo, normalized = draw(_pair(shape, dtype))
        return b_hi, b_lo, normalized
    if kind == "special":
        value = draw(st.sampled_from(_specials(dtype) + [1.0]))
        return torch.tensor(value, dtype=torch.float64).to(dtype), torch.zeros((), dtype=dtype), True
    constant = draw(st.sampled_from([0.999, 0.9, 0.95, 1e-3, 3.7, 1.0, 0.0, -0.5]))
    exact = Fraction(constant)
    high = torch.tensor(constant, dtype=torch.float64).to(dtype)
    low = torch.tensor(float(exact - Fraction(high.double().item())), dtype=torch.float64).to(dtype)
    if kind == "python":
        return high.item(), low.item(), True
    return high, low, True


@pytest.mark.parametrize("backend,device", CPU_MCF)
def test_mcf_pair_ops_property(backend, device):
    require_backend(backend, device)

    @PROPERTY_SETTINGS
    @given(data=st.data())
    def check(data):
        op = data.draw(st.sampled_from(["grow", "grow_", "scale"]))
        dtype = data.draw(st.sampled_from(_mcf_dtypes(backend)))
        shape = data.draw(st.sampled_from(MCF_SHAPES))
        hi, lo, normalized = data.draw(_pair(shape, dtype))
        if op == "scale":
            b_hi, b_lo, b_normalized = data.draw(_multiplier(shape, dtype))
            got = mcf.scale(_layout(data, hi), _layout(data, lo), b_hi, b_lo, backend=backend)
            want = mcf.scale(hi.clone(), lo.clone(), b_hi, b_lo, backend="reference")
        else:
            v = data.draw(_values(shape, dtype))
            want = mcf.grow(hi.clone(), lo.clone(), v.clone(), backend="reference")
            if op == "grow":
                got = mcf.grow(_layout(data, hi), _layout(data, lo), _layout(data, v), backend=backend)
            else:
                got = (_layout(data, hi), _layout(data, lo))  # written in place, through any strides
                returned = mcf.grow_(*got, _layout(data, v), backend=backend)
                assert returned[0] is got[0] and returned[1] is got[1], "grow_ returns its hi and lo"
        for name, g, w in zip(("hi", "lo"), got, want):
            assert_same_values(g, w, f"{op} {backend} {dtype} {tuple(shape)}: {name}")
        if op == "scale":
            as_tensor = [torch.as_tensor(b, dtype=dtype) for b in (b_hi, b_lo)]
            _assert_nan_out([hi, lo] + as_tensor, list(want), op)
            _check_scale_math(hi, lo, *as_tensor, *want, normalized and b_normalized)
        else:
            _assert_nan_out([hi, lo, v], list(want), op)
            _check_grow_math(hi, lo, v, *want, normalized)

    check()


# ---------------------------------------------------------------------------------------------------------------
# MCF: split and merge.

@pytest.mark.parametrize("backend,device", CPU_MCF)
def test_mcf_split_merge_property(backend, device):
    require_backend(backend, device)

    @PROPERTY_SETTINGS
    @given(data=st.data())
    def check(data):
        dtype = data.draw(st.sampled_from(list(leanops.mcf.KERNEL_DTYPES)))
        shape = data.draw(st.sampled_from(MCF_SHAPES))
        x = data.draw(_values(shape, torch.float32))
        hi, lo = mcf.split(_layout(data, x), dtype, backend=backend)
        want_hi, want_lo = mcf.split(x.clone(), dtype, backend="reference")
        assert_same_values(hi, want_hi, f"split {backend} {dtype}: hi")
        assert_same_values(lo, want_lo, f"split {backend} {dtype}: lo")
        merged = mcf.merge(_layout(data, hi), _layout(data, lo), backend=backend)
        assert_same_values(merged, mcf.merge(want_hi, want_lo, backend="reference"), f"merge {backend} {dtype}")
        # The math of the reference: hi = fl(x), lo = fl(x - hi); beyond the format's range (+-inf, -+inf);
        # merge = the float32 nearest to hi + lo; merge(split(x)) is x but for lo's rounding.
        unit = Fraction(1, 2 ** DIGITS[dtype])
        for i, (xv, h, l, m) in enumerate(zip(_flat(x), _flat(want_hi), _flat(want_lo), _flat(merged))):
            if math.isnan(xv):
                assert math.isnan(h) and math.isnan(l) and math.isnan(m), f"split/merge: element {i}: NaN lost"
                continue
            assert h == torch.tensor(xv, dtype=torch.float32).to(dtype).double().item(), f"split: element {i}"
            if math.isinf(xv):
                # An infinite x: (+-inf, NaN) by the IEEE math of lo = fl(x - hi) (inf - inf), NaN merged.
                assert math.isnan(l) and math.isnan(m), f"split/merge: element {i}: {xv} gives ({h}, {l}), {m}"
                continue
            if not math.isfinite(h):
                # A finite x beyond the format's range: (+-inf, -+inf) (the docstring); merged inf - inf = NaN.
                assert math.isinf(l) and l == -h and math.isnan(m), f"split: element {i}: {xv} gives ({h}, {l}), {m}"
                continue
            assert l == _rounded(Fraction(xv) - Fraction(h), dtype), f"split: element {i}: lo = {l} for {xv}"
            assert m == torch.tensor(float(Fraction(h) + Fraction(l)), dtype=torch.float64).float().item(), (
                f"merge: element {i}: {m} is not the float32 nearest to {h} + {l}")
            error = abs(Fraction(m) - Fraction(xv))
            bound = unit * abs(Fraction(xv) - Fraction(h)) + _ulp(xv, torch.float32) / 2 + _subnormal_unit(dtype)
            assert error <= bound, f"merge(split({xv!r}, {dtype})) = {m!r}"
            if dtype == torch.float32:
                assert m == xv and l == 0, f"float32 split/merge of {xv!r} is not the identity"

    check()


def test_float64_two_prod_of_huge_operands():
    """mcf.py: a * b == p + e exactly (unless e underflows), and an overflowing product of finite operands gives
    e = -p: also on the float64 reference, whose Dekker splitting works on operands scaled by 2^-54 beyond 2^995."""
    a = torch.tensor([-0.123, 1.7976931348623157e308], dtype=torch.float64)
    b = torch.tensor([1.7976931348623157e308, 4346.0], dtype=torch.float64)
    p, e = mcf.two_prod(a, b, backend="reference")
    assert math.isfinite(p[0].item()) and Fraction(p[0].item()) + Fraction(e[0].item()) == Fraction(a[0].item()) * \
        Fraction(b[0].item())
    assert math.isinf(p[1].item()) and e[1].item() == -p[1].item()


# python/leanops/mcf.py: the kernels return contiguous results (the reference follows torch's layout rules).
@pytest.mark.parametrize("backend,device", [case for case in CPU_MCF if case.values[0] != "reference"])
@pytest.mark.parametrize("op", ["two_sum", "fast_two_sum", "two_prod", "grow", "scale", "split", "merge"])
def test_mcf_results_are_contiguous(backend, device, op):
    require_backend(backend, device)
    a = torch.randn(5, 3).to(torch.bfloat16).t()
    arguments = {"grow": (a, a, a), "scale": (a, a, 1.0, 0.0), "split": (a.float(),), "merge": (a, a)}.get(op, (a, a))
    results = getattr(mcf, op)(*arguments, backend=backend)
    for result in results if isinstance(results, tuple) else (results,):
        assert result.is_contiguous(), f"{op}: a result of strides {result.stride()}"


# ---------------------------------------------------------------------------------------------------------------
# MCF: bad input gets a clear error naming the argument.

@pytest.mark.parametrize("backend,device", CPU_MCF)
def test_mcf_bad_input_names_the_argument(backend, device):
    require_backend(backend, device)

    @PROPERTY_SETTINGS
    @given(data=st.data())
    def check(data):
        op = data.draw(st.sampled_from(["two_sum", "fast_two_sum", "two_prod", "grow", "grow_", "scale", "merge",
                                        "split"]))
        dtype = data.draw(st.sampled_from(list(leanops.mcf.KERNEL_DTYPES)))
        shape = data.draw(st.sampled_from([(1,), (7,), (3, 5)]))
        arity = {"two_sum": 2, "fast_two_sum": 2, "two_prod": 2, "grow": 3, "grow_": 3, "scale": 4, "merge": 2,
                 "split": 1}[op]
        names = {"grow": ["hi", "lo", "v"], "grow_": ["hi", "lo", "v"], "scale": ["hi", "lo", "b_hi", "b_lo"],
                 "merge": ["hi", "lo"], "split": ["x"]}.get(op, ["a", "b"])
        arguments = [torch.ones(shape, dtype=torch.float32 if op == "split" else dtype) for _ in range(arity)]
        index = data.draw(st.integers(0, arity - 1))
        defect = data.draw(st.sampled_from(["dtype", "integer", "shape", "device", "not a tensor"]))
        bad = arguments[index]
        if defect == "dtype":
            other = [d for d in leanops.mcf.KERNEL_DTYPES if d != bad.dtype]
            bad = bad.to(data.draw(st.sampled_from(other)))
        elif defect == "integer":
            bad = bad.to(torch.int32)
        elif defect == "shape":
            bad = torch.ones((shape[0] + 1,) + shape[1:] if index else (2, 2, 2), dtype=bad.dtype)
        elif defect == "device":
            bad = bad.to("meta")
        else:
            bad = [1.0]
        if op == "split" and defect == "dtype" and bad.dtype == torch.float32:
            return
        if index == 0 and defect in ("shape", "device"):
            return  # the first tensor sets the shape and device the others are held to
        arguments[index] = bad
        # Another valid dtype for the first tensor: the next one is the one that does not match it.
        named = names[1] if index == 0 and defect == "dtype" and op != "split" else names[index]
        with pytest.raises((TypeError, ValueError), match=rf"argument '{named}'"):
            getattr(mcf, op)(*arguments, backend=backend)

    check()
    if backend != "reference":  # float64 is the reference's alone: said so, not silently served
        with pytest.raises(leanops.BackendUnavailableError, match="float64"):
            mcf.two_sum(torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), backend=backend)


# ---------------------------------------------------------------------------------------------------------------
# Collage: CollageAdamW's step on every provider gives the reference provider's bits.

COLLAGE_SHAPES = [(1,), (7,), (129,), (1031,), (3, 5), (13, 1), (2, 3, 2, 2), (1, 4, 3, 3)]


def _collage_parameters(data, dtype):
    """1-3 parameters of awkward shapes (a 4-d one in channels-last memory on some draws), with gradients drawn by
    `data` with special values, for steps 1-3."""
    count = data.draw(st.integers(1, 3))
    parameters = []
    for _ in range(count):
        shape = data.draw(st.sampled_from(COLLAGE_SHAPES))
        value = data.draw(_values(shape, dtype, specials=data.draw(st.integers(0, 4)) == 0, binades=4))
        if len(shape) == 4 and data.draw(st.booleans()):
            value = value.contiguous(memory_format=torch.channels_last)
        parameters.append(value)
    return parameters


def _gradient(data, shape, dtype):
    """A gradient: ordinary values at a drawn scale, with special values (NaN, +-inf, huge, tiny, zeros) on some
    draws, or all zeros."""
    kind = data.draw(st.sampled_from(["ordinary", "ordinary", "special", "zeros", "tiny", "huge"]))
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    binades = {"tiny": 4, "huge": 4}.get(kind, 6)
    g = data.draw(_values(shape, dtype, specials=kind == "special", binades=binades)).double()
    if kind == "tiny":
        g = g * torch.finfo(dtype).smallest_normal * 16
    if kind == "huge":
        g = g * torch.finfo(dtype).max / 64
    return g.to(dtype)


def _run_collage(backend, initial, gradients, options):
    parameters = [torch.nn.Parameter(p.clone(memory_format=torch.preserve_format)) for p in initial]
    optimizer = leanops.optim.CollageAdamW(parameters, backend=backend, **options)
    for step_gradients in gradients:
        for parameter, g in zip(parameters, step_gradients):
            parameter.grad = g.clone().to(memory_format=torch.contiguous_format)
        optimizer.step()
    return parameters, optimizer


@pytest.mark.parametrize("backend,device", CPU_COLLAGE)
def test_collage_step_property(backend, device):
    require_backend(backend, device)

    @PROPERTY_SETTINGS
    @given(data=st.data())
    def check(data):
        dtype = data.draw(st.sampled_from(SIXTEEN_BIT))
        initial = _collage_parameters(data, dtype)
        options = dict(lr=data.draw(st.sampled_from([0.0, 1e-4, 1e-3, 0.1, 1.0])),
                       betas=(data.draw(st.sampled_from([0.0, 0.5, 0.9])),
                              data.draw(st.sampled_from([0.0, 0.95, 0.999, 0.9999]))),
                       eps=data.draw(st.sampled_from([0.0, 1e-8, 1e-6, 1e-3])),
                       weight_decay=data.draw(st.sampled_from([0.0, 0.01, 0.1, 1.0])),
                       mode=data.draw(st.sampled_from(["light", "plus"])),
                       maximize=data.draw(st.integers(0, 4)) == 0)
        gradients = [[_gradient(data, p.shape, dtype) for p in initial] for _ in range(data.draw(st.integers(1, 3)))]
        got, optimizer = _run_collage(backend, initial, gradients, options)
        want, oracle = _run_collage("reference", initial, gradients, options)
        for index, (a, b) in enumerate(zip(got, want)):
            what = f"{backend} {dtype} {options} parameter {index} {tuple(a.shape)}"
            assert a.stride() == b.stride(), f"{what}: strides"
            assert_same_values(a, b, what)
            for key in ("param_lo", "exp_avg", "exp_avg_sq", "exp_avg_sq_lo"):
                mine, theirs = optimizer.state[a].get(key), oracle.state[b].get(key)
                assert (mine is None) == (theirs is None), f"{what}: state {key!r}"
                if mine is not None:
                    assert_same_values(mine, theirs, f"{what}: state {key!r}")
            assert optimizer.state[a]["step"] == oracle.state[b]["step"] == len(gradients)
            # NaN in gives NaN out: a NaN gradient leaves NaN in the parameter (through m, or the update).
            nan = torch.zeros(a.shape, dtype=torch.bool)
            for step_gradients in gradients:
                nan |= torch.isnan(step_gradients[index])
            if options["lr"] > 0 and options["betas"][0] < 1:
                assert bool(torch.isnan(a.detach())[nan].all()), f"{what}: a NaN gradient was dropped"

    check()


@pytest.mark.parametrize("backend,device", CPU_COLLAGE)
def test_collage_invalid_hyperparameters_name_the_argument(backend, device):
    require_backend(backend, device)

    @PROPERTY_SETTINGS
    @given(data=st.data())
    def check(data):
        name, value = data.draw(st.sampled_from([
            ("lr", -1e-3), ("lr", math.nan), ("lr", math.inf), ("lr", "0.1"), ("eps", -1e-8), ("eps", math.nan),
            ("weight_decay", -0.1), ("weight_decay", math.inf), ("betas", (1.0, 0.999)), ("betas", (0.9, -0.1)),
            ("betas", (0.9, math.nan)), ("betas", (0.9,)), ("betas", (0.9, 0.99, 0.999)), ("mode", "heavy"),
            ("mode", None)]))
        parameter = torch.nn.Parameter(torch.ones(5, dtype=data.draw(st.sampled_from(SIXTEEN_BIT))))
        with pytest.raises((ValueError, TypeError), match=rf"argument '{name}'"):
            leanops.optim.CollageAdamW([parameter], backend=backend, **{name: value})
        # The same in a group added later: refused, and not added.
        optimizer = leanops.optim.CollageAdamW([parameter], backend=backend)
        other = torch.nn.Parameter(torch.ones(3, dtype=parameter.dtype))
        with pytest.raises((ValueError, TypeError), match=rf"argument '{name}'"):
            optimizer.add_param_group({"params": [other], name: value})
        assert len(optimizer.param_groups) == 1

    check()


# ---------------------------------------------------------------------------------------------------------------
# FRUGAL: the primitive frugal_split_step_ on every kernel gives the oracle's bits.

FRUGAL_STATES = ("params", "params_lo", "exp_avgs", "exp_avg_sqs")


@st.composite
def _frugal_problem(draw, dtype, grad_dtype, compensated):
    """The primitive's arguments for 1-3 tensors of random modes and awkward shapes, with special values."""
    arguments = {key: [] for key in ("params", "params_lo", "exp_avgs", "exp_avg_sqs", "grads", "positions",
                                     "addends", "modes", "step_sizes", "roots")}
    for _ in range(draw(st.integers(1, 3))):
        mode = draw(st.sampled_from(frugal_oracle.MODES))
        rows, columns = draw(st.integers(1, 9)), draw(st.sampled_from([1, 2, 7, 13, 33]))
        shape = (rows, columns) if mode in (frugal_oracle.COLUMNS, frugal_oracle.ROWS) or draw(
            st.booleans()) else (rows * columns,)
        arguments["params"].append(draw(_values(shape, dtype, specials=draw(st.integers(0, 3)) == 0, binades=3)))
        if compensated:
            arguments["params_lo"].append((arguments["params"][-1].float() * 2.0 ** -(DIGITS[dtype] + 1)
                                           * (torch.rand(shape) * 2 - 1)).to(dtype))
        g = draw(_values(shape, grad_dtype, specials=draw(st.booleans()), binades=draw(st.sampled_from([2, 20]))))
        arguments["grads"].append(g)
        positions, moments = torch.empty(0, dtype=torch.int32), None
        if mode == frugal_oracle.ADAMW:
            moments = shape
        elif mode in (frugal_oracle.COLUMNS, frugal_oracle.ROWS):
            size = columns if mode == frugal_oracle.COLUMNS else rows
            indices = sorted(draw(st.sets(st.integers(0, size - 1), max_size=size)))
            positions = torch.full((size,), -1, dtype=torch.int32)
            positions[torch.tensor(indices, dtype=torch.long)] = torch.arange(len(indices), dtype=torch.int32)
            moments = (rows, len(indices)) if mode == frugal_oracle.COLUMNS else (len(indices), columns)
        if moments is None:
            arguments["exp_avgs"].append(torch.empty(0))
            arguments["exp_avg_sqs"].append(torch.empty(0))
        else:
            arguments["exp_avgs"].append(draw(_values(moments, torch.float32, specials=False, binades=6)))
            arguments["exp_avg_sqs"].append(draw(_values(moments, torch.float32, specials=False, binades=6)).abs())
        with_addend = mode == frugal_oracle.FREE and draw(st.booleans())
        arguments["addends"].append(draw(_values(shape, torch.float32, specials=False, binades=3)) * 1e-2
                                    if with_addend else torch.empty(0))
        arguments["positions"].append(positions)
        arguments["modes"].append(mode)
        arguments["step_sizes"].append(draw(st.sampled_from([0.0, 1e-3, 0.05, 1.0])))
        arguments["roots"].append(draw(st.sampled_from([1.0, 0.3, 0.0447])))
    scalars = dict(beta1=draw(st.sampled_from([0.0, 0.9])), beta2=draw(st.sampled_from([0.0, 0.999])),
                   eps=draw(st.sampled_from([0.0, 1e-8, 1e-3])), decay=draw(st.sampled_from([1.0, 1 - 1e-3, 0.5])),
                   free_lr=draw(st.sampled_from([0.0, 3e-3, 0.1])),
                   state_free=draw(st.sampled_from([frugal_oracle.SIGNSGD, frugal_oracle.SGD, frugal_oracle.NONE])))
    return arguments, scalars


def _frugal_call(backend, arguments, scalars):
    FRUGAL.provider(backend).operators.frugal_split_step_(
        arguments["params"], arguments["params_lo"], arguments["exp_avgs"], arguments["exp_avg_sqs"],
        arguments["grads"], arguments["positions"], arguments["addends"], arguments["modes"], arguments["step_sizes"],
        arguments["roots"], scalars["beta1"], scalars["beta2"], scalars["eps"], scalars["decay"], scalars["free_lr"],
        scalars["state_free"])


def _copied(arguments):
    return {key: [t.clone() for t in value] if key not in ("modes", "step_sizes", "roots") else list(value)
            for key, value in arguments.items()}


@pytest.mark.parametrize("backend,device", CPU_FRUGAL_KERNELS)
def test_frugal_primitive_property(backend, device):
    require_backend(backend, device)

    @PROPERTY_SETTINGS
    @given(data=st.data())
    def check(data):
        dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
        grad_dtype = data.draw(st.sampled_from(sorted({dtype, torch.float32}, key=str)))
        compensated = dtype in SIXTEEN_BIT and data.draw(st.booleans())
        expected, scalars = data.draw(_frugal_problem(dtype, grad_dtype, compensated))
        actual = _copied(expected)
        for step in range(data.draw(st.integers(1, 3))):
            if step:  # a fresh gradient; the state goes on from the last step's
                fresh = [data.draw(_values(g.shape, grad_dtype, specials=data.draw(st.booleans())))
                         for g in expected["grads"]]
                expected["grads"], actual["grads"] = fresh, [g.clone() for g in fresh]
            _frugal_call("reference", expected, scalars)
            _frugal_call(backend, actual, scalars)
            for key in FRUGAL_STATES:
                for index, (want, got) in enumerate(zip(expected[key], actual[key])):
                    assert_same_values(got, want, f"{backend} step {step} {key}[{index}] mode "
                                                  f"{expected['modes'][index]} {tuple(want.shape)} {scalars}")
        # NaN in gives NaN out: a NaN gradient of a state-free element makes its parameter NaN under signSGD/SGD
        # (leanops.reference.frugal: sign(NaN) is NaN).
        if scalars["state_free"] != frugal_oracle.NONE and scalars["free_lr"] > 0:
            for index, mode in enumerate(expected["modes"]):
                if mode == frugal_oracle.FREE:
                    nan = torch.isnan(expected["grads"][index])
                    assert bool(torch.isnan(expected["params"][index])[nan].all()), "a NaN gradient was dropped"

    check()


# ---------------------------------------------------------------------------------------------------------------
# FRUGAL: the optimizer on the kernels follows the reference backend (to float32 rounding), the kernels agree bit
# for bit, and bad options are refused by name.

def _frugal_options(data):
    projection = data.draw(st.sampled_from(["blockwise", "blockwise", "columns", "columns", "rows", "rows", "random",
                                            "svd"]))
    return dict(lr=data.draw(st.sampled_from([1e-3, 1e-2, 0.1])),
                betas=(data.draw(st.sampled_from([0.0, 0.9])), data.draw(st.sampled_from([0.9, 0.999]))),
                eps=data.draw(st.sampled_from([1e-8, 1e-6])),
                weight_decay=data.draw(st.sampled_from([0.0, 0.01, 0.1])),
                density=data.draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
                update_gap=data.draw(st.integers(1, 2)), projection=projection,
                block_order=data.draw(st.sampled_from(["random", "ascending", "descending"])),
                state_free=data.draw(st.sampled_from(["signsgd", "sgd", "none"])),
                on_switch=data.draw(st.sampled_from(["reset", "project"])), seed=data.draw(st.integers(0, 99)))


def _run_frugal(backend, initial, gradients, options):
    parameters = [torch.nn.Parameter(p.clone()) for p in initial]
    optimizer = leanops.optim.FRUGAL([{"params": parameters}], backend=backend, **options)
    changes = [torch.zeros(p.shape, dtype=torch.float64) for p in parameters]
    for step_gradients in gradients:
        before = [_frugal_value(p, optimizer) for p in parameters]
        for parameter, g in zip(parameters, step_gradients):
            parameter.grad = g.clone()
        optimizer.step()
        for change, parameter, old in zip(changes, parameters, before):
            change += (_frugal_value(parameter, optimizer) - old).abs().nan_to_num(0.0, 0.0, 0.0)
    return parameters, optimizer, changes


def _frugal_value(parameter, optimizer):
    """The parameter in float64, with its Collage compensation when it has one."""
    value = parameter.detach().double()
    low = optimizer.state.get(parameter, {}).get("param_lo")
    return value + low.double() if low is not None else value


def _assert_close_or_same_non_finite(actual, expected, tolerance, what):
    """Non-finite exactly where `expected` is (NaN where NaN, the same infinity), within `tolerance` elsewhere."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, what
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{what}: NaN at other places: {actual} against {expected}"
    infinite = torch.isinf(expected)
    assert torch.equal(torch.isinf(actual), infinite) and torch.equal(actual[infinite], expected[infinite]), (
        f"{what}: infinities at other places")
    finite = torch.isfinite(expected)
    error = (actual - expected).abs()[finite]
    allowed = torch.as_tensor(tolerance, dtype=torch.float64).expand(expected.shape)[finite]
    bad = error > allowed
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} values off by more than float32 rounding, e.g. "
                                 f"{actual[finite][bad][:3].tolist()} vs {expected[finite][bad][:3].tolist()}")


@pytest.mark.parametrize("backend,device", CPU_FRUGAL)
def test_frugal_optimizer_property(backend, device):
    require_backend(backend, device)
    others = [case.values[0] for case in CPU_FRUGAL_KERNELS
              if case.values[0] not in ("reference", backend) and FRUGAL.unavailable_reason(
                  case.values[0], torch.device("cpu")) is None]

    @PROPERTY_SETTINGS
    @given(data=st.data())
    def check(data):
        options = _frugal_options(data)
        precision = data.draw(st.sampled_from(["fp32", "collage"]))
        dtype = torch.float32 if precision == "fp32" else data.draw(st.sampled_from(SIXTEEN_BIT))
        if options["projection"] in ("random", "svd"):
            shapes = [(data.draw(st.integers(2, 7)), data.draw(st.integers(2, 7)))]  # slower: one small matrix
        else:
            shapes = [(data.draw(st.integers(1, 9)), data.draw(st.sampled_from([1, 3, 7, 13, 17])))
                      for _ in range(data.draw(st.integers(1, 3)))]
        initial = [data.draw(_values(shape, dtype, specials=False, binades=3)) for shape in shapes]
        # Enough steps for a switch at update_gap 1 or 2.
        steps = data.draw(st.integers(1, 3))
        gradients = []
        for _ in range(steps):
            special = options["projection"] not in ("svd",) and data.draw(st.integers(0, 3)) == 0
            gradients.append([data.draw(_values(shape, dtype, specials=special, binades=4)) for shape in shapes])
        options["precision"] = precision
        got, optimizer, _ = _run_frugal(backend, initial, gradients, options)
        if backend == "reference":
            # The reference backend's right-ness against AdamW and signSGD is tests/frugal/test_frugal_optimizer.py's;
            # here: NaN in gives NaN out for the state-free part, and nothing finite comes out of NaN.
            for index, parameter in enumerate(got):
                nan = torch.zeros(parameter.shape, dtype=torch.bool)
                for step_gradients in gradients:
                    nan |= torch.isnan(step_gradients[index])
                if options["state_free"] != "none" and options["density"] == 0.0 and options["lr"] > 0:
                    assert bool(torch.isnan(parameter.detach())[nan].all()), "a NaN gradient was dropped"
            return
        want, oracle, changes = _run_frugal("reference", initial, gradients, options)
        rounding = torch.finfo(dtype).eps  # a 16-bit update may round the other way: one ulp of each step's change
        for index, (a, b) in enumerate(zip(got, want)):
            what = f"{backend} vs reference, {options} parameter {index} {tuple(a.shape)} {dtype}"
            _assert_close_or_same_non_finite(_frugal_value(a, optimizer), _frugal_value(b, oracle),
                                             1e-5 * _frugal_value(b, oracle).abs().nan_to_num(0.0, 0.0, 0.0) + 1e-6
                                             + (rounding * changes[index] if dtype in SIXTEEN_BIT else 0.0), what)
            for key in ("exp_avg", "exp_avg_sq"):
                mine, theirs = optimizer.state.get(a, {}).get(key), oracle.state.get(b, {}).get(key)
                assert (mine is None) == (theirs is None), f"{what}: state {key!r}"
                if mine is not None:
                    # The reference backend is torch.optim.AdamW's operations (FRUGAL's docstring): its
                    # exp_avg.lerp_(g, 1 - beta1) turns an infinite moment into NaN at the next finite gradient
                    # (inf + w (g - inf)), where the kernels' beta1 m + (1 - beta1) g (leanops.reference.frugal)
                    # keeps it infinite. The moments are held to being non-finite at the same places, the
                    # parameters (above) to NaN at the same places (reported as a difference to decide on).
                    mine, theirs = mine.double().cpu(), theirs.double().cpu()
                    assert torch.equal(torch.isfinite(mine), torch.isfinite(theirs)), (
                        f"{what}: state {key!r} non-finite at other places: {mine} against {theirs}")
                    infinite = torch.isinf(mine) & torch.isnan(theirs)
                    _assert_close_or_same_non_finite(torch.where(infinite, math.nan, mine), theirs,
                                                     1e-5 * theirs.abs().nan_to_num(0.0, 0.0, 0.0) + 1e-6,
                                                     f"{what}: state {key!r}")
        # The kernels give the oracle primitive's bits, and the optimizer around them is the same code: the other
        # kernel provider's run is this one's, bit for bit.
        for other in others:
            theirs, other_optimizer, _ = _run_frugal(other, initial, gradients, options)
            for index, (a, b) in enumerate(zip(got, theirs)):
                what = f"{backend} vs {other}, {options} parameter {index}"
                assert_same_values(a, b, what)
                for key in ("param_lo", "exp_avg", "exp_avg_sq"):
                    mine, their = optimizer.state.get(a, {}).get(key), other_optimizer.state.get(b, {}).get(key)
                    assert (mine is None) == (their is None), f"{what}: state {key!r}"
                    if mine is not None:
                        assert_same_values(mine, their, f"{what}: state {key!r}")

    check()


@pytest.mark.parametrize("backend,device", CPU_FRUGAL)
def test_frugal_invalid_options_name_the_argument(backend, device):
    require_backend(backend, device)

    @PROPERTY_SETTINGS
    @given(data=st.data())
    def check(data):
        name, value = data.draw(st.sampled_from([
            ("lr", -1e-3), ("lr", math.nan), ("eps", -1.0), ("weight_decay", math.inf), ("betas", (1.0, 0.999)),
            ("betas", (0.9,)), ("density", 1.5), ("density", -0.1), ("density", math.nan), ("update_gap", 0),
            ("update_gap", 1.5), ("update_gap", True), ("projection", "qr"), ("block_order", "shuffled"),
            ("state_free", "adam"), ("on_switch", "keep"), ("state_free_lr_scale", -1.0),
            ("state_full_lr_scale", math.nan), ("precision", "fp16"), ("seed", 1.5), ("backend", "gpu")]))
        parameter = torch.nn.Parameter(torch.ones(4, 3))
        with pytest.raises((ValueError, TypeError), match=rf"argument '{name}'"):
            leanops.optim.FRUGAL([{"params": [parameter]}], **{"backend": backend, name: value})

    check()
