"""``leanops bench ce`` on the CPU: checked rows, JSON, table, plots; peers that cannot run, failures and
out-of-memory become rows, never times, drops or crashes."""
import importlib.util
import json
import math

import pytest
import torch

from leanops import cli, ops
from leanops.benchmarks import bench_cross_entropy, common

CPU = torch.device("cpu")
CHECK_VOCABULARY = bench_cross_entropy.CHECK_SHAPE["cpu"][2]


def _usable_kernels() -> list[str]:
    return [method for method in ("cpu",) if ops.CROSS_ENTROPY.unavailable_reason(method, CPU) is None]


@pytest.mark.slow  # every method with the peers; the failure-row tests below run the benchmark quickly
def test_bench_writes_checked_times_table_and_plots(tmp_path, capsys):
    status = cli.main(["bench", "ce", "--peers", "--device", "cpu", "--quick", "--size", "2048", "--repeats", "2",
                       "--out", str(tmp_path)])
    assert status == 0
    results = json.loads((tmp_path / "ce-cpu.json").read_text())
    assert results["family"] == "ce" and results["environment"]["device_type"] == "cpu"
    settings = results["settings"]
    assert settings["cases"] == [[256, 64, 2048]] and settings["dtype"] == "float32"
    assert settings["input_kinds"] == ["trained-like"]
    rows = {row["backend"]: row for row in results["rows"]}
    assert list(rows) == bench_cross_entropy.candidate_methods(CPU)
    timed = ["pytorch", "chunked"] + _usable_kernels()
    for method in timed:
        row = rows[method]
        assert row["check"] == "passed", row
        assert (row["tokens"], row["dim"], row["vocabulary"], row["elements"]) == (256, 64, 2048, 2048)
        assert row["inputs"] == "trained-like" and 2.0 < row["input_loss"] < 3.0
        assert row["ms"] > 0 and row["tflops"] > 0 and row["repeats"] >= 1
        assert row["flop_floor"] == 8 * 256 * 64 * 2048 and row["logits_bytes"] == 4 * 256 * 2048
        assert row["fraction_of_peak"] is None  # no measured CPU ceiling
        for name in bench_cross_entropy.CHECKED:
            assert row[f"{name}_error"] <= row[f"{name}_tolerance"], (method, name)
        assert row["peak_extra_bytes"] is None or row["peak_extra_bytes"] >= 0
    for peer in bench_cross_entropy.PEERS:  # listed, never dropped; on the CPU they cannot run even if installed
        row = rows[peer]
        assert row["check"] == "skipped" and row["ms"] is None and row["note"]
        if importlib.util.find_spec(bench_cross_entropy.PEERS[peer][0].split(".")[0]) is None:
            assert row["note"].startswith("not installed (pip install ")
    table = capsys.readouterr().out
    for method in timed + list(bench_cross_entropy.PEERS):
        assert method in table
    assert "not installed" in table or "CUDA tensors only" in table
    if importlib.util.find_spec("matplotlib") is not None:
        for suffix in ("memory", "time"):
            if suffix == "memory" and rows["pytorch"]["peak_extra_bytes"] in (None, 0):
                continue  # nothing positive to plot on a log axis
            assert (tmp_path / f"ce-cpu-{suffix}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert any("plots skipped" in note for note in results["notes"])


@pytest.mark.slow  # a second run of the whole benchmark
def test_input_kinds_are_selectable_and_recorded(tmp_path):
    status = cli.main(["bench", "ce", "--device", "cpu", "--quick", "--size", "1024", "--repeats", "1",
                       "--backends", "cpu", "--inputs", "trained-like,random", "--out", str(tmp_path)])
    assert status == 0
    results = json.loads((tmp_path / "ce-cpu.json").read_text())
    assert results["settings"]["input_kinds"] == ["trained-like", "random"]
    plain = {row["inputs"]: row for row in results["rows"] if row["backend"] == "pytorch"}
    assert 2.0 < plain["trained-like"]["input_loss"] < 3.0
    assert abs(plain["random"]["input_loss"] - math.log(1024)) < 0.3
    assert all(row["check"] == "passed" for row in plain.values())


def test_unknown_names_and_misplaced_inputs_option_are_refused(tmp_path):
    with pytest.raises(SystemExit):  # --inputs is ce's alone
        cli.main(["bench", "mcf", "--device", "cpu", "--inputs", "random", "--out", str(tmp_path)])
    for options, message in (({"input_kinds": ["adversarial"]}, "unknown input kind"),
                             ({"backend_names": ["fastest"]}, "unknown method")):
        with pytest.raises(ValueError, match=message):
            bench_cross_entropy.run(CPU, elements=64, repeats=1, **options)


def _patch_method(monkeypatch, method: str, replacement):
    """Make `method` compute `replacement(original function)`."""
    original = bench_cross_entropy.method_function

    def patched(name):
        return replacement(original(name)) if name == method else original(name)

    monkeypatch.setattr(bench_cross_entropy, "method_function", patched)


def test_wrong_gradients_are_a_failure_row_without_time(monkeypatch):
    def wrong_gradient(function):
        # The same loss value; the gradient of hidden shifted by 0.01 everywhere.
        return lambda hidden, weight, targets: (function(hidden, weight, targets)
                                                + 0.01 * (hidden.sum() - hidden.sum().detach()))

    _patch_method(monkeypatch, "chunked", wrong_gradient)
    report = bench_cross_entropy.run(CPU, quick=True, elements=1024, repeats=1, backend_names=["chunked"])
    rows = {row.backend: row for row in report.rows}
    assert set(rows) == {"pytorch", "chunked"}
    failed = rows["chunked"]
    assert failed.check == "failed" and failed.ms is None and failed.tflops is None
    assert "grad hidden relative error" in failed.note and "loss relative" not in failed.note
    assert failed.grad_hidden_error > failed.grad_hidden_tolerance
    assert failed.loss_error <= failed.loss_tolerance
    assert rows["pytorch"].check == "passed" and rows["pytorch"].ms > 0


def test_crashing_method_is_a_failure_row(monkeypatch):
    def crash(function):
        def crashing(hidden, weight, targets):
            raise RuntimeError("kernel exploded")
        return crashing

    _patch_method(monkeypatch, "chunked", crash)
    report = bench_cross_entropy.run(CPU, quick=True, elements=1024, repeats=1, backend_names=["chunked"])
    (row,) = [row for row in report.rows if row.backend == "chunked"]
    assert row.check == "failed" and row.ms is None and "kernel exploded" in row.note


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                "68719476736 bytes")])
def test_out_of_memory_is_a_row_not_a_crash(monkeypatch, tmp_path, error):
    def runs_out_above_the_check_size(function):
        def loss(hidden, weight, targets):
            if weight.shape[0] > CHECK_VOCABULARY:
                raise error
            return function(hidden, weight, targets)
        return loss

    _patch_method(monkeypatch, "pytorch", runs_out_above_the_check_size)
    report = bench_cross_entropy.run(CPU, quick=True, elements=2 * CHECK_VOCABULARY, repeats=1,
                                     backend_names=["cpu"])
    rows = {row.backend: row for row in report.rows}
    assert rows["pytorch"].out_of_memory and rows["pytorch"].note == "out of memory"
    assert rows["pytorch"].check == "passed" and rows["pytorch"].ms is None  # checked at the small size
    for method in _usable_kernels():
        assert rows[method].check == "passed" and rows[method].ms > 0
    common.write_results(str(tmp_path), report)  # the row serialises like any other
    assert json.loads((tmp_path / "ce-cpu.json").read_text())["rows"][0]["out_of_memory"] is True


