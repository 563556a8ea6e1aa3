"""FRUGAL's fused split step in plain PyTorch: the oracle that the C++, CUDA and Triton kernels match bit for bit.

The optimizer (leanops.optim.FRUGAL) chooses the subspaces; this step applies one optimizer step to a list of
tensors, each in one of four modes (per tensor, ``modes[i]``):

    ADAMW   (0): every element is state-full: AdamW with moments m, v of the tensor's shape.
    FREE    (1): every element is state-free (an inactive block, or the remainder of a projected tensor).
    COLUMNS (2): the tensor is a matrix (rows, n) with n = positions.numel(); column j is state-full when
                 p = positions[j] >= 0, its moments being column p of the (rows, k) matrices m, v.
    ROWS    (3): the matrix (n_rows, columns) with n_rows = positions.numel(); row i is state-full when
                 p = positions[i] >= 0, its moments being row p of the (k, columns) matrices m, v.

``positions`` is the inverse of the sorted int32 subspace indices: -1 for a coordinate outside the subspace.

Per element, with theta the parameter (and theta_lo its Collage compensation when ``params_lo`` is given), g the
gradient, a the optional addend, every value widened to float32, and every float32 operation below performed once,
correctly rounded, in this order (no fused multiply-add):

    before = theta (+ theta_lo)
    work   = before * decay                                        decay = float32(1 - lr * weight_decay)
    state-full: m    = beta1 * m + (1 - beta1) * g
                v    = beta2 * v + (1 - beta2) * (g * g)
                work = work - step_size * (m / (sqrt(v) / bias_correction2_root + eps))
    work   = work + a                                              when addends[i] is not empty
    state-free: work = work - free_lr * sign(g)   (state_free = 0, signSGD; sign(+-0) = +0, sign(NaN) = NaN)
                work = work - free_lr * g         (state_free = 1, SGD)
                (nothing)                         (state_free = 2, none)
    store  float32 parameter: theta = work;  16-bit without compensation: theta = F(work) (nearest even);
           16-bit with compensation: (theta, theta_lo) = Grow((theta, theta_lo), F(work - before)) (leanops.mcf)

step_size = float32(lr * state_full_lr_scale / (1 - beta1^t)) and bias_correction2_root = float32(sqrt(1 - beta2^t))
are per tensor (the step count t is), computed in float64 on the host; the other scalars are per call, rounded to
float32 as torch.tensor(value, dtype=float32) does; 1 - beta1 and 1 - beta2 are taken in float64 first.

Special values propagate as in torch: a NaN gradient makes its element's parameter NaN (state-free: sign(NaN) is NaN,
not torch.sign's 0, so signSGD does not silently drop it; state-full: through the moments), whatever the provider.

Random and SVD projections use the same step around torch matmuls: an ADAMW-mode step on a zeroed float32 "parameter"
of the projected shape (decay 1) leaves -step_size * m / denom in it, which is projected back and given as the
addend of a FREE-mode step on the parameter, with the remainder G - P P^T G as its gradient.
"""
import torch

from . import mcf
from .collage import sqrt_rn

Tensor = torch.Tensor

ADAMW, FREE, COLUMNS, ROWS = 0, 1, 2, 3
MODES = (ADAMW, FREE, COLUMNS, ROWS)
SIGNSGD, SGD, NONE = 0, 1, 2
STATE_FREE_CODES = {"signsgd": SIGNSGD, "sgd": SGD, "none": NONE}


def _float32(value: float, device) -> Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


def sign(g: Tensor) -> Tensor:
    """signSGD's sign: +1 for g > 0, -1 for g < 0, +0 for +-0, and NaN for NaN (torch.sign gives 0 for NaN, which
    would drop a NaN gradient silently; and its zero's sign is an implementation detail)."""
    one = torch.ones((), dtype=g.dtype, device=g.device)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    return torch.where(g > 0, one, torch.where(g < 0, -one, torch.where(torch.isnan(g), g, zero)))


