"""Linear cross-entropy (a language model's loss head) in plain PyTorch.

Two versions:

- ``linear_cross_entropy``: the textbook computation that builds the N x V logits and calls
  ``torch.nn.functional.cross_entropy`` (plus the auxiliary terms). float64-capable: the oracle of the tests.
  Memory O(N V).
- ``linear_ce_forward`` / ``linear_ce_backward``: the chunked primitives that the Triton, CUDA and C++ kernels
  implement (csrc/ops.cpp states their contract), in plain PyTorch over chunks of tokens and of the vocabulary:
  memory O(chunk x V + N x chunk). With ``python/leanops/cross_entropy.py`` they give the chunked reference.

Notation: h = hidden states (N, D), W = classifier weight (V, D), b = bias (V,), t = targets (N,);
z = h W^T + b (N, V); with a softcap c, z' = c tanh(z / c) (Gemma 2), else z' = z.
"""
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Rows (tokens, or vocabulary entries) per chunk of the chunked primitives.
CHUNK_ROWS = 512


def capped_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    """z' = softcap(h W^T + b), (N, V)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def per_token_loss(logits: Tensor, targets: Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                   z_loss: float = 0.0, squentropy: bool = False) -> Tensor:
    """(N,) losses from (N, V) logits: F.cross_entropy (with its label smoothing) + z_loss * lse^2 + (squentropy)
    sum_{j != t} z_j^2 / (V - 1); 0 at ignored tokens."""
    valid = targets != ignore_index
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="none")
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1) ** 2
    if squentropy:
        vocabulary = logits.shape[-1]
        off_target = torch.ones_like(logits, dtype=torch.bool)
        safe_targets = torch.where(valid, targets, 0)
        off_target[torch.arange(logits.shape[0], device=logits.device), safe_targets] = False
        squares = torch.where(off_target, logits.square(), 0).sum(dim=-1)
        loss = loss + (squares / (vocabulary - 1) if vocabulary > 1 else torch.zeros_like(squares))
    return torch.where(valid, loss, 0)


def reduce_tokens(per_token: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """"mean" over the valid tokens (0, not NaN, when there are none), "sum", or the (N,) vector itself."""
    if reduction == "mean":
        return per_token.sum() / valid.sum().clamp_min(1).to(per_token.dtype)
    if reduction == "sum":
        return per_token.sum()
    return per_token


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                         ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None, squentropy: bool = False, reduction: str = "mean") -> Tensor:
    """Cross-entropy of softcap(hidden @ weight^T + bias) against targets, built the plain way (hidden (..., D),
    targets (...); "none" returns the per-token losses in targets' shape)."""
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    logits = capped_logits(flat_hidden, weight, bias, softcap)
    per_token = per_token_loss(logits, flat_targets, ignore_index=ignore_index, label_smoothing=label_smoothing,
                               z_loss=z_loss, squentropy=squentropy)
    reduced = reduce_tokens(per_token, flat_targets != ignore_index, reduction)
    return reduced.reshape(targets.shape) if reduction == "none" else reduced


# ---------------------------------------------------------------------------------------------------------------
# Chunked primitives (the kernels' contract; see csrc/ops.cpp). Statistics are float32 (float64 for float64
# inputs); gradients come back in the input dtype, reduced in float32 (float64) before one rounding.

def _accumulation_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _chunks(rows: int):
    for start in range(0, rows, CHUNK_ROWS):
        yield slice(start, min(start + CHUNK_ROWS, rows))


def _logits_chunk(h: Tensor, w: Tensor, bias: Tensor, softcap: float) -> tuple[Tensor, Tensor]:
    """(z', dz'/dz) for a chunk, in the accumulation dtype; softcap <= 0 means none, an empty bias none."""
    logits = h @ w.T
    if bias.numel():
        logits = logits + bias
    if softcap > 0:
        capped = softcap * torch.tanh(logits / softcap)
        return capped, 1 - (capped / softcap).square()
    return logits, None


def linear_ce_forward(hidden: Tensor, weight: Tensor, bias: Tensor, targets: Tensor,
                      softcap: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token statistics of z' = softcap(h W^T + b), each (N,):
    lse = logsumexp_j z'_j, target_logit = z'_t (0 where t < 0), logit_sum = sum_j z'_j,
    logit_square_sum = sum_j z'_j^2."""
    dtype = _accumulation_dtype(hidden)
    h, w, b = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    tokens = h.shape[0]
    outputs = [torch.empty(tokens, dtype=dtype, device=h.device) for _ in range(4)]
    lse, target_logit, logit_sum, logit_square_sum = outputs
    for rows in _chunks(tokens):
        logits, _ = _logits_chunk(h[rows], w, b, softcap)
        chunk_targets = targets[rows]
        lse[rows] = torch.logsumexp(logits, dim=1)
        picked = logits.gather(1, chunk_targets.clamp_min(0)[:, None])[:, 0]
        target_logit[rows] = torch.where(chunk_targets >= 0, picked, 0)
        logit_sum[rows] = logits.sum(dim=1)
        logit_square_sum[rows] = logits.square().sum(dim=1)
    return lse, target_logit, logit_sum, logit_square_sum


def _logit_gradient(logits: Tensor, derivative: Tensor | None, lse: Tensor, targets: Tensor, grad_lse: Tensor,
                    grad_target: Tensor, grad_sum: Tensor, grad_square_sum: Tensor, columns: slice) -> Tensor:
    """G = dL/dz for a (rows x columns) chunk (module docstring of python/leanops/cross_entropy.py):
    G = (grad_lse softmax + grad_sum + 2 grad_square_sum z' + grad_target [j = t]) * dz'/dz."""
    gradient = (grad_lse[:, None] * torch.exp(logits - lse[:, None]) + grad_sum[:, None]
                + 2 * grad_square_sum[:, None] * logits)
    vocabulary_index = torch.arange(columns.start, columns.stop, device=logits.device)
    gradient = gradient + torch.where(targets[:, None] == vocabulary_index[None, :], grad_target[:, None], 0)
    return gradient if derivative is None else gradient * derivative


def linear_ce_backward(hidden: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, softcap: float, lse: Tensor,
                       grad_lse: Tensor, grad_target: Tensor, grad_sum: Tensor,
                       grad_square_sum: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_n (grad_lse lse + grad_target target_logit + grad_sum logit_sum + grad_square_sum
    logit_square_sum) for hidden (N, D), weight (V, D) and bias (V,; empty without a bias), in their dtypes.

    Two chunked passes, each reduction complete inside a chunk (no partial sums across chunks): token chunks give
    grad_hidden = G W, vocabulary chunks give grad_weight = G^T h and grad_bias = sum_n G."""
    dtype = _accumulation_dtype(hidden)
    h, w, b = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    per_token = [t.to(dtype) for t in (lse, grad_lse, grad_target, grad_sum, grad_square_sum)]
    tokens, vocabulary = h.shape[0], w.shape[0]
    everything = slice(0, vocabulary)
    grad_hidden = torch.empty_like(hidden)
    for rows in _chunks(tokens):
        logits, derivative = _logits_chunk(h[rows], w, b, softcap)
        chunk_stats = [t[rows] for t in per_token]
        gradient = _logit_gradient(logits, derivative, chunk_stats[0], targets[rows], *chunk_stats[1:], everything)
        grad_hidden[rows] = (gradient @ w).to(hidden.dtype)
    grad_weight = torch.empty_like(weight)
    grad_bias = torch.empty_like(bias)
    for columns in _chunks(vocabulary):
        logits, derivative = _logits_chunk(h, w[columns], b[columns] if b.numel() else b, softcap)
        gradient = _logit_gradient(logits, derivative, per_token[0], targets, *per_token[1:], columns)
        grad_weight[columns] = (gradient.T @ h).to(weight.dtype)
        if bias.numel():
            grad_bias[columns] = gradient.sum(dim=0).to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias
