"""The plain GEMM of the loss plans: C = alpha A B (+ C), float32 accumulation, deterministic.

After the fused kernels have written a panel of G (CLIP / SigLIP) or a chunk of d_logits (linear CE) in the input
dtype, the two gradient products are ordinary matrix products: grad_x[panel] = G Y, grad_y += G^T X[panel],
grad_h += G W[chunk], grad_W[chunk] = G^T h. This kernel does them, on Hopper's warpgroup MMA (tl.dot on 16-bit
tiles of 128 x 128 x 64, 8 warps, a 3-stage cp.async pipeline: the compile test checks that it lowers to wgmma).

- Operands are strided views, so G^T is G read with its strides swapped (no transposed copy).
- alpha is a 0-dim float32 tensor on the device (the panel's bound times the scale: no host synchronisation).
- ``accumulate``: C (float32) += alpha A B, read-modify-write by the one program that owns each output tile;
  panels are launched one after another, so the sum over panels runs in a fixed order: bitwise reproducible.
- Split-K: when the output has too few tiles to fill the GPU (grad_x of a short panel: P x D with K = B), the K
  range is cut into `splits` ranges, each program writes its partial product to a float32 buffer (splits, M, N),
  and the launcher adds the partials in order: deterministic, unlike atomics.
- The output is written in C's dtype (float32 accumulators, or the weight dtype for grad_W: each element rounded
  once, after its whole K sum).
"""
import torch
import triton
import triton.language as tl

from .tiles import Tiles, device_context, input_precision

# Hopper: 128 x 128 output tiles, 64-wide K slices, two warpgroups, 3 stages (96 KiB of shared memory for 16-bit
# operands). float32 operands use exact "ieee" products on the CUDA cores: smaller tiles, as for the loss kernels.
_GPU_TILES = Tiles(block_m=128, block_n=128, block_d=64, block_dout=0, num_warps=8, num_stages=3)
_GPU_TILES_FLOAT32 = Tiles(block_m=64, block_n=64, block_d=16, block_dout=0, num_warps=4, num_stages=2)
# The interpreter: small tiles, several programs and K steps at test sizes.
_INTERPRETER_TILES = Tiles(block_m=16, block_n=16, block_d=16, block_dout=0, num_warps=1, num_stages=1)


def matmul_tiles(device: torch.device, dtype: torch.dtype) -> Tiles:
    if device.type != "cuda":
        return _INTERPRETER_TILES
    return _GPU_TILES_FLOAT32 if dtype == torch.float32 else _GPU_TILES


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, alpha_ptr, M, N, K, k_per_split,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,
                   ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):
    """Program (m block, n block, k split): C[split][m, n] (+)= alpha sum_{k in split} A[m, k] B[k, n].

    Register economy (a 128 x 128 float32 accumulator leaves little room): the tile's first element is reached by
    an int64 offset once, the offsets inside the tile are int32, rows and columns beyond the matrix wrap around
    instead of being masked (their results are never stored), and the operand pointers advance by one K slice per
    step; only the K range is masked.
    """
    row0 = tl.program_id(0) * BLOCK_M
    column0 = tl.program_id(1) * BLOCK_N
    split = tl.program_id(2)
    k_start = split * k_per_split
    k_count = tl.minimum(k_per_split, K - k_start)
    # Rows and columns past the end wrap around to the first ones (valid addresses; never stored), which keeps
    # the offsets contiguous for vector loads.
    local_rows = tl.max_contiguous(tl.multiple_of((row0 + tl.arange(0, BLOCK_M)) % M, BLOCK_M), BLOCK_M) - row0
    local_columns = (tl.max_contiguous(tl.multiple_of((column0 + tl.arange(0, BLOCK_N)) % N, BLOCK_N), BLOCK_N)
                     - column0)
    ks = tl.arange(0, BLOCK_K)
    a_pointers = (a_ptr + row0.to(tl.int64) * stride_am + k_start.to(tl.int64) * stride_ak
                  + (local_rows[:, None] * stride_am + ks[None, :] * stride_ak))
    b_pointers = (b_ptr + column0.to(tl.int64) * stride_bn + k_start.to(tl.int64) * stride_bk
                  + (ks[:, None] * stride_bk + local_columns[None, :] * stride_bn))
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, k_count, BLOCK_K):
        mask_k = ks < k_count - step
        a = tl.load(a_pointers, mask=mask_k[None, :], other=0.0)
        b = tl.load(b_pointers, mask=mask_k[:, None], other=0.0)
        accumulator = tl.dot(a, b, accumulator, input_precision=INPUT_PRECISION)
        a_pointers += BLOCK_K * stride_ak
        b_pointers += BLOCK_K * stride_bk
    accumulator = accumulator * tl.load(alpha_ptr)
    rows = tl.arange(0, BLOCK_M)
    columns = tl.arange(0, BLOCK_N)
    c = (c_ptr + split.to(tl.int64) * stride_cs + row0.to(tl.int64) * stride_cm + column0.to(tl.int64) * stride_cn
         + (rows[:, None] * stride_cm + columns[None, :] * stride_cn))
    mask = (rows < M - row0)[:, None] & (columns < N - column0)[None, :]
    if ACCUMULATE:
        accumulator += tl.load(c, mask=mask, other=0.0)
    tl.store(c, accumulator.to(c_ptr.dtype.element_ty), mask=mask)


