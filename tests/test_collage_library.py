"""The Collage AdamW step as torch.library operators: opcheck (schema, mutation annotations, fake kernel) in every
namespace this machine can run."""
import pytest
import torch

from helpers import BACKEND_CASES, require_backend
from leanops.optim import collage

NAMESPACE = {"reference": "leanops_reference", "triton": "leanops_triton", "cpu": "leanops", "cuda": "leanops"}


def _require(backend, device):
    require_backend(backend, device)
    if backend not in collage.IMPLEMENTED:
        pytest.skip(f"the {backend} backend has no Collage kernels yet")


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
@pytest.mark.parametrize("plus", [False, True], ids=["light", "plus"])
def test_opcheck_step(backend, device, plus):
    _require(backend, device)
    generator = torch.Generator().manual_seed(0)

    def tensors(scale=1.0):
        return [(scale * torch.randn(shape, generator=generator)).bfloat16().to(device) for shape in ((7,), (2, 3))]

    params, params_lo, exp_avgs, grads = tensors(), tensors(1e-3), tensors(0.1), tensors()
    exp_avg_sqs = [t.abs() for t in tensors(0.01)]
    exp_avg_sqs_lo = [t.abs() for t in tensors(1e-4)] if plus else []
    args = (params, params_lo, exp_avgs, exp_avg_sqs, exp_avg_sqs_lo, grads, 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.1,
            0.001, plus, torch.zeros(4, dtype=torch.float64, device=device))
    operator = getattr(torch.ops, NAMESPACE[backend]).collage_adamw_step_.default
    torch.library.opcheck(operator, args)
