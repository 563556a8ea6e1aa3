"""The FRUGAL split-step Triton kernel compiles for Hopper (sm_90) on a machine without a GPU, and its PTX keeps
what bit-exactness with the oracle (python/leanops/reference/frugal.py) depends on: no multiply-add contracted into
an FMA, divisions and square roots correctly rounded (div.rn / sqrt.rn), no flush-to-zero; and no register spills."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def report():
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "hopper_frugal_report.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_every_variant_compiled(report):
    assert len(report) == 7, sorted(report)


def test_no_contraction_correct_rounding_no_spills(report):
    for case, counts in report.items():
        assert counts["fma"] == 0, f"{case}: {counts}"
        assert counts["div_rn"] > 0 and counts["div_approximate"] == 0, f"{case}: {counts}"
        assert counts["sqrt_rn"] > 0 and counts["sqrt_approximate"] == 0, f"{case}: {counts}"
        assert counts["flush_to_zero"] == 0, f"{case}: {counts}"
        assert counts["spill_stores"] == 0 and counts["spill_loads"] == 0, f"{case}: {counts}"
