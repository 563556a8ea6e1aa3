"""Triton kernel of Collage AdamW's fused multi-tensor step: the contract is python/leanops/reference/collage.py,
whose bits (params, params_lo, exp_avgs, exp_avg_sqs, exp_avg_sqs_lo) this kernel reproduces exactly.

Arithmetic. Storage values are widened to float32 in registers; "arithmetic in F" and the MCF algorithms (TwoSum,
Fast2Sum, TwoProd, so Grow and Scale) are the device functions of triton_kernels/mcf.py, in the reference's order.
Every float32 operation is the reference's, in its order and correctly rounded: the kernel is compiled with
``enable_fp_fusion=False`` (no a*b+c contracted into an FMA), divides with ``tl.div_rn`` and takes square roots with
``tl.sqrt_rn`` (plain ``/`` and ``tl.sqrt`` are approximate on the GPU). The only fused multiply-add is TwoProd's
error term in ``plus`` mode (``fma(v, F(beta2), -p)``), which is exact for 16-bit operands whether fused or not.
The scalars are rounded to float32 on the host exactly as the reference's ``torch.tensor(value, dtype=float32)``
(so that Triton's own double -> float conversion of the arguments is exact), -lr included.

Multi-tensor launch. One launch serves every tensor of the lists (they share dtype and device; each must be
contiguous). The host builds a small int64 table, one row per non-empty tensor:

    [param, param_lo, exp_avg, exp_avg_sq, exp_avg_sq_lo (0 in light mode), grad, numel, first_chunk]

(data pointers as integers; first_chunk = number of BLOCK_SIZE chunks of the rows before it). The grid has one
program per chunk of BLOCK_SIZE elements, over all tensors. A program finds its row by a binary search of the
first_chunk column (log2(rows) scalar loads, no per-chunk table to build or copy), casts the row's addresses to
pointers (int64 -> pointer bitcast) and updates its chunk. Full chunks take an unmasked-in-effect path (a constant
all-true mask) whose loads and stores are 16-byte vectors when every address is 16-byte aligned (ALIGNED, checked
on the host; then the pointers carry a ``tl.multiple_of`` hint); the last, partial chunk of a tensor takes a masked
path. On the GPU the table is copied from pinned memory without blocking the host.

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

from .eft import _STORAGE_CODE, _add, _fast_two_sum, _load, _mul, _round, _store, _two_prod, _two_sum

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
def _pointer(row_ptr, column: tl.constexpr, start, STORAGE: tl.constexpr, ALIGNED: tl.constexpr):
    """The row's address in `column` as a pointer to storage values (bfloat16 as int16 bit patterns), plus start."""
    address = tl.load(row_ptr + column)
    if STORAGE == 1:
        pointer = address.to(tl.pointer_type(tl.float16), bitcast=True)
    else:
        pointer = address.to(tl.pointer_type(tl.int16), bitcast=True)
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer + start


