"""Triton kernel of Collage AdamW's fused multi-tensor step: the contract is python/leanops/reference/collage.py,
whose bits (params, params_lo, exp_avgs, exp_avg_sqs, exp_avg_sqs_lo) this kernel reproduces exactly.

Arithmetic. Storage values are widened to float32 in registers; "arithmetic in F" and the MCF algorithms (TwoSum,
Fast2Sum, TwoProd, so Grow and Scale) are those of triton_kernels/eft.py (the twin of csrc/include/leanops/eft.h),
restated here (_f, _two_sum_f, _fast_two_sum_f) with the same operations in the same order, so that the values the
kernel stores keep their storage form instead of being converted twice. Every float32 operation is the reference's,
in its order and correctly rounded: the kernel is compiled with ``enable_fp_fusion=False`` (no a*b+c contracted into
an FMA), divides with ``tl.div_rn`` and takes square roots with ``tl.sqrt_rn`` (plain ``/`` and ``tl.sqrt`` are
approximate on the GPU). The only fused multiply-add is TwoProd's error term in ``plus`` mode
(``fma(v, F(beta2), -p)``), which is exact for 16-bit operands whether fused or not. The scalars are rounded to
float32 on the host exactly as the reference's ``torch.tensor(value, dtype=float32)`` (so that Triton's own double ->
float conversion of the arguments is exact), -lr included.

Rounding to F (NATIVE, the GPU): bfloat16 by the hardware's conversion, one instruction a rounding (_f), float16 by
Triton's conversions (which LLVM turns into float16x2 arithmetic where it can: the same values). Under the
interpreter (NATIVE false) bfloat16 is rounded on its bit pattern: the interpreter's own conversion truncates.
Arithmetic in F on the pair path (_packed): the operations of the MCF algorithms (TwoSum, Fast2Sum, Grow, Scale's
cross terms), each of two F values, are add.rn / sub.rn / mul.rn on bf16x2 or f16x2 words of two values, one
instruction for two elements: the same bits as the float32 operation then the rounding (the double-rounding theorem;
tests/collage/test_collage_packed_rounding.py). Under the interpreter they are that float32 operation and rounding.

Multi-tensor launch. One launch serves every tensor of the lists (they share dtype and device; each must be
contiguous). The host builds a small int64 table, one row per non-empty tensor:

    [param, param_lo, exp_avg, exp_avg_sq, exp_avg_sq_lo (0 in light mode), grad, numel, first_chunk]

(data pointers as integers; first_chunk = number of BLOCK_SIZE chunks of the rows before it). The grid has one
program per chunk of BLOCK_SIZE elements, over all tensors. A program finds its row by a binary search of the
first_chunk column (log2(rows) scalar loads, no per-chunk table to build or copy), casts the row's addresses to
pointers (int64 -> pointer bitcast) and updates its chunk. When every address is 16-byte aligned (ALIGNED, checked on
the host; then the pointers carry a ``tl.multiple_of`` hint), full chunks take a path with a constant all-true mask
whose loads and stores are 16-byte vectors, and which moves 32-bit words of two values (the pair path: see
_widen). The last, partial chunk of a tensor, and every chunk of unaligned operands, take a masked path. On the
GPU the table is copied from pinned memory without blocking the host.

Instructions per element (SASS, sm_90, the full-chunk path without the division and square-root slow-path stubs;
tests/collage/test_collage_sass.py): bfloat16 light 143 -> 87 -> 71, plus 259 -> 126 -> 86 (the rounding on the bit
pattern took five integer instructions, and extracting 16-bit values from vectors two or three; then the F operations
as packed bf16x2 instructions, where Triton's own bfloat16 arithmetic goes through float32: an operation and a
rounding per element each); float16 light 71 -> 72 -> 72, plus 91 -> 96 -> 87 (its arithmetic was already float16x2
instructions, LLVM's, one value per element; about 1.3 of the first difference is pointer arithmetic the old kernel
did ahead of its branch, the rest the compiler's scheduling of the earlier loads; then the pair path with packed
f16x2 instructions, which LLVM had not found for all of plus mode's F operations, and which keeps the words as they
are loaded and stored).

Telemetry (``metrics`` given: the METRICS constexpr). Each program writes float64 partial sums of its chunk to a
partials buffer (grid, 3): sum s*delta and sum delta^2, with the products formed in float64 (exact, as the
reference's, for float32 factors), and the count of lost updates (exact); the host reduces them with torch in
float64 and adds them, with the element count, into ``metrics``. The sums differ from the reference's only by the
order of float64 summation.

Interpreter. Under TRITON_INTERPRET=1 (CPU tensors) the same multi-tensor kernel runs: the interpreter's loads and
stores dereference raw host addresses, so the pointer table works as on the GPU. Only CUDA tensors under the
interpreter (whose kernel arguments the interpreter copies to the host, so that device addresses in a table would
be meaningless) are copied to the CPU, stepped there, and copied back. BLOCK_SIZE is larger under the interpreter
(fewer, wider programs run faster in numpy).
"""
import torch
import triton
import triton.language as tl

