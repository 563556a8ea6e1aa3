"""The FRUGAL split-step Triton kernel compiles for Hopper (sm_90) on a machine without a GPU, and its PTX keeps
what bit-exactness with the oracle (python/leanops/reference/frugal.py) depends on: no multiply-add contracted into
an FMA, divisions and square roots correctly rounded (div.rn / sqrt.rn), no flush-to-zero; what bandwidth depends
on: in full chunks of aligned operands, vector loads and stores of every contiguous stream (the parameter and its
compensation, the gradient, the addend, and the moments in ADAMW mode: 16 bytes a thread for float32, 8 bytes for
16-bit values, 4 elements a thread); and no register spills. The report comes from
scripts/reports/hopper_frugal_report.py."""
import pytest

pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.slow]  # compiles eight kernel variants for sm_90 in a subprocess

from helpers import run_report_script  # noqa: E402

# Counts every variant must have exactly: nothing fused, approximated, flushed or spilled.
NONE_OF = ("fma", "div_approximate", "sqrt_approximate", "flush_to_zero", "spill_stores", "spill_loads")
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@pytest.fixture(scope="module")
def report():
    return run_report_script("hopper_frugal_report.py")


def test_every_variant_compiles_exact_and_without_spills(report):
    assert len(report) == 8, sorted(report)  # three state-free rules, three storages, compensated or not, unaligned
    for case, counts in report.items():
        assert {name: counts[name] for name in NONE_OF} == dict.fromkeys(NONE_OF, 0), f"{case}: {counts}"
        assert counts["div_rn"] > 0 and counts["sqrt_rn"] > 0, f"{case}: {counts}"


def test_contiguous_streams_are_vector_accesses(report):
    for case, counts in report.items():
        parts = case.split("/")
        param, grad, compensated = parts[0], parts[1], parts[2] == "compensated"
        if case.endswith("/unaligned"):
            assert counts["vector_loads"] == counts["vector_loads_8"] == 0, f"{case}: {counts}"
            continue
        # Loads of the full-chunk path: the parameter (and its compensation), the gradient; the addend and ADAMW
        # mode's two moments (float32). Stores: the parameter (and its compensation), the two moments.
        loads = [param] * (2 if compensated else 1) + [grad] + ["float32"] * 3
        stores = [param] * (2 if compensated else 1) + ["float32"] * 2
        for kind, streams in (("loads", loads), ("stores", stores)):
            wide = sum(1 for dtype in streams if BYTES[dtype] == 4)  # 16 bytes a thread: .v4
            narrow = len(streams) - wide  # 8 bytes a thread: .v2.b32
            assert counts[f"vector_{kind}"] >= wide, f"{case}: {kind} {counts}"
            assert counts[f"vector_{kind}_8"] >= narrow, f"{case}: {kind} {counts}"
