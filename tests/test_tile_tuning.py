"""The launchers' tile tuner (triton_kernels/tile_tuning.py), with an injected timer: it keeps the fastest
candidate per key, times each key once, skips candidates that fail, and falls back to the default off the GPU or
when disabled. (On the GPU it times with CUDA events: the benchmarks exercise that.)"""
import pytest
import torch

pytest.importorskip("triton")

from leanops.triton_kernels import tile_tuning  # noqa: E402

CUDA = torch.device("cuda")


class FakeTimer:
    """Milliseconds per candidate; counts how often each was timed."""

    def __init__(self, milliseconds: dict):
        self.milliseconds = milliseconds
        self.calls = []

    def __call__(self, run):
        candidate = run()
        self.calls.append(candidate)
        return self.milliseconds[candidate]


def _tuner(milliseconds):
    timer = FakeTimer(milliseconds)
    return tile_tuning.TileTuner(measure=timer), timer


def test_picks_the_fastest_and_times_each_key_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    tuner, timer = _tuner({"a": 3.0, "b": 1.0, "c": 2.0})
    assert tuner.choose("key", CUDA, ["a", "b", "c"], lambda tiles: tiles) == "b"
    assert tuner.choose("key", CUDA, ["a", "b", "c"], lambda tiles: tiles) == "b"
    assert timer.calls == ["a", "b", "c"]
    assert tuner.timings["key"] == [("a", 3.0), ("b", 1.0), ("c", 2.0)]
    assert tuner.choose("other", CUDA, ["a", "c"], lambda tiles: tiles) == "c"


def test_failing_candidates_are_skipped_and_all_failing_raises(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    tuner, _ = _tuner({"a": 3.0, "c": 2.0})

    def run(tiles):
        if tiles == "b":
            raise RuntimeError("out of resources: shared memory")
        return tiles

    assert tuner.choose("key", CUDA, ["a", "b", "c"], run) == "c"
    assert tuner.timings["key"][1] == ("b", None)

    def always_fails(tiles):
        raise RuntimeError(f"cannot compile {tiles}")

    with pytest.raises(RuntimeError, match="cannot compile a"):
        tuner.choose("broken", CUDA, ["a", "c"], always_fails)


def test_default_without_timing_off_the_gpu_or_when_disabled(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    tuner, timer = _tuner({"a": 3.0, "b": 1.0})
    assert tuner.choose("key", torch.device("cpu"), ["a", "b"], lambda tiles: tiles) == "a"
    monkeypatch.setenv("LEANOPS_TRITON_AUTOTUNE", "0")
    assert tuner.choose("key", CUDA, ["a", "b"], lambda tiles: tiles) == "a"
    assert timer.calls == []
    with pytest.raises(ValueError, match="'candidates' is empty"):
        tuner.choose("key", CUDA, [], lambda tiles: tiles)


def test_graph_capture_gets_the_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    tuner, timer = _tuner({"a": 3.0, "b": 1.0})
    assert tuner.choose("key", CUDA, ["a", "b"], lambda tiles: tiles) == "a"
    assert timer.calls == []
