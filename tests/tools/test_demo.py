"""``leanops demo`` (python/leanops/demo/): both demos run with --quick on the CPU, through the
arguments the CLI's subparser gets from ``demo.add_arguments``, and write what they say with real outcomes: every
configuration learns, plain PyTorch and the chunked cross-entropy start from the same loss, the optimizer state per
parameter is what each optimizer keeps, and the contrastive demo's loss falls at a batch whose plain-PyTorch
logits are reported by the formula. This is the CI smoke test of both commands."""
import argparse
import copy
import json
import math
import sys

import pytest
import torch

from leanops import demo
from leanops.demo import clip as demo_clip


def _parse(argv):
    parser = argparse.ArgumentParser(prog="leanops demo")
    demo.add_arguments(parser)
    return parser.parse_args(argv)


def _run(argv) -> int:
    return demo.run(_parse(argv))


@pytest.fixture(scope="module")
def lm_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-lm")
    assert _run(["lm", "--quick", "--device", "cpu", "--threads", "2", "--out", str(out)]) == 0
    return out, json.loads((out / "demo-lm-cpu.json").read_text())


@pytest.fixture(scope="module")
def clip_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-clip")
    assert _run(["clip", "--quick", "--device", "cpu", "--threads", "2", "--out", str(out)]) == 0
    return out, json.loads((out / "demo-clip-cpu.json").read_text())


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Arguments.

def test_arguments_defaults_and_choices(tmp_path, monkeypatch):
    arguments = _parse([])
    assert arguments.which == "lm" and arguments.device is None and not arguments.quick and arguments.out is None
    assert _parse(["clip", "--quick", "--out", "x"]).which == "clip"
    with pytest.raises(SystemExit):
        _parse(["gpt"])
    with pytest.raises(SystemExit):
        _parse(["lm", "--configs", "no-such-configuration"])
    # Default output directory: benchmarks/results/demo in a checkout, else ./leanops-results.
    monkeypatch.chdir(tmp_path)
    assert demo.default_out_dir() == "leanops-results"
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    assert demo.default_out_dir() == "benchmarks/results/demo"