def test_default_sizes_follow_the_brief():
    cuda = torch.device("cuda")
    cases = bench_cross_entropy.default_cases(cuda, quick=False)
    for target in ((8192, 2048, 128256), (8192, 2304, 256000), (32768, 4096, 128256)):
        assert target in cases
    assert [v for n, d, v in cases if (n, d) == (8192, 2048)] == [32768, 65536, 128256, 256000]
    assert len(set(cases)) == len(cases)
    assert bench_cross_entropy.default_cases(cuda, quick=True) == [(4096, 2048, 32768), (8192, 2048, 128256)]
    assert bench_cross_entropy.default_cases(CPU, quick=False) == [(512, 64, v) for v in (8192, 32768, 50257)]
    assert bench_cross_entropy.default_cases(CPU, quick=False, full=True) == [
        (512, 64, v) for v in (8192, 32768, 50257, 128256)]
    assert bench_cross_entropy.default_cases(CPU, quick=True) == [(256, 64, 4096), (256, 64, 16384)]
    assert bench_cross_entropy.default_dtype(cuda) == torch.bfloat16
    assert bench_cross_entropy.default_dtype(CPU) == torch.float32
    assert bench_cross_entropy.default_input_kinds(cuda) == ("trained-like", "random")
    assert bench_cross_entropy.default_input_kinds(CPU) == ("trained-like",)
    assert "ce" in cli.BENCHMARK_FAMILIES


def test_trained_like_inputs_have_a_trained_loss_at_any_vocabulary():
    torch.manual_seed(0)
    for vocabulary in (512, 8192):
        hidden, weight, targets = bench_cross_entropy.make_inputs("trained-like", 1024, 64, vocabulary,
                                                                   torch.float32, CPU)
        assert hidden.requires_grad and weight.requires_grad and targets.dtype == torch.int64
        # The margin is calibrated on the first 256 tokens; the other 768 follow.
        assert 2.0 < bench_cross_entropy.input_loss(hidden[256:], weight, targets[256:]) < 3.0
        hidden, weight, targets = bench_cross_entropy.make_inputs("random", 1024, 64, vocabulary, torch.float32, CPU)
        assert abs(bench_cross_entropy.input_loss(hidden, weight, targets) - math.log(vocabulary)) < 0.3
