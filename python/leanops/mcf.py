"""Multi-component float (MCF) arithmetic: error-free transformations over tensors, elementwise.

A value is carried as an unevaluated sum ``hi + lo`` of two numbers of one dtype (bfloat16, float16 or float32),
which nearly doubles its precision: a bfloat16 pair holds about 16 significant bits. These are the building blocks
of Collage (Yu et al., "Collage: Light-Weight Low-Precision Strategy for LLM Training", ICML 2024), whose
optimizers keep bfloat16 weights and optimizer state without fp32 master copies.

All ops take tensors of one dtype and one shape (``scale``'s multiplier may be a single element) and return new
tensors (contiguous from the kernels; the reference's follow torch's layout rules, e.g. a permuted input's order);
every result is exact as stated, not merely close:

==================================  ===========================================================================
``two_sum(a, b) -> (s, e)``          s = fl(a + b), and a + b == s + e exactly (Knuth's TwoSum, any operands)
``fast_two_sum(a, b) -> (s, e)``     the same, in three operations, when |a| >= |b| (Dekker's Fast2Sum)
``two_prod(a, b) -> (p, e)``         p = fl(a * b), and a * b == p + e exactly (unless e underflows)
``grow(hi, lo, v) -> (hi, lo)``      add v into the pair: (s, e) = TwoSum(hi, v); Fast2Sum(s, e + lo), so that
                                     |lo| <= ulp(hi) / 2 afterwards (Collage's Grow); ``grow_`` works in place
``scale(hi, lo, b_hi, b_lo)``        the pair times the pair (b_hi, b_lo), e.g. beta2 = 0.999 split as
                                     (1.0, -0.001) in bfloat16: bf16(0.999) is 1.0, so the low part carries all
                                     of the decay
``split(x, dtype) -> (hi, lo)``      float32 x as hi = fl(x), lo = fl(x - hi) in `dtype`
``merge(hi, lo) -> float32``         the float32 nearest to hi + lo
==================================  ===========================================================================

Every op takes ``backend="auto" | "reference" | "triton" | "cuda" | "cpu"`` (see ``leanops.backends``); all
backends give the same bits. The reference also runs float64 (except ``split``/``merge``).

Special values: every backend gives the reference's results for any input, NaN and infinities included (the
algorithms' own IEEE float math, no special cases). NaN in gives NaN out. Where the leading result is infinite (an
infinite operand, or a sum or product that overflows):

- ``two_sum``: the error term is NaN (the algorithm computes inf - inf). ``fast_two_sum`` (s, e) = (s, b - (s - a)):
  a sum of finite operands that overflows gives e = -+inf (e.g. (inf, -inf) for 65504 + 4348 in float16), an
  infinite operand NaN. ``grow`` inherits both: Fast2Sum(s, e + lo) gives (inf, -inf) where only the last sum
  overflows and (NaN, NaN) where TwoSum's error term is already NaN.
- ``two_prod``: p = +-inf; for finite operands whose product overflows e = -p (e = a * b - p taken exactly: a finite
  product minus an infinite p), for an infinite or NaN operand e = NaN. Large finite float32 operands are exact up
  to the overflow (no splitting that overflows first).
- ``scale``: an overflowing product gives (NaN, NaN) (Fast2Sum of p = +-inf and e = -p).
- ``split``: a finite x beyond the format's range gives (+-inf, -+inf), an infinite x (+-inf, NaN); ``merge``: hi + lo
  in float32.

``grow_`` refuses, like torch's in-place operators and before any kernel runs, a ``hi`` or ``lo`` that is a leaf
requiring grad (or a view of one) while grad mode is on.
"""
import struct

import torch

from . import _validation, backends
from .ops import MCF
from .ops.registry import REFERENCE_DTYPES

Tensor = torch.Tensor

KERNEL_DTYPES = backends.KERNEL_DTYPES