@triton.jit
def _chunk(param_ptr, param_lo_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_sq_lo_ptr, grad_ptr, offsets, mask,
           partials_ptr, pid, neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2, beta2_hi, beta2_lo, eps,
           weight_decay, bias_correction1, bias_correction2, STORAGE: tl.constexpr, PLUS: tl.constexpr,
           METRICS: tl.constexpr):
    """One chunk of one tensor, in the reference's order (python/leanops/reference/collage.py)."""
    g = _load(grad_ptr, offsets, mask, STORAGE, False)
    m = _load(exp_avg_ptr, offsets, mask, STORAGE, False)
    m = _round(beta1 * m + one_minus_beta1 * g, STORAGE)
    _store(exp_avg_ptr, offsets, mask, m, STORAGE)
    square_update = one_minus_beta2 * (g * g)
    v = _load(exp_avg_sq_ptr, offsets, mask, STORAGE, False)
    if PLUS:
        v_lo = _load(exp_avg_sq_lo_ptr, offsets, mask, STORAGE, False)
        # Scale((v, v_lo), (F(beta2), F(beta2 - F(beta2)))): the error term's FMA is exact for 16-bit operands.
        p, e = _two_prod(v, beta2_hi, STORAGE, True)
        cross = _add(_mul(v, beta2_lo, STORAGE), _mul(v_lo, beta2_hi, STORAGE), STORAGE)
        v, v_lo = _fast_two_sum(p, _add(e, cross, STORAGE), STORAGE)
        # Grow((v, v_lo), F((1 - beta2) g g)).
        s, e = _two_sum(v, _round(square_update, STORAGE), STORAGE)
        v, v_lo = _fast_two_sum(s, _add(e, v_lo, STORAGE), STORAGE)
        _store(exp_avg_sq_ptr, offsets, mask, v, STORAGE)
        _store(exp_avg_sq_lo_ptr, offsets, mask, v_lo, STORAGE)
        second = v + v_lo
    else:
        v = _round(beta2 * v + square_update, STORAGE)
        _store(exp_avg_sq_ptr, offsets, mask, v, STORAGE)
        second = v
    first = tl.div_rn(m, bias_correction1)
    denominator = tl.sqrt_rn(tl.div_rn(second, bias_correction2)) + eps
    theta = _load(param_ptr, offsets, mask, STORAGE, False)
    theta_lo = _load(param_lo_ptr, offsets, mask, STORAGE, False)
    before = theta + theta_lo
    delta = neg_lr * (tl.div_rn(first, denominator) + weight_decay * before)
    # Grow((theta, theta_lo), F(delta)).
    s, e = _two_sum(theta, _round(delta, STORAGE), STORAGE)
    theta, theta_lo = _fast_two_sum(s, _add(e, theta_lo, STORAGE), STORAGE)
    _store(param_ptr, offsets, mask, theta, STORAGE)
    _store(param_lo_ptr, offsets, mask, theta_lo, STORAGE)
    if METRICS:
        stored = (theta + theta_lo) - before
        stored64 = stored.to(tl.float64)
        delta64 = delta.to(tl.float64)
        # float32 factors: their float64 products are exact, as the reference's.
        descent = tl.sum(tl.where(mask, stored64 * delta64, 0.0), axis=0)
        squares = tl.sum(tl.where(mask, delta64 * delta64, 0.0), axis=0)
        lost = tl.sum(tl.where(mask & (stored == 0) & (delta != 0), 1, 0), axis=0)
        row_ptr = partials_ptr + pid.to(tl.int64) * 3
        tl.store(row_ptr, descent)
        tl.store(row_ptr + 1, squares)
        tl.store(row_ptr + 2, lost.to(tl.float64))


@triton.jit
def _collage_adamw_kernel(table_ptr, n_rows, partials_ptr, neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                          beta2_hi, beta2_lo, eps, weight_decay, bias_correction1, bias_correction2,
                          STORAGE: tl.constexpr, PLUS: tl.constexpr, METRICS: tl.constexpr, ALIGNED: tl.constexpr,
                          BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    row_ptr = table_ptr + _find_row(table_ptr, n_rows, pid).to(tl.int64) * 8
    numel = tl.load(row_ptr + 6)
    start = (pid - tl.load(row_ptr + 7)).to(tl.int64) * BLOCK_SIZE
    param_ptr = _pointer(row_ptr, 0, start, STORAGE, ALIGNED)
    param_lo_ptr = _pointer(row_ptr, 1, start, STORAGE, ALIGNED)
    exp_avg_ptr = _pointer(row_ptr, 2, start, STORAGE, ALIGNED)
    exp_avg_sq_ptr = _pointer(row_ptr, 3, start, STORAGE, ALIGNED)
    if PLUS:
        exp_avg_sq_lo_ptr = _pointer(row_ptr, 4, start, STORAGE, ALIGNED)
    else:
        exp_avg_sq_lo_ptr = exp_avg_sq_ptr  # not read in light mode
    grad_ptr = _pointer(row_ptr, 5, start, STORAGE, ALIGNED)
    offsets = tl.arange(0, BLOCK_SIZE)
    if start + BLOCK_SIZE <= numel:
        # A full chunk: a constant mask, so that loads and stores vectorise.
        _chunk(param_ptr, param_lo_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_sq_lo_ptr, grad_ptr, offsets,
               tl.full([BLOCK_SIZE], 1, tl.int1), partials_ptr, pid, neg_lr, beta1, one_minus_beta1, beta2,
               one_minus_beta2, beta2_hi, beta2_lo, eps, weight_decay, bias_correction1, bias_correction2, STORAGE,
               PLUS, METRICS)
    else:
        _chunk(param_ptr, param_lo_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_sq_lo_ptr, grad_ptr, offsets,
               offsets < numel - start, partials_ptr, pid, neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
               beta2_hi, beta2_lo, eps, weight_decay, bias_correction1, bias_correction2, STORAGE, PLUS, METRICS)


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
            PLUS=bool(plus), METRICS=metrics is not None, ALIGNED=aligned, BLOCK_SIZE=block_size, **options)
    if metrics is not None:
        totals = partials.sum(dim=0)
        metrics[:_PARTIALS] += totals.to(metrics.device)
        metrics[_PARTIALS] += float(numel_total)


class _no_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
