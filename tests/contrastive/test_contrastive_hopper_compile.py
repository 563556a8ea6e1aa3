"""The contrastive Triton kernels compile for Hopper (sm_90) on a machine without a GPU, for every tile candidate
the launchers may pick: no register spills, within the SM's shared memory, 16-bit features on the tensor cores
(wgmma) — the S tiles of the forwards and of the G panels, and both GEMMs of the backward (G Y and G^T X) — float32
ones off them (scripts/reports/hopper_loss_report.py, run in a process without TRITON_INTERPRET)."""
import pytest

from helpers import assert_hopper_tiles_compile, run_report_script

pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.slow]

KERNELS = {name: ("bfloat16", "float32") for name in ("clip_forward", "siglip_forward", "clip_gradient_panel",
                                                       "siglip_gradient_panel", "contrastive_matmul",
                                                       "contrastive_matmul_transposed_a")}


def test_tile_candidates_compile_without_spills():
    assert_hopper_tiles_compile(run_report_script("hopper_loss_report.py", "contrastive"), KERNELS)
