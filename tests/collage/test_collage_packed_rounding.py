"""The equivalence the Collage step kernels' packed 16-bit arithmetic rests on, checked rather than assumed.

The CUDA kernel (csrc/include/leanops/collage_cuda.cuh) and the Triton kernel's bfloat16 pair path
(triton_kernels/collage.py) compute the operations "in F" of the MCF algorithms (TwoSum, Fast2Sum, Grow, Scale's
cross terms) with native packed instructions, add.rn / sub.rn / mul.rn on bf16x2 or f16x2: one instruction rounds
the exact result once to F. collage.h, the reference and the host fallbacks compute the float32 operation and round
its result to F (round to nearest, ties to even). The two agree for add, sub and mul of two F values when float32's
precision is at least 2p + 2 (Figueroa, "When is double rounding innocuous?", 1995: bfloat16 p = 8, float16 p = 11,
float32 24), with IEEE's overflow, subnormals and signed zeros. This test checks that, for bfloat16 and float16, on
every value of F against a set of special operands, on a large random sample of bit patterns and of operands of
nearby exponents (where the ties and the cancellations are), and with exact rational arithmetic (fractions) where
float64 is not exact: "float32 op, then rounded to F" == "the exact result rounded once to F", bit for bit (NaN:
any NaN).

The exact side is independent of float32: the operations on two F values are exact in float64 (products have at most
2p <= 22 significant bits, float16 sums span at most 40 bits) except for bfloat16 sums of operands far apart, which
Knuth's TwoSum in float64 detects; those are checked with fractions.Fraction. The rounding to F is written here on
float64 (and on fractions), not taken from the code under test, and is checked against torch's conversions.
"""
from fractions import Fraction

import numpy as np
import pytest
import torch

# F: significand bits p (hidden bit included), the smallest and largest normal exponents.
FORMATS = {
    "bfloat16": {"p": 8, "emin": -126, "emax": 127, "dtype": torch.bfloat16},
    "float16": {"p": 11, "emin": -14, "emax": 15, "dtype": torch.float16},
}
OPERATIONS = {"add": np.add, "sub": np.subtract, "mul": np.multiply}
FRACTION_PAIRS = 20_000  # at most this many pairs of one check go through fractions.Fraction


def _largest(f: dict) -> float:
    return (2.0 - 2.0 ** (1 - f["p"])) * 2.0 ** f["emax"]


def round_to_format(x: np.ndarray, f: dict) -> np.ndarray:
    """float64 values, each rounded once to F (nearest, ties to even; overflow to infinity; NaN and infinities kept).
    Exact for every float64 input: the quantum is a power of two, the scaling by it exact, np.rint ties to even."""
    x = np.asarray(x, dtype=np.float64)
    magnitude = np.abs(x)
    finite = np.isfinite(x) & (magnitude > 0)
    safe = np.where(finite, magnitude, 1.0)
    exponent = np.frexp(safe)[1] - 1  # safe = m * 2^exponent, 1 <= m < 2
    quantum = np.maximum(exponent, f["emin"]) - (f["p"] - 1)
    rounded = np.ldexp(np.rint(np.ldexp(safe, -quantum)), quantum)
    rounded = np.where(rounded > _largest(f), np.inf, rounded)
    return np.where(finite, np.copysign(rounded, x), x)


def round_fraction(x: Fraction, f: dict) -> float:
    """A nonzero exact rational rounded once to F (nearest, ties to even), as a float (infinity on overflow)."""
    sign = -1.0 if x < 0 else 1.0
    magnitude = abs(x)
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:
        exponent -= 1  # now 2^exponent <= magnitude < 2^(exponent + 1)
    quantum = max(exponent, f["emin"]) - (f["p"] - 1)
    scaled = magnitude / Fraction(2) ** quantum
    whole = scaled.numerator // scaled.denominator
    remainder = scaled - whole
    if remainder > Fraction(1, 2) or (remainder == Fraction(1, 2) and whole % 2 == 1):
        whole += 1
    value = float(Fraction(whole) * Fraction(2) ** quantum)
    return sign * (np.inf if value > _largest(f) else value)


