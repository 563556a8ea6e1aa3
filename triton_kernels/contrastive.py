"""Triton kernels for the blockwise contrastive primitives: CLIP (softmax cross-entropy both ways) and SigLIP
(pairwise sigmoid), after Radford et al. 2021 (CLIP), Zhai et al. 2023 (SigLIP) and, for the tiling, Dao et al.
2022 (FlashAttention) and Cheng et al. 2024 (Inf-CL).

Notation: x = image features, y = text features, both (B, D) of one dtype (float32, float16 or bfloat16);
S[i, j] = <x_i, y_j>. S is only ever held as BLOCK_M x BLOCK_N tiles in registers, computed by tl.dot with float32
accumulation over BLOCK_D slices of the feature dimension; the B x B matrix is never written to memory. Every
statistic and gradient is float32.

Memory, besides the inputs and the outputs: O(B * B / BLOCK_M) float32 for the column statistics of
``clip_forward`` (one partial log-sum-exp per row block and column), O(B / BLOCK_M) for SigLIP's scalar
gradients, O(1) otherwise.

Numerics: log-sum-exps keep a running maximum in float32, so scale * S may be large (scale 100 with |S| ~ 1e3
gives logits ~ 1e5) without overflow; masked rows and columns (beyond B) enter as -inf before any exp, and
masked feature columns (beyond D) load as zero. float32 features use ``input_precision="ieee"`` (no TF32), so
float32 results agree with a float64 computation to ~1e-6; float16/bfloat16 products run on the tensor cores,
whose float32 accumulation of exact products makes S as accurate as for float32 features. The backward kernels
multiply a float32 tile by a feature tile; for 16-bit features the tile is first rounded to that dtype (as
FlashAttention does with P), after division by a bound on its entries so that float16 neither overflows nor
flushes small probabilities to zero.

Tiles: on the GPU each launcher times a short list of tile candidates on its first call per (dtype, D, B rounded
up to a power of two) and keeps the fastest (tile_tuning.py; ``LEANOPS_TRITON_AUTOTUNE=0`` keeps the defaults). The
tests compile every candidate for sm_90 and check that none spills registers.

Launchers take torch tensors already validated by the caller (python/leanops/contrastive.py): same dtype,
B >= 1, D >= 1, float32 scale/weights. They make their inputs contiguous and allocate float32 outputs.
"""
from dataclasses import replace

import torch
import triton
import triton.language as tl

from . import tile_tuning
from .tiles import INTERPRETER_TILES, forward_candidates
from .tiles import Tiles as _Tiles
from .tiles import aligned_features as _aligned_features
from .tiles import device_context as _device_context
from .tiles import input_precision as _input_precision
from .tiles import load_rows as _load_rows
from .tiles import product_tile as _similarity_tile
from .tiles import unpadded as _unpadded


# ---------------------------------------------------------------------------------------------------------------
# Tile sizes, a function of the device and the feature dtype.

# Off the GPU: tiles.INTERPRETER_TILES (16 x 16 x 16, 32 gradient columns: B = 37 is three row blocks, D = 70 three
# gradient column chunks).