def state_full_mask(mode: int, positions: Tensor, rows: int, columns: int) -> Tensor | None:
    """(rows, columns) bool mask of the state-full elements for COLUMNS / ROWS (None for ADAMW and FREE)."""
    if mode == COLUMNS:
        return (positions >= 0).view(1, columns).expand(rows, columns)
    if mode == ROWS:
        return (positions >= 0).view(rows, 1).expand(rows, columns)
    return None


def frugal_split_step_(params: list[Tensor], params_lo: list[Tensor], exp_avgs: list[Tensor],
                       exp_avg_sqs: list[Tensor], grads: list[Tensor], positions: list[Tensor],
                       addends: list[Tensor], modes: list[int], step_sizes: list[float],
                       bias_correction2_roots: list[float], beta1: float, beta2: float, eps: float, decay: float,
                       free_lr: float, state_free: int) -> None:
    """One FRUGAL split step on every tensor of the lists, in place (module docstring). params_lo is empty (no
    compensation) or one 16-bit tensor per parameter; exp_avgs/exp_avg_sqs, positions and addends hold an empty
    tensor where a tensor's mode or call does not use them."""
    f32 = torch.float32
    for index, theta in enumerate(params):
        device = theta.device
        mode = modes[index]
        compensated = len(params_lo) > 0
        g = grads[index].to(f32).reshape(-1)
        x = theta.to(f32).reshape(-1)
        before = x + params_lo[index].to(f32).reshape(-1) if compensated else x
        work = before * _float32(decay, device)
        numel = theta.numel()
        if mode == ADAMW:
            full = torch.ones(numel, dtype=torch.bool, device=device)
            m_flat, v_flat = exp_avgs[index].view(-1), exp_avg_sqs[index].view(-1)
            moment_index = torch.arange(numel, device=device)
        elif mode == FREE:
            full = torch.zeros(numel, dtype=torch.bool, device=device)
            m_flat = v_flat = moment_index = None
        else:
            size = positions[index].numel()
            rows, columns = (numel // size, size) if mode == COLUMNS else (size, numel // size)
            position = positions[index].long()
            full = state_full_mask(mode, position, rows, columns).reshape(-1)
            row = torch.arange(rows, device=device).view(rows, 1).expand(rows, columns)
            column = torch.arange(columns, device=device).view(1, columns).expand(rows, columns)
            if mode == COLUMNS:
                k = exp_avgs[index].numel() // max(rows, 1)
                moment_index = (row * k + position.view(1, columns)).reshape(-1)
            else:
                moment_index = (position.view(rows, 1) * columns + column).reshape(-1)
            moment_index = moment_index[full]
            m_flat, v_flat = exp_avgs[index].view(-1), exp_avg_sqs[index].view(-1)
        if m_flat is not None and moment_index.numel():
            g_full = g[full]
            m = _float32(beta1, device) * m_flat[moment_index] + _float32(1.0 - beta1, device) * g_full
            v = _float32(beta2, device) * v_flat[moment_index] + _float32(1.0 - beta2, device) * (g_full * g_full)
            m_flat[moment_index] = m
            v_flat[moment_index] = v
            denominator = sqrt_rn(v) / _float32(bias_correction2_roots[index], device) + _float32(eps, device)
            work[full] = work[full] - _float32(step_sizes[index], device) * (m / denominator)
        if addends[index].numel():
            work = work + addends[index].to(f32).reshape(-1)
        free = ~full
        if state_free == SIGNSGD:
            work[free] = work[free] - _float32(free_lr, device) * sign(g[free])
        elif state_free == SGD:
            work[free] = work[free] - _float32(free_lr, device) * g[free]
        if compensated:
            low = params_lo[index]
            high, low_part = mcf.grow(theta.reshape(-1), low.reshape(-1), (work - before).to(theta.dtype))
            theta.copy_(high.view_as(theta))
            low.copy_(low_part.view_as(low))
        else:
            theta.copy_(work.view_as(theta))
