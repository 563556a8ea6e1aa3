"""The linear cross-entropy Triton kernels compile for Hopper (sm_90) on a machine without a GPU, for every tile
candidate the launchers may pick: no register spills, within the SM's shared memory, 16-bit features on the tensor
cores (wgmma), float32 ones off them (scripts/reports/hopper_loss_report.py, run in a process without
TRITON_INTERPRET). float16 compiles apart from bfloat16 where the backward scales its tiles for float16's range."""
import pytest

from helpers import assert_hopper_tiles_compile, run_report_script

pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.slow]

KERNELS = {"linear_ce_forward": ("bfloat16", "float32"),
           "linear_ce_grad_hidden": ("bfloat16", "float16", "float32"),
           "linear_ce_grad_weight": ("bfloat16", "float16", "float32")}


def test_tile_candidates_compile_without_spills():
    assert_hopper_tiles_compile(run_report_script("hopper_loss_report.py", "cross_entropy"), KERNELS)
