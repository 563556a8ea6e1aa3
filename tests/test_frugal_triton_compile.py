"""The FRUGAL split-step Triton kernel compiles for Hopper (sm_90) on a machine without a GPU, and its PTX keeps
what bit-exactness with the oracle (python/leanops/reference/frugal.py) depends on: no multiply-add contracted into
an FMA, divisions and square roots correctly rounded (div.rn / sqrt.rn), no flush-to-zero; and no register spills."""
import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

from helpers import run_report_script  # noqa: E402


@pytest.fixture(scope="module")
def report():
    return run_report_script("hopper_frugal_report.py")


def test_every_variant_compiled(report):
    assert len(report) == 7, sorted(report)


def test_no_contraction_correct_rounding_no_spills(report):
    for case, counts in report.items():
        assert counts["fma"] == 0, f"{case}: {counts}"
        assert counts["div_rn"] > 0 and counts["div_approximate"] == 0, f"{case}: {counts}"
        assert counts["sqrt_rn"] > 0 and counts["sqrt_approximate"] == 0, f"{case}: {counts}"
        assert counts["flush_to_zero"] == 0, f"{case}: {counts}"
        assert counts["spill_stores"] == 0 and counts["spill_loads"] == 0, f"{case}: {counts}"
