"""Linear cross-entropy (a language model's loss head) that never materializes the N x V logits.

With hidden states h (N, D), classifier W (V, D), optional bias b (V,) and targets t (N,):

    z = h W^T + b,   z' = c tanh(z / c) with softcap=c (Gemma 2), else z' = z,   lse = logsumexp_j z'_j

    loss_n = (lse - z'_t) + a (z'_t - sum_j z'_j / V)     cross-entropy with label smoothing a (as F.cross_entropy)
             + l lse^2                                    z_loss=l (PaLM's auxiliary loss)
             + sum_{j != t} z'_j^2 / (V - 1)              squentropy=True (Hui & Belkin, "Cut your Losses with
                                                          Squentropy": the mean square loss over the wrong classes)

Everything per token is a function of four statistics the kernels compute chunk by chunk from z' (lse, z'_t,
sum_j z'_j, sum_j z'_j^2), so the options cost nothing extra in the kernels. The gradient with respect to z is

    G_nj = (g_lse softmax_j + g_sum + 2 g_square z'_j + g_target [j = t]) * dz'/dz,   dz'/dz = 1 - (z'_j / c)^2

with g_* the gradients of the loss with respect to the statistics (torch autograd on O(N) tensors supplies
them); then grad_h = G W, grad_W = G^T h, grad_b = sum_n G, each reduced in float32 inside one chunk (token chunks
for grad_h, vocabulary chunks for grad_W and grad_b), never summed across chunks. Memory: O(N + V + one chunk)
besides the gradients. Tokens whose target is ``ignore_index`` contribute nothing.
"""
import math

import torch
import torch.nn.functional as F

from . import _validation, backends, distributed_cross_entropy, plans
from .backends import AUTO
from .ops import CROSS_ENTROPY
from .ops.registry import REFERENCE_DTYPES, Provider

Tensor = torch.Tensor

