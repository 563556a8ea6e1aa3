"""The benchmark cases of ``leanops bench`` under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Each family's run (the same code ``leanops bench`` runs, checks against the reference included) is executed once at
collection with its quick sizes, and every timed call it makes is collected (``common.collecting``); each becomes
one pytest-benchmark test, so pytest-benchmark's --benchmark-save / --benchmark-compare track regressions on any
machine with one definition of each case. A case whose check failed is not timed by ``leanops bench`` and so is
not collected either.

``LEANOPS_BENCH_FAMILIES`` (comma-separated, default every measured family) and ``LEANOPS_BENCH_DEVICE`` (default:
cuda if available) select what is collected.
"""
import os

import pytest
import torch

from leanops.benchmarks import common

MEASURED_FAMILIES = ("mcf", "clip", "siglip", "ce", "optim")


def _device() -> torch.device:
    return torch.device(os.environ.get("LEANOPS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def collect_cases(families, device: torch.device) -> list[common.Case]:
    """Run each family's quick benchmark once and return every timed call it made, labelled family/case."""
    import importlib

    from leanops.cli import BENCHMARK_FAMILIES

    cases = []
    for family in families:
        module_name, _, function_name = BENCHMARK_FAMILIES[family].partition(":")
        run = getattr(importlib.import_module(module_name), function_name or "run")
        with common.collecting() as collected, common.peers_enabled(False):
            run(device, quick=True)
        seen: dict[str, int] = {}
        for case in collected:
            label = f"{family}/{case.label}"
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                label = f"{label}#{seen[label]}"
            cases.append(common.Case(label, case.function, case.device))
    return cases


def _families() -> list[str]:
    chosen = os.environ.get("LEANOPS_BENCH_FAMILIES")
    families = [name for name in chosen.split(",") if name] if chosen else list(MEASURED_FAMILIES)
    unknown = sorted(set(families) - set(MEASURED_FAMILIES))
    if unknown:
        raise ValueError(f"LEANOPS_BENCH_FAMILIES: unknown famil(ies) {unknown}; expected some of "
                         f"{MEASURED_FAMILIES}")
    return families


CASES = collect_cases(_families(), _device())


@pytest.mark.parametrize("case", CASES, ids=[case.label for case in CASES])
def test_case(benchmark, case: common.Case) -> None:
    def call():
        case.function()
        common.synchronize(case.device)  # time the work, not its launch

    benchmark(call)