# Hopper (H100) candidates, each checked by the tests to compile for sm_90 without register spills when D % 16 == 0
# (Triton then pipelines the K loop through shared memory, with wgmma for 16-bit features). The first of each list
# is the default; on the GPU the launchers time them all on the first call per shape and keep the fastest
# (tile_tuning.py). Not yet timed on a GPU.
# 16-bit forward: a GEMM-shaped loop; the default is a 128 x 128 tile, 3-stage pipeline of 64-wide K slices,
# 8 warps (two warpgroups), 227 registers. BLOCK_M also sets the column-statistics workspace, B * B / BLOCK_M
# floats: 256 halves it.
# 16-bit backward: a BLOCK_M x BLOCK_DOUT float32 accumulator in registers next to the S tile: 128 x 128 or
# 64 x 256 (~220 registers). With atomics it also holds the anchor's feature chunk and G^T, which fits spill-free
# only at 64 x 128 (226 registers); 128 x 128 spills in the SigLIP backward.
# float32 features: "ieee" products are FMA loops on the CUDA cores, whose register layouts need smaller tiles
# (ptxas, sm_90, D = 512: 128 x 64 x 32 forward tiles spill in the SigLIP kernel, 64 x 32 x 32 backward tiles with
# 64 gradient columns spill in both).
# D % 16 != 0 leaves rows without 16-byte alignment: loads then go through registers, unpipelined, and ptxas
# spills. Correct but slow: so on the GPU the launchers zero-pad D to a multiple of 16 (S is unchanged).
_GPU_FORWARD = (
    _Tiles(block_m=128, block_n=128, block_d=64, block_dout=0, num_warps=8, num_stages=3),
    _Tiles(block_m=128, block_n=64, block_d=64, block_dout=0, num_warps=4, num_stages=4),
    _Tiles(block_m=128, block_n=128, block_d=32, block_dout=0, num_warps=8, num_stages=4),
    _Tiles(block_m=256, block_n=64, block_d=64, block_dout=0, num_warps=8, num_stages=3),
)
_GPU_FORWARD_FLOAT32 = (_Tiles(block_m=64, block_n=64, block_d=16, block_dout=0, num_warps=4, num_stages=2),)


def forward_tile_candidates(device: torch.device, dtype: torch.dtype) -> tuple[_Tiles, ...]:
    """Forward tiles to choose from, the default first."""
    return forward_candidates(device, dtype, _GPU_FORWARD, _GPU_FORWARD_FLOAT32)


def backward_tile_candidates(device: torch.device, dtype: torch.dtype, features: int,
                             atomics: bool) -> tuple[_Tiles, ...]:
    """Backward tiles to choose from, the default first. A program owns BLOCK_DOUT columns of its gradient rows;
    when D > BLOCK_DOUT the columns are split into cdiv(D, BLOCK_DOUT) chunks, each recomputing S (2 B^2 D flops
    per extra chunk and launch)."""
    if device.type != "cuda":
        return (INTERPRETER_TILES,)
    width = max(triton.next_power_of_2(features), 16)
    if dtype == torch.float32:
        if atomics:
            return (_Tiles(block_m=64, block_n=32, block_d=32, block_dout=min(width, 32), num_warps=4, num_stages=2),)
        return (_Tiles(block_m=32, block_n=32, block_d=32, block_dout=min(width, 64), num_warps=4, num_stages=2),
                _Tiles(block_m=64, block_n=32, block_d=16, block_dout=min(width, 64), num_warps=4, num_stages=1))
    if atomics:
        return (_Tiles(block_m=64, block_n=64, block_d=64, block_dout=min(width, 128), num_warps=8, num_stages=2),)
    block_dout = min(width, 256)
    default = _Tiles(block_m=128 if block_dout <= 128 else 64, block_n=64, block_d=64, block_dout=block_dout,
                     num_warps=8, num_stages=2)
    return tuple(dict.fromkeys((default, replace(default, block_n=32), replace(default, num_stages=3))))


_TUNER = tile_tuning.TileTuner()


def _tuned(name: str, x: torch.Tensor, candidates: tuple[_Tiles, ...], run):
    """run(tiles) with the tiles that the tuner picked for this kernel, device, dtype, D and power-of-2 bucket
    of B."""
    key = (name, x.device, x.dtype, x.shape[1], triton.next_power_of_2(x.shape[0]))
    return run(_TUNER.choose(key, x.device, candidates, run))


# ---------------------------------------------------------------------------------------------------------------
# Shared device functions.

