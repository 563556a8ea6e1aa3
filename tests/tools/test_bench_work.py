"""Work and model time in ``leanops bench`` (issue 14): each loss row carries the matrix work its method's plan issues
over the floor (``leanops.plans``), shown in the table and written to the JSON; on a GPU the roofline time and the
fraction of it reached (here with stand-in ceilings: the CPU has none); the tables stay within 120 columns; the
target sizes, the target table, and the time limit that keeps a run within one short GPU call."""
import json
import re

import pytest
import torch

from leanops import cli, ops, plans
from leanops.benchmarks import bench_contrastive, bench_cross_entropy, bench_optim, common, measurement, targets

CPU = torch.device("cpu")
# Ceilings as measured on the H100 (../shared/DESIGN.md), standing in for a GPU's on the CPU.
H100_LIKE = measurement.Ceilings(dtype="float32", peak_flops=747e12, bandwidth_bytes_per_s=2.95e12, matmul_size=8192,
                                 matmul_ms=1.47, copy_bytes=2**30, copy_ms=0.73, repeats=10, tf32_allowed=False)


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("note: ")]


def _header(text: str, first_column: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if line.split()[:1] == [first_column]]
    return re.split(r"\s{2,}", line.strip())


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_contrastive_rows_carry_the_work_of_their_plan(family, tmp_path, capsys):
    assert cli.main(["bench", family, "--device", "cpu", "--size", "128", "--repeats", "1", "--out",
                     str(tmp_path)]) == 0
    document = json.loads((tmp_path / f"{family}-cpu.json").read_text())
    rows = {row["backend"]: row for row in document["rows"]}
    sizes = {"batch": 128, "features": 64}
    floor = plans.floor_flops(family, **sizes)
    for row in rows.values():
        assert row["flop_floor"] == floor == 8 * 128**2 * 64
        assert row["bytes_moved"] == plans.floor_bytes(family, torch.float32, **sizes)
        assert row["roofline_ms"] is None and row["fraction_of_roofline"] is None  # no roofline on the CPU
    assert rows["pytorch"]["work"] == pytest.approx(0.75)  # S once, two gradient products: it keeps S
    assert rows["blockwise"]["work"] == pytest.approx(
        plans.planned_flops(family, "reference", dtype=torch.float32, device_type="cpu", **sizes) / floor)
    if ops.CONTRASTIVE.unavailable_reason("cpu", CPU) is None:
        assert rows["cpu"]["planned_flops"] == plans.planned_flops(family, "cpu", dtype=torch.float32,
                                                                   device_type="cpu", **sizes)
        assert rows["cpu"]["work"] == pytest.approx(rows["cpu"]["planned_flops"] / floor)
    table = capsys.readouterr().out
    assert "work" in _header(table, "B") and "roof ms" not in table
    pytorch_line = next(line for line in table.splitlines() if line.split()[:2] == ["128", "pytorch"])
    assert "0.75x" in pytorch_line
    assert all(len(line) <= common.TABLE_WIDTH for line in _table_lines(table))


def test_cross_entropy_rows_carry_the_work_of_their_plan(tmp_path, capsys):
    assert cli.main(["bench", "ce", "--device", "cpu", "--quick", "--size", "512", "--repeats", "1",
                     "--backends", "chunked,cpu,liger", "--out", str(tmp_path)]) == 0
    rows = {row["backend"]: row for row in json.loads((tmp_path / "ce-cpu.json").read_text())["rows"]}
    sizes = {"tokens": 256, "vocabulary": 512, "features": 64}
    floor = plans.floor_flops("cross_entropy", **sizes)
    assert floor == 8 * 256 * 512 * 64
    for row in rows.values():
        assert row["flop_floor"] == floor
    assert rows["pytorch"]["work"] == pytest.approx(0.75)
    assert rows["chunked"]["work"] == pytest.approx(
        plans.planned_flops("cross_entropy", "reference", dtype=torch.float32, device_type="cpu", **sizes) / floor)
    assert rows["liger"]["work"] is None and rows["liger"]["ms"] is None  # a peer: unknown, and not run here
    table = capsys.readouterr().out
    assert "work" in _header(table, "N")
    liger_line = next(line for line in table.splitlines() if " liger " in f" {line} ")
    assert " - " in liger_line
    assert all(len(line) <= common.TABLE_WIDTH for line in _table_lines(table))


