"""Triton kernels for the chunked linear cross-entropy primitives (csrc/ops.cpp states the contract;
python/leanops/cross_entropy.py the math).

Notation: h = hidden states (N, D), W = classifier weight (V, D), b = bias (V,), t = targets (N,) (-1: none);
z = h W^T + b, z' = c tanh(z / c) with a softcap c > 0, else z. The N x V logits only ever exist as BLOCK_M x
BLOCK_N tiles in registers (tiles.product_tile: tl.dot with float32 accumulation over BLOCK_D slices of D).

The plan: the matrix work at its floor, 8 N V D for a forward + backward (leanops/plans.py), independent of D, as
in Megatron-core's fused linear cross-entropy:
- ``linear_ce_forward``: program (token block, vocabulary split) streams its split once, keeping an online
  log-sum-exp (running max and rescaled sum) and the target logit, sum and sum of squares of z', all float32; the
  splits' partials ((splits, N) each) are merged afterwards. The splits keep every SM busy when N / BLOCK_M is
  small (64 token blocks at N = 8192 on 132 SMs).
- ``linear_ce_backward``, per vocabulary chunk of Vc entries (Vc from the memory budget, plans.panel_rows): one
  kernel recomputes the chunk's logit tiles once and writes d_logits G (N x Vc) in the input dtype, with
  grad_bias[chunk] reduced from per-token-block partials; then two plain GEMMs (gemm.py, on wgmma):
  grad_h += G W[chunk] into a float32 (N, D) buffer, and grad_W[chunk] = G^T h, one GEMM with K = N whose
  elements are rounded once to the weight dtype.
  G[n, j] = (grad_lse[n] softmax[n, j] + grad_sum[n] + 2 grad_square_sum[n] z'[n, j] + grad_target[n] [j = t_n])
  * dz'/dz.

Memory, besides inputs and outputs: one G chunk (N x Vc, input dtype) within the budget (leanops/plans.py: 64 MiB
on the GPU, at least 512 columns; LEANOPS_PANEL_BUDGET_MIB), the float32 (N, D) grad_h accumulator, and O(N)
partials.

Numerics: float32 statistics and accumulators; float32 inputs use "ieee" products (no TF32). For float16 inputs
G is divided by a power of two bounding its entries before the cast (undone exactly in float32 after the
products), so that it neither overflows nor flushes small softmax weights times a 1/N upstream gradient; the bound
is max_n (|grad_lse| + |grad_sum| + |grad_target| + 2 |grad_square_sum| max_j |z'[n, j]|), with |z'| <= softcap
or <= |h_n| max_j |W_j| + max |b|. bfloat16 has float32's exponent range and needs no scaling.

Launchers take tensors already validated by the caller (python/leanops/cross_entropy.py).
"""
import torch
import triton
import triton.language as tl

from leanops import plans

from . import gemm, tile_tuning
from .tiles import Tiles, aligned_features, device_context, forward_candidates, input_precision
from .tiles import product_tile, unpadded

# ---------------------------------------------------------------------------------------------------------------
# Tiles: BLOCK_M tokens x BLOCK_N vocabulary entries per logit tile. Off the GPU: tiles.INTERPRETER_TILES.

# Hopper candidates, the default first; every one is compiled for sm_90 by the tests and must not spill registers
# and must use wgmma for 16-bit inputs (D % 16 == 0, which the launchers ensure by padding). Not yet timed on a GPU.
_GPU_TILES = (
    Tiles(block_m=128, block_n=128, block_d=64, block_dout=0, num_warps=8, num_stages=3),
    Tiles(block_m=128, block_n=64, block_d=64, block_dout=0, num_warps=4, num_stages=4),
    Tiles(block_m=64, block_n=128, block_d=64, block_dout=0, num_warps=4, num_stages=3),
)
_GPU_TILES_FLOAT32 = (Tiles(block_m=64, block_n=64, block_d=16, block_dout=0, num_warps=4, num_stages=2),)
# The d_logits kernel holds more float32 tiles (the logits, their derivative, G) and stores G: 128 x 128 tiles spill
# there (ptxas, sm_90); 128 x 64 and 64 x 128 ones fit with 8 warps (178 and 153 registers).
_GPU_BACKWARD_TILES = (
    Tiles(block_m=128, block_n=64, block_d=64, block_dout=0, num_warps=8, num_stages=3),
    Tiles(block_m=64, block_n=128, block_d=64, block_dout=0, num_warps=8, num_stages=3),
)


