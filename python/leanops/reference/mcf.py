"""Multi-component float (MCF) arithmetic in plain PyTorch: the textbook algorithms, one torch op per step.

Every op here works in the inputs' own dtype: torch rounds each bfloat16/float16 operation correctly (it computes
in float32 and rounds once, and that double rounding is innocuous for +, - and *), so these are the exact
error-free transformations of that format. float64 inputs work too (``two_prod`` then uses Dekker's splitting,
since torch has no fused multiply-add). The kernels compute the same algorithms and must agree bit for bit.

References: Knuth, TAOCP vol. 2, 4.2.2 (TwoSum); Dekker, "A floating-point technique for extending the available
precision", 1971 (Fast2Sum, TwoProduct); Yu et al., "Collage: Light-Weight Low-Precision Strategy for LLM
Training", ICML 2024 (Grow, MCF state).
"""
import torch

Tensor = torch.Tensor


def two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Knuth's TwoSum: s = fl(a + b) and e with a + b == s + e exactly, for any a, b."""
    s = a + b
    b_virtual = s - a
    a_virtual = s - b_virtual
    return s, (a - a_virtual) + (b - b_virtual)


def fast_two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Dekker's Fast2Sum: the same as two_sum when |a| >= |b|, in three operations instead of six."""
    s = a + b
    return s, b - (s - a)


def _dekker_split(x: Tensor) -> tuple[Tensor, Tensor]:
    """Veltkamp's splitting of float64 x into two halves of 26 significant bits each, x == hi + lo exactly."""
    c = x * 134217729.0  # 2**27 + 1
    hi = c - (c - x)
    return hi, x - hi


def two_prod(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """TwoProd: p = fl(a * b) and e with a * b == p + e exactly (unless e underflows).

    For bfloat16/float16/float32 the float64 product is exact (at most 2 x 24 significant bits, and no overflow),
    and so is its difference from p, so e is that difference rounded once to float32 (then to the dtype, exactly):
    the bits of fma(a, b, -p) in float32, which the kernels compute. Special values follow from that float math:
    finite operands whose product overflows give p = +-inf and e = -p (a * b - p with a finite a * b); an infinite
    or NaN operand gives e = NaN. (The float32 product of two bfloat16 values can itself overflow, which would make
    e = inf - inf = NaN; hence float64 for every dtype.) float64 uses Dekker's TwoProduct on operands scaled by
    2^-54 where they exceed 2^995 (Veltkamp's splitting would overflow there; the scaling is exact, and e scaled
    back cannot have underflowed: p would have to be below 2^-915 with an operand above 2^995).
    """
    p = a * b
    if a.dtype == torch.float64:
        big, down = 2.0 ** 995, 2.0 ** -54
        scale_a = torch.where(a.abs() > big, down, 1.0)
        scale_b = torch.where(b.abs() > big, down, 1.0)
        a_scaled, b_scaled = a * scale_a, b * scale_b
        p_scaled = a_scaled * b_scaled
        a_hi, a_lo = _dekker_split(a_scaled)
        b_hi, b_lo = _dekker_split(b_scaled)
        e = (((a_hi * b_hi - p_scaled) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo) / (scale_a * scale_b)
        overflowed = torch.isinf(p) & torch.isfinite(a) & torch.isfinite(b)
        return p, torch.where(overflowed, -p, e)
    exact = a.to(torch.float64) * b.to(torch.float64)
    # float64 -> float32 -> dtype: torch narrows float64 to 16 bits through float32, and so do the kernels (fma's
    # float32 result, then the rounding to the dtype): the two agree where e underflows too.
    return p, (exact - p.to(torch.float64)).to(torch.float32).to(a.dtype)


def grow(hi: Tensor, lo: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Collage's Grow: add v to the pair (hi, lo), renormalised with Fast2Sum so that |lo| <= ulp(hi) / 2."""
    s, e = two_sum(hi, v)
    return fast_two_sum(s, e + lo)


def grow_(hi: Tensor, lo: Tensor, v: Tensor) -> None:
    """In-place ``grow``: hi and lo receive the new pair (they must not share memory: leanops.mcf.grow_ checks)."""
    new_hi, new_lo = grow(hi, lo, v)
    hi.copy_(new_hi)
    lo.copy_(new_lo)


def scale(hi: Tensor, lo: Tensor, b_hi: Tensor, b_lo: Tensor) -> tuple[Tensor, Tensor]:
    """Multiply the pair (hi, lo) by the pair (b_hi, b_lo), dropping lo * b_lo (below the pair's precision).

    p, e = TwoProd(hi, b_hi); e += hi * b_lo + lo * b_hi; (hi, lo) = Fast2Sum(p, e)   (Dekker's mul2)
    """
    p, e = two_prod(hi, b_hi)
    cross = hi * b_lo + lo * b_hi
    return fast_two_sum(p, e + cross)


def split(x: Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """Split float32 x into hi = fl_dtype(x) and lo = fl_dtype(x - hi); x - hi is exact in float32 (Sterbenz)."""
    hi = x.to(dtype)
    return hi, (x - hi.to(x.dtype)).to(dtype)


def merge(hi: Tensor, lo: Tensor) -> Tensor:
    """The float32 nearest to hi + lo."""
    return hi.to(torch.float32) + lo.to(torch.float32)
