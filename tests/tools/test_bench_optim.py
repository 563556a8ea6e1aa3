"""``leanops bench optim`` on the CPU: checked rows with bandwidth and bytes per parameter, JSON, table; peers that
cannot run, failed checks and crashes become rows, never times, drops or crashes."""
import dataclasses
import importlib.util
import json

import pytest
import torch

from leanops import cli, ops
from leanops.benchmarks import bench_optim
from leanops.optim import FRUGAL

CPU = torch.device("cpu")
CPU_COLLAGE = ops.COLLAGE.unavailable_reason("cpu", CPU)  # why the C++ kernel cannot serve here, or None
# State bytes per parameter (the step counters are scalars: a few bytes per tensor) and bytes moved per parameter.
# FRUGAL at density 0.25 on 4 tensors of 64x64: blockwise keeps the moments of one tensor (2 B/param); columns
# the moments of 16 columns of each (2 B/param) and their int32 indices (64 B per tensor), and the kernels their
# int32 inverse (one entry per column: 256 B per tensor).
EXPECTED_STATE = {"torch-foreach-fp32": 8, "torch-bf16": 4, "collage-light-reference": 6, "collage-light-cpu": 6,
                  "collage-plus-reference": 8, "collage-plus-cpu": 8, "frugal-blockwise-reference": 2,
                  "frugal-blockwise-cpu": 2, "frugal-columns-reference": 2 + 64 / 4096,
                  "frugal-columns-cpu": 2 + (64 + 256) / 4096}
EXPECTED_MASTER = {"torch-foreach-fp32": 4, "frugal-blockwise-reference": 4, "frugal-blockwise-cpu": 4,
                   "frugal-columns-reference": 4, "frugal-columns-cpu": 4}
EXPECTED_MOVED = {"torch-foreach-fp32": 28, "torch-bf16": 14, "collage-light-reference": 18,
                  "collage-light-cpu": 18, "collage-plus-reference": 22, "collage-plus-cpu": 22,
                  "frugal-blockwise-reference": 16, "frugal-blockwise-cpu": 16, "frugal-columns-reference": 16,
                  "frugal-columns-cpu": 16, "optimi-kahan": 18, "torchao-sr": 14}


def _timed_methods() -> list[str]:
    kernels = [name for name in ("collage-light-cpu", "collage-plus-cpu") if CPU_COLLAGE is None]
    kernels += [name for name in ("frugal-blockwise-cpu", "frugal-columns-cpu")
                if ops.FRUGAL.unavailable_reason("cpu", CPU) is None]
    return ["torch-foreach-fp32", "torch-bf16", "collage-light-reference", "collage-plus-reference",
            "frugal-blockwise-reference", "frugal-columns-reference"] + kernels


def _bench(tmp_path, *options) -> tuple[int, dict]:
    status = cli.main(["bench", "optim", "--peers", "--device", "cpu", "--quick", "--size", "4096", "--repeats", "2",
                       "--out", str(tmp_path), *options])
    return status, json.loads((tmp_path / "optim-cpu.json").read_text())


