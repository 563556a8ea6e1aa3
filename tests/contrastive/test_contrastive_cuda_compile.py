"""The contrastive CUDA provider (csrc/cuda/contrastive.cu) compiles for Hopper (sm_90) on a machine without a GPU
(scripts/reports/hopper_cuda_report.py): every kernel of its fused steps without register spills, no hand-written
tensor-core products (no mma / wmma / wgmma in the PTX, no WMMA in its sources), and its heavy products issued as
ATen GEMMs (leanops/contrastive_plan_host.h: aten::mm / aten::addmm, the .dtype overloads for 16-bit features)."""
import pytest
import torch
from torch.utils import cpp_extension

from helpers import run_report_script

pytestmark = pytest.mark.slow

TYPES = ("float", "__half", "__nv_bfloat16")
KERNELS = ({"clip_forward_rows_kernel", "clip_forward_column_partials_kernel", "clip_merge_column_partials_kernel",
            "clip_backward_column_partials_kernel", "sum_column_partials_kernel", "siglip_forward_rows_kernel",
            "sum_rows_kernel", "gradient_scale_kernel"}
           | {f"{name}<{t}>" for name in ("clip_backward_rows_kernel", "siglip_backward_rows_kernel") for t in TYPES})
GEMM_OPERATORS = {"mm_out", "mm_dtype_out", "addmm_out", "addmm_dtype_out"}


def test_kernels_compile_without_spills_and_leave_the_products_to_cublas():
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        pytest.skip("needs nvcc and a CUDA build of torch")
    report = run_report_script("hopper_cuda_report.py", "contrastive")["contrastive"]
    assert set(report["kernels"]) == KERNELS, sorted(report["kernels"])
    for name, counts in report["kernels"].items():
        assert counts["spill_stores"] == 0 and counts["spill_loads"] == 0, f"{name} spills registers: {counts}"
        assert counts["registers"] <= 255, f"{name}: {counts}"
    assert report["ptx_bytes"] > 0 and report["tensor_core_instructions"] == 0, report
    assert report["wmma_in_sources"] == [], report["wmma_in_sources"]
    assert GEMM_OPERATORS <= set(report["gemm_operators"]), report["gemm_operators"]
