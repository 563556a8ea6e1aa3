"""The error-free transformations as Triton device functions: the Triton twin of csrc/include/leanops/eft.h, shared
by the MCF, Collage and FRUGAL kernels (the same algorithms, bit for bit).

Values are widened to float32 in registers; "arithmetic in format F" is a float32 operation followed by rounding to
F, which is the correctly rounded F operation for bfloat16 and float16 (see eft.h). Kernels using these must be
compiled with ``enable_fp_fusion=False`` so that no a*b+c is contracted into an FMA behind our back.

Rounding to bfloat16 is done on the float32 bit pattern (round to nearest, ties to even) and bfloat16 tensors are
moved as int16 bit patterns: Triton's interpreter truncates float32 -> bfloat16 conversions, so this keeps one exact
code path for the GPU and for the interpreter on the CPU. float16 uses Triton's own conversions, which round to
nearest even on the GPU and in the interpreter (numpy).
"""
import torch
import triton
import triton.language as tl

# Storage codes (a tl.constexpr in every kernel).
_FLOAT32 = 0
_FLOAT16 = 1
_BFLOAT16 = 2
_STORAGE_CODE = {torch.float32: _FLOAT32, torch.float16: _FLOAT16, torch.bfloat16: _BFLOAT16}

@triton.jit
def _round(x, STORAGE: tl.constexpr):
    """Round float32 x to the nearest value of the storage format (ties to even), returned as float32."""
    if STORAGE == 2:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        # A NaN whose payload sits in the low 16 bits would round to infinity: keep NaN as it is.
        return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))
    elif STORAGE == 1:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _load(pointer, offsets, mask, STORAGE: tl.constexpr, BROADCAST: tl.constexpr):
    """Load storage values as float32; a BROADCAST operand holds one element that every position reads."""
    if BROADCAST:
        raw = tl.load(pointer + offsets * 0)
    else:
        raw = tl.load(pointer + offsets, mask=mask, other=0)
    if STORAGE == 2:
        bits = raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return raw.to(tl.float32)


@triton.jit
def _store(pointer, offsets, mask, x, STORAGE: tl.constexpr):
    """Store float32 x, already representable in the storage format (so the narrowing is exact)."""
    if STORAGE == 2:
        bits = (x.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
        tl.store(pointer + offsets, bits.to(tl.int16, bitcast=True), mask=mask)
    elif STORAGE == 1:
        tl.store(pointer + offsets, x.to(tl.float16), mask=mask)
    else:
        tl.store(pointer + offsets, x, mask=mask)


@triton.jit
def _add(a, b, STORAGE: tl.constexpr):
    return _round(a + b, STORAGE)


@triton.jit
def _sub(a, b, STORAGE: tl.constexpr):
    return _round(a - b, STORAGE)


@triton.jit
def _mul(a, b, STORAGE: tl.constexpr):
    return _round(a * b, STORAGE)


@triton.jit
def _two_sum(a, b, STORAGE: tl.constexpr):
    s = _add(a, b, STORAGE)
    b_virtual = _sub(s, a, STORAGE)
    a_virtual = _sub(s, b_virtual, STORAGE)
    return s, _add(_sub(a, a_virtual, STORAGE), _sub(b, b_virtual, STORAGE), STORAGE)


@triton.jit
def _fast_two_sum(a, b, STORAGE: tl.constexpr):
    s = _add(a, b, STORAGE)
    return s, _sub(b, _sub(s, a, STORAGE), STORAGE)


@triton.jit
def _two_prod(a, b, STORAGE: tl.constexpr, FUSED_FMA: tl.constexpr):
    """p = F(a * b) and e = F(fma(a, b, -p)): eft.h's two_prod, the same bits for any operands (e = -p where finite
    operands' product overflows, NaN where an operand is infinite or NaN)."""
    p = _mul(a, b, STORAGE)
    if FUSED_FMA:
        # One fused instruction on the GPU. (For bfloat16/float16 a*b is exact in float32, but an unfused multiply-add
        # is still not enough: the float32 product of two large bfloat16 values can overflow.)
        error = tl.fma(a, b, -p)
    else:
        # Triton's interpreter evaluates tl.fma as a rounded multiply then add. The float64 product of two float32
        # values is exact (2 x 24 <= 53 significant bits, no overflow), and so is its difference from p, so one
        # rounding to float32 gives fma's result bit for bit, overflow and underflow included. (Dekker's splitting,
        # used here before, overflows for operands above about 8e34.)
        error = (a.to(tl.float64) * b.to(tl.float64) - p.to(tl.float64)).to(tl.float32)
    return p, _round(error, STORAGE)
