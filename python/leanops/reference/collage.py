"""Collage AdamW's fused step in plain PyTorch: the oracle that the Triton, CUDA and C++ kernels match bit for bit.

Collage (Yu et al., "Collage: Light-Weight Low-Precision Strategy for LLM Training", ICML 2024) keeps every optimizer
tensor in a 16-bit storage format F (bfloat16, or float16) and compensates rounding with multi-component floats:
a parameter is the unevaluated pair (theta, theta_lo) of two F numbers, updated with Grow (leanops.mcf). In
``plus`` mode the second moment is a pair too, decayed with Scale by (F(beta2), beta2 - F(beta2)): bfloat16(0.999)
is 1.0, so a plain bfloat16 v never decays at the most common beta2.

One step, per element, with bias corrections c1 = 1 - beta1^t and c2 = 1 - beta2^t (computed in float64 on the host
and passed as float32), every F value read as float32, and "F(x)" rounding a float32 x to F (to nearest even):

    m      <- F(beta1 m + (1 - beta1) g)                                      float32 arithmetic, one rounding
    light: v <- F(beta2 v + (1 - beta2) (g g))                                 float32 arithmetic, one rounding
    plus:  (v, v_lo) <- Scale((v, v_lo), (F(beta2), F(beta2 - F(beta2))))      arithmetic in F (mcf.scale)
           (v, v_lo) <- Grow((v, v_lo), F((1 - beta2) (g g)))                  arithmetic in F (mcf.grow)
    V      = v (+ v_lo)                                                       float32
    delta  = -lr ((m / c1) / (sqrt(V / c2) + eps) + weight_decay (theta + theta_lo))     float32
    (theta, theta_lo) <- Grow((theta, theta_lo), F(delta))                    arithmetic in F (mcf.grow)

Decoupled weight decay is part of delta, so it goes through the compensated update: a separate F multiply
theta (1 - lr wd) rounds back to theta whenever lr wd is below F's half-ulp (2^-9 for bfloat16).

float32 operations are performed in exactly this order, each correctly rounded (sqrt and division included, no
fused multiply-add), so every backend produces the same bits. "Arithmetic in F" is leanops.mcf's: each operation in
float32, rounded to F.

Telemetry (``metrics`` given): the stored change s = (theta' + theta_lo') - (theta + theta_lo), in float32, against
the intended delta: metrics += (sum s delta, sum delta^2, count(s == 0 and delta != 0), count(elements)), float64
(4,); the effective descent quality is EDQ = sum s delta / sum delta^2 (1: nothing of the update was lost).
"""
import torch

from . import mcf

Tensor = torch.Tensor


def beta_pair(beta: float, dtype: torch.dtype) -> tuple[float, float]:
    """(F(beta), F(beta - F(beta))): beta as an MCF pair of the storage format (the difference is exact in
    float64)."""
    high = torch.tensor(beta, dtype=torch.float64).to(dtype)
    low = (torch.tensor(beta, dtype=torch.float64) - high.to(torch.float64)).to(dtype)
    return float(high), float(low)


def sqrt_rn(x: Tensor) -> Tensor:
    """The correctly rounded float32 square root of float32 x (IEEE sqrt, as the kernels compute it).

    torch's CPU float32 sqrt is not always correctly rounded (about 16% of random arguments were 1 ulp off with
    torch 2.14 on AVX2), so: a float64 square root rounded to float32, then corrected exactly. For the candidate r,
    the midpoints to its neighbours have 25 significant bits, their squares are exact in float64, and comparing them
    with x decides the rounding (no midpoint squared equals a float32 x: that would need 49-50 significant bits).
    """
    root = torch.sqrt(x.double()).to(torch.float32)
    exact = x.double()
    up, down = torch.nextafter(root, torch.full_like(root, torch.inf)), torch.nextafter(root, torch.zeros_like(root))
    upper_midpoint = (root.double() + up.double()) / 2
    lower_midpoint = (root.double() + down.double()) / 2
    root = torch.where(upper_midpoint * upper_midpoint < exact, up, root)
    return torch.where(lower_midpoint * lower_midpoint > exact, down, root)


def collage_adamw_step_(params: list[Tensor], params_lo: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], exp_avg_sqs_lo: list[Tensor], grads: list[Tensor], lr: float,
                        beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction1: float,
                        bias_correction2: float, plus: bool, metrics: Tensor | None = None) -> None:
    """One Collage AdamW step on every tensor of the lists, in place (module docstring). exp_avg_sqs_lo is empty
    in light mode. metrics, if given, is a float64 (4,) tensor that the step adds its telemetry sums to."""
    for index, theta in enumerate(params):
        dtype = theta.dtype
        theta_lo, m, v, g = params_lo[index], exp_avgs[index], exp_avg_sqs[index], grads[index]
        f32 = torch.float32
        g32 = g.to(f32)
        scalar = lambda value: torch.tensor(value, dtype=f32, device=theta.device)  # noqa: E731
        m32 = (scalar(beta1) * m.to(f32) + scalar(1.0 - beta1) * g32)
        m.copy_(m32.to(dtype))
        square_update = scalar(1.0 - beta2) * (g32 * g32)
        if plus:
            v_lo = exp_avg_sqs_lo[index]
            b_hi, b_lo = beta_pair(beta2, dtype)
            new_v, new_v_lo = mcf.scale(v, v_lo, torch.tensor(b_hi, dtype=dtype, device=v.device),
                                        torch.tensor(b_lo, dtype=dtype, device=v.device))
            new_v, new_v_lo = mcf.grow(new_v, new_v_lo, square_update.to(dtype))
            v.copy_(new_v)
            v_lo.copy_(new_v_lo)
            second = v.to(f32) + v_lo.to(f32)
        else:
            v.copy_((scalar(beta2) * v.to(f32) + square_update).to(dtype))
            second = v.to(f32)
        first = m.to(f32) / scalar(bias_correction1)
        denominator = sqrt_rn(second / scalar(bias_correction2)) + scalar(eps)
        before = theta.to(f32) + theta_lo.to(f32)
        delta = -scalar(lr) * (first / denominator + scalar(weight_decay) * before)
        new_theta, new_theta_lo = mcf.grow(theta, theta_lo, delta.to(dtype))
        theta.copy_(new_theta)
        theta_lo.copy_(new_theta_lo)
        if metrics is not None:
            stored = (theta.to(f32) + theta_lo.to(f32)) - before
            lost = (stored == 0) & (delta != 0)
            metrics += torch.stack([(stored.double() * delta.double()).sum(), delta.double().square().sum(),
                                    lost.sum().double(), torch.tensor(float(theta.numel()), dtype=torch.float64,
                                                                      device=theta.device)]).to(metrics.device)