from .eft import _STORAGE_CODE

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)

# Columns of a table row.
_PARAM, _PARAM_LO, _EXP_AVG, _EXP_AVG_SQ, _EXP_AVG_SQ_LO, _GRAD, _NUMEL, _FIRST_CHUNK = range(8)
_ROW = 8
# Columns of the partials buffer.
_PARTIALS = 3

BLOCK_SIZE_GPU = 2048
NUM_WARPS_GPU = 8
BLOCK_SIZE_INTERPRETER = 8192
# Pointer alignment (bytes) that lets full chunks use 16-byte vector loads and stores.
_VECTOR_BYTES = 16


@triton.jit
def _find_row(table_ptr, n_rows, pid, ROW: tl.constexpr = 8, FIRST_CHUNK: tl.constexpr = 7):
    """The row whose chunks hold program pid: the last row with first_chunk <= pid (row 0's first_chunk is 0), in a
    table of ROW int64 columns whose column FIRST_CHUNK holds each row's first chunk."""
    low = pid * 0
    high = low + n_rows
    while high - low > 1:
        middle = (low + high) // 2
        first_chunk = tl.load(table_ptr + middle.to(tl.int64) * ROW + FIRST_CHUNK)
        go_up = first_chunk <= pid
        low = tl.where(go_up, middle, low)
        high = tl.where(go_up, high, middle)
    return low


@triton.jit
def _pointer(address, start, STORAGE: tl.constexpr, ALIGNED: tl.constexpr, PAIRS: tl.constexpr):
    """An operand's address (an int64 of the table) as a pointer to storage values (bfloat16 as int16 bit patterns)
    plus start, or with PAIRS to 32-bit words (two storage values each) plus start / 2."""
    if PAIRS:
        pointer = address.to(tl.pointer_type(tl.int32), bitcast=True)
    elif STORAGE == 1:
        pointer = address.to(tl.pointer_type(tl.float16), bitcast=True)
    else:
        pointer = address.to(tl.pointer_type(tl.int16), bitcast=True)
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    if PAIRS:
        return pointer + start // 2
    else:
        return pointer + start


# Storage values <-> float32. The element path (tail chunks, unaligned tensors) holds one storage value per element
# (bfloat16 as its int16 bit pattern, float16 as itself); the pair path (full chunks of 16-byte aligned tensors) holds
# a 32-bit word of two neighbouring values (low half: the even element) and their float32 values as an (n, 2) tensor
# (tl.join of the two halves, which keeps both in one thread). The pair path exists for the instruction count: a
# 16-bit value extracted from a vector load cost Triton's code two or three instructions (PRMT, MOV, shift) where a
# half of a 32-bit word costs one (a shift or a mask; a float16 half widens by one HADD2.F32), a stored word is made
# of two values by one instruction, without unpacking and repacking 16-bit values, and the arithmetic in F takes the
# words as they are (_packed).

@triton.jit
def _widen(raw, STORAGE: tl.constexpr, PAIRS: tl.constexpr):
    """Storage values as float32 (exact): one SASS instruction per element."""
    if PAIRS and STORAGE == 2:
        return tl.join((raw << 16).to(tl.float32, bitcast=True), (raw & -65536).to(tl.float32, bitcast=True))
    elif PAIRS:
        low = raw.to(tl.int16).to(tl.float16, bitcast=True)
        high = (raw >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        return tl.join(low.to(tl.float32), high.to(tl.float32))
    elif STORAGE == 2:
        return (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return raw.to(tl.float32)


@triton.jit
def _bfloat16_bits(x):
    """float32 x rounded to the nearest bfloat16 (ties to even) as its bit pattern in the low 16 bits of a uint32;
    NaN becomes the canonical NaN 0x7FFF, as the GPU's conversion gives it. Integer arithmetic (eft._round's, about
    five instructions per element on the GPU): the interpreter's own float32 -> bfloat16 conversion truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FFF, rounded)


@triton.jit
def _f(x, STORAGE: tl.constexpr, NATIVE: tl.constexpr):
    """F(x): float32 x rounded to the storage format (nearest, ties to even), as float32 (eft._round's value).

    bfloat16 on the GPU: one instruction, cvt.rn.bf16x2.f32 d, x, 0 (x rounded into the high half, +0 in the low
    half: d is F(x) as a float32), where a conversion and a widening take two (F2F and a shift) and the rounding on
    the bit pattern five. float16: Triton's conversions, which LLVM turns, where an operation on widened float16
    values is rounded back to float16, into that operation in float16 (add.rn.f16x2: the same value, float32 having
    more than twice float16's precision; the kernel's float16 arithmetic has compiled so since it was written)."""
    if STORAGE == 2:
        if NATIVE:
            return tl.inline_asm_elementwise("{ .reg .b32 zero; mov.b32 zero, 0; cvt.rn.bf16x2.f32 $0, $1, zero; }",
                                             "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        else:
            return (_bfloat16_bits(x) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float16).to(tl.float32)


@triton.jit
def _rounded(x, STORAGE: tl.constexpr, NATIVE: tl.constexpr, PAIRS: tl.constexpr):
    """(F(x) as float32, F(x) in storage form): a value the kernel both stores and computes with."""
    if STORAGE == 2:
        value = _f(x, STORAGE, NATIVE)
        if PAIRS:
            # The two high halves (the values' low halves are zero) by one PRMT, an integer instruction: the
            # conversion unit, whose throughput is low on Hopper, is left to the roundings (cvt.rn.bf16x2.f32 of the
            # two values would give the same word).
            low, high = tl.split(value)
            if NATIVE:
                raw = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [low, high],
                                                dtype=tl.int32, is_pure=True, pack=1)
            else:
                raw = ((low.to(tl.uint32, bitcast=True) >> 16)
                       | (high.to(tl.uint32, bitcast=True) & 0xFFFF0000)).to(tl.int32, bitcast=True)
        else:
            raw = (value.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
        return value, raw
    elif PAIRS:
        # float16: the two values rounded into the stored word by one cvt.rn.f16x2.f32, widened by HADD2.F32.
        raw = _word(x, STORAGE, NATIVE)
        return _widen(raw, STORAGE, PAIRS), raw
    else:
        half = x.to(tl.float16)
        return half.to(tl.float32), half


# Arithmetic in F on the pair path: an F value is held as the 32-bit word of two storage values (the storage form,
# see _widen), and an operation in F of two such words is one packed instruction for both lanes on the GPU,
# add.rn / sub.rn / mul.rn on bf16x2 (sm_90) or f16x2 (subnormals kept: no .ftz): F correctly rounded, the same bits
# as the float32 operation followed by the rounding to F (Figueroa's double-rounding theorem: float32's 24 bits are
# at least 2p + 2, p = 8 or 11; tests/collage/test_collage_packed_rounding.py checks the equivalence on every class of
# operands). Triton's own bfloat16 arithmetic goes through float32 (a conversion per operand and result), hence the
# inline assembly. Under the interpreter (NATIVE false) the same operation is the float32 operation on the widened
# values, rounded (bfloat16 on the bit pattern, float16 by numpy's conversion) into a word (_word).

@triton.jit
def _word(x, STORAGE: tl.constexpr, NATIVE: tl.constexpr):
    """The word of F(x) of an (n, 2) float32 pair: one cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32 for both values (its
    first operand goes to the high half); under the interpreter, bfloat16's rounding on the bit pattern or numpy's
    float16 conversion."""
    low, high = tl.split(x)
    if NATIVE and STORAGE == 2:
        return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,r,r", [high, low], dtype=tl.int32,
                                         is_pure=True, pack=1)
    elif NATIVE:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,r,r", [high, low], dtype=tl.int32,
                                         is_pure=True, pack=1)
    elif STORAGE == 2:
        return (_bfloat16_bits(low) | (_bfloat16_bits(high) << 16)).to(tl.int32, bitcast=True)
    else:
        low_bits = low.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        high_bits = high.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        return (low_bits | (high_bits << 16)).to(tl.int32, bitcast=True)


@triton.jit
def _packed(a, b, OPERATION: tl.constexpr, STORAGE: tl.constexpr, NATIVE: tl.constexpr):
    """F(a OPERATION b) on words of two F values (OPERATION: "add", "sub", "mul")."""
    if NATIVE and STORAGE == 2:
        return tl.inline_asm_elementwise(OPERATION + ".rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)
    elif NATIVE:
        return tl.inline_asm_elementwise(OPERATION + ".rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        x = _widen(a, STORAGE, True)
        y = _widen(b, STORAGE, True)
        if OPERATION == "add":
            return _word(x + y, STORAGE, NATIVE)
        elif OPERATION == "sub":
            return _word(x - y, STORAGE, NATIVE)
        else:
            return _word(x * y, STORAGE, NATIVE)


@triton.jit
def _add_f(a, b, STORAGE: tl.constexpr, NATIVE: tl.constexpr, PAIRS: tl.constexpr):
    """F(a + b) of two F values: float32 values rounded to F, or on the pair path words (_packed)."""
    if PAIRS:
        return _packed(a, b, "add", STORAGE, NATIVE)
    else:
        return _f(a + b, STORAGE, NATIVE)


@triton.jit
def _sub_f(a, b, STORAGE: tl.constexpr, NATIVE: tl.constexpr, PAIRS: tl.constexpr):
    if PAIRS:
        return _packed(a, b, "sub", STORAGE, NATIVE)
    else:
        return _f(a - b, STORAGE, NATIVE)


@triton.jit
def _mul_f(a, b, STORAGE: tl.constexpr, NATIVE: tl.constexpr, PAIRS: tl.constexpr):
    if PAIRS:
        return _packed(a, b, "mul", STORAGE, NATIVE)
    else:
        return _f(a * b, STORAGE, NATIVE)


@triton.jit
def _to_f(x, STORAGE: tl.constexpr, NATIVE: tl.constexpr, PAIRS: tl.constexpr):
    """F(x) of float32 x, in the form the F arithmetic takes (a float32, or on the pair path a word)."""
    if PAIRS:
        return _word(x, STORAGE, NATIVE)
    else:
        return _f(x, STORAGE, NATIVE)


@triton.jit
def _value(x, STORAGE: tl.constexpr, PAIRS: tl.constexpr):
    """An F value of the F arithmetic as float32 (on the pair path: the word widened, exact)."""
    if PAIRS:
        return _widen(x, STORAGE, PAIRS)
    else:
        return x


@triton.jit
def _scalar_f(x, STORAGE: tl.constexpr, PAIRS: tl.constexpr):
    """A scalar F value (a float32) in the form of the F arithmetic: on the pair path the word of two copies."""
    if PAIRS:
        if STORAGE == 2:  # (x is a Python float under the interpreter)
            bits = tl.cast(tl.cast(x, tl.float32), tl.uint32, bitcast=True) >> 16
        else:
            bits = tl.cast(tl.cast(tl.cast(x, tl.float32), tl.float16), tl.uint16, bitcast=True).to(tl.uint32)
        return (bits | (bits << 16)).to(tl.int32, bitcast=True)
    else:
        return x


@triton.jit
def _two_sum_f(a, b, STORAGE: tl.constexpr, NATIVE: tl.constexpr, PAIRS: tl.constexpr):
    """eft._two_sum: Knuth's TwoSum in F arithmetic, the same operations in the same order."""
    s = _add_f(a, b, STORAGE, NATIVE, PAIRS)
    b_virtual = _sub_f(s, a, STORAGE, NATIVE, PAIRS)
    a_virtual = _sub_f(s, b_virtual, STORAGE, NATIVE, PAIRS)
    return s, _add_f(_sub_f(a, a_virtual, STORAGE, NATIVE, PAIRS), _sub_f(b, b_virtual, STORAGE, NATIVE, PAIRS),
                     STORAGE, NATIVE, PAIRS)


@triton.jit
def _fast_two_sum_f(a, b, STORAGE: tl.constexpr, NATIVE: tl.constexpr, PAIRS: tl.constexpr):
    """eft._fast_two_sum: (s, t) in the form of the F arithmetic and in storage form (the kernel stores them; on the
    pair path the two are the same words)."""
    if PAIRS:
        s = _packed(a, b, "add", STORAGE, NATIVE)
        t = _packed(b, _packed(s, a, "sub", STORAGE, NATIVE), "sub", STORAGE, NATIVE)
        return s, s, t, t
    else:
        s, s_raw = _rounded(a + b, STORAGE, NATIVE, PAIRS)
        t, t_raw = _rounded(b - _f(s - a, STORAGE, NATIVE), STORAGE, NATIVE, PAIRS)
        return s, s_raw, t, t_raw


@triton.jit
def _chunk(param_ptr, param_lo_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_sq_lo_ptr, grad_ptr, offsets, mask,
           partials_ptr, pid, neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2, beta2_hi, beta2_lo, eps,
           weight_decay, bias_correction1, bias_correction2, STORAGE: tl.constexpr, PLUS: tl.constexpr,
           METRICS: tl.constexpr, NATIVE: tl.constexpr, PAIRS: tl.constexpr):
    """One chunk of one tensor, in the reference's order (python/leanops/reference/collage.py). PAIRS: the pointers
    address 32-bit words, offsets count words, and every value is an (n, 2) tensor (see _widen); mask is then
    all-true.

    Loads are issued ahead of their use (the prefetch): the moments' operands before anything is computed or stored
    (the compiler cannot move a load above a store to memory it cannot prove distinct, so loads interleaved with
    stores would wait for each other), the parameter pair right before the divisions, whose forty-odd instructions
    per element hide its latency; loaded up front as well, it held eight more registers across the moments, and with
    float16 the compiler then computed some values twice (about four instructions per element more)."""
    g_raw = tl.load(grad_ptr + offsets, mask=mask, other=0)
    m_raw = tl.load(exp_avg_ptr + offsets, mask=mask, other=0)
    v_raw = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0)
    if PLUS:
        v_lo_raw = tl.load(exp_avg_sq_lo_ptr + offsets, mask=mask, other=0)

    g = _widen(g_raw, STORAGE, PAIRS)
    m, m_raw = _rounded(beta1 * _widen(m_raw, STORAGE, PAIRS) + one_minus_beta1 * g, STORAGE, NATIVE, PAIRS)
    tl.store(exp_avg_ptr + offsets, m_raw, mask=mask)
    square_update = one_minus_beta2 * (g * g)
    if PLUS:
        # Scale((v, v_lo), (F(beta2), F(beta2 - F(beta2)))) (eft._two_prod, then mcf's Scale): the error term's FMA
        # is exact for 16-bit operands (the float32 product is exact), fused or not. The product and its error are
        # float32 operations rounded to F; the rest is arithmetic in F (on the pair path, of words: _packed).
        v_f = v_raw if PAIRS else _widen(v_raw, STORAGE, PAIRS)
        v_lo_f = v_lo_raw if PAIRS else _widen(v_lo_raw, STORAGE, PAIRS)
        v = _widen(v_raw, STORAGE, PAIRS)
        p = _to_f(v * beta2_hi, STORAGE, NATIVE, PAIRS)
        e = _to_f(tl.fma(v, beta2_hi, -_value(p, STORAGE, PAIRS)), STORAGE, NATIVE, PAIRS)
        cross = _add_f(_mul_f(v_f, _scalar_f(beta2_lo, STORAGE, PAIRS), STORAGE, NATIVE, PAIRS),
                       _mul_f(v_lo_f, _scalar_f(beta2_hi, STORAGE, PAIRS), STORAGE, NATIVE, PAIRS),
                       STORAGE, NATIVE, PAIRS)
        v, _, v_lo, _ = _fast_two_sum_f(p, _add_f(e, cross, STORAGE, NATIVE, PAIRS), STORAGE, NATIVE, PAIRS)
        # Grow((v, v_lo), F((1 - beta2) g g)).
        s, e = _two_sum_f(v, _to_f(square_update, STORAGE, NATIVE, PAIRS), STORAGE, NATIVE, PAIRS)
        v, v_raw, v_lo, v_lo_raw = _fast_two_sum_f(s, _add_f(e, v_lo, STORAGE, NATIVE, PAIRS), STORAGE, NATIVE,
                                                   PAIRS)
        tl.store(exp_avg_sq_ptr + offsets, v_raw, mask=mask)
        tl.store(exp_avg_sq_lo_ptr + offsets, v_lo_raw, mask=mask)
        second = _value(v, STORAGE, PAIRS) + _value(v_lo, STORAGE, PAIRS)
    else:
        v, v_raw = _rounded(beta2 * _widen(v_raw, STORAGE, PAIRS) + square_update, STORAGE, NATIVE, PAIRS)
        tl.store(exp_avg_sq_ptr + offsets, v_raw, mask=mask)
        second = v
    theta_raw = tl.load(param_ptr + offsets, mask=mask, other=0)
    theta_lo_raw = tl.load(param_lo_ptr + offsets, mask=mask, other=0)
    first = tl.div_rn(m, bias_correction1)
    denominator = tl.sqrt_rn(tl.div_rn(second, bias_correction2)) + eps
    quotient = tl.div_rn(first, denominator)
    # The parameter pair is widened after the divisions (whose slow-path calls make the compiler keep few values
    # alive across them): widened before, its floats were dropped and widened again after them.
    theta = _widen(theta_raw, STORAGE, PAIRS)
    theta_lo = _widen(theta_lo_raw, STORAGE, PAIRS)
    before = theta + theta_lo
    delta = neg_lr * (quotient + weight_decay * before)
    # Grow((theta, theta_lo), F(delta)), in F arithmetic (on the pair path, of the loaded words themselves).
    if PAIRS:
        theta = theta_raw
        theta_lo = theta_lo_raw
    s, e = _two_sum_f(theta, _to_f(delta, STORAGE, NATIVE, PAIRS), STORAGE, NATIVE, PAIRS)
    theta, theta_raw, theta_lo, theta_lo_raw = _fast_two_sum_f(s, _add_f(e, theta_lo, STORAGE, NATIVE, PAIRS),
                                                               STORAGE, NATIVE, PAIRS)
    tl.store(param_ptr + offsets, theta_raw, mask=mask)
    tl.store(param_lo_ptr + offsets, theta_lo_raw, mask=mask)
    if METRICS:
        stored = (_value(theta, STORAGE, PAIRS) + _value(theta_lo, STORAGE, PAIRS)) - before
        stored64 = stored.to(tl.float64)
        delta64 = delta.to(tl.float64)
        lost = (stored == 0) & (delta != 0)
        row_ptr = partials_ptr + pid.to(tl.int64) * 3
        # float32 factors: their float64 products are exact, as the reference's.
        if PAIRS:  # a full chunk: nothing masked
            descent = tl.sum(tl.sum(stored64 * delta64, axis=1), axis=0)
            squares = tl.sum(tl.sum(delta64 * delta64, axis=1), axis=0)
            lost_count = tl.sum(tl.sum(lost.to(tl.int32), axis=1), axis=0)
        else:
            descent = tl.sum(tl.where(mask, stored64 * delta64, 0.0), axis=0)
            squares = tl.sum(tl.where(mask, delta64 * delta64, 0.0), axis=0)
            lost_count = tl.sum(tl.where(mask & lost, 1, 0), axis=0)
        tl.store(row_ptr, descent)
        tl.store(row_ptr + 1, squares)
        tl.store(row_ptr + 2, lost_count.to(tl.float64))


@triton.jit
def _collage_adamw_kernel(table_ptr, n_rows, partials_ptr, neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                          beta2_hi, beta2_lo, eps, weight_decay, bias_correction1, bias_correction2,
                          STORAGE: tl.constexpr, PLUS: tl.constexpr, METRICS: tl.constexpr, ALIGNED: tl.constexpr,
                          BLOCK_SIZE: tl.constexpr, NATIVE: tl.constexpr):
    pid = tl.program_id(0)
    row_ptr = table_ptr + _find_row(table_ptr, n_rows, pid).to(tl.int64) * 8
    numel = tl.load(row_ptr + 6)
    start = (pid - tl.load(row_ptr + 7)).to(tl.int64) * BLOCK_SIZE
    param = tl.load(row_ptr + 0)
    param_lo = tl.load(row_ptr + 1)
    exp_avg = tl.load(row_ptr + 2)
    exp_avg_sq = tl.load(row_ptr + 3)
    # exp_avg_sq_lo's column is 0 in light mode, which passes exp_avg_sq's address instead (never read).
    exp_avg_sq_lo = tl.load(row_ptr + 4) if PLUS else exp_avg_sq
    grad = tl.load(row_ptr + 5)
    if ALIGNED and start + BLOCK_SIZE <= numel:
        # A full chunk of 16-byte aligned operands: a constant mask, 16-byte vector loads and stores, the pair path
        # (32-bit words of two values, packed arithmetic in F). float16 took one value per element until the packed
        # arithmetic (LLVM computed most of its F arithmetic in float16x2 instructions by itself, see _f): on the pair
        # path its plus mode takes 87 instructions per element instead of 96, its light mode 72 as before.
        PAIRS: tl.constexpr = True
        if NATIVE:
            # The divisors in registers (x + -0 is exactly x): MUFU.RCP, which each division starts with, cannot read
            # a kernel argument, and left to itself the compiler reloads it (LDC) for every division.
            bias_correction1 = tl.inline_asm_elementwise("add.rn.f32 $0, $1, 0f80000000;", "=r,r",
                                                         [bias_correction1], dtype=tl.float32, is_pure=True, pack=1)
            bias_correction2 = tl.inline_asm_elementwise("add.rn.f32 $0, $1, 0f80000000;", "=r,r",
                                                         [bias_correction2], dtype=tl.float32, is_pure=True, pack=1)
        if PAIRS:
            full_offsets = tl.arange(0, BLOCK_SIZE // 2)
            all_true = tl.full([BLOCK_SIZE // 2], 1, tl.int1)
        else:
            full_offsets = tl.arange(0, BLOCK_SIZE)
            all_true = tl.full([BLOCK_SIZE], 1, tl.int1)
        _chunk(_pointer(param, start, STORAGE, True, PAIRS), _pointer(param_lo, start, STORAGE, True, PAIRS),
               _pointer(exp_avg, start, STORAGE, True, PAIRS), _pointer(exp_avg_sq, start, STORAGE, True, PAIRS),
               _pointer(exp_avg_sq_lo, start, STORAGE, True, PAIRS), _pointer(grad, start, STORAGE, True, PAIRS),
               full_offsets, all_true, partials_ptr, pid, neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
               beta2_hi, beta2_lo, eps, weight_decay, bias_correction1, bias_correction2, STORAGE, PLUS, METRICS,
               NATIVE, PAIRS)
    else:
        # The last, partial chunk of a tensor, or operands off the 16-byte grid: one storage value per element.
        ELEMENTS: tl.constexpr = False
        offsets = tl.arange(0, BLOCK_SIZE)
        _chunk(_pointer(param, start, STORAGE, ALIGNED, ELEMENTS),
               _pointer(param_lo, start, STORAGE, ALIGNED, ELEMENTS),
               _pointer(exp_avg, start, STORAGE, ALIGNED, ELEMENTS),
               _pointer(exp_avg_sq, start, STORAGE, ALIGNED, ELEMENTS),
               _pointer(exp_avg_sq_lo, start, STORAGE, ALIGNED, ELEMENTS),
               _pointer(grad, start, STORAGE, ALIGNED, ELEMENTS), offsets, offsets < numel - start, partials_ptr, pid,
               neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2, beta2_hi, beta2_lo, eps, weight_decay,
               bias_correction1, bias_correction2, STORAGE, PLUS, METRICS, NATIVE, ELEMENTS)


# ---------------------------------------------------------------------------------------------------------------
# Launcher.

def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_collage_adamw_kernel, InterpretedFunction)


def _float32_scalars(*values: float) -> list[float]:
    """Each value as the reference's torch.tensor(value, dtype=float32), returned exactly as Python floats."""
    return [float(torch.tensor(value, dtype=torch.float32)) for value in values]


def _check(lists: dict, plus: bool) -> None:
    params = lists["params"]
    dtype, device = params[0].dtype, params[0].device
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"collage_adamw_step_: storage dtype must be bfloat16 or float16, got {dtype}")
    for name, tensors in lists.items():
        if name == "exp_avg_sqs_lo" and not plus:
            continue
        if len(tensors) != len(params):
            raise ValueError(f"collage_adamw_step_: {name} has {len(tensors)} tensors, params {len(params)}")
        for index, tensor in enumerate(tensors):
            if tensor.dtype != dtype or tensor.device != device:
                raise ValueError(f"collage_adamw_step_: {name}[{index}] is {tensor.dtype} on {tensor.device}, "
                                 f"expected {dtype} on {device}")
            if tensor.numel() != params[index].numel():
                raise ValueError(f"collage_adamw_step_: {name}[{index}] has {tensor.numel()} elements, "
                                 f"params[{index}] {params[index].numel()}")
            assert tensor.is_contiguous(), f"collage_adamw_step_: {name}[{index}] must be contiguous"


def _step_on_cpu(lists: dict, metrics, scalars: tuple, plus: bool) -> None:
    """CUDA tensors under the interpreter: step CPU copies, then copy the states back."""
    copies = {name: [tensor.cpu() for tensor in tensors] for name, tensors in lists.items()}
    cpu_metrics = None if metrics is None else torch.zeros(4, dtype=torch.float64)
    collage_adamw_step_(*copies.values(), *scalars, plus, cpu_metrics)
    for name in ("params", "params_lo", "exp_avgs", "exp_avg_sqs", "exp_avg_sqs_lo"):
        for tensor, copy in zip(lists[name], copies[name]):
            tensor.copy_(copy)
    if metrics is not None:
        metrics += cpu_metrics.to(metrics.device)


def _beta_pair(beta: float, dtype: torch.dtype) -> tuple[float, float]:
    """(F(beta), F(beta - F(beta))): beta as an MCF pair of the storage format, the difference exact in float64
    (as python/leanops/reference/collage.py's beta_pair and csrc/include/leanops/collage_host.h compute it)."""
    high = torch.tensor(beta, dtype=torch.float64).to(dtype)
    low = (torch.tensor(beta, dtype=torch.float64) - high.to(torch.float64)).to(dtype)
    return float(high), float(low)


def collage_adamw_step_(params: list[torch.Tensor], params_lo: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                        exp_avg_sqs: list[torch.Tensor], exp_avg_sqs_lo: list[torch.Tensor],
                        grads: list[torch.Tensor], lr: float, beta1: float, beta2: float, eps: float,
                        weight_decay: float, bias_correction1: float, bias_correction2: float, plus: bool,
                        metrics: torch.Tensor | None = None) -> None:
    """One Collage AdamW step on every tensor of the lists, in place, in one launch (module docstring).

    All tensors share one dtype (bfloat16 or float16) and device and are contiguous; exp_avg_sqs_lo is empty in
    light mode. metrics, if given, is a float64 (4,) tensor that the step adds its telemetry sums to.
    """
    if len(params) == 0:
        return
    lists = {"params": params, "params_lo": params_lo, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             "exp_avg_sqs_lo": exp_avg_sqs_lo, "grads": grads}
    _check(lists, plus)
    dtype, device = params[0].dtype, params[0].device
    interpreted = _interpreted()
    if interpreted and device.type != "cpu":
        _step_on_cpu(lists, metrics, (lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2), plus)
        return
    if not interpreted and device.type != "cuda":
        raise RuntimeError("collage_adamw_step_: the Triton kernel runs on CUDA tensors (or on the CPU under "
                           "TRITON_INTERPRET=1)")
    block_size = BLOCK_SIZE_INTERPRETER if interpreted else BLOCK_SIZE_GPU
    rows, chunks, numel_total, aligned = [], 0, 0, True
    for index, param in enumerate(params):
        numel = param.numel()
        if numel == 0:
            continue
        addresses = [param.data_ptr(), params_lo[index].data_ptr(), exp_avgs[index].data_ptr(),
                     exp_avg_sqs[index].data_ptr(), exp_avg_sqs_lo[index].data_ptr() if plus else 0,
                     grads[index].data_ptr()]
        aligned = aligned and all(address % _VECTOR_BYTES == 0 for address in addresses)
        rows.append(addresses + [numel, chunks])
        chunks += triton.cdiv(numel, block_size)
        numel_total += numel
    if not rows:
        return
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    partials = torch.empty((chunks, _PARTIALS) if metrics is not None else (1, _PARTIALS), dtype=torch.float64,
                           device=device)
    beta2_hi, beta2_lo = _beta_pair(beta2, dtype)
    (lr32, beta1_32, one_minus_beta1, beta2_32, one_minus_beta2, eps32, weight_decay32, bias_correction1_32,
     bias_correction2_32) = _float32_scalars(lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
                                             bias_correction1, bias_correction2)
    options = {} if interpreted else {"num_warps": NUM_WARPS_GPU, "enable_fp_fusion": False}
    with torch.cuda.device(device) if device.type == "cuda" else _no_context():
        _collage_adamw_kernel[(chunks,)](
            table, len(rows), partials, -lr32, beta1_32, one_minus_beta1, beta2_32, one_minus_beta2, beta2_hi,
            beta2_lo, eps32, weight_decay32, bias_correction1_32, bias_correction2_32, STORAGE=_STORAGE_CODE[dtype],
            PLUS=bool(plus), METRICS=metrics is not None, ALIGNED=aligned, BLOCK_SIZE=block_size,
            NATIVE=not interpreted, **options)
    if metrics is not None:
        totals = partials.sum(dim=0)
        metrics[:_PARTIALS] += totals.to(metrics.device)
        metrics[_PARTIALS] += float(numel_total)


class _no_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