def all_values(f: dict) -> np.ndarray:
    """Every value of F (every bit pattern: NaNs, infinities, zeros and subnormals included) as float32."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    return bits.view(f["dtype"]).to(torch.float32).numpy()


def special_values(f: dict) -> np.ndarray:
    """Operands at the edges: zeros, subnormals, the smallest normals, around one, near overflow, infinities, NaN."""
    p, emin, emax = f["p"], f["emin"], f["emax"]
    tiny = 2.0 ** (emin - p + 1)  # the smallest subnormal
    ulp_one = 2.0 ** (1 - p)
    magnitudes = [0.0, tiny, 2 * tiny, 3 * tiny, 2.0 ** emin - tiny, 2.0 ** emin, 2.0 ** emin + 2.0 ** (emin - p + 1),
                  ulp_one / 2, ulp_one, 1.0, 1.0 + ulp_one, 1.0 + 2 * ulp_one, 1.5, 2.0 - ulp_one, 3.0,
                  2.0 ** (emax - 1), 2.0 ** emax, _largest(f) - 2.0 ** (emax - p + 1), _largest(f), np.inf]
    values = np.array([sign * m for m in magnitudes for sign in (1.0, -1.0)] + [np.nan])
    # Every special magnitude is an F value: rounding leaves it alone.
    assert np.array_equal(round_to_format(values, f), values, equal_nan=True)
    return values.astype(np.float32)


def random_pairs(f: dict, count: int, generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Half uniform bit patterns, half operands of nearby exponents (differences of 0 to 2p + 2 binades, either
    sign: the cases of rounding ties, carries and cancellation)."""
    values = all_values(f)
    half = count // 2
    a_uniform = values[generator.integers(0, 65536, half)]
    b_uniform = values[generator.integers(0, 65536, half)]
    finite = values[np.isfinite(values)]
    a_near = finite[generator.integers(0, finite.size, count - half)].astype(np.float64)
    mantissas = 1.0 + generator.integers(0, 2 ** (f["p"] - 1), count - half) * 2.0 ** (1 - f["p"])
    shifts = generator.integers(-(2 * f["p"] + 2), 2 * f["p"] + 3, count - half)
    exponents = np.frexp(np.where(a_near == 0, 1.0, a_near))[1] - 1 + shifts
    signs = np.where(generator.integers(0, 2, count - half) == 1, 1.0, -1.0)
    b_near = round_to_format(signs * np.ldexp(mantissas, exponents), f)  # subnormal or overflowing: F's neighbour
    return (np.concatenate([a_uniform, a_near.astype(np.float32)]),
            np.concatenate([b_uniform, b_near.astype(np.float32)]))


