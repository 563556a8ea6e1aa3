"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU.

MCF: the generated PTX keeps the properties exactness and bandwidth depend on: no fused multiply-add except where
the algorithm asks for one (TwoProd, inside two_prod and scale), and 16-byte vector loads and stores of full-size
operands. Losses (contrastive, linear cross-entropy): every tile candidate the launchers may pick compiles without
register spills, within the SM's shared memory, and 16-bit features run on the tensor cores (wgmma)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.triton


def _run_report(script_name: str) -> dict:
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), script_name)
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def ptx_report():
    return _run_report("hopper_ptx_report.py")


@pytest.fixture(scope="module")
def loss_report():
    return _run_report("hopper_loss_report.py")


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


# Hopper's shared memory per block (227 KiB) and its register file per thread.
HOPPER_SHARED_BYTES = 227 * 1024
HOPPER_REGISTERS = 255


def test_loss_tile_candidates_compile_without_spills(loss_report):
    assert len(loss_report) >= 18, "expected every contrastive and cross-entropy kernel in both dtypes"
    for case, counts in loss_report.items():
        assert counts["spill_stores"] == 0 and counts["spill_loads"] == 0, f"{case} spills registers: {counts}"
        assert counts["registers"] <= HOPPER_REGISTERS, case
        assert counts["shared_bytes"] <= HOPPER_SHARED_BYTES, f"{case} needs too much shared memory: {counts}"
        if "/bfloat16/" in case or "/float16/" in case:
            assert counts["wgmma"] > 0, f"{case}: 16-bit features should run on wgmma: {counts}"
        else:
            assert counts["wgmma"] == 0, f"{case}: float32 features must not use TF32 tensor cores: {counts}"
