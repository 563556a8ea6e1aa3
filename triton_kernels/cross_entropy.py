"""Triton kernels for the chunked linear cross-entropy primitives (csrc/ops.cpp states the contract;
python/leanops/cross_entropy.py the math).

Notation: h = hidden states (N, D), W = classifier weight (V, D), b = bias (V,), t = targets (N,) (-1: none);
z = h W^T + b, z' = c tanh(z / c) with a softcap c > 0, else z. The N x V logits only ever exist as BLOCK_M x
BLOCK_N tiles in registers (tiles.product_tile: tl.dot with float32 accumulation over BLOCK_D slices of D).

- ``linear_ce_forward``: one program per block of tokens streams over the vocabulary once, keeping an online
  log-sum-exp (running max and rescaled sum) and the target logit, sum and sum of squares of z', all float32.
- ``linear_ce_backward``: two kernels, each output-stationary, so every gradient element is reduced in float32
  inside one program and rounded once to the input dtype; no atomics, no partial sums across programs, no
  N x V or fp32 (V, D) buffer:
    * grad_hidden: programs over (token block, column chunk of D), streaming over the vocabulary: G tile, then
      grad_hidden += G @ W[:, chunk];
    * grad_weight, grad_bias: programs over (vocabulary block, column chunk), streaming over the tokens: G^T tile,
      then grad_weight += G^T @ h[:, chunk] and grad_bias += sum over tokens.
  G[n, j] = (grad_lse[n] softmax[n, j] + grad_sum[n] + 2 grad_square_sum[n] z'[n, j] + grad_target[n] [j = t_n])
  * dz'/dz. A program owns BLOCK_DOUT columns of its output rows; with D > BLOCK_DOUT each column chunk
  recomputes the z tiles (2 N V D flops per extra chunk), which is cheap for D <= 256 and costly for a language
  model's D of 2048-4096: benchmarks/results/cross_entropy.md discusses the large-D design.

Numerics: float32 statistics and accumulators; float32 inputs use "ieee" products (no TF32). For float16 inputs
the G tile is rounded to float16 before its product with the features; each tile is first divided by a power of
two near its largest entry (undone after the product, exactly), so that small softmax weights times a 1/N
upstream gradient do not flush to zero. bfloat16 has float32's exponent range and needs no scaling.

Launchers take tensors already validated by the caller (python/leanops/cross_entropy.py).
"""
from dataclasses import replace

import torch
import triton
import triton.language as tl

from . import tile_tuning
from .tiles import (INTERPRETER_TILES, Tiles, aligned_features, device_context, forward_candidates, input_precision,
                    load_rows, product_tile, unpadded)

# ---------------------------------------------------------------------------------------------------------------
# Tiles: BLOCK_M rows of the stationary side (tokens in the forward and grad_hidden kernels, vocabulary entries in
# the grad_weight kernel), BLOCK_N rows of the streamed side per step. Off the GPU: tiles.INTERPRETER_TILES.

# Hopper candidates, the default first; every one is compiled for sm_90 by the tests and must not spill registers
# (D % 16 == 0, which the launchers ensure by padding). Not yet timed on a GPU.
_GPU_FORWARD = (
    Tiles(block_m=128, block_n=128, block_d=64, block_dout=0, num_warps=8, num_stages=3),
    Tiles(block_m=128, block_n=64, block_d=64, block_dout=0, num_warps=4, num_stages=4),
    Tiles(block_m=64, block_n=128, block_d=64, block_dout=0, num_warps=4, num_stages=3),
)
_GPU_FORWARD_FLOAT32 = (Tiles(block_m=64, block_n=64, block_d=16, block_dout=0, num_warps=4, num_stages=2),)


def forward_tile_candidates(device: torch.device, dtype: torch.dtype) -> tuple[Tiles, ...]:
    """Forward tiles to choose from, the default first."""
    return forward_candidates(device, dtype, _GPU_FORWARD, _GPU_FORWARD_FLOAT32)


def backward_tile_candidates(device: torch.device, dtype: torch.dtype, features: int) -> tuple[Tiles, ...]:
    if device.type != "cuda":
        return (INTERPRETER_TILES,)
    width = max(triton.next_power_of_2(features), 16)
    if dtype == torch.float32:
        # (64 x 32 tiles with a 16-wide K loop, which suit the contrastive kernels, spill here.)
        return (Tiles(block_m=32, block_n=32, block_d=32, block_dout=min(width, 64), num_warps=4, num_stages=2),)
    block_dout = min(width, 256)
    default = Tiles(block_m=128 if block_dout <= 128 else 64, block_n=64, block_d=64, block_dout=block_dout,
                    num_warps=8, num_stages=2)
    return tuple(dict.fromkeys((default, replace(default, block_n=32), replace(default, num_stages=3))))