def _split_count(device: torch.device, output_tiles: int, k_blocks: int) -> int:
    """K splits so that the GPU gets about two programs per SM; 1 off the GPU (the interpreter), or when the
    output alone fills the GPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if output_tiles >= sms:
        return 1
    return max(1, min(k_blocks // 4, triton.cdiv(2 * sms, output_tiles), 16))


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor, accumulate: bool = False,
           splits: int | None = None) -> torch.Tensor:
    """out (M, N) (+)= alpha a @ b for strided a (M, K), b (K, N) of one dtype; out float32 or a's dtype; alpha a
    0-dim (or 1-element) float32 tensor on the device. Returns out."""
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0:
        return out
    tiles = matmul_tiles(a.device, a.dtype)
    output_tiles = triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n)
    if splits is None:
        splits = _split_count(a.device, output_tiles, triton.cdiv(k, tiles.block_d))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), tiles.block_d) * tiles.block_d if k else tiles.block_d
    splits = max(triton.cdiv(k, k_per_split), 1)
    options = dict(INPUT_PRECISION=input_precision(a.dtype), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                   BLOCK_K=tiles.block_d)
    if a.device.type == "cuda":
        options.update(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    grid_mn = (triton.cdiv(m, tiles.block_m), triton.cdiv(n, tiles.block_n))
    with device_context(a.device):
        if splits == 1:
            _matmul_kernel[grid_mn + (1,)](a, b, out, alpha, m, n, k, k_per_split, a.stride(0), a.stride(1),
                                           b.stride(0), b.stride(1), 0, out.stride(0), out.stride(1),
                                           ACCUMULATE=accumulate, **options)
            return out
        partial = torch.empty((splits, m, n), dtype=torch.float32, device=a.device)
        _matmul_kernel[grid_mn + (splits,)](a, b, partial, alpha, m, n, k, k_per_split, a.stride(0), a.stride(1),
                                            b.stride(0), b.stride(1), partial.stride(0), partial.stride(1),
                                            partial.stride(2), ACCUMULATE=False, **options)
    total = partial.sum(dim=0)  # a fixed order over the splits
    if accumulate:
        total += out
    out.copy_(total)
    return out


def planned_matmul_flops(m: int, n: int, k: int, device_type: str, dtype: torch.dtype) -> int:
    """The tl.dot FLOPs that ``matmul`` issues for an (m, k) x (k, n) product: padded to its tiles (split-K pads
    each split's K range; at multiples of the tiles that is the exact 2 m n k)."""
    tiles = matmul_tiles(torch.device(device_type), dtype)
    padded = [triton.cdiv(size, block) * block for size, block in ((m, tiles.block_m), (n, tiles.block_n),
                                                                   (k, tiles.block_d))]
    return 2 * padded[0] * padded[1] * padded[2]
