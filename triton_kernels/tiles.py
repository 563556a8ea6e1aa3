"""What the Triton kernels of leanops share: tile sizes, launch helpers and the tile product device functions.

A "tile" kernel here keeps a block of rows of one (R, D) matrix stationary (BLOCK_M rows per program) and streams
the rows of another (BLOCK_N per loop step), forming BLOCK_M x BLOCK_N products over BLOCK_D slices of the shared
dimension D with float32 accumulation: the contrastive similarity tiles S = X Y^T and the classifier logits
z = H W^T are both of this shape. Backward kernels also own BLOCK_DOUT columns of their gradient rows.
"""
import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Tiles:
    block_m: int  # rows of the stationary side per program
    block_n: int  # rows of the streamed side per loop step
    block_d: int  # slice of the shared dimension per partial product
    block_dout: int  # gradient columns one program owns (backward only; 0 otherwise)
    num_warps: int
    num_stages: int

    def launch_options(self, device: torch.device) -> dict:
        constexprs = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_D": self.block_d}
        if device.type == "cuda":
            constexprs.update(num_warps=self.num_warps, num_stages=self.num_stages)
        return constexprs


# The interpreter runs programs serially in numpy: small tiles keep the tests quick and still cover several blocks.
INTERPRETER_TILES = Tiles(block_m=16, block_n=16, block_d=16, block_dout=32, num_warps=1, num_stages=1)


def forward_candidates(device: torch.device, dtype: torch.dtype, gpu: tuple, gpu_float32: tuple) -> tuple:
    """A forward kernel's tiles to choose from, the default first: the interpreter's off the GPU, else the Hopper
    candidates for 16-bit or float32 features."""
    if device.type != "cuda":
        return (INTERPRETER_TILES,)
    return gpu_float32 if dtype == torch.float32 else gpu


def input_precision(dtype: torch.dtype) -> str:
    # float32 inputs: exact float32 products (no TF32), the precision a float32 caller asked for.
    # float16/bfloat16: the argument is ignored; products are exact and accumulate in float32.
    return "ieee" if dtype == torch.float32 else "tf32"


def device_context(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def feature_alignment(device: torch.device) -> int:
    """On the GPU, D is zero-padded to a multiple of this (products are unchanged): rows then start 16-byte
    aligned, which the pipelined, spill-free code paths need. The interpreter needs no padding."""
    return 16 if device.type == "cuda" else 1


def aligned_features(*matrices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The (R, D) matrices contiguous, zero-padded in D to a multiple of feature_alignment (a copy of O(R D),
    against the O(R R' D) work of the kernels)."""
    contiguous = [matrix.contiguous() for matrix in matrices]
    padding = -contiguous[0].shape[1] % feature_alignment(contiguous[0].device)
    if not padding:
        return tuple(contiguous)
    return tuple(torch.nn.functional.pad(matrix, (0, padding)) for matrix in contiguous)


def unpadded(gradient: torch.Tensor, features: int) -> torch.Tensor:
    """A gradient computed on padded features, cut back to the first `features` columns (contiguous)."""
    return gradient if gradient.shape[1] == features else gradient[:, :features].contiguous()


@triton.jit
def product_tile(anchor_ptr, other_ptr, rows_a, mask_a, rows_b, mask_b, D,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    """P[a, b] = <anchor_a, other_b> for a BLOCK_M x BLOCK_N tile of row-major (R, D) matrices, float32. Masked rows
    read row 0 instead (a valid address: fewer predicates and registers than masked loads); their entries are
    garbage that every caller masks."""
    product = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    columns = tl.arange(0, BLOCK_D)
    # int64 row offsets: R * D may exceed 2**31 elements.
    anchor = anchor_ptr + tl.where(mask_a, rows_a, 0).to(tl.int64)[:, None] * D + columns[None, :]
    other = other_ptr + tl.where(mask_b, rows_b, 0).to(tl.int64)[:, None] * D + columns[None, :]
    for start in range(0, D, BLOCK_D):
        mask_d = columns < D - start
        u = tl.load(anchor, mask=mask_d[None, :], other=0.0)
        v = tl.load(other, mask=mask_d[None, :], other=0.0)
        product = tl.dot(u, tl.trans(v), product, input_precision=INPUT_PRECISION)
        anchor += BLOCK_D
        other += BLOCK_D
    return product


@triton.jit
def load_rows(pointer, rows, mask_rows, columns, mask_columns, D):
    """A (rows x columns) block of a row-major (R, D) tensor, zero outside."""
    return tl.load(pointer + rows.to(tl.int64)[:, None] * D + columns[None, :],
                   mask=mask_rows[:, None] & mask_columns[None, :], other=0.0)
