"""The ``leanops`` command line: ``info`` tells the truth about this machine; ``bench`` checks, times and writes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from leanops import backends, cli, info, ops


def _entries(table) -> dict:
    """{(family, backend, device type): entry} of info's provider table, each key once."""
    entries = {(e["family"], e["backend"], e["device_type"]): e for e in table}
    assert len(entries) == len(table)
    return entries


def test_info_collect_reports_every_provider_of_every_family_and_device_type():
    entries = _entries(info.collect()["backends"])
    families = [family.name for family in ops.FAMILIES]
    assert set(entries) == {(family, backend, device_type) for family in families
                            for backend in backends.BACKENDS for device_type in ("cpu", "cuda")}
    for entry in entries.values():
        assert entry["usable"] == (entry["reason"] is None)
    for family in families:
        assert entries[family, "reference", "cpu"]["usable"]
        assert entries[family, "cpu", "cpu"]["usable"]
        assert not entries[family, "cpu", "cuda"]["usable"]
        if not torch.cuda.is_available():
            for backend in backends.BACKENDS:
                entry = entries[family, backend, "cuda"]
                assert not entry["usable"] and entry["reason"]
            assert "no CUDA device visible" in entries[family, "cuda", "cuda"]["reason"]


def test_info_command_prints_every_provider(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for name in [family.name for family in ops.FAMILIES] + list(backends.BACKENDS):
        assert name in text
    assert f"torch   {torch.__version__}" in text
    if not torch.cuda.is_available():
        assert "no CUDA device visible" in text


def test_info_json_round_trips(capsys):
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["versions"]["torch"] == torch.__version__


def test_info_subprocess_without_triton_interpreter():
    """As a user runs it: a fresh process, and without TRITON_INTERPRET triton is not usable on CPU tensors."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "leanops.cli", "info", "--json"], capture_output=True, text=True,
                            env=environment, timeout=120, check=True)
    entries = _entries(json.loads(result.stdout)["backends"])
    for family in ops.FAMILIES:
        cpu = entries[family.name, "cpu", "cpu"]
        assert cpu["built"] and cpu["usable"]
        assert "TRITON_INTERPRET=1" in entries[family.name, "triton", "cpu"]["reason"]
        if not torch.cuda.is_available():
            assert "no CUDA device visible" in entries[family.name, "cuda", "cuda"]["reason"]


def test_bench_mcf_writes_checked_times(tmp_path, capsys):
    status = cli.main(["bench", "mcf", "--quick", "--device", "cpu", "--out", str(tmp_path), "--repeats", "2",
                       "--size", "65536"])
    assert status == 0
    results = json.loads((tmp_path / "mcf-cpu.json").read_text())
    assert results["environment"]["device_type"] == "cpu"
    assert results["copy_bandwidth_gbps"] > 0
    rows = results["rows"]
    for op in ("two_sum", "grow_"):
        for dtype in ("bfloat16", "float32"):
            by_backend = {row["backend"]: row for row in rows if row["op"] == op and row["dtype"] == dtype}
            assert by_backend["reference"]["check"] == "oracle"
            assert by_backend["cpu"]["check"] == "passed"
            for backend in ("reference", "cpu"):
                assert by_backend[backend]["elements"] == 65536
                assert by_backend[backend]["ms"] > 0 and by_backend[backend]["gbps"] > 0
    triton_rows = [row for row in rows if row["backend"] == "triton"]
    if backends.unavailable_reason("triton", torch.device("cpu")) is None:  # the interpreter (see conftest.py)
        assert all(row["check"] == "passed" and row["ms"] > 0 for row in triton_rows)
    else:
        assert all(row["check"] == "skipped" and row["ms"] is None for row in triton_rows)
    assert all(row["check"] != "failed" for row in rows)
    assert "two_sum" in capsys.readouterr().out  # the table comes last, on stdout


def test_bench_reports_a_mismatch_as_a_failure_not_a_time(tmp_path, monkeypatch, capsys):
    from leanops.benchmarks import bench_mcf

    two_sum = bench_mcf.mcf.two_sum

    def wrong_on_cpu_backend(a, b, *, backend="auto"):
        s, e = two_sum(a, b, backend=backend)
        return (s, e + 1) if backend == "cpu" else (s, e)

    monkeypatch.setattr(bench_mcf.mcf, "two_sum", wrong_on_cpu_backend)
    status = cli.main(["bench", "mcf", "--device", "cpu", "--out", str(tmp_path), "--repeats", "1",
                       "--size", "4096", "--backends", "cpu"])
    assert status == 1
    rows = json.loads((tmp_path / "mcf-cpu.json").read_text())["rows"]
    failed = [row for row in rows if row["check"] == "failed"]
    assert {(row["op"], row["backend"]) for row in failed} == {("two_sum", "cpu")}
    assert all(row["ms"] is None and "differ from the reference" in row["note"] for row in failed)
    assert "FAILED" in capsys.readouterr().err


def test_bench_rejects_unknown_family_and_missing_gpu(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["bench", "no_such_family", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli.main(["bench", "--device", "cuda", "--out", str(tmp_path)])


def test_bench_dtype_csv_peers_and_compare(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    options = ["--device", "cpu", "--repeats", "3", "--size", "4096", "--dtype", "float32"]
    assert cli.main(["bench", "mcf", "--out", str(first)] + options) == 0
    document = json.loads((first / "mcf-cpu.json").read_text())
    assert {row["dtype"] for row in document["rows"]} == {"float32"}  # --dtype: that dtype only
    timed = [row for row in document["rows"] if row["ms"] is not None]
    assert timed and all(row["ms_q1"] <= row["ms"] <= row["ms_q3"] for row in timed)  # median and spread
    csv_lines = (first / "mcf-cpu.csv").read_text().splitlines()
    assert len(csv_lines) == len(document["rows"]) + 1
    assert csv_lines[0].startswith("family,device,device_type,date_utc") and "git_commit" in csv_lines[0]
    capsys.readouterr()
    # --compare runs the old file's family again (no family named) and prints the comparison after the tables.
    assert cli.main(["bench", "--compare", str(first / "mcf-cpu.json"), "--out", str(second)] + options) == 0
    out = capsys.readouterr().out
    assert "mcf: this run" in out and "verdict" in out and "beyond the run-to-run spread" in out
    assert "two_sum reference float32 elements=4096" in out


def test_compare_flags_only_changes_beyond_the_spread():
    from leanops.benchmarks import compare

    def row(ms, q1, q3, backend="cpu"):
        return {"op": "two_sum", "backend": backend, "dtype": "float32", "elements": 10, "bytes_moved": 1,
                "check": "passed", "ms": ms, "ms_q1": q1, "ms_q3": q3, "note": ""}

    old = {"family": "mcf", "rows": [row(10, 9, 11), row(10, 9.5, 10.5, "triton"), row(10, 9, 11, "cuda")]}
    new = {"family": "mcf", "rows": [row(20, 19, 21), row(10.4, 10, 10.8, "triton"), row(5, 4, 6, "reference")]}
    changes, only_old, only_new = compare.compare(old, new)
    verdicts = {change.case.split()[1]: change.verdict for change in changes}
    assert verdicts == {"cpu": "slower", "triton": "within spread"}
    assert changes[0].ratio == 2.0
    assert len(only_old) == 1 and "cuda" in only_old[0] and len(only_new) == 1 and "reference" in only_new[0]


def test_bench_peers_are_rows_not_runs_without_the_flag(tmp_path):
    from leanops.benchmarks import bench_optim, common

    with common.peers_enabled(False):
        report = bench_optim.run(torch.device("cpu"), quick=True, elements=1024, repeats=1,
                                 backend_names=["reference"])
    with common.peers_enabled(True):
        reason = bench_optim.unavailable_reason(bench_optim.Method("optimi-kahan", torch.bfloat16, "optimi-kahan",
                                                                   "compensated"), torch.device("cpu"))
    peers = [row for row in report.rows if row.backend in bench_optim.PEERS]
    assert peers == []  # --backends reference: only the baselines and the references
    assert reason is not None and "--peers" not in reason  # with peers on: installed or not, on a GPU only
    with common.peers_enabled(False):
        assert "--peers" in bench_optim.unavailable_reason(
            bench_optim.Method("optimi-kahan", torch.bfloat16, "optimi-kahan", "compensated"), torch.device("cpu"))


def test_demo_command_runs_through_the_cli(tmp_path, capsys):
    """The quick smoke test of ``leanops demo`` (tests/tools/test_demo.py runs both demos' --quick sizes, slow)."""
    assert cli.main(["demo", "clip", "--quick", "--device", "cpu", "--steps", "2", "--batch-size", "1024",
                     "--out", str(tmp_path), "--no-plot"]) == 0
    assert (tmp_path / "demo-clip-cpu.md").exists() and (tmp_path / "demo-clip-cpu.json").exists()
    document = json.loads((tmp_path / "demo-clip-cpu.json").read_text())
    assert document["environment"]["device_type"] == "cpu"
    assert (document["settings"]["steps"], document["settings"]["batch_size"]) == (2, 1024)
