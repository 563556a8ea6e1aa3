"""The Collage family: CollageAdamW's fused multi-tensor step (python/leanops/reference/collage.py states the
per-element math and is the oracle: every provider gives its bits). The step mutates its lists and returns nothing,
so it needs no fake kernel and no autograd."""
import torch

from .registry import OpFamily, Operator, standard_providers

STORAGE_DTYPES = (torch.bfloat16, torch.float16)

COLLAGE = OpFamily(
    name="collage",
    description="CollageAdamW's fused step (leanops.optim.CollageAdamW)",
    operators=(
        Operator("collage_adamw_step_(Tensor(a!)[] params, Tensor(b!)[] params_lo, Tensor(c!)[] exp_avgs, "
                 "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] exp_avg_sqs_lo, Tensor[] grads, float lr, float beta1, "
                 "float beta2, float eps, float weight_decay, float bias_correction1, float bias_correction2, "
                 "bool plus, Tensor(f!)? metrics) -> ()"),
    ),
    providers=standard_providers("collage", kernel_dtypes=STORAGE_DTYPES, reference_dtypes=STORAGE_DTYPES),
    # Elementwise and memory-bound: the CUDA kernel first on a GPU, as for the MCF arithmetic.
    preference={"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
).register()