@triton.jit
def _accumulate(pointer, value, mask, ATOMIC: tl.constexpr):
    """pointer[...] += value: atomically when other programs add to the same elements concurrently, else (one
    writer per element at a time) a plain read-modify-write, which keeps the result deterministic."""
    if ATOMIC:
        tl.atomic_add(pointer, value, mask=mask)
    else:
        tl.store(pointer, tl.load(pointer, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _log1p(t):
    """log(1 + t) for t >= 0, accurate also where 1 + t rounds to 1 (Goldberg 1991: log(u) * t / (u - 1))."""
    u = 1.0 + t
    exact = u == 1.0
    # Both branches are evaluated: keep the unused one free of 0 / 0.
    return tl.where(exact, t, tl.log(u) * (t / tl.where(exact, 1.0, u - 1.0)))


# ---------------------------------------------------------------------------------------------------------------
# CLIP forward.

@triton.jit
def _clip_forward_kernel(x_ptr, y_ptr, scale_ptr, row_lse_ptr, column_partial_ptr, B, D,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr):
    """One program per row block of BLOCK_M rows, streaming over all column blocks once.

    Row statistics: an online (running max, rescaled sum) log-sum-exp of scale[i] * S[i, :], finished in-register.
    Column statistics need every row block, so from the same S tile each program writes, for every column j, the
    log-sum-exp of scale[j] * S[i, j] over its own rows to column_partial[row_block, j]; the launcher reduces that
    (cdiv(B, BLOCK_M), B) buffer over row blocks. This costs B * B / BLOCK_M floats (1/128 of the logits at
    BLOCK_M = 128) and keeps the forward at one pass, 2 B^2 D flops; the alternative, a second kernel over column
    blocks, would compute S twice. (Atomics cannot merge log-sum-exps, which need a shared running max.)
    """
    row_block = tl.program_id(0)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_rows = rows < B
    # Masked rows get scale 0: their row logits are finite zeros, never stored, and they are excluded (-inf) from
    # the column statistics below.
    row_scale = tl.load(scale_ptr + rows, mask=mask_rows, other=0.0)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    partial_row = column_partial_ptr + row_block.to(tl.int64) * B
    for start in range(0, B, BLOCK_N):
        columns = start + tl.arange(0, BLOCK_N)
        mask_columns = columns < B
        similarity = _similarity_tile(x_ptr, y_ptr, rows, mask_rows, columns, mask_columns, D,
                                      BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)

        row_logits = tl.where(mask_columns[None, :], row_scale[:, None] * similarity, float("-inf"))
        # The first column block holds column 0, so new_max is finite from the first step on and
        # exp(running_max - new_max) never sees (-inf) - (-inf).
        new_max = tl.maximum(running_max, tl.max(row_logits, axis=1))
        running_sum = (running_sum * tl.exp(running_max - new_max)
                       + tl.sum(tl.exp(row_logits - new_max[:, None]), axis=1))
        running_max = new_max

        column_scale = tl.load(scale_ptr + columns, mask=mask_columns, other=0.0)
        column_logits = tl.where(mask_rows[:, None], column_scale[None, :] * similarity, float("-inf"))
        column_max = tl.max(column_logits, axis=0)  # finite: this block's first row is always valid
        column_sum = tl.sum(tl.exp(column_logits - column_max[None, :]), axis=0)
        tl.store(partial_row + columns, column_max + tl.log(column_sum), mask=mask_columns)
    tl.store(row_lse_ptr + rows, running_max + tl.log(running_sum), mask=mask_rows)


def clip_forward(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP log-sum-exps without the B x B logits.

    image, text: (B, D), one dtype; scale: (B,) float32 per-anchor logit scales. Returns float32 (B,) tensors
    row_lse[i] = logsumexp_j(scale[i] S[i, j]) and col_lse[j] = logsumexp_i(scale[j] S[i, j]).
    """
    (x, y), scale = _aligned_features(image, text), scale.contiguous()
    batch, features = x.shape

    def run(tiles: _Tiles) -> tuple[torch.Tensor, torch.Tensor]:
        row_blocks = triton.cdiv(batch, tiles.block_m)
        row_lse = torch.empty(batch, dtype=torch.float32, device=x.device)
        column_partial = torch.empty((row_blocks, batch), dtype=torch.float32, device=x.device)
        with _device_context(x.device):
            _clip_forward_kernel[(row_blocks,)](x, y, scale, row_lse, column_partial, batch, features,
                                                INPUT_PRECISION=_input_precision(x.dtype),
                                                **tiles.launch_options(x.device))
        # Every partial is finite (each row block has a valid row), so this is a plain, stable float32 reduction.
        return row_lse, torch.logsumexp(column_partial, dim=0)

    return _tuned("clip_forward", x, forward_tile_candidates(x.device, x.dtype), run)


# ---------------------------------------------------------------------------------------------------------------
# CLIP backward.

@triton.jit
def _clip_backward_kernel(anchor_ptr, other_ptr, scale_ptr, anchor_lse_ptr, other_lse_ptr,
                          anchor_weight_ptr, other_weight_ptr, bound_ptr,
                          grad_anchor_ptr, grad_other_ptr, grad_scale_ptr, B, D,
                          OTHER_SIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Gradient rows of the "anchor" side, streaming over the "other" side; grid (cdiv(B, BLOCK_M), cdiv(D,
    BLOCK_DOUT)): program (a, c) owns grad_anchor[a-block, c-chunk] as a float32 accumulator in registers.

    With S' = anchor @ other^T, the tile of G (or of G^T) is
        G'[a, b] = w1[a] s[a] exp(s[a] S'[a, b] - L1[a]) + w2[b] s[b] exp(s[b] S'[a, b] - L2[b]),
    which is G for (anchor, L1, w1, other, L2, w2) = (image, row_lse, row_weight, text, col_lse, col_weight) and
    G^T for (text, col_lse, col_weight, image, row_lse, row_weight); grad_scale gets w1[a] sum_b p'[a, b] S'[a, b]
    with p' the first exponential, which is the row part of grad_scale for the first assignment and the column part
    for the second. So one kernel serves both directions.

    Two ways to get grad_other (the launchers' `deterministic` picks):
    - OTHER_SIDE=False, the default: the launcher runs the kernel twice with the roles swapped. With n column
      chunks, 2 (2n + 2) B^2 D flops (8 B^2 D when D <= BLOCK_DOUT = 256), no atomics, bitwise reproducible.
    - OTHER_SIDE=True: one launch also adds G'^T @ anchor[a-block, c-chunk] to grad_other and
      w2[b] sum_a q'[a, b] S'[a, b] to grad_scale with float32 atomics: (2n + 4) B^2 D flops, the floor 6 B^2 D
      when D <= BLOCK_DOUT. But it needs more registers (BLOCK_DOUT 128 instead of 256 on Hopper, so n doubles
      for D > 128 and the flops come out equal to two launches), it sends B^2 D / BLOCK_M float32 atomic
      additions through L2 (4 B^2 D / 64 bytes, 1/96 byte per flop of the floor, against a Hopper balance of
      ~250 flops per DRAM byte) and the order of those additions, hence the last bits of grad_other and
      grad_scale, varies from run to run. It can only pay for D <= 128; which one is faster there is for a GPU
      benchmark to say.
    """
    anchor_block = tl.program_id(0)
    chunk = tl.program_id(1)
    rows_a = anchor_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_a = rows_a < B
    columns_out = chunk * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    mask_out = columns_out < D
    first_chunk = chunk == 0  # the per-anchor scale gradient is written by one chunk only

    # G' is computed divided by bound >= max |w1 s| + max |w2 s| >= max |G'| (the exponentials are <= 1): its
    # entries lie in [-1, 1] before the 16-bit cast, where float16 neither overflows nor loses small values.
    bound = tl.load(bound_ptr)
    bound = tl.where(bound > 0, bound, 1.0)
    scale_a = tl.load(scale_ptr + rows_a, mask=mask_a, other=0.0)
    lse_a = tl.load(anchor_lse_ptr + rows_a, mask=mask_a, other=0.0)
    weight_a = tl.load(anchor_weight_ptr + rows_a, mask=mask_a, other=0.0)
    coefficient_a = weight_a * scale_a / bound

    grad_a = tl.zeros((BLOCK_M, BLOCK_DOUT), dtype=tl.float32)
    scale_sum_a = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum_b p'[a, b] S'[a, b]
    if OTHER_SIDE:
        anchor_chunk = _load_rows(anchor_ptr, rows_a, mask_a, columns_out, mask_out, D)
    for start in range(0, B, BLOCK_N):
        rows_b = start + tl.arange(0, BLOCK_N)
        mask_b = rows_b < B
        similarity = _similarity_tile(anchor_ptr, other_ptr, rows_a, mask_a, rows_b, mask_b, D,
                                      BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        valid = mask_a[:, None] & mask_b[None, :]
        scale_b = tl.load(scale_ptr + rows_b, mask=mask_b, other=0.0)
        lse_b = tl.load(other_lse_ptr + rows_b, mask=mask_b, other=0.0)
        weight_b = tl.load(other_weight_ptr + rows_b, mask=mask_b, other=0.0)
        coefficient_b = weight_b * scale_b / bound

        # -inf before the exp: masked entries are exactly 0 and never overflow.
        p = tl.exp(tl.where(valid, scale_a[:, None] * similarity - lse_a[:, None], float("-inf")))
        q = tl.exp(tl.where(valid, scale_b[None, :] * similarity - lse_b[None, :], float("-inf")))
        g = coefficient_a[:, None] * p + coefficient_b[None, :] * q

        other_chunk = _load_rows(other_ptr, rows_b, mask_b, columns_out, mask_out, D)
        grad_a = tl.dot(g.to(other_chunk.dtype), other_chunk, grad_a, input_precision=INPUT_PRECISION)
        scale_sum_a += tl.sum(p * similarity, axis=1)
        if OTHER_SIDE:
            grad_b = tl.dot(tl.trans(g).to(anchor_chunk.dtype), anchor_chunk, input_precision=INPUT_PRECISION)
            tl.atomic_add(grad_other_ptr + rows_b.to(tl.int64)[:, None] * D + columns_out[None, :], grad_b * bound,
                          mask=mask_b[:, None] & mask_out[None, :])
            tl.atomic_add(grad_scale_ptr + rows_b, weight_b * tl.sum(q * similarity, axis=0),
                          mask=mask_b & first_chunk)

    tl.store(grad_anchor_ptr + rows_a.to(tl.int64)[:, None] * D + columns_out[None, :], grad_a * bound,
             mask=mask_a[:, None] & mask_out[None, :])
    _accumulate(grad_scale_ptr + rows_a, weight_a * scale_sum_a, mask_a & first_chunk, OTHER_SIDE)


def _use_atomics(deterministic: bool) -> bool:
    if not deterministic and torch.are_deterministic_algorithms_enabled():
        return False  # torch.use_deterministic_algorithms(True) wins over a request for atomics
    return not deterministic


def clip_backward(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, row_lse: torch.Tensor,
                  col_lse: torch.Tensor, row_weight: torch.Tensor, col_weight: torch.Tensor,
                  deterministic: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i row_weight[i] row_lse[i] + sum_j col_weight[j] col_lse[j] with respect to image, text
    and scale, recomputing S tile by tile.

    With p[i, j] = exp(scale[i] S[i, j] - row_lse[i]) (row softmax), q[i, j] = exp(scale[j] S[i, j] - col_lse[j])
    (column softmax) and G[i, j] = row_weight[i] scale[i] p[i, j] + col_weight[j] scale[j] q[i, j]:
        grad_image = G @ text (B, D), grad_text = G^T @ image (B, D),
        grad_scale[i] = row_weight[i] sum_j p[i, j] S[i, j] + col_weight[i] sum_k q[k, i] S[k, i]  (B,).
    All float32; scale, row_lse, col_lse, row_weight, col_weight are float32 (B,).

    deterministic: True (default): two launches, no atomics, bitwise reproducible. False: one launch, grad_text and
    the column part of grad_scale reduced with float32 atomics, a quarter fewer flops when D <= 128 (see
    _clip_backward_kernel); ignored under torch.use_deterministic_algorithms(True).
    """
    x, y = _aligned_features(image, text)
    scale, row_lse, col_lse = scale.contiguous(), row_lse.contiguous(), col_lse.contiguous()
    row_weight, col_weight = row_weight.contiguous(), col_weight.contiguous()
    batch, features = x.shape
    atomics = _use_atomics(deterministic)
    if batch == 0:
        return (torch.zeros(image.shape, dtype=torch.float32, device=x.device),
                torch.zeros(text.shape, dtype=torch.float32, device=x.device),
                torch.zeros(0, dtype=torch.float32, device=x.device))
    # A tensor, not .item(): no host synchronisation, and the op stays traceable.
    bound = (row_weight * scale).abs().amax() + (col_weight * scale).abs().amax()

    def run(tiles: _Tiles) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = (triton.cdiv(batch, tiles.block_m), max(triton.cdiv(features, tiles.block_dout), 1))
        grad_image = torch.empty((batch, features), dtype=torch.float32, device=x.device)
        # Atomics add into grad_text; two launches store it.
        grad_text = (torch.zeros if atomics else torch.empty)((batch, features), dtype=torch.float32,
                                                              device=x.device)
        grad_scale = torch.zeros(batch, dtype=torch.float32, device=x.device)
        options = dict(BLOCK_DOUT=tiles.block_dout, INPUT_PRECISION=_input_precision(x.dtype),
                       **tiles.launch_options(x.device))
        with _device_context(x.device):
            if atomics:
                _clip_backward_kernel[grid](x, y, scale, row_lse, col_lse, row_weight, col_weight, bound,
                                            grad_image, grad_text, grad_scale, batch, features, OTHER_SIDE=True,
                                            **options)
            else:
                _clip_backward_kernel[grid](x, y, scale, row_lse, col_lse, row_weight, col_weight, bound,
                                            grad_image, grad_text, grad_scale, batch, features, OTHER_SIDE=False,
                                            **options)
                _clip_backward_kernel[grid](y, x, scale, col_lse, row_lse, col_weight, row_weight, bound,
                                            grad_text, grad_image, grad_scale, batch, features, OTHER_SIDE=False,
                                            **options)
        return grad_image, grad_text, grad_scale

    candidates = backward_tile_candidates(x.device, x.dtype, features, atomics)
    grad_image, grad_text, grad_scale = _tuned(f"clip_backward/atomics={atomics}", x, candidates, run)
    return _unpadded(grad_image, image.shape[1]), _unpadded(grad_text, image.shape[1]), grad_scale


# ---------------------------------------------------------------------------------------------------------------
# SigLIP.

@triton.jit
def _signed_exponent(similarity, groups_rows, groups_columns, scale, bias):
    """(positive, t) on a SigLIP tile: label +1 where the group ids match (else -1), t = -label * (scale S + bias),
    so that each pair's loss is softplus(t)."""
    positive = groups_rows[:, None] == groups_columns[None, :]
    logits = scale * similarity + bias
    return positive, tl.where(positive, -logits, logits)


@triton.jit
def _siglip_forward_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, groups_ptr, row_loss_ptr, B, D,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           INPUT_PRECISION: tl.constexpr):
    """One program per row block: row_loss[i] = sum_j softplus(-label[i, j] z[i, j]), z = scale S + bias."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_rows = rows < B
    # Read from memory, not passed as Python floats: the caller's scale and bias may be traced tensors.
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    groups_rows = tl.load(groups_ptr + rows, mask=mask_rows, other=0)
    row_loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, B, BLOCK_N):
        columns = start + tl.arange(0, BLOCK_N)
        mask_columns = columns < B
        similarity = _similarity_tile(x_ptr, y_ptr, rows, mask_rows, columns, mask_columns, D,
                                      BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        groups_columns = tl.load(groups_ptr + columns, mask=mask_columns, other=0)
        _, t = _signed_exponent(similarity, groups_rows, groups_columns, scale, bias)
        # softplus(t) = max(t, 0) + log1p(exp(-|t|)): no overflow for |t| ~ 1e5, no cancellation for t << 0.
        softplus = tl.maximum(t, 0.0) + _log1p(tl.exp(-tl.abs(t)))
        row_loss += tl.sum(tl.where(mask_columns[None, :], softplus, 0.0), axis=1)
    tl.store(row_loss_ptr + rows, row_loss, mask=mask_rows)


def siglip_forward(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                   groups: torch.Tensor) -> torch.Tensor:
    """SigLIP per-image losses without the B x B logits.

    image, text: (B, D), one dtype; scale, bias: 0-dim float32; groups: int64 (B,), label[i, j] = +1 where
    groups[i] == groups[j], else -1. Returns float32 (B,) row_loss[i] = sum_j softplus(-label[i, j] (scale S[i, j]
    + bias)) = -sum_j log sigmoid(label[i, j] z[i, j]).
    """
    x, y = _aligned_features(image, text)
    scale, bias, groups = scale.contiguous(), bias.contiguous(), groups.contiguous()
    batch, features = x.shape

    def run(tiles: _Tiles) -> torch.Tensor:
        row_loss = torch.empty(batch, dtype=torch.float32, device=x.device)
        with _device_context(x.device):
            _siglip_forward_kernel[(triton.cdiv(batch, tiles.block_m),)](
                x, y, scale, bias, groups, row_loss, batch, features, INPUT_PRECISION=_input_precision(x.dtype),
                **tiles.launch_options(x.device))
        return row_loss

    return _tuned("siglip_forward", x, forward_tile_candidates(x.device, x.dtype), run)


@triton.jit
def _siglip_backward_kernel(anchor_ptr, other_ptr, scale_ptr, bias_ptr, groups_ptr, weight_ptr, bound_ptr,
                            grad_anchor_ptr, grad_other_ptr, partial_scale_ptr, partial_bias_ptr, B, D,
                            WEIGHT_ON_ANCHOR: tl.constexpr, OTHER_SIDE: tl.constexpr,
                            REDUCE_SCALARS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Gradient rows of the anchor side, same grid and the same two modes as _clip_backward_kernel.

    With S' = anchor @ other^T (the label matrix is symmetric), the tile is
        D'[a, b] = -w * label[a, b] * sigmoid(-label[a, b] (scale S'[a, b] + bias)),
    w = row_weight[a] (WEIGHT_ON_ANCHOR: anchor = image, D' = D) or row_weight[b] (anchor = text, D' = D^T), and
    grad_anchor = scale D' @ other. REDUCE_SCALARS: chunk 0 of each anchor block also writes its share of
    sum D' S' and sum D' to partial_*[anchor_block]; the launcher adds the partials (deterministic either way).
    """
    anchor_block = tl.program_id(0)
    chunk = tl.program_id(1)
    rows_a = anchor_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_a = rows_a < B
    columns_out = chunk * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    mask_out = columns_out < D

    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    # D' is computed divided by bound = max |row_weight| >= max |D'|: entries in [-1, 1] before the 16-bit cast.
    bound = tl.load(bound_ptr)
    bound = tl.where(bound > 0, bound, 1.0)
    groups_a = tl.load(groups_ptr + rows_a, mask=mask_a, other=0)
    if WEIGHT_ON_ANCHOR:
        weight_a = tl.load(weight_ptr + rows_a, mask=mask_a, other=0.0) / bound

    grad_a = tl.zeros((BLOCK_M, BLOCK_DOUT), dtype=tl.float32)
    sum_ds = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_d = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if OTHER_SIDE:
        anchor_chunk = _load_rows(anchor_ptr, rows_a, mask_a, columns_out, mask_out, D)
    for start in range(0, B, BLOCK_N):
        rows_b = start + tl.arange(0, BLOCK_N)
        mask_b = rows_b < B
        similarity = _similarity_tile(anchor_ptr, other_ptr, rows_a, mask_a, rows_b, mask_b, D,
                                      BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        groups_b = tl.load(groups_ptr + rows_b, mask=mask_b, other=0)
        positive, t = _signed_exponent(similarity, groups_a, groups_b, scale, bias)
        # sigmoid(t) without overflow: exp of a non-positive number only.
        e = tl.exp(-tl.abs(t))
        sigmoid = tl.where(t >= 0, 1.0, e) / (1.0 + e)
        if WEIGHT_ON_ANCHOR:
            weight = weight_a[:, None]
        else:
            weight = (tl.load(weight_ptr + rows_b, mask=mask_b, other=0.0) / bound)[None, :]
        d = tl.where(positive, -weight, weight) * sigmoid
        d = tl.where(mask_a[:, None] & mask_b[None, :], d, 0.0)

        other_chunk = _load_rows(other_ptr, rows_b, mask_b, columns_out, mask_out, D)
        grad_a = tl.dot(d.to(other_chunk.dtype), other_chunk, grad_a, input_precision=INPUT_PRECISION)
        if REDUCE_SCALARS:
            sum_ds += tl.sum(d * similarity, axis=1)
            sum_d += tl.sum(d, axis=1)
        if OTHER_SIDE:
            grad_b = tl.dot(tl.trans(d).to(anchor_chunk.dtype), anchor_chunk, input_precision=INPUT_PRECISION)
            tl.atomic_add(grad_other_ptr + rows_b.to(tl.int64)[:, None] * D + columns_out[None, :],
                          grad_b * (scale * bound), mask=mask_b[:, None] & mask_out[None, :])

    tl.store(grad_anchor_ptr + rows_a.to(tl.int64)[:, None] * D + columns_out[None, :], grad_a * (scale * bound),
             mask=mask_a[:, None] & mask_out[None, :])
    if REDUCE_SCALARS:
        first_chunk = chunk == 0
        tl.store(partial_scale_ptr + anchor_block, tl.sum(sum_ds, axis=0) * bound, mask=first_chunk)
        tl.store(partial_bias_ptr + anchor_block, tl.sum(sum_d, axis=0) * bound, mask=first_chunk)


def siglip_backward(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                    groups: torch.Tensor, row_weight: torch.Tensor, deterministic: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i row_weight[i] row_loss[i] with respect to image, text, scale and bias.

    With z = scale S + bias and D[i, j] = -row_weight[i] label[i, j] sigmoid(-label[i, j] z[i, j]):
        grad_image = scale D @ text (B, D), grad_text = scale D^T @ image (B, D),
        grad_scale = sum_ij D[i, j] S[i, j] (0-dim), grad_bias = sum_ij D[i, j] (0-dim). All float32.
    deterministic: as for clip_backward (only grad_text can take atomics; the scalars are always reduced from
    per-block partials).
    """
    x, y = _aligned_features(image, text)
    scale, bias, groups = scale.contiguous(), bias.contiguous(), groups.contiguous()
    row_weight = row_weight.contiguous()
    batch, features = x.shape
    atomics = _use_atomics(deterministic)
    if batch == 0:
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        return (torch.zeros(image.shape, dtype=torch.float32, device=x.device),
                torch.zeros(text.shape, dtype=torch.float32, device=x.device), zero, zero.clone())
    bound = row_weight.abs().amax()

    def run(tiles: _Tiles) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        anchor_blocks = triton.cdiv(batch, tiles.block_m)
        grid = (anchor_blocks, max(triton.cdiv(features, tiles.block_dout), 1))
        grad_image = torch.empty((batch, features), dtype=torch.float32, device=x.device)
        grad_text = (torch.zeros if atomics else torch.empty)((batch, features), dtype=torch.float32,
                                                              device=x.device)
        partial_scale = torch.empty(anchor_blocks, dtype=torch.float32, device=x.device)
        partial_bias = torch.empty(anchor_blocks, dtype=torch.float32, device=x.device)
        options = dict(BLOCK_DOUT=tiles.block_dout, INPUT_PRECISION=_input_precision(x.dtype),
                       **tiles.launch_options(x.device))
        with _device_context(x.device):
            if atomics:
                _siglip_backward_kernel[grid](x, y, scale, bias, groups, row_weight, bound, grad_image, grad_text,
                                              partial_scale, partial_bias, batch, features, WEIGHT_ON_ANCHOR=True,
                                              OTHER_SIDE=True, REDUCE_SCALARS=True, **options)
            else:
                _siglip_backward_kernel[grid](x, y, scale, bias, groups, row_weight, bound, grad_image, grad_text,
                                              partial_scale, partial_bias, batch, features, WEIGHT_ON_ANCHOR=True,
                                              OTHER_SIDE=False, REDUCE_SCALARS=True, **options)
                _siglip_backward_kernel[grid](y, x, scale, bias, groups, row_weight, bound, grad_text, grad_image,
                                              partial_scale, partial_bias, batch, features, WEIGHT_ON_ANCHOR=False,
                                              OTHER_SIDE=False, REDUCE_SCALARS=False, **options)
        return grad_image, grad_text, partial_scale.sum(), partial_bias.sum()

    candidates = backward_tile_candidates(x.device, x.dtype, features, atomics)
    grad_image, grad_text, grad_scale, grad_bias = _tuned(f"siglip_backward/atomics={atomics}", x, candidates, run)
    return _unpadded(grad_image, image.shape[1]), _unpadded(grad_text, image.shape[1]), grad_scale, grad_bias
