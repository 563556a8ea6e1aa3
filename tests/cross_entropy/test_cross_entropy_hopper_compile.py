"""The linear cross-entropy Triton kernels compile for Hopper (sm_90) on a machine without a GPU, for every tile
candidate the launchers may pick: no register spills, within the SM's shared memory, 16-bit features on the tensor
cores (wgmma) — the logit tiles of the forward and of the d_logits chunk, and both GEMMs of the backward (G W and
G^T h) — float32 ones off them (scripts/reports/hopper_loss_report.py, run in a process without TRITON_INTERPRET)."""
import pytest

from helpers import assert_hopper_tiles_compile, run_report_script

pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.slow]

KERNELS = {name: ("bfloat16", "float32") for name in ("linear_ce_forward", "linear_ce_gradient_chunk",
                                                       "linear_ce_matmul", "linear_ce_matmul_transposed_a")}


def test_tile_candidates_compile_without_spills():
    assert_hopper_tiles_compile(run_report_script("hopper_loss_report.py", "cross_entropy"), KERNELS)