def forward_tile_candidates(device: torch.device, dtype: torch.dtype) -> tuple[Tiles, ...]:
    """Tiles of the forward kernel to choose from, the default first."""
    return forward_candidates(device, dtype, _GPU_TILES, _GPU_TILES_FLOAT32)


def backward_tile_candidates(device: torch.device, dtype: torch.dtype) -> tuple[Tiles, ...]:
    """Tiles of the d_logits kernel to choose from, the default first (the GEMMs have theirs: gemm.py)."""
    return forward_candidates(device, dtype, _GPU_BACKWARD_TILES, _GPU_TILES_FLOAT32)


_TUNER = tile_tuning.TileTuner()


def _tuned(name: str, tokens: int, stationary: torch.Tensor, candidates: tuple[Tiles, ...], run):
    """run(tiles) with the tiles the tuner picked for this kernel, device, dtype, shapes (rounded up to powers of
    two)."""
    key = (name, stationary.device, stationary.dtype, stationary.shape[1], triton.next_power_of_2(tokens),
           triton.next_power_of_2(stationary.shape[0]))
    return run(_TUNER.choose(key, stationary.device, candidates, run))


# ---------------------------------------------------------------------------------------------------------------
# How the work is cut (shared by the launchers and planned_matrix_flops).

def _vocabulary_splits(device: torch.device, token_blocks: int, vocabulary: int, block: int) -> tuple[int, int]:
    """(entries per split, splits) of the forward: about two programs per SM on the GPU, two under the interpreter
    (so that the tests merge partials); whole blocks, none empty."""
    blocks = triton.cdiv(vocabulary, block)
    if device.type == "cuda":
        wanted = triton.cdiv(2 * torch.cuda.get_device_properties(device).multi_processor_count, token_blocks)
    else:
        wanted = 2
    per_split = triton.cdiv(blocks, max(1, min(wanted, blocks))) * block
    return per_split, triton.cdiv(vocabulary, per_split)


def _chunk_leading_dimension(device: torch.device, columns: int) -> int:
    """Row stride of a G chunk: rows start 16-byte aligned on the GPU (the GEMMs' pipelined loads need it)."""
    return triton.cdiv(columns, 16) * 16 if device.type == "cuda" else columns


def _vocabulary_chunks(device: torch.device, tokens: int, vocabulary: int, dtype: torch.dtype,
                       tiles: Tiles) -> list[tuple[int, int]]:
    """Vocabulary chunks of the backward: an (N x Vc) G chunk in the input dtype fits the memory budget."""
    element = torch.empty((), dtype=dtype).element_size()
    columns = plans.panel_rows(vocabulary, tokens, element, multiple=tiles.block_n, device_type=device.type)
    return [(first, min(first + columns, vocabulary)) for first in range(0, vocabulary, columns)]


