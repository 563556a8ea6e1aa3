"""The Collage AdamW Triton kernel compiles for Hopper (sm_90) on a machine without a GPU, and its PTX keeps what
bit-exactness with the reference depends on: no multiply-add contracted into an FMA (the only fma.rn.f32 are
TwoProd's error terms in plus mode, one per element and code path), divisions and square roots correctly rounded
(div.rn / sqrt.rn, not div.full / sqrt.approx), no flush-to-zero; and what bandwidth depends on: 16-byte vector
loads and stores of every operand in full chunks when the addresses are aligned, no register spills. The report
comes from scripts/reports/hopper_collage_report.py."""
import pytest

pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.slow]  # compiles nine kernel variants for sm_90 in a subprocess

from helpers import run_report_script  # noqa: E402


@pytest.fixture(scope="module")
def report():
    return run_report_script("hopper_collage_report.py")


def test_every_variant_compiled(report):
    # Two storages, light and plus, with and without telemetry, aligned; one unaligned variant.
    assert len(report) == 9, sorted(report)


def test_no_contraction_and_correct_rounding(report):
    for case, counts in report.items():
        plus = "/plus/" in case
        # TwoProd's error fma(v, F(beta2), -p) is deliberate (exact for 16-bit operands); nothing else may be fused
        # (the divisors' copies into registers are add.rn.f32 x, -0).
        expected_fma = counts["elements_per_thread_paths"] if plus else 0
        assert counts["fma"] == expected_fma, f"{case}: {counts}"
        assert counts["div_rn"] > 0 and counts["div_approximate"] == 0, f"{case}: {counts}"
        assert counts["sqrt_rn"] > 0 and counts["sqrt_approximate"] == 0, f"{case}: {counts}"
        assert counts["flush_to_zero"] == 0, f"{case}: {counts}"


def test_vector_memory_access_and_no_spills(report):
    for case, counts in report.items():
        assert counts["spill_stores"] == 0 and counts["spill_loads"] == 0, f"{case}: {counts}"
        if case.endswith("/aligned"):
            plus = "/plus/" in case
            # Loads: param, param_lo, m, v, grad (+ v_lo); stores: param, param_lo, m, v (+ v_lo).
            assert counts["vector_loads"] >= (6 if plus else 5), f"{case}: {counts}"
            assert counts["vector_stores"] >= (5 if plus else 4), f"{case}: {counts}"
