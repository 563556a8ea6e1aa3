"""The blockwise contrastive-loss primitives as torch.library operators, with fake kernels and autograd.

Three providers share one contract (csrc/ops.cpp documents it):
- ``leanops::`` the C++ kernels (CPU; CUDA to come), defined in csrc/ops.cpp;
- ``leanops_triton::`` the Triton kernels (triton_kernels/contrastive.py), defined here;
- ``leanops_reference::`` the blockwise plain-PyTorch version (python/leanops/reference/contrastive.py).

Autograd is registered on the forward primitives: the gradient of sum(w * row_lse) + sum(w' * col_lse) (CLIP) or of
sum(w * row_loss) (SigLIP) is exactly what the backward primitive computes, so everything built on top of them
(positive terms, reductions) differentiates with plain torch autograd, and torch.compile sees no graph break.
"""
import torch

from .. import _extension
from ..reference import contrastive as reference

Tensor = torch.Tensor


def _statistics_dtype(features: Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _fake_clip_forward(image, text, scale):
    dtype = _statistics_dtype(image)
    batch = image.shape[0]
    return (torch.empty(batch, dtype=dtype, device=image.device),
            torch.empty(batch, dtype=dtype, device=image.device))


def _fake_clip_backward(image, text, scale, row_lse, col_lse, row_weight, col_weight):
    dtype = _statistics_dtype(image)
    return (torch.empty(image.shape, dtype=dtype, device=image.device),
            torch.empty(text.shape, dtype=dtype, device=image.device),
            torch.empty(image.shape[0], dtype=dtype, device=image.device))


def _fake_siglip_forward(image, text, scale, bias, groups):
    return torch.empty(image.shape[0], dtype=_statistics_dtype(image), device=image.device)


def _fake_siglip_backward(image, text, scale, bias, groups, row_weight):
    dtype = _statistics_dtype(image)
    return (torch.empty(image.shape, dtype=dtype, device=image.device),
            torch.empty(text.shape, dtype=dtype, device=image.device),
            torch.empty((), dtype=dtype, device=image.device),
            torch.empty((), dtype=dtype, device=image.device))


def _register_autograd(namespace: str) -> None:
    operators = getattr(torch.ops, namespace)

    def clip_setup(ctx, inputs, output):
        image, text, scale = inputs
        ctx.save_for_backward(image, text, scale, *output)

    def clip_backward(ctx, grad_row_lse, grad_col_lse):
        image, text, scale, row_lse, col_lse = ctx.saved_tensors
        grad_row_lse = torch.zeros_like(row_lse) if grad_row_lse is None else grad_row_lse.contiguous()
        grad_col_lse = torch.zeros_like(col_lse) if grad_col_lse is None else grad_col_lse.contiguous()
        grad_image, grad_text, grad_scale = operators.clip_backward(image, text, scale, row_lse, col_lse,
                                                                   grad_row_lse, grad_col_lse)
        return grad_image.to(image.dtype), grad_text.to(text.dtype), grad_scale.to(scale.dtype)

    def siglip_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def siglip_backward(ctx, grad_row_loss):
        image, text, scale, bias, groups = ctx.saved_tensors
        grad_image, grad_text, grad_scale, grad_bias = operators.siglip_backward(
            image, text, scale, bias, groups, grad_row_loss.contiguous())
        return (grad_image.to(image.dtype), grad_text.to(text.dtype), grad_scale.to(scale.dtype),
                grad_bias.to(bias.dtype), None)

    torch.library.register_autograd(f"{namespace}::clip_forward", clip_backward, setup_context=clip_setup)
    torch.library.register_autograd(f"{namespace}::siglip_forward", siglip_backward, setup_context=siglip_setup)


def _register_fakes(namespace: str) -> None:
    for name, fake in (("clip_forward", _fake_clip_forward), ("clip_backward", _fake_clip_backward),
                       ("siglip_forward", _fake_siglip_forward), ("siglip_backward", _fake_siglip_backward)):
        torch.library.register_fake(f"{namespace}::{name}")(fake)


def _triton():
    from ..triton_kernels import contrastive as kernels

    return kernels


def _define_python_provider(namespace: str, implementation) -> None:
    """Define the four primitives in `namespace`, each calling `implementation()`'s function of that name."""

    @torch.library.custom_op(f"{namespace}::clip_forward", mutates_args=())
    def clip_forward(image: Tensor, text: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        return implementation().clip_forward(image, text, scale)

    @torch.library.custom_op(f"{namespace}::clip_backward", mutates_args=())
    def clip_backward(image: Tensor, text: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor,
                      row_weight: Tensor, col_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return implementation().clip_backward(image, text, scale, row_lse, col_lse, row_weight, col_weight)

    @torch.library.custom_op(f"{namespace}::siglip_forward", mutates_args=())
    def siglip_forward(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, groups: Tensor) -> Tensor:
        return implementation().siglip_forward(image, text, scale, bias, groups)

    @torch.library.custom_op(f"{namespace}::siglip_backward", mutates_args=())
    def siglip_backward(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, groups: Tensor,
                        row_weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return implementation().siglip_backward(image, text, scale, bias, groups, row_weight)


_define_python_provider("leanops_reference", lambda: reference)
_define_python_provider("leanops_triton", _triton)
NAMESPACES = ["leanops_reference", "leanops_triton"]
# The C++ operators exist when leanops._C loaded (and was built from sources that define them).
if _extension.extension_loaded() and hasattr(torch.ops.leanops, "clip_forward"):
    NAMESPACES.append("leanops")
for _namespace in NAMESPACES:
    _register_fakes(_namespace)
    _register_autograd(_namespace)
