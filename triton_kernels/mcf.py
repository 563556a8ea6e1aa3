"""Triton kernels for multi-component float (MCF) arithmetic: the same algorithms as csrc/include/leanops/eft.h.

Values are widened to float32 in registers; "arithmetic in format F" is a float32 operation followed by rounding to
F, which is the correctly rounded F operation for bfloat16 and float16 (see eft.h). The kernels are compiled with
``enable_fp_fusion=False`` so that no a*b+c is contracted into an FMA behind our back.

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
SUPPORTED_DTYPES = tuple(_STORAGE_CODE)

_BLOCK_SIZE_GPU = 2048
_NUM_WARPS_GPU = 8
# The interpreter runs one program at a time with numpy: fewer, larger programs are much faster.
_BLOCK_SIZE_INTERPRETER = 16384


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
def _veltkamp_split(x):
    """x == hi + lo exactly, each half with at most 12 significant bits (float32, no FMA needed)."""
    c = x * 4097.0  # 2**12 + 1
    hi = c - (c - x)
    return hi, x - hi


@triton.jit
def _two_prod(a, b, STORAGE: tl.constexpr, FUSED_FMA: tl.constexpr):
    p = _mul(a, b, STORAGE)
    if FUSED_FMA or STORAGE != 0:
        # For bfloat16/float16 a*b is exact in float32, so even an unfused multiply-add gives the exact error.
        error = tl.fma(a, b, -p)
    else:
        # Triton's interpreter evaluates tl.fma as a rounded multiply then add; Dekker's TwoProduct is exact
        # without a fused multiply-add.
        a_hi, a_lo = _veltkamp_split(a)
        b_hi, b_lo = _veltkamp_split(b)
        error = ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    return p, _round(error, STORAGE)


@triton.jit
def _offsets(n, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    return offsets, offsets < n


# Operation codes for _binary_kernel.
_OP_TWO_SUM = 0
_OP_FAST_TWO_SUM = 1
_OP_TWO_PROD = 2


@triton.jit
def _binary_kernel(a_ptr, b_ptr, hi_ptr, lo_ptr, n, OP: tl.constexpr, STORAGE: tl.constexpr,
                   FUSED_FMA: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offsets, mask = _offsets(n, BLOCK_SIZE)
    a = _load(a_ptr, offsets, mask, STORAGE, False)
    b = _load(b_ptr, offsets, mask, STORAGE, False)
    if OP == 0:
        hi, lo = _two_sum(a, b, STORAGE)
    elif OP == 1:
        hi, lo = _fast_two_sum(a, b, STORAGE)
    else:
        hi, lo = _two_prod(a, b, STORAGE, FUSED_FMA)
    _store(hi_ptr, offsets, mask, hi, STORAGE)
    _store(lo_ptr, offsets, mask, lo, STORAGE)


@triton.jit
def _grow_kernel(hi_ptr, lo_ptr, v_ptr, hi_out_ptr, lo_out_ptr, n, STORAGE: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr):
    """Collage's Grow; hi_out/lo_out may be hi/lo themselves (each element is read before it is written)."""
    offsets, mask = _offsets(n, BLOCK_SIZE)
    hi = _load(hi_ptr, offsets, mask, STORAGE, False)
    lo = _load(lo_ptr, offsets, mask, STORAGE, False)
    v = _load(v_ptr, offsets, mask, STORAGE, False)
    s, e = _two_sum(hi, v, STORAGE)
    new_hi, new_lo = _fast_two_sum(s, _add(e, lo, STORAGE), STORAGE)
    _store(hi_out_ptr, offsets, mask, new_hi, STORAGE)
    _store(lo_out_ptr, offsets, mask, new_lo, STORAGE)


@triton.jit
def _scale_kernel(hi_ptr, lo_ptr, b_hi_ptr, b_lo_ptr, hi_out_ptr, lo_out_ptr, n, STORAGE: tl.constexpr,
                  B_HI_BROADCAST: tl.constexpr, B_LO_BROADCAST: tl.constexpr, FUSED_FMA: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr):
    offsets, mask = _offsets(n, BLOCK_SIZE)
    hi = _load(hi_ptr, offsets, mask, STORAGE, False)
    lo = _load(lo_ptr, offsets, mask, STORAGE, False)
    b_hi = _load(b_hi_ptr, offsets, mask, STORAGE, B_HI_BROADCAST)
    b_lo = _load(b_lo_ptr, offsets, mask, STORAGE, B_LO_BROADCAST)
    p, e = _two_prod(hi, b_hi, STORAGE, FUSED_FMA)
    cross = _add(_mul(hi, b_lo, STORAGE), _mul(lo, b_hi, STORAGE), STORAGE)
    new_hi, new_lo = _fast_two_sum(p, _add(e, cross, STORAGE), STORAGE)
    _store(hi_out_ptr, offsets, mask, new_hi, STORAGE)
    _store(lo_out_ptr, offsets, mask, new_lo, STORAGE)


