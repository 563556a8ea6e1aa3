"""The FRUGAL family: the fused split step of leanops.optim.FRUGAL (python/leanops/reference/frugal.py states the
per-element math and is the oracle: every provider gives its bits). The step mutates its lists and returns nothing,
so it needs no fake kernel and no autograd."""
import torch

from .registry import OpFamily, Operator, standard_providers

PARAMETER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

FRUGAL = OpFamily(
    name="frugal",
    description="FRUGAL's fused split step (leanops.optim.FRUGAL)",
    operators=(
        Operator("frugal_split_step_(Tensor(a!)[] params, Tensor(b!)[] params_lo, Tensor(c!)[] exp_avgs, "
                 "Tensor(d!)[] exp_avg_sqs, Tensor[] grads, Tensor[] positions, Tensor[] addends, int[] modes, "
                 "float[] step_sizes, float[] bias_correction2_roots, float beta1, float beta2, float eps, "
                 "float decay, float free_lr, int state_free) -> ()"),
    ),
    providers=standard_providers("frugal", kernel_dtypes=PARAMETER_DTYPES),
    # Elementwise and memory-bound: the CUDA kernel first on a GPU, as for CollageAdamW.
    # float16 on the CPU: the reference first: the C++ kernel's float16 rounding costs a dozen vector operations a
    # value, slower than the reference's torch ops for blockwise and columns (9.3 / 11.1 against 5.0 / 7.8 ms, 8 x 512^2,
    # 2-core VM); the same bits either way.
    preference={"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference"),
                "cpu:float16": ("reference",)},
).register()
