"""Triton kernel of FRUGAL's fused split step: the contract is python/leanops/reference/frugal.py, whose bits (params,
params_lo, exp_avgs, exp_avg_sqs) this kernel reproduces exactly.

Arithmetic. Values are widened to float32 in registers, and every float32 operation is the reference's, in its
order and correctly rounded: compiled with ``enable_fp_fusion=False``, dividing with ``tl.div_rn`` and taking square
roots with ``tl.sqrt_rn``. 16-bit parameters are rounded (or, with compensation, grown into their pair) with the
device functions of triton_kernels/mcf.py. The float32 scalars are rounded on the host as the reference's
``torch.tensor(value, dtype=float32)`` (so Triton's own double -> float conversion of the arguments is exact).

Multi-tensor launch. One launch serves every tensor of the lists (one dtype and device, each contiguous). The host
builds an int64 table, one row per non-empty tensor,

    [param, param_lo, exp_avg, exp_avg_sq, grad, positions, addend, numel, columns, subspace, mode, first_chunk]

(data pointers as integers, 0 where a tensor has no such operand; columns and subspace describe the matrix view in
COLUMNS / ROWS modes; first_chunk = number of BLOCK_SIZE chunks of the rows before it) and a float32 table of the
per-tensor scalars (step_size, bias_correction2_root). A program finds its row by binary search of first_chunk (as
triton_kernels/collage.py does) and steps its chunk of the flat tensor. In COLUMNS / ROWS modes element e is (i, j)
of the matrix, e = i * columns + j; it is state-full when p = positions[j] (columns) or positions[i] (rows) is >= 0,
and its moments are at i * subspace + p (columns: (rows, k) moments) or p * columns + j (rows: (k, columns)).

Memory access. When every streamed operand's address is 16-byte aligned (ALIGNED, checked on the host; the pointers
then carry a ``tl.multiple_of`` hint), a full chunk takes a path with a constant all-true mask, so that its contiguous
streams are vector loads and stores (they were one scalar access per element: a mask the compiler cannot see to be
all-true, and addresses of unknown alignment, keep Triton from vectorising): the parameter, its compensation, the
gradient and the addend, and in ADAMW mode the moments, which are then at the element's own offset (COLUMNS / ROWS
gather them through positions). With 4 elements a thread, that is 16 bytes a thread for float32 streams and 8 for
16-bit ones. The last, partial chunk of a tensor takes a masked path.

Under TRITON_INTERPRET=1 the same kernel runs on CPU tensors (the interpreter dereferences host addresses, so the
pointer table works as on the GPU); BLOCK_SIZE is larger there (fewer, wider programs run faster in numpy).
"""
import torch
import triton
import triton.language as tl

from .collage import _find_row, _float32_scalars, _interpreted, _no_context
from .eft import _STORAGE_CODE, _add, _fast_two_sum, _load, _round, _store, _two_sum

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ADAMW, FREE, COLUMNS, ROWS = 0, 1, 2, 3

_ROW = 12
# 4 elements per thread: the int64 index arithmetic of the matrix modes spilled registers at 2048 (ptxas, sm_90);
# with the full-chunk path beside the masked one, 2048 (16-byte vectors for the 16-bit streams too) takes about 200
# registers a thread against about 100 at 1024.
BLOCK_SIZE_GPU = 1024
NUM_WARPS_GPU = 8
BLOCK_SIZE_INTERPRETER = 8192
# Pointer alignment (bytes) that lets full chunks use vector loads and stores.
_VECTOR_BYTES = 16


@triton.jit
def _address(row_ptr, column: tl.constexpr, STORAGE: tl.constexpr, ALIGNED: tl.constexpr = False):
    """The row's address in `column` as a pointer to values of STORAGE (0 float32, 1 float16, 2 bfloat16 as int16
    bit patterns, 3 int32); ALIGNED: the address is a multiple of 16 bytes (checked on the host), which lets the
    contiguous loads and stores of a full chunk be vectors."""
    address = tl.load(row_ptr + column)
    if STORAGE == 0:
        pointer = address.to(tl.pointer_type(tl.float32), bitcast=True)
    elif STORAGE == 1:
        pointer = address.to(tl.pointer_type(tl.float16), bitcast=True)
    elif STORAGE == 2:
        pointer = address.to(tl.pointer_type(tl.int16), bitcast=True)
    else:
        pointer = address.to(tl.pointer_type(tl.int32), bitcast=True)
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _adam_update(work, m, v, g, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
                 bias_correction2_root):
    """The state-full element's moments and its work, in the reference's order."""
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    denominator = tl.div_rn(tl.sqrt_rn(v), bias_correction2_root) + eps
    return work - step_size * tl.div_rn(m, denominator), m, v


