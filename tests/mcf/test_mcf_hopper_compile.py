"""The MCF Triton kernels compile for Hopper (sm_90) on a machine without a GPU, and the generated PTX keeps the
properties exactness and bandwidth depend on: no fused multiply-add except where the algorithm asks for one
(TwoProd, inside two_prod and scale), and 16-byte vector loads and stores of full-size operands
(scripts/reports/hopper_ptx_report.py compiles them in a process without TRITON_INTERPRET)."""
import pytest

from helpers import run_report_script

pytest.importorskip("triton")
pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def ptx_report():
    return run_report_script("hopper_ptx_report.py")


# Full-size operands each kernel loads and stores (at least one 16-byte vector per thread each).
OPERANDS = {"two_sum": (2, 2), "fast_two_sum": (2, 2), "two_prod": (2, 2), "grow": (3, 2), "scale": (2, 2),
            "split": (1, 2), "merge": (2, 1)}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("op", list(OPERANDS))
def test_kernel_compiles_for_hopper(ptx_report, op, dtype):
    counts = ptx_report[f"{op}/{dtype}"]
    if op in ("two_prod", "scale"):
        assert counts["fma"] > 0, "TwoProd's error term needs its fused multiply-add"
    else:
        assert counts["fma"] == 0, "a multiply-add was contracted: the error-free transformation would not be exact"
    loads, stores = OPERANDS[op]
    assert counts["vector_loads"] >= loads, f"expected 16-byte vector loads, PTX has {counts}"
    assert counts["vector_stores"] >= stores, f"expected 16-byte vector stores, PTX has {counts}"
