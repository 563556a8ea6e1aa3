"""The FRUGAL split-step Triton kernel compiles for Hopper (sm_90) on a machine without a GPU, and its PTX keeps
what bit-exactness with the oracle (python/leanops/reference/frugal.py) depends on: no multiply-add contracted into
an FMA, divisions and square roots correctly rounded (div.rn / sqrt.rn), no flush-to-zero; and no register spills.
The report comes from scripts/reports/hopper_frugal_report.py."""
import pytest

pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.slow]  # compiles seven kernel variants for sm_90 in a subprocess

from helpers import run_report_script  # noqa: E402

# Counts every variant must have exactly: nothing fused, approximated, flushed or spilled.
NONE_OF = ("fma", "div_approximate", "sqrt_approximate", "flush_to_zero", "spill_stores", "spill_loads")


def test_every_variant_compiles_exact_and_without_spills():
    report = run_report_script("hopper_frugal_report.py")
    assert len(report) == 7, sorted(report)  # three state-free rules, three storages, compensated or not
    for case, counts in report.items():
        assert {name: counts[name] for name in NONE_OF} == dict.fromkeys(NONE_OF, 0), f"{case}: {counts}"
        assert counts["div_rn"] > 0 and counts["sqrt_rn"] > 0, f"{case}: {counts}"