def test_bad_arguments_are_an_exit_status_not_a_crash(tmp_path, capsys):
    assert _run(["lm", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert _run(["clip", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# leanops demo lm --quick.

@pytest.mark.slow  # the demo's --quick run (a module fixture)
def test_lm_writes_its_reports(lm_quick):
    out, document = lm_quick
    markdown = (out / "demo-lm-cpu.md").read_text()
    environment = document["environment"]
    assert environment["device_type"] == "cpu" and environment["date_utc"] in markdown
    assert environment["device"] in markdown and environment["git_commit"][:7] in markdown
    assert (out / "demo-lm-cpu.png").exists() == _has_matplotlib()
    for name in demo.LM_CONFIGURATION_NAMES:
        assert f"| `{name}` |" in markdown
    assert document["settings"]["size"] == "quick" and document["settings"]["threads"] == 2
    assert document["corpus"]["train_bytes"] > 0 and list(document["corpus"]["roots"]) == ["stdlib"]


@pytest.mark.slow
def test_lm_every_configuration_learns_with_finite_loss(lm_quick):
    _, document = lm_quick
    entries = {entry["name"]: entry for entry in document["configurations"]}
    assert list(entries) == list(demo.LM_CONFIGURATION_NAMES)
    for name, entry in entries.items():
        run = entry["run"]
        assert run["steps"] == document["settings"]["steps"] and not run["diverged"], name
        assert math.isfinite(run["final_validation_loss"]) and math.isfinite(entry["initial_validation_loss"]), name
        assert run["tokens_per_second"] > 0, name
        assert entry["peak_memory_bytes"] is None or entry["peak_memory_bytes"] > 0, name
    for name in ("plain", "leanops-ce"):
        entry = entries[name]
        # Byte-level: an untrained model is near ln(256) nats per byte; training lowers it.
        assert abs(entry["initial_validation_loss"] - math.log(256)) < 0.1
        assert entry["run"]["final_validation_loss"] < entry["initial_validation_loss"] - 0.2, name
        assert entry["run"]["train_curve"][-1][1] < entry["run"]["train_curve"][0][1], name


@pytest.mark.slow
def test_lm_plain_and_chunked_ce_start_from_the_same_loss(lm_quick):
    _, document = lm_quick
    entries = {entry["name"]: entry for entry in document["configurations"]}
    plain, chunked = entries["plain"], entries["leanops-ce"]
    assert plain["loss"] == "logits" and chunked["loss"] == "linear-ce"
    # Same seed, same data: the same initial loss (validation, and the first train batch), and the same training.
    assert abs(plain["initial_validation_loss"] - chunked["initial_validation_loss"]) < 1e-5
    assert abs(plain["run"]["train_curve"][0][1] - chunked["run"]["train_curve"][0][1]) < 1e-5
    assert abs(plain["run"]["final_validation_loss"] - chunked["run"]["final_validation_loss"]) < 1e-3


@pytest.mark.slow
def test_lm_optimizer_bytes_per_parameter(lm_quick):
    _, document = lm_quick
    state = {entry["name"]: entry["state_bytes_per_parameter"] for entry in document["configurations"]}
    parameters = {entry["run"]["parameters"] for entry in document["configurations"]}
    assert len(parameters) == 1  # one model
    # torch AdamW: two fp32 moments (8 B/param) plus a 4-byte step counter per parameter tensor.
    for name in ("plain", "leanops-ce"):
        assert 8.0 <= state[name] < 8.01, name
    assert state["collage"] == pytest.approx(8.0)  # bf16 m, v and two bf16 compensations
    assert state["frugal"] < state["plain"] and state["frugal-collage"] < state["plain"]
    dtypes = {entry["name"]: entry["run"]["parameter_dtype"] for entry in document["configurations"]}
    assert dtypes == {"plain": "float32", "leanops-ce": "float32", "collage": "bfloat16", "frugal": "float32",
                      "frugal-collage": "bfloat16"}


@pytest.mark.slow
def test_lm_loss_head_at_a_large_vocabulary(lm_quick):
    _, document = lm_quick
    head = document["loss_head"]
    assert head["logits_bytes_fp32"] == head["tokens"] * head["vocabulary"] * 4
    rows = {row["loss"]: row for row in head["rows"]}
    if rows["plain"]["peak_bytes"] is not None and rows["leanops"]["peak_bytes"] is not None:
        # Plain PyTorch holds at least the float32 logits; the chunked loss never builds them.
        assert rows["plain"]["peak_bytes"] >= head["logits_bytes_fp32"]
        assert rows["leanops"]["peak_bytes"] < head["logits_bytes_fp32"]


@pytest.mark.slow
def test_lm_report_without_matplotlib_says_so(lm_quick, tmp_path, monkeypatch, capsys):
    _, document = lm_quick
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    document = copy.deepcopy(document)
    assert demo.lm.write_lm_outputs(document, str(tmp_path)) == 0
    assert not (tmp_path / "demo-lm-cpu.png").exists()
    assert "matplotlib is not installed" in (tmp_path / "demo-lm-cpu.md").read_text()
    assert "no PNG" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# leanops demo clip --quick.

@pytest.mark.slow
def test_clip_trains_at_a_batch_plain_pytorch_needs_quadratic_memory_for(clip_quick):
    out, document = clip_quick
    assert (out / "demo-clip-cpu.md").exists()
    assert (out / "demo-clip-cpu.png").exists() == _has_matplotlib()
    batch = document["settings"]["batch_size"]
    assert batch == demo_clip.CLIP_SIZES["quick"]["batch_size"]
    markdown = (out / "demo-clip-cpu.md").read_text()
    assert document["environment"]["date_utc"] in markdown and f"{batch:,}" in markdown
    assert set(document["losses"]) == {"clip", "siglip"}
    for name, result in document["losses"].items():
        losses = result["losses"]
        assert len(losses) == document["settings"]["steps"] and all(map(math.isfinite, losses)), name
        assert losses[-1] < losses[0] - 1.0, name
        assert result["retrieval_after"] > result["retrieval_before"], name
        # The plain-PyTorch memory the report gives at B is the formula: three B x B float32 matrices.
        assert result["plain_logits_bytes"] == 3 * batch * batch * 4 == demo_clip.plain_logits_bytes(batch)
        assert not result["plain_at_batch"]["tried"]  # on the CPU it is computed, never allocated
        if result["peak_bytes"] is not None:
            assert result["peak_bytes"] < result["plain_logits_bytes"], name
    # Plain PyTorch measured at smaller B grows with B; leanops' loss stays far below it.
    for name in ("clip", "siglip"):
        plain = sorted((row["batch"], row["peak_bytes"]) for row in document["scaling"]
                       if row["loss"] == name and row["implementation"] == "plain")
        assert [b for b, _ in plain] == document["settings"]["plain_batches"]
        if all(peak is not None for _, peak in plain):
            assert plain[-1][1] > 2 * plain[0][1]
            largest = plain[-1]
            leanops_peak = next(row["peak_bytes"] for row in document["scaling"] if row["loss"] == name and
                                row["implementation"] == "leanops" and row["batch"] == largest[0])
            assert leanops_peak is None or leanops_peak < largest[1]
