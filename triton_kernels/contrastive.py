"""Triton kernels for the blockwise contrastive primitives: CLIP (softmax cross-entropy both ways) and SigLIP
(pairwise sigmoid), after Radford et al. 2021 (CLIP), Zhai et al. 2023 (SigLIP) and, for the tiling, Dao et al.
2022 (FlashAttention), Cheng et al. 2024 (Inf-CL) and the vocabulary-split fused cross-entropy of Megatron-core.

Notation: x = image features, y = text features, both (B, D) of one dtype (float32, float16 or bfloat16);
S[i, j] = <x_i, y_j>. Every statistic and gradient is float32.

The plan: the matrix work at its floor, 8 B^2 D for a forward + backward (leanops/plans.py), independent of D.
- Forward: S is only ever held as BLOCK_M x BLOCK_N tiles in registers (tl.dot over BLOCK_D slices of D, float32
  accumulation), each computed once. Program (row block, column split) streams its columns with an online
  log-sum-exp of its rows, and writes, per column, the log-sum-exp over its own rows. Both partials are merged
  afterwards: rows over the splits (a (splits, B) buffer), columns over the row blocks, one column panel at a time
  (a (row blocks, panel columns) buffer, the panel sized by the memory budget), so no (B / BLOCK_M) x B workspace.
  The splits keep every SM busy when B / BLOCK_M is small.
- Backward, per row panel of P rows (P from the memory budget, plans.panel_rows): one kernel recomputes the panel's
  S tiles and writes G (CLIP: w1 s p + w2 s q; SigLIP: the logit gradient D) in the input dtype, divided by a bound
  on its entries, with the scale (and bias) gradient sums reduced per tile into small partial buffers; then two
  plain GEMMs (gemm.py, on wgmma): grad_x[panel] = bound G Y and grad_y += bound G^T X[panel] (float32, panels in
  order: deterministic, no atomics). S is computed twice in all; each product once.

Memory, besides the inputs and outputs: one G panel (P x B in the input dtype) and O(B) partials, within the
budget (leanops/plans.py: 64 MiB on the GPU, at least 512 rows; LEANOPS_PANEL_BUDGET_MIB).

Numerics: log-sum-exps keep a running maximum in float32, so scale * S may be large (scale 100 with |S| ~ 1e3
gives logits ~ 1e5) without overflow; masked rows and columns enter as -inf before any exp, and masked feature
columns load as zero. float32 features use ``input_precision="ieee"`` (no TF32), so float32 results agree with a
float64 computation to ~1e-6; float16/bfloat16 products run on the tensor cores, whose float32 accumulation of exact
products makes S as accurate as for float32 features. G is rounded to the feature dtype before its products (as
FlashAttention does with P), after division by a bound on its entries so that float16 neither overflows nor
flushes small probabilities to zero; the bound is undone in float32 after the product.

Tiles: on the GPU each launcher times a short list of tile candidates on its first call per (dtype, D, B rounded
up to a power of two) and keeps the fastest (tile_tuning.py; ``LEANOPS_TRITON_AUTOTUNE=0`` keeps the defaults). The
tests compile every candidate for sm_90 and check that none spills registers and that the products use wgmma.

Launchers take torch tensors already validated by the caller (python/leanops/contrastive.py): same dtype,
B >= 1, D >= 1, float32 scale/weights. They make their inputs contiguous and allocate float32 outputs.
"""
import torch
import triton
import triton.language as tl

from leanops import plans

from . import gemm, tile_tuning
from .tiles import forward_candidates
from .tiles import Tiles as _Tiles
from .tiles import aligned_features as _aligned_features
from .tiles import device_context as _device_context
from .tiles import input_precision as _input_precision
from .tiles import product_tile as _similarity_tile
from .tiles import unpadded as _unpadded

# ---------------------------------------------------------------------------------------------------------------
# Tile sizes, a function of the device and the feature dtype. Off the GPU: tiles.INTERPRETER_TILES (16 x 16 x 16).

