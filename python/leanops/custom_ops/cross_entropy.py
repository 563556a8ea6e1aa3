"""The chunked linear cross-entropy primitives as torch.library operators, with fake kernels and autograd.

Providers share one contract (csrc/ops.cpp documents it):
- ``leanops::`` the C++ kernels (CPU), defined in csrc/ops.cpp;
- ``leanops_triton::`` the Triton kernels (triton_kernels/cross_entropy.py), defined here;
- ``leanops_reference::`` the chunked plain-PyTorch version (python/leanops/reference/cross_entropy.py).

Autograd is registered on ``linear_ce_forward``: the gradient of sum_n (a_n lse_n + b_n target_logit_n
+ c_n logit_sum_n + d_n logit_square_sum_n) is exactly what ``linear_ce_backward`` computes, so every loss option
built on the four statistics (label smoothing, z-loss, squentropy, ignored tokens, reductions) differentiates with
plain torch autograd on O(N) tensors, and torch.compile sees no graph break.
"""
import torch

from .. import _extension
from ..reference import cross_entropy as reference

Tensor = torch.Tensor


def _statistics_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _fake_forward(hidden, weight, bias, targets, softcap):
    return tuple(torch.empty(hidden.shape[0], dtype=_statistics_dtype(hidden), device=hidden.device)
                 for _ in range(4))


def _fake_backward(hidden, weight, bias, targets, softcap, lse, grad_lse, grad_target, grad_sum, grad_square_sum):
    return torch.empty_like(hidden), torch.empty_like(weight), torch.empty_like(bias)


def _register_autograd(namespace: str) -> None:
    operators = getattr(torch.ops, namespace)

    def setup_context(ctx, inputs, output):
        hidden, weight, bias, targets, softcap = inputs
        ctx.softcap = softcap
        ctx.save_for_backward(hidden, weight, bias, targets, output[0])

    def backward(ctx, *grad_statistics):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grads = [torch.zeros_like(lse) if g is None else g.contiguous() for g in grad_statistics]
        grad_hidden, grad_weight, grad_bias = operators.linear_ce_backward(hidden, weight, bias, targets,
                                                                         ctx.softcap, lse, *grads)
        return grad_hidden, grad_weight, grad_bias, None, None

    torch.library.register_autograd(f"{namespace}::linear_ce_forward", backward, setup_context=setup_context)


def _register_fakes(namespace: str) -> None:
    torch.library.register_fake(f"{namespace}::linear_ce_forward")(_fake_forward)
    torch.library.register_fake(f"{namespace}::linear_ce_backward")(_fake_backward)


def _triton():
    from ..triton_kernels import cross_entropy as kernels

    return kernels


def _define_python_provider(namespace: str, implementation) -> None:
    """Define the two primitives in `namespace`, each calling `implementation()`'s function of that name."""

    @torch.library.custom_op(f"{namespace}::linear_ce_forward", mutates_args=())
    def linear_ce_forward(hidden: Tensor, weight: Tensor, bias: Tensor, targets: Tensor,
                          softcap: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return implementation().linear_ce_forward(hidden, weight, bias, targets, softcap)

    @torch.library.custom_op(f"{namespace}::linear_ce_backward", mutates_args=())
    def linear_ce_backward(hidden: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, softcap: float,
                           lse: Tensor, grad_lse: Tensor, grad_target: Tensor, grad_sum: Tensor,
                           grad_square_sum: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return implementation().linear_ce_backward(hidden, weight, bias, targets, softcap, lse, grad_lse,
                                                   grad_target, grad_sum, grad_square_sum)


_define_python_provider("leanops_reference", lambda: reference)
_define_python_provider("leanops_triton", _triton)
NAMESPACES = ["leanops_reference", "leanops_triton"]
# The C++ operators exist when leanops._C loaded (and was built from sources that define them).
if _extension.extension_loaded() and hasattr(torch.ops.leanops, "linear_ce_forward"):
    NAMESPACES.append("leanops")
for _namespace in NAMESPACES:
    _register_fakes(_namespace)
    _register_autograd(_namespace)