def planned_matrix_flops(case: str, dtype: torch.dtype, device_type: str, tokens: int, vocabulary: int,
                         features: int) -> int:
    """The tl.dot FLOPs this module's plan issues for one forward + backward, with the default tiles: logit tiles
    padded to BLOCK_M x BLOCK_N x BLOCK_D, the GEMMs padded to theirs (gemm.py). At sizes that are multiples of the
    tiles this is exactly the floor 8 N V D."""
    device = torch.device(device_type)
    padded_features = triton.cdiv(features, 16) * 16 if device_type == "cuda" else features
    tiles = forward_tile_candidates(device, dtype)[0]
    depth = triton.cdiv(padded_features, tiles.block_d) * tiles.block_d
    token_rows = triton.cdiv(tokens, tiles.block_m) * tiles.block_m
    per_split, splits = _vocabulary_splits(device, triton.cdiv(tokens, tiles.block_m), vocabulary, tiles.block_n)
    columns = sum(triton.cdiv(min(per_split, vocabulary - k * per_split), tiles.block_n) * tiles.block_n
                  for k in range(splits))
    total = 2 * token_rows * columns * depth
    tiles = backward_tile_candidates(device, dtype)[0]
    depth = triton.cdiv(padded_features, tiles.block_d) * tiles.block_d
    token_rows = triton.cdiv(tokens, tiles.block_m) * tiles.block_m
    for first, stop in _vocabulary_chunks(device, tokens, vocabulary, dtype, tiles):
        width = stop - first
        total += 2 * token_rows * triton.cdiv(width, tiles.block_n) * tiles.block_n * depth
        total += gemm.planned_matmul_flops(tokens, padded_features, width, device_type, dtype)
        total += gemm.planned_matmul_flops(width, padded_features, tokens, device_type, dtype)
    return total


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
    valid. The per-token arguments come broadcast to the tile's orientation (tokens on rows or on columns). The z'
    term is left out where grad_square is 0: a masked class (z' = -inf, a -inf bias) gets 0, not 0 * inf = NaN."""
    softmax = tl.exp(tl.where(valid, logits - lse, float("-inf")))
    square_term = tl.where(grad_square != 0.0, 2.0 * grad_square * logits, 0.0)
    gradient = grad_lse * softmax + grad_sum + square_term + tl.where(is_target, grad_target, 0.0)
    return tl.where(valid, gradient * derivative, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Forward.

@triton.jit
def _linear_ce_forward_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, partial_ptr, N, V, D, softcap,
                              classes_per_split, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              INPUT_PRECISION: tl.constexpr):
    """Program (token block, split k): the four statistics of its tokens over the split's classes
    [k classes_per_split, (k + 1) classes_per_split), stored to partial[statistic, k, tokens] (statistic: 0 the
    log-sum-exp, 1 the target logit (0 where the target is elsewhere), 2 the sum, 3 the sum of squares)."""
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    mask_tokens = tokens < N
    first = split * classes_per_split
    last = tl.minimum(first + classes_per_split, V)
    targets = tl.load(targets_ptr + tokens, mask=mask_tokens, other=-1)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    logit_square_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(first, last, BLOCK_N):
        classes = start + tl.arange(0, BLOCK_N)
        mask_classes = classes < last
        logits, _ = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, tokens, mask_tokens, classes, mask_classes, D,
                                 softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        logits = tl.where(mask_classes[None, :], logits, 0.0)
        # The split's first block holds a valid class, so new_max is finite from the first step on:
        # exp(running_max - new_max) never sees (-inf) - (-inf).
        masked = tl.where(mask_classes[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(masked, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(masked - new_max[:, None]), axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(classes[None, :] == targets[:, None], logits, 0.0), axis=1)
        logit_sum += tl.sum(logits, axis=1)
        logit_square_sum += tl.sum(logits * logits, axis=1)
    row = partial_ptr + split.to(tl.int64) * N + tokens
    plane = tl.num_programs(1).to(tl.int64) * N
    tl.store(row, running_max + tl.log(running_sum), mask=mask_tokens)
    tl.store(row + plane, target_logit, mask=mask_tokens)
    tl.store(row + 2 * plane, logit_sum, mask=mask_tokens)
    tl.store(row + 3 * plane, logit_square_sum, mask=mask_tokens)


def linear_ce_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                      softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token float32 statistics (lse, target_logit, logit_sum, logit_square_sum) of z' = softcap(h W^T + b),
    without the N x V logits. hidden (N, D), weight (V, D), bias (V,) or empty, one dtype; targets int64 (N,)."""
    h, w = aligned_features(hidden, weight)
    bias, targets = bias.contiguous(), targets.contiguous()
    tokens, vocabulary = h.shape[0], w.shape[0]
    if tokens == 0:
        return tuple(torch.zeros(tokens, dtype=torch.float32, device=h.device) for _ in range(4))

    def run(tiles: Tiles) -> tuple[torch.Tensor, ...]:
        token_blocks = triton.cdiv(tokens, tiles.block_m)
        per_split, splits = _vocabulary_splits(h.device, token_blocks, vocabulary, tiles.block_n)
        partial = torch.empty((4, splits, tokens), dtype=torch.float32, device=h.device)
        with device_context(h.device):
            _linear_ce_forward_kernel[(token_blocks, splits)](
                h, w, bias, targets, partial, tokens, vocabulary, h.shape[1], float(softcap), per_split,
                HAS_BIAS=bias.numel() > 0, HAS_SOFTCAP=softcap > 0, INPUT_PRECISION=input_precision(h.dtype),
                **tiles.launch_options(h.device))
        # Splits in a fixed order: deterministic. Every split's log-sum-exp is finite (or NaN).
        return (torch.logsumexp(partial[0], dim=0), *(partial[k].sum(dim=0) for k in (1, 2, 3)))

    return _tuned("linear_ce_forward", tokens, w, forward_tile_candidates(h.device, h.dtype), run)


# ---------------------------------------------------------------------------------------------------------------
# Backward.

@triton.jit
def _linear_ce_gradient_chunk_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, grad_lse_ptr,
                                     grad_target_ptr, grad_sum_ptr, grad_square_ptr, bound_ptr, g_ptr,
                                     bias_partial_ptr, N, V, D, softcap, chunk_start, chunk_width, g_stride,
                                     HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Program (token block, class block of the chunk): the d_logits tile G / bound, stored in the input dtype to
    g[tokens, classes - chunk_start], and its sums over the block's tokens to bias_partial[token block,
    classes - chunk_start]."""
    token_block = tl.program_id(0)
    tokens = token_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_tokens = tokens < N
    local = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    classes = chunk_start + local
    mask_classes = (local < chunk_width) & (classes < V)
    bound = tl.load(bound_ptr)
    targets = tl.load(targets_ptr + tokens, mask=mask_tokens, other=-1)
    lse = tl.load(lse_ptr + tokens, mask=mask_tokens, other=0.0)
    grad_lse = tl.load(grad_lse_ptr + tokens, mask=mask_tokens, other=0.0) / bound
    grad_target = tl.load(grad_target_ptr + tokens, mask=mask_tokens, other=0.0) / bound
    grad_sum = tl.load(grad_sum_ptr + tokens, mask=mask_tokens, other=0.0) / bound
    grad_square = tl.load(grad_square_ptr + tokens, mask=mask_tokens, other=0.0) / bound
    logits, derivative = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, tokens, mask_tokens, classes, mask_classes,
                                      D, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
    valid = mask_tokens[:, None] & mask_classes[None, :]
    gradient = _logit_gradient(logits, derivative, lse[:, None], grad_lse[:, None], grad_target[:, None],
                               grad_sum[:, None], grad_square[:, None], classes[None, :] == targets[:, None], valid)
    tl.store(g_ptr + tokens.to(tl.int64)[:, None] * g_stride + local[None, :], gradient.to(g_ptr.dtype.element_ty),
             mask=valid)
    if HAS_BIAS:
        tl.store(bias_partial_ptr + token_block.to(tl.int64) * chunk_width + local, tl.sum(gradient, axis=0),
                 mask=mask_classes)


def _gradient_bound(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, softcap: float, grad_lse: torch.Tensor,
                    grad_target: torch.Tensor, grad_sum: torch.Tensor, grad_square_sum: torch.Tensor) -> torch.Tensor:
    """A power of two >= max |G| (module docstring), as a 1-element float32 tensor: float16's G is divided by it.
    bfloat16 and float32 need no scaling: 1."""
    if h.dtype != torch.float16 or h.shape[0] == 0:
        return torch.ones(1, dtype=torch.float32, device=h.device)
    if softcap > 0:
        largest_logit = torch.full_like(grad_lse, float(softcap))
    else:
        largest_logit = torch.linalg.vector_norm(h.float(), dim=1) * torch.linalg.vector_norm(w.float(), dim=1).amax()
        if bias.numel():  # (masked classes, -inf, have G = grad_sum: their bias does not bound anything)
            finite_bias = bias.float().abs()
            largest_logit = largest_logit + torch.where(torch.isfinite(finite_bias), finite_bias, 0).amax()
    bound = (grad_lse.abs() + grad_sum.abs() + grad_target.abs() + 2 * grad_square_sum.abs() * largest_logit).amax()
    bound = torch.exp2(torch.ceil(torch.log2(bound)))
    return torch.where(torch.isfinite(bound) & (bound > 0), bound, torch.ones_like(bound)).reshape(1)


def linear_ce_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                       softcap: float, lse: torch.Tensor, grad_lse: torch.Tensor, grad_target: torch.Tensor,
                       grad_sum: torch.Tensor, grad_square_sum: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_n (grad_lse lse + grad_target target_logit + grad_sum logit_sum + grad_square_sum
    logit_square_sum) for hidden (N, D), weight (V, D) and bias (V,; empty without one), in the input dtype.
    The per-token tensors are float32 (N,). Deterministic."""
    features = hidden.shape[1]
    h, w = aligned_features(hidden, weight)
    bias, targets = bias.contiguous(), targets.contiguous()
    per_token = tuple(t.contiguous() for t in (lse, grad_lse, grad_target, grad_sum, grad_square_sum))
    tokens, vocabulary, padded = h.shape[0], w.shape[0], h.shape[1]
    if tokens == 0:
        return torch.zeros_like(hidden), torch.zeros_like(weight), torch.zeros_like(bias)
    bound = _gradient_bound(h, w, bias, softcap, *per_token[1:])
    constants = dict(HAS_BIAS=bias.numel() > 0, HAS_SOFTCAP=softcap > 0, INPUT_PRECISION=input_precision(h.dtype))

    def run(tiles: Tiles) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grad_hidden = torch.zeros((tokens, padded), dtype=torch.float32, device=h.device)
        grad_weight = torch.empty_like(w)
        grad_bias = torch.empty_like(bias)
        chunks = _vocabulary_chunks(h.device, tokens, vocabulary, h.dtype, tiles)
        widest = chunks[0][1] - chunks[0][0]
        storage = torch.empty((tokens, _chunk_leading_dimension(h.device, widest)), dtype=h.dtype, device=h.device)
        token_blocks = triton.cdiv(tokens, tiles.block_m)
        with device_context(h.device):
            for first, stop in chunks:
                width = stop - first
                g = storage[:, :width]
                bias_partial = torch.empty((token_blocks, width) if bias.numel() else (0,), dtype=torch.float32,
                                           device=h.device)
                _linear_ce_gradient_chunk_kernel[(token_blocks, triton.cdiv(width, tiles.block_n))](
                    h, w, bias, targets, *per_token, bound, g, bias_partial, tokens, vocabulary, padded,
                    float(softcap), first, width, g.stride(0), **constants, **tiles.launch_options(h.device))
                if bias.numel():
                    grad_bias[first:stop] = (bias_partial.sum(dim=0) * bound).to(bias.dtype)
                gemm.matmul(g, w[first:stop], grad_hidden, bound, accumulate=True)
                gemm.matmul(g.T, h, grad_weight[first:stop], bound)
        return grad_hidden.to(hidden.dtype), grad_weight, grad_bias

    grad_hidden, grad_weight, grad_bias = _tuned("linear_ce_backward", tokens, w,
                                                 backward_tile_candidates(h.device, h.dtype), run)
    return unpadded(grad_hidden, features), unpadded(grad_weight, features), grad_bias