_TUNER = tile_tuning.TileTuner()


def _tuned(name: str, tokens: int, stationary: torch.Tensor, candidates: tuple[Tiles, ...], run):
    """run(tiles) with the tiles the tuner picked for this kernel, device, dtype, shapes (rounded up to powers of
    two)."""
    key = (name, stationary.device, stationary.dtype, stationary.shape[1], triton.next_power_of_2(tokens),
           triton.next_power_of_2(stationary.shape[0]))
    return run(_TUNER.choose(key, stationary.device, candidates, run))


# ---------------------------------------------------------------------------------------------------------------
# Shared device functions.

@triton.jit
def _tanh(x):
    """tanh in float32 from exp (no tanh in every Triton backend): a Taylor polynomial where 1 - exp(-2|x|) would
    cancel, the exp form elsewhere (relative error ~1e-6)."""
    a = tl.abs(x)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
    e = tl.exp(-2.0 * a)
    exponential = (1.0 - e) / (1.0 + e)
    magnitude = tl.where(a < 0.0625, series, exponential)
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def _capped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """(z', dz'/dz) with z' = softcap tanh(z / softcap), or (z, 1) without a cap."""
    if HAS_SOFTCAP:
        capped = softcap * _tanh(z / softcap)
        ratio = capped / softcap
        return capped, 1.0 - ratio * ratio
    else:
        return z, tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, bias_ptr, tokens, mask_tokens, classes, mask_classes, D, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(z', dz'/dz) of the (tokens x classes) tile: z = h W^T (+ b), capped."""
    z = product_tile(hidden_ptr, weight_ptr, tokens, mask_tokens, classes, mask_classes, D,
                     BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
    if HAS_BIAS:
        z += tl.load(bias_ptr + classes, mask=mask_classes, other=0.0).to(tl.float32)[None, :]
    return _capped(z, softcap, HAS_SOFTCAP)


@triton.jit
def _logit_gradient(logits, derivative, lse, grad_lse, grad_target, grad_sum, grad_square, is_target, valid):
    """G = (grad_lse softmax + grad_sum + 2 grad_square z' + grad_target [j = t]) dz'/dz on a tile, 0 where not
    valid. The per-token arguments come broadcast to the tile's orientation (tokens on rows or on columns)."""
    softmax = tl.exp(tl.where(valid, logits - lse, float("-inf")))
    gradient = grad_lse * softmax + grad_sum + 2.0 * grad_square * logits + tl.where(is_target, grad_target, 0.0)
    return tl.where(valid, gradient * derivative, 0.0)


@triton.jit
def _add_product(accumulator, gradient, features, SCALE_TILE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """accumulator + gradient @ features, with the float32 gradient tile rounded to the features' dtype (for
    float16 first divided by a power of two near its largest magnitude, multiplied back after the product)."""
    if SCALE_TILE:
        largest = tl.max(tl.max(tl.abs(gradient), axis=1), axis=0)
        scale = tl.where(largest > 0, tl.exp2(tl.ceil(tl.log2(largest))), 1.0)
        product = tl.dot((gradient / scale).to(features.dtype), features, input_precision=INPUT_PRECISION)
        return accumulator + product * scale
    else:
        return tl.dot(gradient.to(features.dtype), features, accumulator, input_precision=INPUT_PRECISION)


# ---------------------------------------------------------------------------------------------------------------
# Forward.

@triton.jit
def _linear_ce_forward_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, target_logit_ptr,
                              logit_sum_ptr, logit_square_sum_ptr, N, V, D, softcap,
                              HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One program per block of BLOCK_M tokens, streaming once over the vocabulary in blocks of BLOCK_N."""
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_tokens = tokens < N
    targets = tl.load(targets_ptr + tokens, mask=mask_tokens, other=-1)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    logit_square_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, V, BLOCK_N):
        classes = start + tl.arange(0, BLOCK_N)
        mask_classes = classes < V
        logits, _ = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, tokens, mask_tokens, classes, mask_classes, D,
                                 softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        logits = tl.where(mask_classes[None, :], logits, 0.0)
        # The first block holds class 0, so new_max is finite from the first step on: exp(running_max - new_max)
        # never sees (-inf) - (-inf).
        masked = tl.where(mask_classes[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(masked, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(masked - new_max[:, None]), axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(classes[None, :] == targets[:, None], logits, 0.0), axis=1)
        logit_sum += tl.sum(logits, axis=1)
        logit_square_sum += tl.sum(logits * logits, axis=1)
    tl.store(lse_ptr + tokens, running_max + tl.log(running_sum), mask=mask_tokens)
    tl.store(target_logit_ptr + tokens, target_logit, mask=mask_tokens)
    tl.store(logit_sum_ptr + tokens, logit_sum, mask=mask_tokens)
    tl.store(logit_square_sum_ptr + tokens, logit_square_sum, mask=mask_tokens)


def linear_ce_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                      softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token float32 statistics (lse, target_logit, logit_sum, logit_square_sum) of z' = softcap(h W^T + b),
    without the N x V logits. hidden (N, D), weight (V, D), bias (V,) or empty, one dtype; targets int64 (N,)."""
    h, w = aligned_features(hidden, weight)
    bias, targets = bias.contiguous(), targets.contiguous()
    tokens, vocabulary = h.shape[0], w.shape[0]
    outputs = tuple(torch.zeros(tokens, dtype=torch.float32, device=h.device) for _ in range(4))
    if tokens == 0:
        return outputs

    def run(tiles: Tiles) -> tuple[torch.Tensor, ...]:
        results = tuple(torch.empty(tokens, dtype=torch.float32, device=h.device) for _ in range(4))
        with device_context(h.device):
            _linear_ce_forward_kernel[(triton.cdiv(tokens, tiles.block_m),)](
                h, w, bias, targets, *results, tokens, vocabulary, h.shape[1], float(softcap),
                HAS_BIAS=bias.numel() > 0, HAS_SOFTCAP=softcap > 0, INPUT_PRECISION=input_precision(h.dtype),
                **tiles.launch_options(h.device))
        return results

    return _tuned("linear_ce_forward", tokens, w, forward_tile_candidates(h.device, h.dtype), run)


# ---------------------------------------------------------------------------------------------------------------
# Backward.

@triton.jit
def _linear_ce_grad_hidden_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, grad_lse_ptr,
                                  grad_target_ptr, grad_sum_ptr, grad_square_ptr, grad_hidden_ptr, N, V, D, softcap,
                                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SCALE_TILE: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                  BLOCK_DOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Program (token block, column chunk): grad_hidden[block, chunk] = sum over the vocabulary of G @ W[:, chunk]."""
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_tokens = tokens < N
    columns_out = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    mask_out = columns_out < D
    targets = tl.load(targets_ptr + tokens, mask=mask_tokens, other=-1)
    lse = tl.load(lse_ptr + tokens, mask=mask_tokens, other=0.0)
    grad_lse = tl.load(grad_lse_ptr + tokens, mask=mask_tokens, other=0.0)
    grad_target = tl.load(grad_target_ptr + tokens, mask=mask_tokens, other=0.0)
    grad_sum = tl.load(grad_sum_ptr + tokens, mask=mask_tokens, other=0.0)
    grad_square = tl.load(grad_square_ptr + tokens, mask=mask_tokens, other=0.0)
    accumulator = tl.zeros((BLOCK_M, BLOCK_DOUT), dtype=tl.float32)
    for start in range(0, V, BLOCK_N):
        classes = start + tl.arange(0, BLOCK_N)
        mask_classes = classes < V
        logits, derivative = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, tokens, mask_tokens, classes,
                                          mask_classes, D, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_D,
                                          INPUT_PRECISION)
        gradient = _logit_gradient(logits, derivative, lse[:, None], grad_lse[:, None], grad_target[:, None],
                                   grad_sum[:, None], grad_square[:, None], classes[None, :] == targets[:, None],
                                   mask_tokens[:, None] & mask_classes[None, :])
        weight_chunk = load_rows(weight_ptr, classes, mask_classes, columns_out, mask_out, D)
        accumulator = _add_product(accumulator, gradient, weight_chunk, SCALE_TILE, INPUT_PRECISION)
    tl.store(grad_hidden_ptr + tokens.to(tl.int64)[:, None] * D + columns_out[None, :], accumulator,
             mask=mask_tokens[:, None] & mask_out[None, :])


@triton.jit
def _linear_ce_grad_weight_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, grad_lse_ptr,
                                  grad_target_ptr, grad_sum_ptr, grad_square_ptr, grad_weight_ptr, grad_bias_ptr,
                                  N, V, D, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                                  SCALE_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Program (vocabulary block, column chunk): grad_weight[block, chunk] = sum over the tokens of
    G^T @ h[:, chunk]; the chunk-0 program also writes grad_bias[block] = sum over the tokens of G^T."""
    classes = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_classes = classes < V
    chunk = tl.program_id(1)
    columns_out = chunk * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    mask_out = columns_out < D
    if HAS_BIAS:
        bias = tl.load(bias_ptr + classes, mask=mask_classes, other=0.0).to(tl.float32)
    accumulator = tl.zeros((BLOCK_M, BLOCK_DOUT), dtype=tl.float32)
    bias_accumulator = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        mask_tokens = tokens < N
        targets = tl.load(targets_ptr + tokens, mask=mask_tokens, other=-1)
        lse = tl.load(lse_ptr + tokens, mask=mask_tokens, other=0.0)
        grad_lse = tl.load(grad_lse_ptr + tokens, mask=mask_tokens, other=0.0)
        grad_target = tl.load(grad_target_ptr + tokens, mask=mask_tokens, other=0.0)
        grad_sum = tl.load(grad_sum_ptr + tokens, mask=mask_tokens, other=0.0)
        grad_square = tl.load(grad_square_ptr + tokens, mask=mask_tokens, other=0.0)
        z = product_tile(weight_ptr, hidden_ptr, classes, mask_classes, tokens, mask_tokens, D,
                         BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)  # z^T: (classes, tokens)
        if HAS_BIAS:
            z += bias[:, None]
        logits, derivative = _capped(z, softcap, HAS_SOFTCAP)
        gradient = _logit_gradient(logits, derivative, lse[None, :], grad_lse[None, :], grad_target[None, :],
                                   grad_sum[None, :], grad_square[None, :], classes[:, None] == targets[None, :],
                                   mask_classes[:, None] & mask_tokens[None, :])
        hidden_chunk = load_rows(hidden_ptr, tokens, mask_tokens, columns_out, mask_out, D)
        accumulator = _add_product(accumulator, gradient, hidden_chunk, SCALE_TILE, INPUT_PRECISION)
        bias_accumulator += tl.sum(gradient, axis=1)
    tl.store(grad_weight_ptr + classes.to(tl.int64)[:, None] * D + columns_out[None, :], accumulator,
             mask=mask_classes[:, None] & mask_out[None, :])
    if HAS_BIAS:
        tl.store(grad_bias_ptr + classes, bias_accumulator, mask=mask_classes & (chunk == 0))


def linear_ce_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                       softcap: float, lse: torch.Tensor, grad_lse: torch.Tensor, grad_target: torch.Tensor,
                       grad_sum: torch.Tensor, grad_square_sum: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_n (grad_lse lse + grad_target target_logit + grad_sum logit_sum + grad_square_sum
    logit_square_sum) for hidden (N, D), weight (V, D) and bias (V,; empty without one), in the input dtype.
    The per-token tensors are float32 (N,)."""
    features = hidden.shape[1]
    h, w = aligned_features(hidden, weight)
    bias, targets = bias.contiguous(), targets.contiguous()
    per_token = tuple(t.contiguous() for t in (lse, grad_lse, grad_target, grad_sum, grad_square_sum))
    tokens, vocabulary, padded = h.shape[0], w.shape[0], h.shape[1]
    if tokens == 0:
        return torch.zeros_like(hidden), torch.zeros_like(weight), torch.zeros_like(bias)
    constants = dict(HAS_BIAS=bias.numel() > 0, HAS_SOFTCAP=softcap > 0, SCALE_TILE=h.dtype == torch.float16,
                     INPUT_PRECISION=input_precision(h.dtype))
    candidates = backward_tile_candidates(h.device, h.dtype, padded)

    def run_hidden(tiles: Tiles) -> torch.Tensor:
        grad_hidden = torch.empty_like(h)
        grid = (triton.cdiv(tokens, tiles.block_m), triton.cdiv(padded, tiles.block_dout))
        with device_context(h.device):
            _linear_ce_grad_hidden_kernel[grid](h, w, bias, targets, *per_token, grad_hidden, tokens, vocabulary,
                                                padded, float(softcap), BLOCK_DOUT=tiles.block_dout, **constants,
                                                **tiles.launch_options(h.device))
        return grad_hidden

    def run_weight(tiles: Tiles) -> tuple[torch.Tensor, torch.Tensor]:
        grad_weight = torch.empty_like(w)
        grad_bias = torch.empty_like(bias)
        # At least one column chunk: chunk 0 also writes grad_bias (D = 0 included).
        grid = (triton.cdiv(vocabulary, tiles.block_m), max(triton.cdiv(padded, tiles.block_dout), 1))
        with device_context(h.device):
            _linear_ce_grad_weight_kernel[grid](h, w, bias, targets, *per_token, grad_weight, grad_bias, tokens,
                                                vocabulary, padded, float(softcap), BLOCK_DOUT=tiles.block_dout,
                                                **constants, **tiles.launch_options(h.device))
        return grad_weight, grad_bias

    grad_hidden = _tuned("linear_ce_grad_hidden", tokens, w, candidates, run_hidden)
    grad_weight, grad_bias = _tuned("linear_ce_grad_weight", tokens, w, candidates, run_weight)
    return unpadded(grad_hidden, features), unpadded(grad_weight, features), grad_bias
