"""Triton kernels for multi-component float (MCF) arithmetic, elementwise over flat tensors. The error-free
transformations themselves are the device functions of triton_kernels/eft.py (the twin of
csrc/include/leanops/eft.h); the kernels are compiled with ``enable_fp_fusion=False`` so that no a*b+c is contracted
into an FMA behind our back.
"""
import torch
import triton
import triton.language as tl

from .eft import _STORAGE_CODE, _add, _fast_two_sum, _load, _mul, _round, _store, _two_prod, _two_sum

_BLOCK_SIZE_GPU = 2048
_NUM_WARPS_GPU = 8
# The interpreter runs one program at a time with numpy: fewer, larger programs are much faster.
_BLOCK_SIZE_INTERPRETER = 16384


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
    """hi, lo must not share memory (leanops.mcf.grow_ checks it before any provider runs)."""
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