@triton.jit
def _frugal_chunk(row_ptr, offsets, mask, start, columns, subspace, mode, step_size, bias_correction2_root,
                  beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, free_lr, STORAGE: tl.constexpr,
                  GRAD_STORAGE: tl.constexpr, COMPENSATED: tl.constexpr, RULE: tl.constexpr, ALIGNED: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr):
    """One chunk of one tensor: elements `offsets` (those in `mask`). In a full chunk of aligned operands `mask` is a
    constant, so that the contiguous streams (parameter, compensation, gradient, addend, and the moments in ADAMW
    mode) are vector loads and stores: 16 bytes a thread for float32, 8 for 16-bit values (4 elements a thread)."""
    param_ptr = _address(row_ptr, 0, STORAGE, ALIGNED)
    theta = _load(param_ptr, offsets, mask, STORAGE, False)
    if COMPENSATED:
        param_lo_ptr = _address(row_ptr, 1, STORAGE, ALIGNED)
        theta_lo = _load(param_lo_ptr, offsets, mask, STORAGE, False)
        before = theta + theta_lo
    else:
        before = theta
    g = _load(_address(row_ptr, 4, GRAD_STORAGE, ALIGNED), offsets, mask, GRAD_STORAGE, False)
    addend_address = tl.load(row_ptr + 6)
    has_addend = addend_address != 0
    addend_ptr = addend_address.to(tl.pointer_type(tl.float32), bitcast=True)
    if ALIGNED:
        addend_ptr = tl.multiple_of(addend_ptr, 16)
    work = before * decay

    # State-full elements: AdamW on the moments. ADAMW mode has them at the element's own offset (contiguous: vector
    # loads in a full chunk); COLUMNS / ROWS gather them through positions; FREE has none.
    full = offsets < 0
    exp_avg_ptr = _address(row_ptr, 2, 0, ALIGNED)
    exp_avg_sq_ptr = _address(row_ptr, 3, 0, ALIGNED)
    if mode == 0:
        m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
        work, m, v = _adam_update(work, m, v, g, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
                                  bias_correction2_root)
        tl.store(exp_avg_ptr + offsets, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
        full = offsets >= 0
    elif mode >= 2:
        # (i, j) from the chunk's first element with one scalar division, then in int32 within the chunk (j0 + k <
        # columns + BLOCK_SIZE < 2^31, checked on the host): a 64-bit division per element costs about as much as
        # the memory traffic on the GPU.
        first_row = start // columns
        local = (start - first_row * columns).to(tl.int32) + tl.arange(0, BLOCK_SIZE)
        rows_ahead = local // columns.to(tl.int32)
        i = first_row + rows_ahead.to(tl.int64)
        j = (local - rows_ahead * columns.to(tl.int32)).to(tl.int64)
        positions_ptr = _address(row_ptr, 5, 3)
        p = tl.load(positions_ptr + tl.where(mode == 2, j, i), mask=mask, other=-1).to(tl.int64)
        full = p >= 0
        moment = tl.where(mode == 2, i * subspace + p, p * columns + j)
        full_mask = mask & full
        m = tl.load(exp_avg_ptr + moment, mask=full_mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + moment, mask=full_mask, other=0.0)
        updated, m, v = _adam_update(work, m, v, g, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
                                     bias_correction2_root)
        tl.store(exp_avg_ptr + moment, m, mask=full_mask)
        tl.store(exp_avg_sq_ptr + moment, v, mask=full_mask)
        work = tl.where(full, updated, work)

    # The addend (random / svd: the projected-back AdamW update).
    addend = tl.load(addend_ptr + offsets, mask=mask & has_addend, other=0.0)
    work = tl.where(has_addend, work + addend, work)

    # State-free elements.
    if RULE == 0:
        # reference.frugal.sign: +0 for +-0, NaN for NaN (a NaN gradient reaches the parameter).
        sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, tl.where(g != g, g, 0.0)))
        work = tl.where(full, work, work - free_lr * sign)
    elif RULE == 1:
        work = tl.where(full, work, work - free_lr * g)

    if COMPENSATED:
        # Grow((theta, theta_lo), F(work - before)).
        s, e = _two_sum(theta, _round(work - before, STORAGE), STORAGE)
        theta, theta_lo = _fast_two_sum(s, _add(e, theta_lo, STORAGE), STORAGE)
        _store(param_lo_ptr, offsets, mask, theta_lo, STORAGE)
    else:
        theta = _round(work, STORAGE)
    _store(param_ptr, offsets, mask, theta, STORAGE)


