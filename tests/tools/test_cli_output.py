"""What ``leanops bench`` shows and where it writes: ``python -m leanops`` is the same command line; results go to a
fresh folder outside the source checkout unless --out names one; progress has a count and the time left; printed
lines fit 120 columns (the details are in the JSON and CSV)."""
import io
import os
import subprocess
import sys
import time

import torch

from leanops import cli
from leanops.benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_python_dash_m_leanops_is_the_command_line():
    result = subprocess.run([sys.executable, "-m", "leanops", "bench", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: leanops bench" in result.stdout and "--out DIR" in result.stdout


def test_default_out_dir_is_fresh_and_outside_the_source_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    now = time.mktime((2026, 3, 4, 5, 6, 7, 0, 0, -1))
    # Outside a checkout: a new folder in the current one.
    outside = tmp_path / "work"
    outside.mkdir()
    first = cli.default_out_dir(now, cwd=str(outside))
    assert first == str(outside / "leanops-results-20260304-050607")
    os.makedirs(first)
    assert cli.default_out_dir(now, cwd=str(outside)) == first + "-2"  # never an existing folder
    # Inside the checkout (its root or any folder below): the user's cache folder, never benchmarks/results.
    assert cli.source_tree_root(os.path.join(ROOT, "benchmarks", "results")) == os.path.realpath(ROOT)
    for where in (ROOT, os.path.join(ROOT, "benchmarks")):
        chosen = cli.default_out_dir(now, cwd=where)
        assert chosen == str(tmp_path / "cache" / "leanops" / "leanops-results-20260304-050607"), chosen
        assert not os.path.realpath(chosen).startswith(os.path.realpath(ROOT) + os.sep)


def test_bench_in_the_checkout_leaves_benchmarks_results_alone(tmp_path, monkeypatch, capsys):
    """Run in the checkout without --out: nothing under benchmarks/results changes; the results folder is named."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    results = os.path.join(ROOT, "benchmarks", "results")
    before = {name: os.stat(os.path.join(results, name)).st_mtime_ns for name in os.listdir(results)}
    assert cli.main(["bench", "mcf", "--quick", "--device", "cpu", "--repeats", "1", "--size", "4096",
                     "--backends", "cpu"]) == 0
    after = {name: os.stat(os.path.join(results, name)).st_mtime_ns for name in os.listdir(results)}
    assert after == before
    written = list((tmp_path / "cache" / "leanops").glob("leanops-results-*/mcf-cpu.json"))
    assert len(written) == 1, written
    assert f"results in {written[0].parent}" in capsys.readouterr().err


def test_bench_progress_and_table_width(tmp_path, capsys):
    """Progress lines (stderr, not a terminal: one per row) carry [done/total], the family and the time left; the
    printed tables, notes and footnotes fit 120 columns."""
    assert cli.main(["bench", "mcf", "scaling", "--quick", "--device", "cpu", "--repeats", "1", "--size", "4096",
                     "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("leanops bench: running [")]
    assert progress, captured.err
    assert any("[1/" in line and "mcf" in line and "(family 1/2)" in line and "left" in line for line in progress), \
        progress
    last = [line for line in progress if "mcf" in line][-1]
    done, total = last.split("[", 1)[1].split("]", 1)[0].split("/")
    assert done == total, last  # the count reaches the family's row count
    widest = max(captured.out.splitlines(), key=len)
    assert len(widest) <= common.TABLE_WIDTH, widest
    assert (tmp_path / "mcf-cpu.json").exists() and (tmp_path / "scaling-cpu.csv").exists()


def test_progress_line_format():
    stream = io.StringIO()
    progress = common.Progress(stream)
    progress.begin("clip", 2, 6)
    report = common.Report("clip", torch.device("cpu"), rows=[])
    progress.expect(report, 4)
    progress.start -= 30  # 30 s into the family
    report.rows.append(common.Row(op="clip", backend="pytorch", dtype="float32", elements=32768, bytes_moved=0,
                                  check="passed"))
    progress.tick()
    progress.end()
    line = stream.getvalue().strip()
    assert line.startswith("leanops bench: running [1/4] clip pytorch float32 n=32768 (family 2/6) 30 s"), line
    assert line.endswith("~2 min left in clip"), line  # 30 s a row, 3 rows to go


def test_fit_width_wraps_long_lines_only():
    table = "op   ms\n--   --\nx    1.0"
    note = "note: " + " ".join(["word"] * 60)
    text = common.fit_width(table + "\n" + note, width=50)
    lines = text.splitlines()
    assert lines[:3] == table.splitlines()
    assert all(len(line) <= 50 for line in lines)
    assert all(line.startswith("      ") for line in lines[4:])  # continuation under the note's text
