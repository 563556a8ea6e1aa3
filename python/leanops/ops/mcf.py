"""The MCF (multi-component float) family: error-free transformations, elementwise (python/leanops/mcf.py states
the math). Every provider gives the same bits; the reference is torch's own operators, called as plain functions
(so it keeps torch autograd and its in-place checks) and float64-capable."""
import torch

from .registry import OpFamily, Operator, standard_providers

Tensor = torch.Tensor


def _pair_like(a: Tensor, *rest) -> tuple[Tensor, Tensor]:
    return torch.empty(a.shape, dtype=a.dtype, device=a.device), torch.empty(a.shape, dtype=a.dtype, device=a.device)


def _nothing(*arguments) -> None:
    return None


def _split_pair(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.empty(x.shape, dtype=dtype, device=x.device), torch.empty(x.shape, dtype=dtype, device=x.device)


def _merged(hi: Tensor, lo: Tensor) -> Tensor:
    return torch.empty(hi.shape, dtype=torch.float32, device=hi.device)


MCF = OpFamily(
    name="mcf",
    description="multi-component float arithmetic (leanops.mcf)",
    operators=(
        Operator("two_sum(Tensor a, Tensor b) -> (Tensor sum, Tensor error)", _pair_like),
        Operator("fast_two_sum(Tensor a, Tensor b) -> (Tensor sum, Tensor error)", _pair_like),
        Operator("two_prod(Tensor a, Tensor b) -> (Tensor product, Tensor error)", _pair_like),
        Operator("grow(Tensor hi, Tensor lo, Tensor v) -> (Tensor hi_out, Tensor lo_out)", _pair_like),
        Operator("grow_(Tensor(a!) hi, Tensor(b!) lo, Tensor v) -> ()", _nothing),
        Operator("scale(Tensor hi, Tensor lo, Tensor b_hi, Tensor b_lo) -> (Tensor hi_out, Tensor lo_out)",
                 _pair_like),
        Operator("split(Tensor x, ScalarType dtype) -> (Tensor hi, Tensor lo)", _split_pair),
        Operator("merge(Tensor hi, Tensor lo) -> Tensor", _merged),
    ),
    providers=standard_providers("mcf", reference_wrapped=False),
    # Memory-bound elementwise work: the CUDA kernels first on a GPU (both GPU backends reach the bandwidth).
    # float16 on the CPU: the reference first: the C++ kernels round to float16 through a branch per value
    # (eft::Float16Format), 4-13x slower than the reference's vectorised torch ops (two_sum 52 against 4.6 ms on 4M
    # elements, 2-core VM); the same bits either way.
    preference={"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference"),
                "cpu:float16": ("reference",)},
).register()