FLOAT_DTYPES = REFERENCE_DTYPES
REDUCTIONS = ("mean", "sum", "none")
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_number(op: str, name: str, value, low: float, high: float, *, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: argument '{name}' must be a number, got {type(value).__name__}")
    value = float(value)
    inside = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not inside:
        interval = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{op}: argument '{name}' must be a finite number in {interval}, got {value!r}")
    return value


def _check_arguments(op: str, hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, softcap,
                     squentropy, reduction, vocabulary: int | None = None) -> None:
    """Every argument, before any kernel runs; each error names the argument. `vocabulary`: the number of classes
    the targets index (default: weight's rows; a vocabulary-parallel classifier's total)."""
    _validation.check_tensor(op, "hidden", hidden, FLOAT_DTYPES)
    _validation.check_tensor(op, "weight", weight, FLOAT_DTYPES)
    if hidden.dim() < 1:
        raise ValueError(f"{op}: argument 'hidden' must have shape (..., D), got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"{op}: argument 'weight' must be 2-D (V, D), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: argument 'weight' has dtype {weight.dtype} but 'hidden' has dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{op}: argument 'weight' is on {weight.device} but 'hidden' is on {hidden.device}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: argument 'weight' has D = {weight.shape[1]} but 'hidden' has D = "
                         f"{hidden.shape[-1]} (shapes {tuple(weight.shape)} and {tuple(hidden.shape)})")
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: argument 'weight' has no classes (V = 0): the softmax is undefined")
    if hidden.shape[-1] == 0:
        raise ValueError(f"{op}: argument 'hidden' has no feature dimension (D = 0)")
    if bias is not None:
        _validation.check_tensor(op, "bias", bias, FLOAT_DTYPES)
        if bias.dtype != hidden.dtype or bias.device != hidden.device or bias.shape != (weight.shape[0],):
            raise ValueError(f"{op}: argument 'bias' must be a ({weight.shape[0]},) tensor of dtype {hidden.dtype} "
                             f"on {hidden.device}, got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if not isinstance(targets, Tensor):
        raise TypeError(f"{op}: argument 'targets' must be a torch.Tensor of int64 class indices, got "
                        f"{type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{op}: argument 'targets' must have dtype torch.int64, got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"{op}: argument 'targets' must have shape {tuple(hidden.shape[:-1])} (hidden's leading "
                         f"dimensions), got {tuple(targets.shape)}")
    if targets.device != hidden.device:
        raise ValueError(f"{op}: argument 'targets' is on {targets.device} but 'hidden' is on {hidden.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: argument 'ignore_index' must be an int, got {type(ignore_index).__name__}")
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ValueError(f"{op}: argument 'ignore_index' must fit in int64 (the targets' dtype), got {ignore_index}")
    _check_number(op, "label_smoothing", label_smoothing, 0.0, 1.0)
    _check_number(op, "z_loss", z_loss, 0.0, math.inf, high_open=True)
    if softcap is not None:
        # At most float32's largest value: the kernels hold c (and 1 / c) in float32.
        if _check_number(op, "softcap", softcap, 0.0, FLOAT32_MAX) <= 0:
            raise ValueError(f"{op}: argument 'softcap' must be positive (or None), got {softcap!r}")
    if not isinstance(squentropy, bool):
        raise TypeError(f"{op}: argument 'squentropy' must be a bool, got {type(squentropy).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: argument 'reduction' must be one of {REDUCTIONS}, got {reduction!r}")
    if _validation.values_checkable(targets) and targets.numel():
        vocabulary = weight.shape[0] if vocabulary is None else vocabulary
        out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= vocabulary))
        if bool(out_of_range.any()):
            bad = targets[out_of_range][:5].tolist()
            raise ValueError(f"{op}: argument 'targets' holds class indices outside [0, {vocabulary}) that are not "
                             f"ignore_index={ignore_index}: {bad}")


def reduce_tokens(per_token: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """"mean" over the valid tokens (0, not NaN, when there are none), "sum", or the (N,) vector itself."""
    if reduction == "mean":
        return per_token.sum() / valid.sum().clamp_min(1).to(per_token.dtype)
    if reduction == "sum":
        return per_token.sum()
    return per_token


def _dense_per_token_loss(hidden: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, softcap: float,
                          label_smoothing: float, z_loss: float, squentropy: bool) -> Tensor:
    """The per-token losses from the dense N x V logits, through F.cross_entropy and torch autograd: ``auto``'s
    choice on the CPU for small logits (leanops.plans.dense_logits_chosen), as fast as plain PyTorch there. targets:
    -1 where no target (ignored or out of range); those tokens' rows are masked before squaring (an ignored token's
    -inf logit must not turn its zero gradient into 0 * inf)."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias.numel():
        logits = logits + bias.to(dtype)
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, targets, ignore_index=-1, label_smoothing=label_smoothing, reduction="none")
    if z_loss:
        lse = torch.logsumexp(logits, dim=1)
        loss = loss + lse * (z_loss * lse)
    vocabulary = weight.shape[0]
    if squentropy and vocabulary > 1:
        has_target = targets >= 0
        off_target = torch.ones_like(logits, dtype=torch.bool).scatter_(1, targets.clamp_min(0)[:, None],
                                                                       ~has_target[:, None])
        squares = torch.where(off_target & has_target[:, None], logits, 0).square().sum(dim=1)
        loss = loss + squares / (vocabulary - 1)
    return loss


def _loss_from_primitives(provider: Provider | None, hidden: Tensor, weight: Tensor, targets: Tensor,
                          bias: Tensor | None, ignore_index: int, label_smoothing: float, z_loss: float,
                          softcap: float | None, squentropy: bool, reduction: str, group=None,
                          vocabulary: int | None = None) -> Tensor:
    """The loss from the four per-token statistics of `provider`'s chunked primitives (module docstring); with a
    `group`, of the vocabulary-parallel classifier whose slices the group's ranks hold
    (leanops.distributed_cross_entropy), `vocabulary` being its total number of classes. `provider` None: from the
    dense logits (_dense_per_token_loss)."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    vocabulary = weight.shape[0] if vocabulary is None else vocabulary
    valid = flat_targets != ignore_index
    # Targets outside [0, V) are refused before this in eager mode (_check_arguments); inside a compiled graph that
    # check cannot run, so such tokens get a NaN loss (and NaN gradients) instead of a plausible number.
    out_of_range = valid & ((flat_targets < 0) | (flat_targets >= vocabulary))
    kernel_targets = torch.where(valid & ~out_of_range, flat_targets, -1)  # -1: no target logit, for the kernels
    kernel_bias = bias if bias is not None else flat_hidden.new_empty(0)
    if provider is None:
        loss = _dense_per_token_loss(flat_hidden, weight, kernel_bias, kernel_targets, softcap or 0.0,
                                     label_smoothing, z_loss, squentropy)
        return _reduce_loss(loss, targets, valid, out_of_range, reduction)
    if group is None:
        lse, target_logit, logit_sum, logit_square_sum = provider.operators.linear_ce_forward(
            flat_hidden.contiguous(), weight.contiguous(), kernel_bias.contiguous(), kernel_targets, softcap or 0.0)
    else:
        _, (lse, target_logit, logit_sum, logit_square_sum) = distributed_cross_entropy.statistics(
            provider.operators, flat_hidden, weight, kernel_bias, kernel_targets, softcap or 0.0, group)
    # (1 - a)(lse - z_t) + a (lse - mean z), written as nll + a (z_t - mean z): the terms that cancel (lse and z_t,
    # equal for V = 1 or a confident token) meet in one subtraction, which is exact when they are equal.
    loss = lse - target_logit
    if label_smoothing:
        loss = loss + label_smoothing * (target_logit - logit_sum / vocabulary)
    if z_loss:
        loss = loss + lse * (z_loss * lse)  # (not z_loss * lse^2: lse^2 overflows float32 from |lse| ~ 1.8e19)
    if squentropy and vocabulary > 1:
        loss = loss + (logit_square_sum - target_logit.square()) / (vocabulary - 1)
    return _reduce_loss(loss, targets, valid, out_of_range, reduction)


def _reduce_loss(loss: Tensor, targets: Tensor, valid: Tensor, out_of_range: Tensor, reduction: str) -> Tensor:
    """The per-token losses masked (0 at ignored tokens, NaN at out-of-range ones) and reduced."""
    loss = loss * torch.where(out_of_range, math.nan, 1.0)  # (a factor, not a where: NaN gradients only there)
    per_token = torch.where(valid, loss, 0.0)
    reduced = reduce_tokens(per_token, valid, reduction)
    return reduced.reshape(targets.shape) if reduction == "none" else reduced


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                         ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None, squentropy: bool = False, reduction: str = "mean",
                         backend: str = "auto", group=None) -> Tensor:
    """Cross-entropy of softcap(hidden @ weight^T + bias) against targets, without the N x V logits.

    Args:
        hidden: (..., D) bfloat16/float16/float32 (float64 on the reference) hidden states.
        weight: (V, D) classifier weight, same dtype and device. bias: optional (V,).
        targets: (...) int64 class indices in [0, V), or ignore_index.
        ignore_index: targets equal to it contribute nothing (a zero loss and zero gradients).
        label_smoothing: a in [0, 1], exactly F.cross_entropy's definition.
        z_loss: l >= 0 adds l * lse^2 per token. softcap: c > 0 caps the logits to c tanh(z / c).
        squentropy: adds sum_{j != t} z'_j^2 / (V - 1) per token.
        reduction: "mean" over the valid tokens (0, not NaN, when there are none), "sum", or "none" (targets'
            shape, zeros at ignored tokens).
        group: a torch.distributed process group for a vocabulary-parallel classifier: rank r of the group holds
            rows [offset_r, offset_r + V_r) of the (V, D) classifier as `weight` (and `bias`), in rank order, any
            V_r >= 1; hidden and targets (global class indices) are the same on every rank. The loss and the
            gradients equal the single-device ones: hidden's gradient is the whole one on every rank (all-reduced),
            weight's and bias's are this rank's slices (leanops.distributed_cross_entropy).
    Returns:
        The loss in float32 (float64 for float64 inputs). Gradients reach hidden, weight and bias in their dtype.
    """
    op = "leanops.linear_cross_entropy"
    vocabulary = None if group is None else distributed_cross_entropy.check_and_count(op, hidden, weight, group)
    _check_arguments(op, hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, softcap, squentropy,
                     reduction, vocabulary)
    provider = CROSS_ENTROPY.resolve(op, backend, hidden.device, hidden.dtype)
    if (group is None and backend == AUTO and backends.default_backend() == AUTO
            and plans.dense_logits_chosen(hidden.device.type, targets.numel(), weight.shape[0])):
        provider = None  # small logits on the CPU: dense, as fast as plain PyTorch (plans.DEFAULT_DENSE_LOGITS_MIB)
    return _loss_from_primitives(provider, hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss,
                                 softcap, squentropy, reduction, group, vocabulary)


def linear_cross_entropy_chunked(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                                 ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                                 softcap: float | None = None, squentropy: bool = False,
                                 reduction: str = "mean") -> Tensor:
    """``linear_cross_entropy`` through the chunked plain-PyTorch primitives: O(chunk x V) memory, any device."""
    op = "leanops.linear_cross_entropy_chunked"
    _check_arguments(op, hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, softcap, squentropy,
                     reduction)
    return _loss_from_primitives(CROSS_ENTROPY.provider("reference"), hidden, weight, targets, bias, ignore_index,
                                 label_smoothing, z_loss, softcap, squentropy, reduction)