# Hopper (H100) candidates for the S-tile kernels (forward and G panel), each checked by the tests to compile for
# sm_90 without register spills and with wgmma for 16-bit features (D % 16 == 0: the launchers pad D). The first is
# the default; on the GPU the launchers time them all on the first call per shape and keep the fastest. Not yet
# timed on a GPU. 16-bit: a 128 x 128 tile, 3-stage pipeline of 64-wide K slices, 8 warps (two warpgroups).
# float32 features: "ieee" products are FMA loops on the CUDA cores, whose register layouts need smaller tiles.
_GPU_TILES = (
    _Tiles(block_m=128, block_n=128, block_d=64, block_dout=0, num_warps=8, num_stages=3),
    _Tiles(block_m=128, block_n=64, block_d=64, block_dout=0, num_warps=4, num_stages=4),
    _Tiles(block_m=128, block_n=128, block_d=32, block_dout=0, num_warps=8, num_stages=4),
)
# (64 x 64 x 16 spills 4 bytes in the CLIP forward.)
_GPU_TILES_FLOAT32 = (_Tiles(block_m=64, block_n=64, block_d=32, block_dout=0, num_warps=4, num_stages=2),)
# The G-panel kernels hold more float32 tiles at once (S, the exponentials, G) and store G: 128 x 128 tiles spill
# there (ptxas, sm_90), 128 x 64 ones fit (165 registers with 8 warps).
_GPU_BACKWARD_TILES = (
    _Tiles(block_m=128, block_n=64, block_d=64, block_dout=0, num_warps=8, num_stages=3),
    _Tiles(block_m=128, block_n=64, block_d=64, block_dout=0, num_warps=4, num_stages=4),
)


def forward_tile_candidates(device: torch.device, dtype: torch.dtype) -> tuple[_Tiles, ...]:
    """Tiles of the forward kernels to choose from, the default first."""
    return forward_candidates(device, dtype, _GPU_TILES, _GPU_TILES_FLOAT32)


def backward_tile_candidates(device: torch.device, dtype: torch.dtype) -> tuple[_Tiles, ...]:
    """Tiles of the G-panel kernels to choose from, the default first (the GEMMs have theirs: gemm.py)."""
    return forward_candidates(device, dtype, _GPU_BACKWARD_TILES, _GPU_TILES_FLOAT32)


_TUNER = tile_tuning.TileTuner()


def _tuned(name: str, x: torch.Tensor, candidates: tuple[_Tiles, ...], run):
    """run(tiles) with the tiles that the tuner picked for this kernel, device, dtype, D and power-of-2 bucket
    of B."""
    key = (name, x.device, x.dtype, x.shape[1], triton.next_power_of_2(x.shape[0]))
    return run(_TUNER.choose(key, x.device, candidates, run))


# ---------------------------------------------------------------------------------------------------------------
# How the work is cut: column splits and panels (shared by the launchers and planned_matrix_flops).