def test_a_plan_that_cannot_be_counted_is_a_dash_with_a_note(monkeypatch):
    def refuse(*arguments, **sizes):
        raise NotImplementedError("no count yet")

    monkeypatch.setattr(plans, "planned_flops", refuse)
    report = bench_contrastive.run_clip(CPU, elements=64, repeats=1, backend_names=["blockwise"])
    rows = {row.backend: row for row in report.rows}
    assert rows["blockwise"].work is None and rows["blockwise"].ms > 0  # still timed
    assert rows["pytorch"].work == pytest.approx(0.75)
    assert any("work of reference unknown: NotImplementedError: no count yet" in note for note in report.notes)


def test_with_a_gpus_ceilings_rows_get_the_roofline(monkeypatch, tmp_path, capsys):
    """The roofline columns, as on a GPU: the CPU stands in, with the H100's ceilings."""
    monkeypatch.setattr(measurement, "device_ceilings", lambda device, dtype: H100_LIKE)
    assert cli.main(["bench", "clip", "--device", "cpu", "--size", "128", "--repeats", "1", "--backends",
                     "blockwise", "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "clip-cpu.json").read_text())
    assert document["settings"]["ceilings"]["peak_flops"] == 747e12
    assert document["settings"]["peak_flops"] == 747e12
    for row in document["rows"]:
        floor_ms = 1e3 * max(row["flop_floor"] / 747e12, row["bytes_moved"] / 2.95e12)
        assert row["roofline_ms"] == pytest.approx(floor_ms)
        assert row["plan_roofline_ms"] >= row["roofline_ms"] * 0.999
        assert row["fraction_of_roofline"] == pytest.approx(row["roofline_ms"] / row["ms"])
        assert row["fraction_of_peak"] == pytest.approx(row["tflops"] * 1e12 / 747e12)
    table = capsys.readouterr().out
    header = _header(table, "B")
    assert "roof ms" in header and "% roof" in header and "work" in header
    assert any("roof ms = max(floor FLOPs / 747 TFLOP/s, floor bytes / 2950 GB/s)" in line for line in
               table.splitlines())
    assert all(len(line) <= common.TABLE_WIDTH for line in _table_lines(table))


def test_ceilings_are_measured_only_on_a_gpu():
    assert measurement.device_ceilings(CPU, torch.bfloat16) is None
    assert measurement.peak_flops(CPU, torch.float32) is None


def test_the_ceiling_measurement_runs(monkeypatch):
    """The GPU's measurement (matmul and copy), run on the CPU at small sizes so that its code is exercised here."""
    monkeypatch.setattr(measurement, "CEILING_MATMUL_SIZE", 64)
    monkeypatch.setattr(measurement, "CEILING_COPY_BYTES", 2**20)
    monkeypatch.setattr(measurement, "CEILING_REPEATS", 3)
    state = torch.random.get_rng_state()
    ceilings = measurement._measured_ceilings.__wrapped__("cpu", None, torch.float32)
    assert torch.equal(torch.random.get_rng_state(), state)  # the benchmark's random stream is left alone
    assert ceilings.peak_flops > 0 and ceilings.bandwidth_bytes_per_s > 0
    assert ceilings.peak_flops == pytest.approx(2 * 64**3 / (ceilings.matmul_ms * 1e-3))
    assert ceilings.bandwidth_bytes_per_s == pytest.approx(2 * 2**20 / (ceilings.copy_ms * 1e-3))
    assert (ceilings.dtype, ceilings.matmul_size, ceilings.copy_bytes, ceilings.repeats) == ("float32", 64, 2**20, 3)
    assert set(ceilings.as_dict()) >= {"peak_flops", "bandwidth_bytes_per_s", "matmul_ms", "copy_ms"}


def test_tables_stay_within_120_columns_at_gpu_sizes():
    """The widest cells a GPU run makes (B=131072, seconds-long times, GiB, footnoted notes)."""
    wide_notes = ["not installed (pip install cut-cross-entropy)", "out of memory", "3 repeats (time budget 3 s)"]

    def fill(row, index):
        row.ms, row.ms_q1, row.ms_q3, row.tflops = 40110.123, 40000.0, 40200.0, 351.0
        row.work, row.peak_extra_bytes = 1.02, 47 * 2**30
        measurement.set_roofline(row, H100_LIKE)
        row.fraction_of_roofline = row.roofline_ms / row.ms
        row.note = wide_notes[index % len(wide_notes)]
        return row

    clip = common.Report("clip", CPU, rows=[], settings={"ceilings": H100_LIKE.as_dict(), "dtype": "bfloat16",
                                                         "dim": 512})
    clip.rows = [fill(bench_contrastive.ContrastiveRow(
        op="clip_loss", backend=method, dtype="bfloat16", elements=131072, bytes_moved=4 * 131072 * 512 * 2,
        check="skipped", batch=131072, dim=512, flop_floor=8.0 * 131072**2 * 512), index)
        for index, method in enumerate(bench_contrastive.METHODS)]
    ce = common.Report("ce", CPU, rows=[], settings={"ceilings": H100_LIKE.as_dict(), "dtype": "bfloat16"})
    ce.rows = [fill(bench_cross_entropy.CrossEntropyRow(
        op="linear_cross_entropy", backend=method, dtype="bfloat16", elements=128256, bytes_moved=10**9,
        check="skipped", tokens=32768, dim=4096, vocabulary=128256, inputs="trained-like",
        flop_floor=8.0 * 32768 * 4096 * 128256), index) for index, method in enumerate(bench_cross_entropy.METHODS)]
    for text in (bench_contrastive.format_report(clip), bench_cross_entropy.format_report(ce)):
        assert all(len(line) <= common.TABLE_WIDTH for line in _table_lines(text)), text
        assert "[1] " in text  # the long notes as footnotes, in full
        assert "not installed (pip install cut-cross-entropy)" in text


def test_target_sizes_are_the_issues():
    cuda = torch.device("cuda")
    assert bench_contrastive.default_batches("clip", cuda, quick=False, targets=True) == [32768, 131072]
    assert bench_contrastive.default_batches("siglip", CPU, quick=False, targets=True) == [65536]
    assert bench_cross_entropy.default_cases(cuda, quick=False, targets=True) == [(8192, 2048, 128256),
                                                                                (32768, 4096, 128256)]
    assert bench_optim.default_size(cuda, quick=False, targets=True) == (16, 4096 * 4096)
    assert 16 * 4096 * 4096 == targets.TARGET_PARAMS
    assert set(targets.FAMILIES) == set(cli.TARGET_FAMILIES)
    for target in targets.TARGETS:  # every target's sizes are among its family's target sizes
        if target.family in ("clip", "siglip"):
            assert target.match["batch"] in bench_contrastive.TARGET_BATCHES[target.family]
            assert target.match["dim"] == bench_contrastive.TARGET_DIM
        elif target.family == "ce":
            assert (target.match["tokens"], target.match["dim"], target.match["vocabulary"]) in \
                bench_cross_entropy.TARGET_CASES
            assert target.match["inputs"] in bench_cross_entropy.TARGET_INPUT_KINDS


def _row(**fields):
    base = {"check": "passed", "note": "", "ms": None, "peak_extra_bytes": None, "work": None,
            "fraction_of_roofline": None, "out_of_memory": False}
    return {**base, **fields}


def test_target_table_puts_the_measured_values_beside_the_targets(tmp_path):
    clip = {"family": "clip", "environment": {"device": "NVIDIA H100 80GB HBM3", "date_utc": "2026-01-01T00:00:00",
                                              "git_commit": "0123456789abcdef", "torch": "2.11", "triton": "3.6"},
            "rows": [_row(backend="triton", batch=32768, dim=512, dtype="bfloat16", ms=11.5,
                          peak_extra_bytes=int(0.25 * 2**30), work=1.0, fraction_of_roofline=0.8),
                     _row(backend="cuda", batch=32768, dim=512, dtype="bfloat16", ms=14.0,
                          peak_extra_bytes=int(0.2 * 2**30), work=1.0),
                     _row(backend="pytorch", batch=32768, dim=512, dtype="bfloat16", ms=49.8,
                          peak_extra_bytes=12 * 2**30, work=0.75),
                     _row(backend="pytorch", batch=131072, dim=512, dtype="bfloat16", out_of_memory=True,
                          note="out of memory")]}
    documents = {"clip": clip}
    lines = {(line.case, line.method): line for line in targets.lines(documents)}
    first = targets.TARGETS[0].case
    assert lines[first, "triton"].met == "yes" and lines[first, "triton"].ms == 11.5
    assert lines[first, "cuda"].met == "no (time)"
    assert lines[first, "pytorch"].met == "" and lines[first, "pytorch"].peak_gib == pytest.approx(12)
    assert lines[first, "inf-cl"].note == "not in the results (not run at this size)"
    assert lines["CLIP B=131072 D=512", "pytorch"].note == "out of memory"
    assert lines["CLIP B=131072 D=512", "triton"].met == "n/a"
    assert lines["SigLIP B=65536 D=512", "triton"].note == "no siglip results"
    text = targets.format_targets(documents)
    assert "NVIDIA H100 80GB HBM3" in text.splitlines()[1] and "commit 0123456789ab" in text.splitlines()[1]
    assert "torch 2.11, triton 3.6" in text.splitlines()[2]
    assert all(len(line) <= common.TABLE_WIDTH for line in text.splitlines())
    for target in targets.TARGETS:
        assert target.case in text and target.target in text
    paths = targets.write(str(tmp_path), documents, "cuda")
    markdown = (tmp_path / "targets-cuda.md").read_text()
    assert "| CLIP B=32768 D=512 | 12 ms, 0.3 GiB | triton | 11.50 | 0.25 | 1.00x | 80% | yes |" in markdown
    assert "2026-01-01T00:00:00" in markdown and "commit 0123456789ab" in markdown
    saved = json.loads((tmp_path / "targets-cuda.json").read_text())
    assert saved["environment"]["device"] == "NVIDIA H100 80GB HBM3" and len(saved["lines"]) == len(lines)
    assert sorted(paths) == sorted([str(tmp_path / "targets-cuda.md"), str(tmp_path / "targets-cuda.json")])


def test_targets_command_reads_a_results_folder(tmp_path, capsys):
    clip = {"family": "clip", "environment": {"device": "X"},
            "rows": [_row(backend="cuda", batch=131072, dim=512, dtype="bfloat16", ms=150.0,
                          peak_extra_bytes=2**29)]}
    (tmp_path / "clip-cuda.json").write_text(json.dumps(clip))
    assert targets.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    case = next(index for index, line in enumerate(out) if line.startswith("CLIP B=131072"))
    assert out[case].split()[-2:] == ["n/a", "[1]"]  # triton: not in the results
    assert out[case + 1].split()[:4] == ["cuda", "150.00", "0.50", "-"] and out[case + 1].split()[-1] == "yes"
    assert (tmp_path / "targets-cuda.md").exists()
    assert targets.main([str(tmp_path / "empty")]) == 1  # nothing there: says so, fails


def test_bench_targets_prints_the_target_table_last(monkeypatch, tmp_path, capsys):
    """The --targets plumbing on the CPU, at tiny stand-in target sizes."""
    monkeypatch.setitem(bench_contrastive.TARGET_BATCHES, "clip", [64])
    monkeypatch.setattr(bench_contrastive, "TARGET_DIM", 32)
    assert cli.main(["bench", "clip", "--targets", "--device", "cpu", "--repeats", "1", "--backends", "blockwise",
                     "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "clip-cpu.json").read_text())
    assert document["settings"]["targets"] is True and document["settings"]["batches"] == [64]
    assert document["settings"]["dim"] == 32
    assert document["settings"]["time_budget_s"] == cli.TARGET_ROW_BUDGET_S
    out = capsys.readouterr().out
    tail = out[out.index("issue 14 targets"):]
    assert "CLIP B=32768 D=512" in tail and "Collage-plus, 268M params" in tail
    assert (tmp_path / "targets-cpu.md").exists() and (tmp_path / "targets-cpu.json").exists()


def test_time_limit_lists_the_rows_it_leaves_out(tmp_path, capsys):
    # A limit already spent (1 ms) by the time the first row begins: every row is listed, none is run.
    assert cli.main(["bench", "siglip", "ce", "--device", "cpu", "--size", "64", "--repeats", "1",
                     "--time-limit", "0.001", "--out", str(tmp_path)]) == 0
    for family in ("siglip", "ce"):
        rows = json.loads((tmp_path / f"{family}-cpu.json").read_text())["rows"]
        assert rows and all(row["ms"] is None for row in rows)
        assert all("time limit" in row["note"] or "peers" in row["note"] for row in rows)
    with pytest.raises(SystemExit):
        cli.main(["bench", "clip", "--time-limit", "0", "--out", str(tmp_path)])


def test_time_limit_leaves_a_familys_unused_time_to_the_next():
    with common.run_limits(deadline=None):
        assert common.out_of_time_reason() is None
    import time

    with common.run_limits(deadline=time.monotonic() - 1, why="the time limit (test)", row_budget_s=2.0):
        assert common.out_of_time_reason() == "not run: the time limit (test) reached"
        assert common.row_budget_s(15.0) == 2.0
    assert common.out_of_time_reason() is None and common.row_budget_s(15.0) == 15.0
