"""MCF ops for torch.library: fake kernels shared by the C++ (``leanops::``) and Triton (``leanops_triton::``) ops.

The C++ schemas are in csrc/ops.cpp. The Triton ops are defined here with the same schemas; their bodies import
the Triton module lazily, so defining them never imports triton.
"""
import torch

from .. import _extension

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels: every output is a new contiguous tensor shaped like the first input.

def _fake_pair(a: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty(a.shape, dtype=a.dtype, device=a.device), torch.empty(a.shape, dtype=a.dtype, device=a.device)


def _fake_grow_(hi: Tensor, lo: Tensor, v: Tensor) -> None:
    return None


def _fake_split(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.empty(x.shape, dtype=dtype, device=x.device), torch.empty(x.shape, dtype=dtype, device=x.device)


def _fake_merge(hi: Tensor, lo: Tensor) -> Tensor:
    return torch.empty(hi.shape, dtype=torch.float32, device=hi.device)


_FAKES = {
    "two_sum": _fake_pair,
    "fast_two_sum": _fake_pair,
    "two_prod": _fake_pair,
    "grow": _fake_pair,
    "grow_": _fake_grow_,
    "scale": _fake_pair,
    "split": _fake_split,
    "merge": _fake_merge,
}

if _extension.extension_loaded():
    for _name, _fake in _FAKES.items():
        torch.library.register_fake(f"leanops::{_name}")(_fake)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels as custom ops.

def _kernels():
    from ..triton_kernels import mcf as triton_mcf

    return triton_mcf


@torch.library.custom_op("leanops_triton::two_sum", mutates_args=())
def triton_two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return _kernels().two_sum(a, b)


@torch.library.custom_op("leanops_triton::fast_two_sum", mutates_args=())
def triton_fast_two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return _kernels().fast_two_sum(a, b)


@torch.library.custom_op("leanops_triton::two_prod", mutates_args=())
def triton_two_prod(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return _kernels().two_prod(a, b)


@torch.library.custom_op("leanops_triton::grow", mutates_args=())
def triton_grow(hi: Tensor, lo: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return _kernels().grow(hi, lo, v)


@torch.library.custom_op("leanops_triton::grow_", mutates_args=("hi", "lo"))
def triton_grow_(hi: Tensor, lo: Tensor, v: Tensor) -> None:
    _kernels().grow_(hi, lo, v)


@torch.library.custom_op("leanops_triton::scale", mutates_args=())
def triton_scale(hi: Tensor, lo: Tensor, b_hi: Tensor, b_lo: Tensor) -> tuple[Tensor, Tensor]:
    return _kernels().scale(hi, lo, b_hi, b_lo)


@torch.library.custom_op("leanops_triton::split", mutates_args=())
def triton_split(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return _kernels().split(x, dtype)


@torch.library.custom_op("leanops_triton::merge", mutates_args=())
def triton_merge(hi: Tensor, lo: Tensor) -> Tensor:
    return _kernels().merge(hi, lo)


for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"leanops_triton::{_name}")(_fake)
