"""FRUGAL's fused split step as torch.library operators (mutating; the op returns nothing).

Providers share one contract, python/leanops/reference/frugal.py (the oracle; csrc/ops.cpp holds the schema):
- ``leanops::frugal_split_step_`` the C++ kernels (CPU; CUDA), defined in csrc/ops.cpp;
- ``leanops_triton::frugal_split_step_`` the Triton kernel (triton_kernels/frugal.py);
- ``leanops_reference::frugal_split_step_`` plain PyTorch.
"""
import torch

from ..reference import frugal as reference

Tensor = torch.Tensor

MUTATED = ("params", "params_lo", "exp_avgs", "exp_avg_sqs")


def _triton():
    from ..triton_kernels import frugal as kernels

    return kernels


def _define_python_provider(namespace: str, implementation) -> None:
    @torch.library.custom_op(f"{namespace}::frugal_split_step_", mutates_args=MUTATED)
    def frugal_split_step_(params: list[Tensor], params_lo: list[Tensor], exp_avgs: list[Tensor],
                           exp_avg_sqs: list[Tensor], grads: list[Tensor], positions: list[Tensor],
                           addends: list[Tensor], modes: list[int], step_sizes: list[float],
                           bias_correction2_roots: list[float], beta1: float, beta2: float, eps: float, decay: float,
                           free_lr: float, state_free: int) -> None:
        implementation().frugal_split_step_(params, params_lo, exp_avgs, exp_avg_sqs, grads, positions, addends,
                                            modes, step_sizes, bias_correction2_roots, beta1, beta2, eps, decay,
                                            free_lr, state_free)


_define_python_provider("leanops_reference", lambda: reference)
_define_python_provider("leanops_triton", _triton)