@pytest.mark.slow  # every method with the peers; the failure-row tests below run the benchmark quickly
def test_bench_writes_checked_rows_json_and_table(tmp_path, capsys):
    status, results = _bench(tmp_path)
    assert status == 0
    assert results["family"] == "optim" and results["environment"]["device_type"] == "cpu"
    assert results["copy_bandwidth_gbps"] > 0
    settings = results["settings"]
    assert (settings["tensors"], settings["shape"], settings["params"]) == (4, [64, 64], 4 * 4096)
    rows = {row["backend"]: row for row in results["rows"]}
    assert list(rows) == [method.name for method in bench_optim.candidate_methods(CPU)]
    for name, row in rows.items():
        assert row["bytes_per_param"] == EXPECTED_MOVED[name]
        assert row["bytes_moved"] == EXPECTED_MOVED[name] * 4 * 4096 and row["params"] == 4 * 4096
    for name in _timed_methods():
        row = rows[name]
        assert row["check"] == "passed", row
        assert row["ms"] > 0 and row["gbps"] > 0 and row["fraction_of_copy"] > 0 and row["repeats"] >= 1
        assert row["tflops"] is None and row["fraction_of_peak"] is None
        assert row["state_bytes_per_param"] == pytest.approx(EXPECTED_STATE[name], abs=0.01)
        assert row["master_bytes_per_param"] == EXPECTED_MASTER.get(name, 0)
        assert row["bytes_per_param_total"] == pytest.approx(2 + EXPECTED_MASTER.get(name, 0)
                                                              + EXPECTED_STATE[name], abs=0.01)
        if row["update_tolerance"] is None:  # plain bf16, the baseline: finite is enough
            assert name == "torch-bf16" and row["update_error"] < 1
        else:
            assert row["update_error"] <= row["update_tolerance"]
    assert rows["torch-foreach-fp32"]["update_tolerance"] == 1e-4
    assert rows["collage-plus-reference"]["update_tolerance"] == 1e-2
    assert rows["frugal-columns-reference"]["update_tolerance"] == 1e-4
    for peer, (module, package) in bench_optim.PEERS.items():  # listed, never dropped; GPU only
        row = rows[peer]
        assert row["check"] == "skipped" and row["ms"] is None and row["note"]
        if importlib.util.find_spec(module) is None:
            assert row["note"] == f"not installed (pip install {package})"
        else:
            assert "GPU" in row["note"] or "failed to import" in row["note"]
    table = capsys.readouterr().out
    for name in rows:
        assert name in table
    assert "targets" in table and "1.75 ms" in table and "28 (read p, g, m, v" in table
    assert "FRUGAL" in table and "at most torch-fused-fp32's time" in table


@pytest.fixture
def timed(monkeypatch) -> list[str]:
    """The methods that reach the timing, which this fixture skips (the check is under test, not the time)."""
    names = []
    monkeypatch.setattr(bench_optim, "measure_step", lambda row, *arguments: names.append(row.backend))
    return names


def _patch_optimizer(monkeypatch, matches, replacement):
    """Make the optimizers of the methods for which `matches(method)` holds `replacement(method, params,
    original optimizer)`."""
    original = bench_optim.make_optimizer

    def patched(method, params):
        optimizer = original(method, params)
        return replacement(method, params, optimizer) if matches(method) else optimizer

    monkeypatch.setattr(bench_optim, "make_optimizer", patched)


@pytest.mark.skipif(CPU_COLLAGE is not None, reason=f"no C++ Collage kernel here: {CPU_COLLAGE}")
def test_a_backend_that_differs_from_the_reference_is_a_failure_row(tmp_path, monkeypatch, capsys, timed):
    def nudge_m(method, params, optimizer):
        step = optimizer.step

        def wrong_step(closure=None):
            step()
            # One bit of m: the first step's update (the float64 check) is untouched, the bits are not.
            optimizer.state[params[0]]["exp_avg"].view(torch.int16).view(-1)[0] += 1

        optimizer.step = wrong_step
        return optimizer

    _patch_optimizer(monkeypatch, lambda method: method.name == "collage-plus-cpu", nudge_m)
    status, results = _bench(tmp_path, "--backends", "cpu")
    assert status == 1
    rows = {row["backend"]: row for row in results["rows"]}
    assert "optimi-kahan" not in rows  # --backends cpu: the Collage cpu rows and the baselines
    failed = [name for name, row in rows.items() if row["check"] == "failed"]
    assert failed == ["collage-plus-cpu"]
    row = rows["collage-plus-cpu"]
    assert row["ms"] is None and row["gbps"] is None and row["state_bytes"] is None
    assert "not bit-identical to backend='reference'" in row["note"] and "elements differ" in row["note"]
    assert row["update_error"] <= row["update_tolerance"]  # the float64 check alone would not have caught it
    assert rows["collage-light-cpu"]["check"] == "passed"
    assert timed == [name for name in rows if name != "collage-plus-cpu"]
    assert "FAILED" in capsys.readouterr().err


