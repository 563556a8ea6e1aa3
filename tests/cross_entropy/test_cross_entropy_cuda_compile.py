"""The linear cross-entropy CUDA provider (csrc/cuda/cross_entropy.cu) compiles for Hopper (sm_90) on a machine
without a GPU (scripts/reports/hopper_cuda_report.py): every kernel of its fused steps without register spills, no
hand-written tensor-core products (no mma / wmma / wgmma in the PTX, no WMMA in its sources), and its heavy products
issued as ATen GEMMs (leanops/cross_entropy_plan_host.h: aten::mm / aten::addmm, the .dtype overloads for 16-bit
inputs)."""
import pytest
import torch
from torch.utils import cpp_extension

from helpers import run_report_script

pytestmark = pytest.mark.slow

TYPES = ("float", "__half", "__nv_bfloat16")
KERNELS = ({"sum_column_partials_kernel", "gradient_scale_kernel"}
           | {f"{name}<{t}>" for name in ("linear_ce_forward_rows_kernel", "linear_ce_bias_partials_kernel",
                                          "linear_ce_backward_rows_kernel") for t in TYPES})
GEMM_OPERATORS = {"mm_out", "mm_dtype_out", "addmm_out", "addmm_dtype_out"}


def test_kernels_compile_without_spills_and_leave_the_products_to_cublas():
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        pytest.skip("needs nvcc and a CUDA build of torch")
    report = run_report_script("hopper_cuda_report.py", "cross_entropy")["cross_entropy"]
    assert set(report["kernels"]) == KERNELS, sorted(report["kernels"])
    for name, counts in report["kernels"].items():
        assert counts["spill_stores"] == 0 and counts["spill_loads"] == 0, f"{name} spills registers: {counts}"
        assert counts["registers"] <= 255, f"{name}: {counts}"
    assert report["ptx_bytes"] > 0 and report["tensor_core_instructions"] == 0, report
    assert report["wmma_in_sources"] == [], report["wmma_in_sources"]
    assert GEMM_OPERATORS <= set(report["gemm_operators"]), report["gemm_operators"]
