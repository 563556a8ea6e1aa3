"""Collage AdamW's fused multi-tensor step as torch.library operators (mutating, so no fake kernel is needed beyond
the schema: the op returns nothing).

Providers share one contract, python/leanops/reference/collage.py (the oracle; csrc/ops.cpp holds the schema):
- ``leanops::collage_adamw_step_`` the C++ kernels (CPU; CUDA), defined in csrc/ops.cpp;
- ``leanops_triton::collage_adamw_step_`` the Triton kernels (triton_kernels/collage.py);
- ``leanops_reference::collage_adamw_step_`` plain PyTorch.
"""
import torch

from ..reference import collage as reference

Tensor = torch.Tensor

MUTATED = ("params", "params_lo", "exp_avgs", "exp_avg_sqs", "exp_avg_sqs_lo", "metrics")


def _triton():
    from ..triton_kernels import collage as kernels

    return kernels


def _define_python_provider(namespace: str, implementation) -> None:
    @torch.library.custom_op(f"{namespace}::collage_adamw_step_", mutates_args=MUTATED)
    def collage_adamw_step_(params: list[Tensor], params_lo: list[Tensor], exp_avgs: list[Tensor],
                            exp_avg_sqs: list[Tensor], exp_avg_sqs_lo: list[Tensor], grads: list[Tensor],
                            lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                            bias_correction1: float, bias_correction2: float, plus: bool,
                            metrics: Tensor | None) -> None:
        implementation().collage_adamw_step_(params, params_lo, exp_avgs, exp_avg_sqs, exp_avg_sqs_lo, grads, lr,
                                             beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2,
                                             plus, metrics)


_define_python_provider("leanops_reference", lambda: reference)
_define_python_provider("leanops_triton", _triton)