def _column_splits(device: torch.device, row_blocks: int, column_blocks: int) -> int:
    """Column splits per row block: about two programs per SM on the GPU; two under the interpreter (so that the
    tests merge partials)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = triton.cdiv(2 * sms, row_blocks)
    else:
        wanted = 2
    return max(1, min(wanted, column_blocks))


def _split_width(start: int, stop: int, splits: int, block: int) -> tuple[int, int]:
    """(columns per split, splits): [start, stop) cut into at most `splits` ranges of whole `block`s, none
    empty."""
    per_split = triton.cdiv(triton.cdiv(stop - start, splits), block) * block
    return per_split, triton.cdiv(stop - start, per_split)


def _split_ranges(start: int, stop: int, splits: int, block: int) -> list[tuple[int, int]]:
    per_split, count = _split_width(start, stop, splits, block)
    return [(start + k * per_split, min(start + (k + 1) * per_split, stop)) for k in range(count)]


def _column_panels(device: torch.device, batch: int, tiles: _Tiles) -> list[tuple[int, int]]:
    """Column panels of the CLIP forward: the column partials of a panel, (row blocks x panel columns) float32,
    fit the memory budget."""
    row_blocks = triton.cdiv(batch, tiles.block_m)
    columns = plans.panel_rows(batch, row_blocks, 4, multiple=tiles.block_n, device_type=device.type)
    return [(first, min(first + columns, batch)) for first in range(0, batch, columns)]


def _g_leading_dimension(device: torch.device, batch: int) -> int:
    """Row stride of a G panel: rows start 16-byte aligned on the GPU (the GEMMs' pipelined loads need it)."""
    return triton.cdiv(batch, 16) * 16 if device.type == "cuda" else batch


def _row_panels(device: torch.device, batch: int, dtype: torch.dtype, tiles: _Tiles) -> list[tuple[int, int]]:
    """Row panels of the backward: a (P x B) G panel in the feature dtype fits the memory budget."""
    element = torch.empty((), dtype=dtype).element_size()
    rows = plans.panel_rows(batch, _g_leading_dimension(device, batch), element, multiple=tiles.block_m,
                            device_type=device.type)
    return [(first, min(first + rows, batch)) for first in range(0, batch, rows)]


def planned_matrix_flops(case: str, dtype: torch.dtype, device_type: str, batch: int, features: int) -> int:
    """The tl.dot FLOPs this module's plan issues for one forward + backward of `case` ("clip" or "siglip"), with
    the default tiles: S tiles padded to BLOCK_M x BLOCK_N x BLOCK_D, the GEMMs padded to theirs (gemm.py). At sizes
    that are multiples of the tiles this is exactly the floor 8 B^2 D."""
    device = torch.device(device_type)
    padded_features = triton.cdiv(features, 16) * 16 if device_type == "cuda" else features
    tiles = forward_tile_candidates(device, dtype)[0]
    row_blocks = triton.cdiv(batch, tiles.block_m)
    tile_flops = 2 * tiles.block_m * tiles.block_n * triton.cdiv(padded_features, tiles.block_d) * tiles.block_d
    panels = _column_panels(device, batch, tiles) if case == "clip" else [(0, batch)]
    forward = 0
    for first, stop in panels:
        splits = _column_splits(device, row_blocks, triton.cdiv(stop - first, tiles.block_n))
        for start, end in _split_ranges(first, stop, splits, tiles.block_n):
            forward += row_blocks * triton.cdiv(end - start, tiles.block_n) * tile_flops
    tiles = backward_tile_candidates(device, dtype)[0]
    tile_flops = 2 * tiles.block_m * tiles.block_n * triton.cdiv(padded_features, tiles.block_d) * tiles.block_d
    column_blocks = triton.cdiv(batch, tiles.block_n)
    backward = 0
    for first, stop in _row_panels(device, batch, dtype, tiles):
        rows = stop - first
        backward += triton.cdiv(rows, tiles.block_m) * column_blocks * tile_flops
        backward += gemm.planned_matmul_flops(rows, padded_features, batch, device_type, dtype)
        backward += gemm.planned_matmul_flops(batch, padded_features, rows, device_type, dtype)
    return forward + backward


# ---------------------------------------------------------------------------------------------------------------
# Shared device functions.

@triton.jit
def _log1p(t):
    """log(1 + t) for t >= 0, accurate also where 1 + t rounds to 1 (Goldberg 1991: log(u) * t / (u - 1))."""
    u = 1.0 + t
    exact = u == 1.0
    # Both branches are evaluated: keep the unused one free of 0 / 0.
    return tl.where(exact, t, tl.log(u) * (t / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _signed_exponent(similarity, groups_rows, groups_columns, scale, bias):
    """(positive, t) on a SigLIP tile: label +1 where the group ids match (else -1), t = -label * (scale S + bias),
    so that each pair's loss is softplus(t)."""
    positive = groups_rows[:, None] == groups_columns[None, :]
    logits = scale * similarity + bias
    return positive, tl.where(positive, -logits, logits)


@triton.jit
def _store_panel_tile(g_ptr, tile, row_block, column_block, g_stride, valid, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """g[row block, column block] = tile, rounded to g's dtype, where valid: the tile's corner by an int64 offset,
    int32 offsets inside it (half the registers of a tile of 64-bit addresses)."""
    corner = g_ptr + (row_block * BLOCK_M).to(tl.int64) * g_stride + column_block * BLOCK_N
    offsets = tl.arange(0, BLOCK_M)[:, None] * g_stride + tl.arange(0, BLOCK_N)[None, :]
    tl.store(corner + offsets, tile.to(g_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _merge_log_sum_exp_kernel(partial_ptr, out_ptr, count, width, stride, BLOCK: tl.constexpr):
    """out[c] = logsumexp_k partial[k, c] for k < count, c < width (a running maximum: no overflow). Every partial
    is finite or NaN, and NaN propagates."""
    columns = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = columns < width
    running_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, count):
        value = tl.load(partial_ptr + k * stride + columns, mask=mask, other=0.0)
        new_max = tl.maximum(running_max, value)
        # tl.maximum drops a NaN operand: put it back.
        new_max = tl.where(value != value, value, new_max)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(value - new_max)
        running_max = new_max
    tl.store(out_ptr + columns, running_max + tl.log(running_sum), mask=mask)


def _merge_log_sum_exp(partial: torch.Tensor, out: torch.Tensor) -> None:
    """out (W,) = logsumexp over the first dimension of partial (K, W), without temporaries of partial's size."""
    count, width = partial.shape
    block = 1024 if partial.device.type == "cuda" else 64
    _merge_log_sum_exp_kernel[(triton.cdiv(width, block),)](partial, out, count, width, partial.stride(0),
                                                            BLOCK=block)


# ---------------------------------------------------------------------------------------------------------------
# CLIP forward.

@triton.jit
def _clip_forward_kernel(x_ptr, y_ptr, scale_ptr, row_partial_ptr, column_partial_ptr, B, D,
                         panel_start, panel_stop, columns_per_split, column_partial_stride, row_slot,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr):
    """Program (row block r, split k) of the column panel [panel_start, panel_stop): its columns_per_split
    columns from panel_start + k columns_per_split.

    Row statistics: an online (running max, rescaled sum) log-sum-exp of scale[i] S[i, :] over the split's
    columns, stored to row_partial[row_slot + k, rows]. Column statistics: from the same S tiles, for every column
    j of the split, the log-sum-exp of scale[j] S[i, j] over the block's rows, stored to
    column_partial[r, j - panel_start]. The launcher merges both (every partial is finite: each split holds a valid
    column and each row block a valid row).
    """
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_rows = rows < B
    first = panel_start + split * columns_per_split
    last = tl.minimum(first + columns_per_split, panel_stop)
    # Masked rows get scale 0: their row logits are finite zeros, never stored, and they are excluded (-inf) from
    # the column statistics below.
    row_scale = tl.load(scale_ptr + rows, mask=mask_rows, other=0.0)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    partial_row = column_partial_ptr + row_block.to(tl.int64) * column_partial_stride
    for start in range(first, last, BLOCK_N):
        columns = start + tl.arange(0, BLOCK_N)
        mask_columns = columns < last
        similarity = _similarity_tile(x_ptr, y_ptr, rows, mask_rows, columns, mask_columns, D,
                                      BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)

        row_logits = tl.where(mask_columns[None, :], row_scale[:, None] * similarity, float("-inf"))
        # The split's first column block holds a valid column, so new_max is finite from the first step on and
        # exp(running_max - new_max) never sees (-inf) - (-inf).
        new_max = tl.maximum(running_max, tl.max(row_logits, axis=1))
        running_sum = (running_sum * tl.exp(running_max - new_max)
                       + tl.sum(tl.exp(row_logits - new_max[:, None]), axis=1))
        running_max = new_max

        column_scale = tl.load(scale_ptr + columns, mask=mask_columns, other=0.0)
        column_logits = tl.where(mask_rows[:, None], column_scale[None, :] * similarity, float("-inf"))
        column_max = tl.max(column_logits, axis=0)  # finite: this block's first row is always valid
        column_sum = tl.sum(tl.exp(column_logits - column_max[None, :]), axis=0)
        tl.store(partial_row + columns - panel_start, column_max + tl.log(column_sum), mask=mask_columns)
    tl.store(row_partial_ptr + (row_slot + split).to(tl.int64) * B + rows, running_max + tl.log(running_sum),
             mask=mask_rows)


def clip_forward(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP log-sum-exps without the B x B logits.

    image, text: (B, D), one dtype; scale: (B,) float32 per-anchor logit scales. Returns float32 (B,) tensors
    row_lse[i] = logsumexp_j(scale[i] S[i, j]) and col_lse[j] = logsumexp_i(scale[j] S[i, j]).
    """
    (x, y), scale = _aligned_features(image, text), scale.contiguous()
    batch, features = x.shape
    if batch == 0:
        return tuple(torch.empty(0, dtype=torch.float32, device=x.device) for _ in range(2))

    def run(tiles: _Tiles) -> tuple[torch.Tensor, torch.Tensor]:
        row_blocks = triton.cdiv(batch, tiles.block_m)
        panels = _column_panels(x.device, batch, tiles)
        widths = [_split_width(first, stop, _column_splits(x.device, row_blocks,
                                                           triton.cdiv(stop - first, tiles.block_n)), tiles.block_n)
                  for first, stop in panels]
        slots = sum(splits for _, splits in widths)
        row_partial = torch.empty((slots, batch), dtype=torch.float32, device=x.device)
        col_lse = torch.empty(batch, dtype=torch.float32, device=x.device)
        width = panels[0][1] - panels[0][0]
        column_partial = torch.empty((row_blocks, width), dtype=torch.float32, device=x.device)
        slot = 0
        with _device_context(x.device):
            for (first, stop), (per_split, splits) in zip(panels, widths):
                _clip_forward_kernel[(row_blocks, splits)](
                    x, y, scale, row_partial, column_partial, batch, features, first, stop, per_split, width, slot,
                    INPUT_PRECISION=_input_precision(x.dtype), **tiles.launch_options(x.device))
                _merge_log_sum_exp(column_partial[:, :stop - first], col_lse[first:stop])
                slot += splits
            row_lse = torch.empty(batch, dtype=torch.float32, device=x.device)
            _merge_log_sum_exp(row_partial, row_lse)
        return row_lse, col_lse

    return _tuned("clip_forward", x, forward_tile_candidates(x.device, x.dtype), run)


# ---------------------------------------------------------------------------------------------------------------
# CLIP backward.

@triton.jit
def _clip_gradient_panel_kernel(x_ptr, y_ptr, scale_ptr, row_lse_ptr, col_lse_ptr, row_weight_ptr, col_weight_ptr,
                                bound_ptr, g_ptr, row_scale_partial_ptr, column_scale_partial_ptr, B, D,
                                panel_start, panel_rows, g_stride,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                INPUT_PRECISION: tl.constexpr):
    """Program (row block a of the panel, column block b): the G tile of the panel's rows, divided by the bound,
    stored in the feature dtype to g[a rows (panel-local), b columns]; and the tile's scale-gradient sums:
        row_scale_partial[b, a rows]  = w1[i] sum_{j in b} p[i, j] S[i, j],
        column_scale_partial[a, j]     = w2[j] sum_{i in a} q[i, j] S[i, j].
    G[i, j] = w1[i] s[i] p[i, j] + w2[j] s[j] q[i, j], p = exp(s[i] S - L1[i]), q = exp(s[j] S - L2[j]);
    bound >= max |w1 s| + max |w2 s| >= max |G| (the exponentials are <= 1), so G / bound lies in [-1, 1] before
    the 16-bit cast, where float16 neither overflows nor loses small values.
    """
    row_block = tl.program_id(0)
    column_block = tl.program_id(1)
    local_rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = panel_start + local_rows
    mask_rows = (local_rows < panel_rows) & (rows < B)
    columns = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_columns = columns < B
    valid = mask_rows[:, None] & mask_columns[None, :]

    bound = tl.load(bound_ptr)
    bound = tl.where(bound > 0, bound, 1.0)
    scale_rows = tl.load(scale_ptr + rows, mask=mask_rows, other=0.0)
    lse_rows = tl.load(row_lse_ptr + rows, mask=mask_rows, other=0.0)
    weight_rows = tl.load(row_weight_ptr + rows, mask=mask_rows, other=0.0)
    scale_columns = tl.load(scale_ptr + columns, mask=mask_columns, other=0.0)
    lse_columns = tl.load(col_lse_ptr + columns, mask=mask_columns, other=0.0)
    weight_columns = tl.load(col_weight_ptr + columns, mask=mask_columns, other=0.0)

    similarity = _similarity_tile(x_ptr, y_ptr, rows, mask_rows, columns, mask_columns, D,
                                  BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
    # -inf before the exp: masked entries are exactly 0 and never overflow. One exponential tile at a time (p, then
    # q), each summed as soon as it exists: fewer float32 tiles live at once.
    p = tl.exp(tl.where(valid, scale_rows[:, None] * similarity - lse_rows[:, None], float("-inf")))
    tl.store(row_scale_partial_ptr + column_block.to(tl.int64) * panel_rows + local_rows,
             weight_rows * tl.sum(p * similarity, axis=1), mask=mask_rows)
    g = (weight_rows * scale_rows / bound)[:, None] * p
    q = tl.exp(tl.where(valid, scale_columns[None, :] * similarity - lse_columns[None, :], float("-inf")))
    tl.store(column_scale_partial_ptr + row_block.to(tl.int64) * B + columns,
             weight_columns * tl.sum(q * similarity, axis=0), mask=mask_columns)
    g += (weight_columns * scale_columns / bound)[None, :] * q
    _store_panel_tile(g_ptr, g, row_block, column_block, g_stride, valid, BLOCK_M, BLOCK_N)


def _gradient_panels(x: torch.Tensor, y: torch.Tensor, tiles: _Tiles, alpha: torch.Tensor, write_panel):
    """The backward's panel loop, shared by CLIP and SigLIP: for each row panel [first, stop), write_panel(g,
    first, stop) fills g (panel rows x B, feature dtype, G / bound) and its scalar partials; then
    grad_x[panel] = alpha G Y and grad_y += alpha G^T X[panel] (gemm.py, float32). Returns (grad_x, grad_y)."""
    batch, features = x.shape
    grad_x = torch.empty((batch, features), dtype=torch.float32, device=x.device)
    grad_y = torch.zeros((batch, features), dtype=torch.float32, device=x.device)
    panels = _row_panels(x.device, batch, x.dtype, tiles)
    stride = _g_leading_dimension(x.device, batch)
    storage = torch.empty((panels[0][1] - panels[0][0], stride), dtype=x.dtype, device=x.device)
    for first, stop in panels:
        g = storage[:stop - first, :batch]
        write_panel(g, first, stop)
        gemm.matmul(g, y, grad_x[first:stop], alpha)
        gemm.matmul(g.T, x[first:stop], grad_y, alpha, accumulate=True)
    return grad_x, grad_y


def clip_backward(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, row_lse: torch.Tensor,
                  col_lse: torch.Tensor, row_weight: torch.Tensor, col_weight: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i row_weight[i] row_lse[i] + sum_j col_weight[j] col_lse[j] with respect to image, text
    and scale, recomputing S once, panel by panel.

    With p[i, j] = exp(scale[i] S[i, j] - row_lse[i]) (row softmax), q[i, j] = exp(scale[j] S[i, j] - col_lse[j])
    (column softmax) and G[i, j] = row_weight[i] scale[i] p[i, j] + col_weight[j] scale[j] q[i, j]:
        grad_image = G @ text (B, D), grad_text = G^T @ image (B, D),
        grad_scale[i] = row_weight[i] sum_j p[i, j] S[i, j] + col_weight[i] sum_k q[k, i] S[k, i]  (B,).
    All float32; scale, row_lse, col_lse, row_weight, col_weight are float32 (B,). Deterministic.
    """
    x, y = _aligned_features(image, text)
    scale, row_lse, col_lse = scale.contiguous(), row_lse.contiguous(), col_lse.contiguous()
    row_weight, col_weight = row_weight.contiguous(), col_weight.contiguous()
    batch, features = x.shape
    if batch == 0:
        return (torch.zeros(image.shape, dtype=torch.float32, device=x.device),
                torch.zeros(text.shape, dtype=torch.float32, device=x.device),
                torch.zeros(0, dtype=torch.float32, device=x.device))
    # A tensor, not .item(): no host synchronisation, and the op stays traceable.
    bound = (row_weight * scale).abs().amax() + (col_weight * scale).abs().amax()
    bound = torch.where(bound > 0, bound, torch.ones_like(bound))

    def run(tiles: _Tiles) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grad_scale = torch.zeros(batch, dtype=torch.float32, device=x.device)
        column_blocks = triton.cdiv(batch, tiles.block_n)

        def write_panel(g, first, stop):
            rows = stop - first
            row_blocks = triton.cdiv(rows, tiles.block_m)
            row_partial = torch.empty((column_blocks, rows), dtype=torch.float32, device=x.device)
            column_partial = torch.empty((row_blocks, batch), dtype=torch.float32, device=x.device)
            with _device_context(x.device):
                _clip_gradient_panel_kernel[(row_blocks, column_blocks)](
                    x, y, scale, row_lse, col_lse, row_weight, col_weight, bound, g, row_partial, column_partial,
                    batch, features, first, rows, g.stride(0), INPUT_PRECISION=_input_precision(x.dtype),
                    **tiles.launch_options(x.device))
            grad_scale[first:stop] += row_partial.sum(dim=0)
            grad_scale.add_(column_partial.sum(dim=0))

        with _device_context(x.device):
            grad_image, grad_text = _gradient_panels(x, y, tiles, bound.reshape(1), write_panel)
        return grad_image, grad_text, grad_scale

    candidates = backward_tile_candidates(x.device, x.dtype)
    grad_image, grad_text, grad_scale = _tuned("clip_backward", x, candidates, run)
    return _unpadded(grad_image, image.shape[1]), _unpadded(grad_text, image.shape[1]), grad_scale


# ---------------------------------------------------------------------------------------------------------------
# SigLIP.

@triton.jit
def _siglip_forward_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, groups_ptr, row_partial_ptr, B, D,
                           columns_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           INPUT_PRECISION: tl.constexpr):
    """Program (row block, split k): row_partial[k, i] = sum over the split's columns j of
    softplus(-label[i, j] z[i, j]), z = scale S + bias."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    mask_rows = rows < B
    first = split * columns_per_split
    last = tl.minimum(first + columns_per_split, B)
    # Read from memory, not passed as Python floats: the caller's scale and bias may be traced tensors.
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    groups_rows = tl.load(groups_ptr + rows, mask=mask_rows, other=0)
    row_loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(first, last, BLOCK_N):
        columns = start + tl.arange(0, BLOCK_N)
        mask_columns = columns < last
        similarity = _similarity_tile(x_ptr, y_ptr, rows, mask_rows, columns, mask_columns, D,
                                      BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        groups_columns = tl.load(groups_ptr + columns, mask=mask_columns, other=0)
        _, t = _signed_exponent(similarity, groups_rows, groups_columns, scale, bias)
        # softplus(t) = max(t, 0) + log1p(exp(-|t|)): no overflow for |t| ~ 1e5, no cancellation for t << 0.
        softplus = tl.maximum(t, 0.0) + _log1p(tl.exp(-tl.abs(t)))
        row_loss += tl.sum(tl.where(mask_columns[None, :], softplus, 0.0), axis=1)
    tl.store(row_partial_ptr + split.to(tl.int64) * B + rows, row_loss, mask=mask_rows)


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
    if batch == 0:
        return torch.empty(0, dtype=torch.float32, device=x.device)

    def run(tiles: _Tiles) -> torch.Tensor:
        row_blocks = triton.cdiv(batch, tiles.block_m)
        per_split, splits = _split_width(0, batch, _column_splits(x.device, row_blocks,
                                                                  triton.cdiv(batch, tiles.block_n)), tiles.block_n)
        row_partial = torch.empty((splits, batch), dtype=torch.float32, device=x.device)
        with _device_context(x.device):
            _siglip_forward_kernel[(row_blocks, splits)](
                x, y, scale, bias, groups, row_partial, batch, features, per_split,
                INPUT_PRECISION=_input_precision(x.dtype), **tiles.launch_options(x.device))
        return row_partial.sum(dim=0)

    return _tuned("siglip_forward", x, forward_tile_candidates(x.device, x.dtype), run)


@triton.jit
def _siglip_gradient_panel_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, groups_ptr, weight_ptr, bound_ptr, g_ptr,
                                  scale_partial_ptr, bias_partial_ptr, B, D, panel_start, panel_rows, g_stride,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                  INPUT_PRECISION: tl.constexpr):
    """Program (row block a of the panel, column block b): the logit-gradient tile
        D[i, j] = -row_weight[i] label[i, j] sigmoid(-label[i, j] (scale S[i, j] + bias)),
    divided by bound = max |row_weight| (entries in [-1, 1] before the cast), stored in the feature dtype to
    g[a rows (panel-local), b columns]; and the tile's sums of D S and D (divided by the bound) to
    scale_partial[a, b] and bias_partial[a, b]."""
    row_block = tl.program_id(0)
    column_block = tl.program_id(1)
    local_rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = panel_start + local_rows
    mask_rows = (local_rows < panel_rows) & (rows < B)
    columns = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_columns = columns < B

    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    bound = tl.load(bound_ptr)
    groups_rows = tl.load(groups_ptr + rows, mask=mask_rows, other=0)
    groups_columns = tl.load(groups_ptr + columns, mask=mask_columns, other=0)
    weight = tl.load(weight_ptr + rows, mask=mask_rows, other=0.0) / bound

    similarity = _similarity_tile(x_ptr, y_ptr, rows, mask_rows, columns, mask_columns, D,
                                  BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
    positive, t = _signed_exponent(similarity, groups_rows, groups_columns, scale, bias)
    # sigmoid(t) without overflow: exp of a non-positive number only.
    e = tl.exp(-tl.abs(t))
    sigmoid = tl.where(t >= 0, 1.0, e) / (1.0 + e)
    d = tl.where(positive, -weight[:, None], weight[:, None]) * sigmoid
    valid = mask_rows[:, None] & mask_columns[None, :]
    d = tl.where(valid, d, 0.0)
    _store_panel_tile(g_ptr, d, row_block, column_block, g_stride, valid, BLOCK_M, BLOCK_N)
    partial = row_block * tl.num_programs(1) + column_block
    tl.store(scale_partial_ptr + partial, tl.sum(tl.sum(d * similarity, axis=1), axis=0))
    tl.store(bias_partial_ptr + partial, tl.sum(tl.sum(d, axis=1), axis=0))


def siglip_backward(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                    groups: torch.Tensor, row_weight: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i row_weight[i] row_loss[i] with respect to image, text, scale and bias.

    With z = scale S + bias and D[i, j] = -row_weight[i] label[i, j] sigmoid(-label[i, j] z[i, j]):
        grad_image = scale D @ text (B, D), grad_text = scale D^T @ image (B, D),
        grad_scale = sum_ij D[i, j] S[i, j] (0-dim), grad_bias = sum_ij D[i, j] (0-dim). All float32,
    deterministic (the scalars are reduced from per-tile partials in a fixed order).
    """
    x, y = _aligned_features(image, text)
    scale, bias, groups = scale.contiguous(), bias.contiguous(), groups.contiguous()
    row_weight = row_weight.contiguous()
    batch, features = x.shape
    if batch == 0:
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        return (torch.zeros(image.shape, dtype=torch.float32, device=x.device),
                torch.zeros(text.shape, dtype=torch.float32, device=x.device), zero, zero.clone())
    bound = row_weight.abs().amax()
    bound = torch.where(bound > 0, bound, torch.ones_like(bound))

    def run(tiles: _Tiles) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        column_blocks = triton.cdiv(batch, tiles.block_n)
        scale_sums, bias_sums = [], []

        def write_panel(g, first, stop):
            row_blocks = triton.cdiv(stop - first, tiles.block_m)
            scale_partial = torch.empty(row_blocks * column_blocks, dtype=torch.float32, device=x.device)
            bias_partial = torch.empty(row_blocks * column_blocks, dtype=torch.float32, device=x.device)
            with _device_context(x.device):
                _siglip_gradient_panel_kernel[(row_blocks, column_blocks)](
                    x, y, scale, bias, groups, row_weight, bound, g, scale_partial, bias_partial, batch, features,
                    first, stop - first, g.stride(0), INPUT_PRECISION=_input_precision(x.dtype),
                    **tiles.launch_options(x.device))
            scale_sums.append(scale_partial.sum())
            bias_sums.append(bias_partial.sum())

        alpha = (scale * bound).reshape(1).to(torch.float32)
        grad_image, grad_text = _gradient_panels(x, y, tiles, alpha, write_panel)
        grad_scale = torch.stack(scale_sums).sum() * bound
        grad_bias = torch.stack(bias_sums).sum() * bound
        return grad_image, grad_text, grad_scale, grad_bias

    candidates = backward_tile_candidates(x.device, x.dtype)
    grad_image, grad_text, grad_scale, grad_bias = _tuned("siglip_backward", x, candidates, run)
    return _unpadded(grad_image, image.shape[1]), _unpadded(grad_text, image.shape[1]), grad_scale, grad_bias