def _dispatch(op: str, backend: str, like: Tensor, *inputs: Tensor):
    """The operator `op` of the provider that serves tensors like `like` (leanops.ops.mcf declares them).

    Only the reference differentiates (torch autograd through the same arithmetic; the kernels have no gradient):
    where an input requires grad and grad mode is on, ``auto`` takes the reference, and a kernel backend named
    explicitly is refused rather than return results whose gradients would silently be missing."""
    name = f"leanops.mcf.{op}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        if backend == backends.AUTO and backends.default_backend() == backends.AUTO:
            backend = "reference"
        elif MCF.resolve(name, backend, like.device, like.dtype).backend != "reference":
            raise RuntimeError(f"{name}: an input requires grad, and backend {backend!r} has no gradient (only the "
                               f"reference differentiates the MCF arithmetic): call it under torch.no_grad(), on "
                               f"detached tensors, or with backend='reference'")
    return getattr(MCF.resolve(name, backend, like.device, like.dtype).operators, op)


def _binary(op: str, a, b, backend: str) -> tuple[Tensor, Tensor]:
    name = f"leanops.mcf.{op}"
    _validation.check_tensor(name, "a", a, REFERENCE_DTYPES)
    _validation.check_like(name, "b", b, "a", a)
    return tuple(_dispatch(op, backend, a, a, b)(a, b))