def same_bits(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return (np.isnan(x) & np.isnan(y)) | (x.view(np.int64) == y.view(np.int64))


def float32_then_rounded(a: np.ndarray, b: np.ndarray, operation: str, f: dict) -> np.ndarray:
    """What collage.h computes: the float32 operation (IEEE, round to nearest even), then its result rounded to F.
    The rounding is this file's, checked against torch's conversion (the kernels' cvt.rn / __float2*_rn)."""
    with np.errstate(all="ignore"):
        result32 = OPERATIONS[operation](a.astype(np.float32), b.astype(np.float32))
        rounded = round_to_format(result32.astype(np.float64), f)
    converted = torch.from_numpy(result32).to(f["dtype"]).to(torch.float64).numpy()
    assert same_bits(rounded, converted).all(), "this file's rounding is not torch's float32 -> F conversion"
    return rounded


def exact_in_float64(a: np.ndarray, b: np.ndarray, operation: str) -> tuple[np.ndarray, np.ndarray]:
    """(the float64 result, where it is exact): products of two F values always are (and IEEE's special cases);
    sums where Knuth's TwoSum in float64 finds no error."""
    with np.errstate(all="ignore"):  # NaN operands, overflow: IEEE's results are what is compared
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        result = OPERATIONS[operation](a64, b64)
        if operation == "mul":
            return result, np.ones(result.shape, dtype=bool)
        b64 = b64 if operation == "add" else -b64
        b_virtual = result - a64
        error = (a64 - (result - b_virtual)) + (b64 - b_virtual)
    return result, ~np.isfinite(result) | (error == 0)


def check(a: np.ndarray, b: np.ndarray, operation: str, f: dict) -> dict:
    """Compare both sides on every pair; returns counts of what was covered (float64-exact pairs, fraction pairs,
    exact results at a rounding tie of F, subnormal and overflowing results)."""
    double = float32_then_rounded(a, b, operation, f)
    exact, is_exact = exact_in_float64(a, b, operation)
    once = round_to_format(exact, f)
    mismatches = np.flatnonzero(is_exact & ~same_bits(double, once))
    assert mismatches.size == 0, [(operation, float(a[i]), float(b[i]), float(double[i]), float(once[i]))
                                  for i in mismatches[:5]]
    fraction_pairs = np.flatnonzero(~is_exact)
    if fraction_pairs.size > FRACTION_PAIRS:  # an even subsample: fractions take tens of microseconds a pair
        fraction_pairs = fraction_pairs[:: -(-fraction_pairs.size // FRACTION_PAIRS)]
    for i in fraction_pairs:  # finite, nonzero operands far apart: the exact sum is neither zero nor a tie
        x, y = Fraction(float(a[i])), Fraction(float(b[i]))
        expected = round_fraction(x + y if operation == "add" else x - y, f)
        assert same_bits(double[i], expected), (operation, float(a[i]), float(b[i]), float(double[i]), expected)
    # Ties: the exact result half way between two F values (its rounding decided by the even neighbour).
    magnitude = np.where(is_exact & np.isfinite(exact) & (exact != 0), np.abs(exact), 1.0)
    quantum = np.maximum(np.frexp(magnitude)[1] - 1, f["emin"]) - (f["p"] - 1)
    scaled = np.ldexp(magnitude, -quantum)
    ties = int(np.count_nonzero(scaled - np.floor(scaled) == 0.5))
    finite_once = np.isfinite(once) & (once != 0)
    return {"pairs": a.size, "fractions": int(fraction_pairs.size), "ties": ties,
            "subnormal": int(np.count_nonzero(finite_once & (np.abs(once) < 2.0 ** f["emin"]))),
            "overflow": int(np.count_nonzero(np.isinf(once) & np.isfinite(a) & np.isfinite(b))),
            "signed_zero": int(np.count_nonzero((once == 0) & np.signbit(once)))}


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_value_against_special_operands(name, operation):
    f = FORMATS[name]
    values, specials = all_values(f), special_values(f)
    a = np.repeat(values, specials.size)
    b = np.tile(specials, values.size)
    covered = check(a, b, operation, f)
    covered_swapped = check(b, a, operation, f)  # sub is not symmetric; products and sums are, cheaply rechecked
    assert covered["overflow"] > 0 and covered["subnormal"] > 0 and covered["signed_zero"] > 0, covered
    assert covered["ties"] > 0 or operation == "mul", covered
    assert covered_swapped["pairs"] == covered["pairs"]


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("name", list(FORMATS))
def test_random_operands(name, operation):
    f = FORMATS[name]
    generator = np.random.default_rng(14 + len(name) + 3 * list(OPERATIONS).index(operation))
    a, b = random_pairs(f, 1_000_000, generator)
    covered = check(a, b, operation, f)
    for kind in ("ties", "subnormal", "overflow"):  # signed zeros: the special operands' test
        assert covered[kind] > 0, covered
    if name == "bfloat16" and operation != "mul":
        assert covered["fractions"] > 0, covered  # the sums float64 cannot hold, checked exactly


@pytest.mark.parametrize("name", list(FORMATS))
def test_rounding_helpers_are_exact(name):
    """This file's two roundings agree with each other (on float64 values: 53 bits) and with torch's conversion of
    float32 values (one rounding; torch converts float64 through float32, so it is not the reference there)."""
    f = FORMATS[name]
    generator = np.random.default_rng(1995)
    x = np.ldexp(generator.uniform(1.0, 2.0, 20_000), generator.integers(f["emin"] - 14, f["emax"] + 2, 20_000))
    x = np.where(generator.integers(0, 2, x.size) == 1, x, -x)
    rounded = round_to_format(x, f)
    for i in range(0, x.size, 10):
        assert same_bits(rounded[i], round_fraction(Fraction(float(x[i])), f)), float(x[i])
    with np.errstate(over="ignore"):  # beyond float32: infinity, which F's rounding keeps
        x32 = x.astype(np.float32)
    converted = torch.from_numpy(x32).to(f["dtype"]).to(torch.float64).numpy()
    assert same_bits(round_to_format(x32.astype(np.float64), f), converted).all()