def test_a_wrong_update_or_a_crash_is_a_failure_row(monkeypatch, timed):
    def twice_the_learning_rate(method, params, optimizer):
        return torch.optim.AdamW(params, **{**bench_optim.HYPERPARAMETERS, "lr": 2e-3}, foreach=True)

    def crash(method, params, optimizer):
        raise RuntimeError("kernel exploded")

    def sgd_remainder(method, params, optimizer):
        return FRUGAL(params, **bench_optim.HYPERPARAMETERS, density=0.25, projection="columns",
                             state_free="sgd", backend="reference")

    _patch_optimizer(monkeypatch, lambda method: method.name == "torch-foreach-fp32", twice_the_learning_rate)
    _patch_optimizer(monkeypatch, lambda method: method.name == "collage-light-reference", crash)
    _patch_optimizer(monkeypatch, lambda method: method.name == "frugal-columns-reference", sgd_remainder)
    report = bench_optim.run(CPU, quick=True, elements=1024, repeats=1, backend_names=["reference"])
    rows = {row.backend: row for row in report.rows}
    assert set(rows) == {"torch-foreach-fp32", "torch-bf16", "collage-light-reference", "collage-plus-reference",
                         "frugal-blockwise-reference", "frugal-columns-reference"}
    for name in ("torch-foreach-fp32", "frugal-columns-reference"):
        wrong = rows[name]
        assert wrong.check == "failed" and wrong.ms is None
        assert "update relative error" in wrong.note and wrong.update_error > wrong.update_tolerance
    crashed = rows["collage-light-reference"]
    assert crashed.check == "failed" and crashed.ms is None and "kernel exploded" in crashed.note
    assert timed == ["torch-bf16", "collage-plus-reference", "frugal-blockwise-reference"]
    assert all(rows[name].check == "passed" for name in timed)


def test_out_of_memory_while_allocating_is_a_row(monkeypatch):
    def out_of_memory(method, tensors, shape, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(bench_optim, "_parameters", out_of_memory)
    report = bench_optim.run(CPU, quick=True, elements=1024, repeats=1, backend_names=["reference"])
    checked = [row for row in report.rows if row.check == "passed"]
    assert len(checked) == 6  # the torch baselines, the Collage reference (light, plus), FRUGAL's (two projections)
    assert all(row.out_of_memory and row.note == "out of memory" and row.ms is None for row in checked)
    assert all(row.state_bytes is None and row.gbps is None for row in checked)


def test_stochastic_rounding_tolerance_is_one_bf16_spacing():
    # Round to nearest is within half a spacing: it passes the stochastic-rounding bound, not the compensated one.
    (plain,) = [method for method in bench_optim.candidate_methods(CPU) if method.name == "torch-bf16"]
    error, tolerance = bench_optim.update_error(dataclasses.replace(plain, accuracy="stochastic rounding"), CPU)
    assert bench_optim.COMPENSATED_TOLERANCE < error <= tolerance
    assert bench_optim.update_error(plain, CPU)[1] is None


def test_sizes_names_and_refusals_follow_the_brief():
    cuda = torch.device("cuda")
    assert bench_optim.default_size(cuda, quick=False) == (16, 4096 * 4096)
    assert bench_optim.default_size(cuda, quick=True) == (4, 4096 * 4096)
    assert bench_optim.default_size(CPU, quick=False) == (8, 512 * 512)
    assert bench_optim.default_size(CPU, quick=True) == (4, 256 * 256)
    assert bench_optim.square_shape(4096 * 4096) == (4096, 4096)
    assert bench_optim.square_shape(4096) == (64, 64) and bench_optim.square_shape(8192) == (64, 128)
    assert bench_optim.square_shape(7) == (1, 7)
    assert [method.name for method in bench_optim.candidate_methods(cuda)] == [
        "torch-fused-fp32", "torch-bf16", "collage-light-reference", "collage-light-cuda", "collage-light-triton",
        "collage-plus-reference", "collage-plus-cuda", "collage-plus-triton", "frugal-blockwise-reference",
        "frugal-blockwise-cuda", "frugal-blockwise-triton", "frugal-columns-reference", "frugal-columns-cuda",
        "frugal-columns-triton", "optimi-kahan", "torchao-sr"]
    assert not any("triton" in method.name for method in bench_optim.candidate_methods(CPU))
    assert "optim" in cli.BENCHMARK_FAMILIES
    with pytest.raises(ValueError, match="unknown method"):
        bench_optim.run(CPU, elements=64, repeats=1, backend_names=["fastest"])
