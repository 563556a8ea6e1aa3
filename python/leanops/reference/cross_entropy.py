"""The reference provider of the linear cross-entropy family: the chunked primitives in plain PyTorch.

``linear_ce_forward`` / ``linear_ce_backward`` are the primitives that the Triton, CUDA and C++ kernels implement
(csrc/ops.cpp states their contract), here over chunks of tokens and of the vocabulary with torch's own operators:
memory O(chunk x V + N x chunk + N x D), any device, float64 too. With ``python/leanops/cross_entropy.py`` they give
``linear_cross_entropy`` with ``backend="reference"`` (and ``linear_cross_entropy_chunked``). The dense O(N V)
formula is the tests' oracle (tests/oracles.py), not a provider.

Notation: h = hidden states (N, D), W = classifier weight (V, D), b = bias (V,), t = targets (N,);
z = h W^T + b (N, V); with a softcap c, z' = c tanh(z / c) (Gemma 2), else z' = z.
"""
import torch

from ._chunks import accumulation_dtype, row_slices

Tensor = torch.Tensor

# Rows (tokens, or vocabulary entries) per chunk of the chunked primitives.
CHUNK_ROWS = 512


# Statistics are float32 (float64 for float64 inputs); gradients come back in the input dtype, reduced in float32
# (float64) before one rounding.



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
    dtype = accumulation_dtype(hidden)
    h, w, b = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    tokens = h.shape[0]
    outputs = [torch.empty(tokens, dtype=dtype, device=h.device) for _ in range(4)]
    lse, target_logit, logit_sum, logit_square_sum = outputs
    for rows in row_slices(tokens, CHUNK_ROWS):
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
    G = (grad_lse softmax + grad_sum + 2 grad_square_sum z' + grad_target [j = t]) * dz'/dz, the z' term left out
    where grad_square_sum is 0 (a masked class, z' = -inf, then gets 0, not 0 * inf = NaN)."""
    gradient = grad_lse[:, None] * torch.exp(logits - lse[:, None]) + grad_sum[:, None]
    gradient = gradient + torch.where(grad_square_sum[:, None] != 0, 2 * grad_square_sum[:, None] * logits, 0)
    vocabulary_index = torch.arange(columns.start, columns.stop, device=logits.device)
    gradient = gradient + torch.where(targets[:, None] == vocabulary_index[None, :], grad_target[:, None], 0)
    return gradient if derivative is None else gradient * derivative


def linear_ce_backward(hidden: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, softcap: float, lse: Tensor,
                       grad_lse: Tensor, grad_target: Tensor, grad_sum: Tensor,
                       grad_square_sum: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_n (grad_lse lse + grad_target target_logit + grad_sum logit_sum + grad_square_sum
    logit_square_sum) for hidden (N, D), weight (V, D) and bias (V,; empty without a bias), in their dtypes.

    One pass over vocabulary chunks (the plan of every provider, leanops/plans.py: the logits recomputed once, 8 N V D
    matrix FLOPs with the forward): a chunk's G gives grad_weight[chunk] = G^T h and grad_bias[chunk] = sum_n G,
    complete, and adds G W[chunk] to grad_hidden, accumulated in float32 (float64) over the chunks in order."""
    dtype = accumulation_dtype(hidden)
    h, w, b = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    per_token = [t.to(dtype) for t in (lse, grad_lse, grad_target, grad_sum, grad_square_sum)]
    grad_hidden = torch.zeros_like(h)
    grad_weight = torch.empty_like(weight)
    grad_bias = torch.empty_like(bias)
    for columns in row_slices(w.shape[0], CHUNK_ROWS):
        logits, derivative = _logits_chunk(h, w[columns], b[columns] if b.numel() else b, softcap)
        gradient = _logit_gradient(logits, derivative, per_token[0], targets, *per_token[1:], columns)
        grad_hidden += gradient @ w[columns]
        grad_weight[columns] = (gradient.T @ h).to(weight.dtype)
        if bias.numel():
            grad_bias[columns] = gradient.sum(dim=0).to(bias.dtype)
    return grad_hidden.to(hidden.dtype), grad_weight, grad_bias