@triton.jit
def _frugal_split_step_kernel(table_ptr, scalars_ptr, n_rows, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                              decay, free_lr, STORAGE: tl.constexpr, GRAD_STORAGE: tl.constexpr,
                              COMPENSATED: tl.constexpr, RULE: tl.constexpr, ALIGNED: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    row = _find_row(table_ptr, n_rows, pid, 12, 11)
    row_ptr = table_ptr + row.to(tl.int64) * 12
    numel = tl.load(row_ptr + 7)
    columns = tl.load(row_ptr + 8)
    subspace = tl.load(row_ptr + 9)
    mode = tl.load(row_ptr + 10)
    start = (pid - tl.load(row_ptr + 11)).to(tl.int64) * BLOCK_SIZE
    step_size = tl.load(scalars_ptr + row.to(tl.int64) * 2)
    bias_correction2_root = tl.load(scalars_ptr + row.to(tl.int64) * 2 + 1)
    offsets = start + tl.arange(0, BLOCK_SIZE)
    if ALIGNED and start + BLOCK_SIZE <= numel:
        # A full chunk of 16-byte aligned operands: a constant mask, so that the contiguous streams vectorise.
        _frugal_chunk(row_ptr, offsets, tl.full([BLOCK_SIZE], 1, tl.int1), start, columns, subspace, mode,
                      step_size, bias_correction2_root, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay,
                      free_lr, STORAGE, GRAD_STORAGE, COMPENSATED, RULE, True, BLOCK_SIZE)
    else:
        _frugal_chunk(row_ptr, offsets, offsets < numel, start, columns, subspace, mode, step_size,
                      bias_correction2_root, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, free_lr,
                      STORAGE, GRAD_STORAGE, COMPENSATED, RULE, False, BLOCK_SIZE)


def _check(params, params_lo, exp_avgs, exp_avg_sqs, grads, positions, addends, modes, step_sizes,
           bias_correction2_roots, state_free) -> None:
    """The C++ kernels' checks (csrc/include/leanops/frugal_host.h), in Python, before the launch."""
    op = "leanops_triton.frugal_split_step_"
    count = len(params)
    if params_lo and len(params_lo) != count:
        raise ValueError(f"{op}: argument 'params_lo' has {len(params_lo)} tensors; expected 0 or {count}")
    for name, entries in (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("grads", grads),
                          ("positions", positions), ("addends", addends), ("modes", modes),
                          ("step_sizes", step_sizes), ("bias_correction2_roots", bias_correction2_roots)):
        if len(entries) != count:
            raise ValueError(f"{op}: argument '{name}' has {len(entries)} entries but 'params' has {count}")
    if state_free not in (0, 1, 2):
        raise ValueError(f"{op}: argument 'state_free' must be 0 (signSGD), 1 (SGD) or 2 (none), got {state_free}")
    if not count:
        return
    dtype, device, grad_dtype = params[0].dtype, params[0].device, grads[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: argument 'params[0]' has dtype {dtype}; the kernels support {SUPPORTED_DTYPES}")
    if params_lo and dtype == torch.float32:
        raise ValueError(f"{op}: argument 'params_lo' must be empty for float32 parameters")
    if grad_dtype not in (dtype, torch.float32):
        raise TypeError(f"{op}: argument 'grads[0]' has dtype {grad_dtype}; expected {dtype} or torch.float32")

    def check(tensor, name, expected, numel):
        if tensor.dtype != expected:
            raise TypeError(f"{op}: argument '{name}' has dtype {tensor.dtype}; expected {expected}")
        if tensor.device != device:
            raise ValueError(f"{op}: argument '{name}' is on {tensor.device} but 'params[0]' is on {device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{op}: argument '{name}' must be contiguous")
        if numel is not None and tensor.numel() != numel:
            raise ValueError(f"{op}: argument '{name}' has {tensor.numel()} elements; expected {numel}")

    for index, theta in enumerate(params):
        numel = theta.numel()
        check(theta, f"params[{index}]", dtype, None)
        if params_lo:
            check(params_lo[index], f"params_lo[{index}]", dtype, numel)
        check(grads[index], f"grads[{index}]", grad_dtype, numel)
        if addends[index].numel():
            check(addends[index], f"addends[{index}]", torch.float32, numel)
        mode = modes[index]
        if mode not in (ADAMW, FREE, COLUMNS, ROWS):
            raise ValueError(f"{op}: argument 'modes[{index}]' must be 0, 1, 2 or 3, got {mode}")
        if mode == FREE:
            continue
        moments = numel
        if mode in (COLUMNS, ROWS):
            check(positions[index], f"positions[{index}]", torch.int32, None)
            size = positions[index].numel()
            if size == 0 or numel % size:
                raise ValueError(f"{op}: argument 'positions[{index}]' has {size} entries, which must divide "
                                 f"params[{index}]'s {numel} elements")
            other = numel // size
            moments = exp_avgs[index].numel()
            if other and (moments % other or moments // other > size):
                raise ValueError(f"{op}: argument 'exp_avgs[{index}]' has {moments} elements, not a whole number "
                                 f"(at most {size}) of {'columns' if mode == COLUMNS else 'rows'} of {other}")
        check(exp_avgs[index], f"exp_avgs[{index}]", torch.float32, moments)
        check(exp_avg_sqs[index], f"exp_avg_sqs[{index}]", torch.float32, moments)


def frugal_split_step_(params: list[torch.Tensor], params_lo: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                       exp_avg_sqs: list[torch.Tensor], grads: list[torch.Tensor], positions: list[torch.Tensor],
                       addends: list[torch.Tensor], modes: list[int], step_sizes: list[float],
                       bias_correction2_roots: list[float], beta1: float, beta2: float, eps: float, decay: float,
                       free_lr: float, state_free: int) -> None:
    """One FRUGAL split step on every tensor of the lists, in place, in one launch (module docstring; the arguments
    are python/leanops/reference/frugal.py's)."""
    _check(params, params_lo, exp_avgs, exp_avg_sqs, grads, positions, addends, modes, step_sizes,
           bias_correction2_roots, state_free)
    if not params:
        return
    dtype, device = params[0].dtype, params[0].device
    interpreted = _interpreted()
    if interpreted and device.type != "cpu":
        raise RuntimeError("leanops_triton.frugal_split_step_: under TRITON_INTERPRET=1 the kernel runs on CPU "
                           "tensors only")
    if not interpreted and device.type != "cuda":
        raise RuntimeError("leanops_triton.frugal_split_step_: the Triton kernel runs on CUDA tensors (or on the CPU "
                           "under TRITON_INTERPRET=1)")
    block_size = BLOCK_SIZE_INTERPRETER if interpreted else BLOCK_SIZE_GPU
    rows, scalars, chunks, aligned = [], [], 0, True
    for index, theta in enumerate(params):
        numel = theta.numel()
        if numel == 0:
            continue
        mode = modes[index]
        has_moments = mode != FREE
        matrix = mode in (COLUMNS, ROWS)
        columns = subspace = 0
        if matrix:
            size = positions[index].numel()
            other = numel // size
            columns = size if mode == COLUMNS else other
            subspace = exp_avgs[index].numel() // other
            if columns + block_size >= 2 ** 31:
                raise ValueError(f"leanops_triton.frugal_split_step_: params[{index}] has rows of {columns} "
                                 "elements; the Triton kernel indexes a row in int32 (fewer than 2^31 - 8192)")
        row = [theta.data_ptr(), params_lo[index].data_ptr() if params_lo else 0,
               exp_avgs[index].data_ptr() if has_moments else 0,
               exp_avg_sqs[index].data_ptr() if has_moments else 0, grads[index].data_ptr(),
               positions[index].data_ptr() if matrix else 0,
               addends[index].data_ptr() if addends[index].numel() else 0,
               numel, columns, subspace, mode, chunks]
        # Every streamed operand's address (positions is gathered: not needed) a multiple of 16 bytes: full chunks
        # take vector loads and stores (ALIGNED). 0 (no such operand) is aligned.
        aligned = aligned and all(address % _VECTOR_BYTES == 0 for address in row[:5] + row[6:7])
        rows.append(row)
        scalars.append([step_sizes[index], bias_correction2_roots[index]])
        chunks += triton.cdiv(numel, block_size)
    if not rows:
        return
    table = torch.tensor(rows, dtype=torch.int64)
    # float32 per-tensor scalars, rounded as the reference rounds them.
    scalar_table = torch.tensor(scalars, dtype=torch.float64).to(torch.float32)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
        scalar_table = scalar_table.pin_memory().to(device, non_blocking=True)
    beta1_32, one_minus_beta1, beta2_32, one_minus_beta2, eps32, decay32, free_lr32 = _float32_scalars(
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, decay, free_lr)
    options = {} if interpreted else {"num_warps": NUM_WARPS_GPU, "enable_fp_fusion": False}
    with torch.cuda.device(device) if device.type == "cuda" else _no_context():
        _frugal_split_step_kernel[(chunks,)](
            table, scalar_table, len(rows), beta1_32, one_minus_beta1, beta2_32, one_minus_beta2, eps32, decay32,
            free_lr32, STORAGE=_STORAGE_CODE[dtype], GRAD_STORAGE=_STORAGE_CODE[grads[0].dtype],
            COMPENSATED=bool(params_lo), RULE=int(state_free), ALIGNED=aligned, BLOCK_SIZE=block_size, **options)