def two_sum(a: Tensor, b: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Knuth's TwoSum: ``s = fl(a + b)`` and ``e = (a + b) - s`` exactly, elementwise.

    Args:
        a, b: tensors of one shape and dtype (bfloat16, float16, float32; float64 on the reference backend).
    Returns:
        (s, e), each shaped and typed like ``a``.
    """
    return _binary("two_sum", a, b, backend)


def fast_two_sum(a: Tensor, b: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Dekker's Fast2Sum: the result of ``two_sum`` in three operations, valid where ``|a| >= |b|``.

    Where ``|a| < |b|`` the error term may be inexact; use ``two_sum`` when the order is unknown.
    """
    return _binary("fast_two_sum", a, b, backend)


def two_prod(a: Tensor, b: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """TwoProd: ``p = fl(a * b)`` and ``e = a * b - p`` exactly, elementwise (exact unless ``e`` underflows).

    ``e`` is ``fma(a, b, -p)`` in float32 rounded to the dtype (exact: for bfloat16/float16 the float32 product
    is exact, and for float32 the kernels use one fused multiply-add, or an exact float64 product where there is
    none). A product of finite operands that overflows gives ``p = +-inf`` and ``e = -p``; an infinite or NaN
    operand gives ``e = NaN``.
    """
    return _binary("two_prod", a, b, backend)


def _check_grow(op: str, hi, lo, v) -> None:
    _validation.check_tensor(op, "hi", hi, REFERENCE_DTYPES)
    _validation.check_like(op, "lo", lo, "hi", hi)
    _validation.check_like(op, "v", v, "hi", hi)


def grow(hi: Tensor, lo: Tensor, v: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Collage's Grow: the pair ``(hi, lo)`` plus ``v``, as a new normalised pair.

    ``(s, e) = TwoSum(hi, v)``; ``(hi', lo') = Fast2Sum(s, e + lo)``, so ``|lo'| <= ulp(hi') / 2``. Small
    updates that plain bfloat16 would round away accumulate in ``lo`` until they reach ``hi``.
    """
    _check_grow("leanops.mcf.grow", hi, lo, v)
    return tuple(_dispatch("grow", backend, hi, hi, lo, v)(hi, lo, v))


def _check_in_place_allowed(op: str, name: str, tensor: Tensor) -> None:
    """torch's own check for an in-place operation, with its message, for every provider: the kernels write through
    the tensor's memory, out of autograd's sight, so they would silently mutate a parameter that requires grad."""
    if not torch.is_grad_enabled():
        return
    if tensor.is_leaf and tensor.requires_grad:
        raise RuntimeError(f"{op}: argument '{name}': a leaf Variable that requires grad is being used in an "
                           "in-place operation.")
    if torch.compiler.is_compiling():
        return
    base = tensor._base
    if base is not None and base.is_leaf and base.requires_grad:
        raise RuntimeError(f"{op}: argument '{name}': a view of a leaf Variable that requires grad is being used in "
                           "an in-place operation.")


def grow_(hi: Tensor, lo: Tensor, v: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """In-place ``grow``: ``hi`` and ``lo`` receive the new pair (they must not share memory). Returns them.

    Like torch's in-place operators, it refuses a ``hi`` or ``lo`` that is a leaf requiring grad (or a view of one)
    while grad mode is on (RuntimeError, before any provider runs); under ``torch.no_grad()`` it writes them."""
    op = "leanops.mcf.grow_"
    _check_grow(op, hi, lo, v)
    _check_in_place_allowed(op, "hi", hi)
    _check_in_place_allowed(op, "lo", lo)
    if not torch.compiler.is_compiling():
        # Eagerly, before any provider runs (inside a compiled graph the C++ kernels check it themselves).
        _validation.check_no_shared_memory(op, "hi", hi, "lo", lo)
    _dispatch("grow_", backend, hi, hi, lo, v)(hi, lo, v)
    return hi, lo


def _multiplier(op: str, name: str, value, like: Tensor) -> Tensor:
    """A multiplier component as a tensor: a tensor like `like` or of one element, or an exactly representable
    Python number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not _exactly_representable(float(value), like.dtype):
            raise ValueError(f"{op}: argument '{name}'={value!r} is not exactly representable in {like.dtype}; "
                             "split it first, e.g. leanops.mcf.split(torch.tensor(value), dtype)")
        return torch.full((), float(value), dtype=like.dtype, device=like.device)
    _validation.check_like(op, name, value, "hi", like, scalar_ok=True)
    return value


def _exactly_representable(value: float, dtype: torch.dtype) -> bool:
    if dtype == torch.float64:
        return True
    try:
        as_float32 = struct.unpack("<f", struct.pack("<f", value))[0]
        if dtype == torch.float16:
            return struct.unpack("<e", struct.pack("<e", value))[0] == value
    except OverflowError:
        return False
    if as_float32 != value:
        return False
    if dtype == torch.bfloat16:
        return struct.unpack("<I", struct.pack("<f", value))[0] & 0xFFFF == 0
    return True


def scale(hi: Tensor, lo: Tensor, b_hi, b_lo, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The pair ``(hi, lo)`` times the pair ``(b_hi, b_lo)``, as a new normalised pair.

    ``(p, e) = TwoProd(hi, b_hi)``; ``e += hi * b_lo + lo * b_hi``; ``(hi', lo') = Fast2Sum(p, e)``
    (Dekker's mul2; ``lo * b_lo`` lies below the pair's precision). ``b_hi`` and ``b_lo`` are tensors shaped like
    ``hi`` or of a single element, or Python numbers exactly representable in the dtype. To decay by beta2 = 0.999
    in bfloat16: ``b_hi, b_lo = split(torch.tensor(0.999), torch.bfloat16)``, i.e. (1.0, -0.000999...).
    """
    op = "leanops.mcf.scale"
    _validation.check_tensor(op, "hi", hi, REFERENCE_DTYPES)
    _validation.check_like(op, "lo", lo, "hi", hi)
    b_hi = _multiplier(op, "b_hi", b_hi, hi)
    b_lo = _multiplier(op, "b_lo", b_lo, hi)
    return tuple(_dispatch("scale", backend, hi, hi, lo, b_hi, b_lo)(hi, lo, b_hi, b_lo))


def split(x: Tensor, dtype: torch.dtype = torch.bfloat16, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """float32 ``x`` as the pair ``hi = fl(x)``, ``lo = fl(x - hi)`` of `dtype` (bfloat16, float16 or float32).

    For bfloat16 the pair keeps 16 of float32's 24 significant bits; ``merge`` gives back the float32 nearest to
    ``hi + lo``.
    """
    op = "leanops.mcf.split"
    _validation.check_tensor(op, "x", x, (torch.float32,))
    if dtype not in KERNEL_DTYPES:
        allowed = ", ".join(str(d) for d in KERNEL_DTYPES)
        raise TypeError(f"{op}: argument 'dtype' must be one of {allowed}, got {dtype!r}")
    return tuple(_dispatch("split", backend, x, x)(x, dtype))


def merge(hi: Tensor, lo: Tensor, *, backend: str = "auto") -> Tensor:
    """The float32 nearest to ``hi + lo`` (a bfloat16/float16/float32 pair)."""
    op = "leanops.mcf.merge"
    _validation.check_tensor(op, "hi", hi, KERNEL_DTYPES)
    _validation.check_like(op, "lo", lo, "hi", hi)
    return _dispatch("merge", backend, hi, hi, lo)(hi, lo)
