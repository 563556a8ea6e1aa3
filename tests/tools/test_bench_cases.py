"""One definition of each benchmark case serves ``leanops bench`` and pytest-benchmark (benchmarks/test_cases.py):
the timed calls of a family's run are collected with their labels, and pytest-benchmark runs them."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from leanops.benchmarks import bench_mcf, common


def test_a_runs_timed_calls_are_collected_with_labels():
    with common.collecting() as cases:
        report = bench_mcf.run(torch.device("cpu"), quick=True, elements=4096, repeats=1)
    timed = [row for row in report.rows if row.ms is not None]
    assert len(cases) == len(timed) > 0
    labels = [case.label for case in cases]
    assert len(set(labels)) == len(labels)
    assert labels[0] == f"{timed[0].op}/{timed[0].backend}/{timed[0].dtype}/elements=4096"
    for case in cases:
        case.function()  # each collected case runs on its own
    with common.collecting() as outside:
        pass
    assert outside == []  # nothing recorded outside a run


def test_time_calls_reports_median_and_quartiles():
    timing = common.time_calls(lambda: None, torch.device("cpu"), repeats=9, warmup=0)
    assert timing.repeats == 9 and timing.q1 <= timing.median <= timing.q3


@pytest.mark.slow  # a pytest subprocess
@pytest.mark.skipif(__import__("importlib").util.find_spec("pytest_benchmark") is None,
                    reason="pytest-benchmark is not installed (scripts/setup.sh installs it)")
def test_pytest_benchmark_runs_the_cases(tmp_path):
    root = pathlib.Path(__file__).resolve().parents[2]  # the repository
    environment = {**os.environ, "LEANOPS_BENCH_FAMILIES": "mcf", "LEANOPS_BENCH_DEVICE": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(root, "benchmarks",
         "test_cases.py"), "--benchmark-only", "--benchmark-disable-gc", "--benchmark-min-rounds=1",
         "--benchmark-max-time=0.01", "--benchmark-warmup=off", f"--benchmark-json={tmp_path / 'bench.json'}"],
        capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import json

    benchmarks = json.loads((tmp_path / "bench.json").read_text())["benchmarks"]
    names = [entry["name"] for entry in benchmarks]
    assert any("mcf/two_sum/cpu/float32" in name for name in names), names
    assert all(entry["stats"]["median"] > 0 for entry in benchmarks)
