"""``leanops bench clip`` / ``leanops bench siglip`` on the CPU: checked rows, JSON, table, plots; failures and
out-of-memory become rows, never times or crashes."""
import dataclasses
import importlib.util
import json

import pytest
import torch

from leanops import cli, ops
from leanops.benchmarks import bench_contrastive, common, measurement

CPU = torch.device("cpu")


@pytest.mark.slow  # every method with the peers; the failure-row tests below run the benchmark quickly
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_bench_writes_checked_times_table_and_plots(family, tmp_path, capsys):
    status = cli.main(["bench", family, "--peers", "--device", "cpu", "--quick", "--size", "256", "--repeats", "2",
                       "--out", str(tmp_path)])
    assert status == 0
    results = json.loads((tmp_path / f"{family}-cpu.json").read_text())
    assert results["family"] == family
    assert results["environment"]["device_type"] == "cpu"
    assert results["settings"]["batches"] == [256]
    assert results["settings"]["dtype"] == "float32" and results["settings"]["dim"] == 64
    rows = {row["backend"]: row for row in results["rows"]}
    timed = ["pytorch", "blockwise"] + (["cpu"] if ops.CONTRASTIVE.unavailable_reason("cpu", CPU) is None else [])
    for method in timed:
        row = rows[method]
        assert row["check"] == "passed", row
        assert row["batch"] == row["elements"] == 256 and row["dim"] == 64
        assert row["ms"] > 0 and row["tflops"] > 0
        assert row["flop_floor"] == 8 * 256 * 256 * 64
        assert row["fraction_of_peak"] is None  # no measured CPU ceiling
        assert row["loss_error"] <= row["loss_tolerance"] and row["grad_error"] <= row["grad_tolerance"]
        assert row["peak_extra_bytes"] is None or row["peak_extra_bytes"] >= 0
    if family == "clip":
        # A peer is listed, never silently dropped; on the CPU it cannot run (CUDA only) even when installed.
        assert rows["inf-cl"]["check"] == "skipped" and rows["inf-cl"]["ms"] is None and rows["inf-cl"]["note"]
    else:
        assert "inf-cl" not in rows
        assert any("Inf-CL" in note for note in results["notes"])
    table = capsys.readouterr().out
    for method in timed:
        assert method in table
    if importlib.util.find_spec("matplotlib") is not None:
        for suffix in ("memory", "time"):
            path = tmp_path / f"{family}-cpu-{suffix}.png"
            if suffix == "memory" and rows["pytorch"]["peak_extra_bytes"] in (None, 0):
                continue  # nothing positive to plot on a log axis
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert any("plots skipped" in note for note in results["notes"])


def _wrong_by_one_percent(function):
    return lambda x, y, parameters: 1.01 * function(x, y, parameters)


def test_failed_check_is_a_failure_row_without_time(monkeypatch):
    spec = bench_contrastive.SPECS["clip"]
    wrong = dataclasses.replace(spec, blockwise=_wrong_by_one_percent(spec.blockwise))
    monkeypatch.setitem(bench_contrastive.SPECS, "clip", wrong)
    report = bench_contrastive.run_clip(CPU, elements=64, repeats=1, backend_names=["blockwise"])
    rows = {row.backend: row for row in report.rows}
    assert set(rows) == {"pytorch", "blockwise"}
    assert rows["blockwise"].check == "failed" and rows["blockwise"].ms is None
    assert "loss relative error" in rows["blockwise"].note
    assert rows["pytorch"].check == "passed" and rows["pytorch"].ms > 0


def test_crashing_method_is_a_failure_row(monkeypatch):
    def crash(x, y, parameters):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(bench_contrastive.SPECS, "siglip",
                        dataclasses.replace(bench_contrastive.SPECS["siglip"], blockwise=crash))
    report = bench_contrastive.run_siglip(CPU, elements=64, repeats=1, backend_names=["blockwise"])
    (row,) = [row for row in report.rows if row.backend == "blockwise"]
    assert row.check == "failed" and row.ms is None and "kernel exploded" in row.note


def test_out_of_memory_is_a_row_not_a_crash(monkeypatch, tmp_path):
    spec = bench_contrastive.SPECS["clip"]

    def runs_out_above_the_check_size(x, y, parameters):
        if x.shape[0] > bench_contrastive.CHECK_BATCH:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return spec.plain(x, y, parameters)

    monkeypatch.setitem(bench_contrastive.SPECS, "clip", dataclasses.replace(spec, plain=runs_out_above_the_check_size))
    report = bench_contrastive.run_clip(CPU, elements=512, repeats=1, backend_names=["blockwise"])
    rows = {row.backend: row for row in report.rows}
    assert rows["pytorch"].out_of_memory and rows["pytorch"].note == "out of memory"
    assert rows["pytorch"].check != "failed" and rows["pytorch"].ms is None
    assert rows["blockwise"].check == "passed" and rows["blockwise"].ms > 0
    common.write_results(str(tmp_path), report)  # the row serialises like any other
    assert json.loads((tmp_path / "clip-cpu.json").read_text())["rows"][0]["out_of_memory"] is True


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        bench_contrastive.run_clip(CPU, elements=64, repeats=1, backend_names=["fastest"])


def test_default_sizes_follow_the_brief():
    cuda = torch.device("cuda")
    assert bench_contrastive.default_batches("clip", cuda, quick=False) == [8192, 16384, 32768, 65536, 131072]
    assert bench_contrastive.default_batches("siglip", cuda, quick=False)[-1] == 65536
    assert bench_contrastive.default_batches("clip", cuda, quick=True) == [4096, 8192]
    assert bench_contrastive.default_batches("siglip", CPU, quick=False) == [512, 1024, 2048]
    assert bench_contrastive.default_dim_and_dtype(cuda) == (512, torch.bfloat16)
    assert bench_contrastive.default_dim_and_dtype(CPU) == (64, torch.float32)
    assert measurement.peak_flops(CPU, torch.bfloat16) is None


@pytest.mark.skipif(not measurement.ResidentSetSampler.supported(), reason="needs /proc/self/statm")
def test_resident_set_sampler_sees_a_touched_allocation():
    megabytes = 64
    with measurement.ResidentSetSampler() as sampler:
        buffer = torch.ones(megabytes * 2**20 // 4)  # written: every page becomes resident
        del buffer
    assert sampler.samples >= 1
    assert sampler.growth_bytes >= 0.9 * megabytes * 2**20