@triton.jit
def _split_kernel(x_ptr, hi_ptr, lo_ptr, n, STORAGE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offsets, mask = _offsets(n, BLOCK_SIZE)
    x = tl.load(x_ptr + offsets, mask=mask, other=0)
    hi = _round(x, STORAGE)
    _store(hi_ptr, offsets, mask, hi, STORAGE)
    _store(lo_ptr, offsets, mask, _round(x - hi, STORAGE), STORAGE)


@triton.jit
def _merge_kernel(hi_ptr, lo_ptr, out_ptr, n, STORAGE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offsets, mask = _offsets(n, BLOCK_SIZE)
    hi = _load(hi_ptr, offsets, mask, STORAGE, False)
    lo = _load(lo_ptr, offsets, mask, STORAGE, False)
    tl.store(out_ptr + offsets, hi + lo, mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers: take and return torch tensors. Inputs must already be validated (python/leanops/mcf.py does that).

def _as_storage(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor in the form the kernels read: bfloat16 as its int16 bit pattern."""
    tensor = tensor.contiguous()
    return tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor


def _fused_fma(device: torch.device) -> bool:
    """On the GPU tl.fma is one fused instruction; the CPU interpreter rounds the product first."""
    return device.type == "cuda"


def _launch(kernel, n: int, device: torch.device, *args, **constexprs) -> None:
    if n == 0:
        return
    interpreted = device.type == "cpu"
    block_size = _BLOCK_SIZE_INTERPRETER if interpreted else _BLOCK_SIZE_GPU
    grid = (triton.cdiv(n, block_size),)
    options = {} if interpreted else {"num_warps": _NUM_WARPS_GPU, "enable_fp_fusion": False}
    with torch.cuda.device(device) if device.type == "cuda" else _no_context():
        kernel[grid](*args, n, BLOCK_SIZE=block_size, **constexprs, **options)


class _no_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _binary(a: torch.Tensor, b: torch.Tensor, op: int) -> tuple[torch.Tensor, torch.Tensor]:
    hi = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    lo = torch.empty_like(hi)
    _launch(_binary_kernel, a.numel(), a.device, _as_storage(a), _as_storage(b), _as_storage(hi), _as_storage(lo),
            OP=op, STORAGE=_STORAGE_CODE[a.dtype], FUSED_FMA=_fused_fma(a.device))
    return hi, lo


def two_sum(a, b):
    return _binary(a, b, _OP_TWO_SUM)


def fast_two_sum(a, b):
    return _binary(a, b, _OP_FAST_TWO_SUM)


def two_prod(a, b):
    return _binary(a, b, _OP_TWO_PROD)


def grow(hi, lo, v):
    hi_out = torch.empty(hi.shape, dtype=hi.dtype, device=hi.device)
    lo_out = torch.empty_like(hi_out)
    _launch(_grow_kernel, hi.numel(), hi.device, _as_storage(hi), _as_storage(lo), _as_storage(v),
            _as_storage(hi_out), _as_storage(lo_out), STORAGE=_STORAGE_CODE[hi.dtype])
    return hi_out, lo_out


def grow_(hi, lo, v) -> None:
    from leanops._validation import check_no_shared_memory

    check_no_shared_memory("leanops.mcf.grow_", "hi", hi, "lo", lo)
    if hi.is_contiguous() and lo.is_contiguous():
        hi_storage, lo_storage = _as_storage(hi), _as_storage(lo)
        _launch(_grow_kernel, hi.numel(), hi.device, hi_storage, lo_storage, _as_storage(v), hi_storage, lo_storage,
                STORAGE=_STORAGE_CODE[hi.dtype])
    else:  # strided destinations: compute contiguously, then copy back through the strides
        new_hi, new_lo = grow(hi, lo, v)
        hi.copy_(new_hi)
        lo.copy_(new_lo)


def scale(hi, lo, b_hi, b_lo):
    hi_out = torch.empty(hi.shape, dtype=hi.dtype, device=hi.device)
    lo_out = torch.empty_like(hi_out)
    n = hi.numel()
    _launch(_scale_kernel, n, hi.device, _as_storage(hi), _as_storage(lo), _as_storage(b_hi), _as_storage(b_lo),
            _as_storage(hi_out), _as_storage(lo_out), STORAGE=_STORAGE_CODE[hi.dtype],
            B_HI_BROADCAST=b_hi.numel() != n, B_LO_BROADCAST=b_lo.numel() != n, FUSED_FMA=_fused_fma(hi.device))
    return hi_out, lo_out


def split(x, dtype):
    hi = torch.empty(x.shape, dtype=dtype, device=x.device)
    lo = torch.empty_like(hi)
    _launch(_split_kernel, x.numel(), x.device, x.contiguous(), _as_storage(hi), _as_storage(lo),
            STORAGE=_STORAGE_CODE[dtype])
    return hi, lo


def merge(hi, lo):
    out = torch.empty(hi.shape, dtype=torch.float32, device=hi.device)
    _launch(_merge_kernel, hi.numel(), hi.device, _as_storage(hi), _as_storage(lo), out,
            STORAGE=_STORAGE_CODE[hi.dtype])
    return out
