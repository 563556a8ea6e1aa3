"""benchmarks/train_lm/ on the CPU: the corpus is deterministic with disjoint splits, batches depend on the seed
only, a tiny model learns with AdamW and with FRUGAL (state bytes as counted by hand), and the aggregation, findings
and markdown report give the expected rows from made-up results; the command line writes and resumes its JSON."""
import dataclasses
import itertools
import json
import math
import os
import sysconfig

import pytest
import torch

from leanops.benchmarks import train_lm

TINY = train_lm.ModelConfig(d_model=32, layers=1, heads=2, mlp_hidden=64, context=32)


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _write_tree(root, files: dict[str, bytes]) -> None:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


@pytest.fixture
def fake_roots(tmp_path):
    """Two roots of made-up .py files (plus files the loader must leave out)."""
    standard = {f"pkg{i % 3}/module_{i}.py": f"# file {i}\nvalue_{i} = {i}\n".encode() * (1 + i % 4)
                for i in range(60)}
    standard["site-packages/installed.py"] = b"# belongs to purelib, not stdlib\n"
    standard["pkg0/__pycache__/cached.py"] = b"# never read\n"
    standard["pkg0/notes.txt"] = b"not python\n"
    standard["pkg1/huge.py"] = b"#" * (train_lm.MAX_FILE_BYTES + 1)
    packages = {f"lib{i}/core.py": f"def f{i}():\n    return {i}\n".encode() for i in range(20)}
    _write_tree(tmp_path / "stdlib", standard)
    _write_tree(tmp_path / "purelib", packages)
    return {"stdlib": str(tmp_path / "stdlib"), "purelib": str(tmp_path / "purelib")}


@pytest.fixture(scope="module")
def stdlib_corpus():
    """A small real corpus: 400 kB of the standard library's .py files."""
    return train_lm.load_corpus(400_000, roots={"stdlib": sysconfig.get_paths()["stdlib"]})


# ---------------------------------------------------------------------------------------------------------------
# Corpus.

def test_corpus_deterministic_disjoint_and_as_listed(fake_roots):
    first = train_lm.load_corpus(10**6, roots=fake_roots, validation_every=4)
    second = train_lm.load_corpus(10**6, roots=fake_roots, validation_every=4)
    assert torch.equal(first.train, second.train) and torch.equal(first.validation, second.validation)
    assert first.train_files == second.train_files and first.digest == second.digest
    assert set(first.train_files).isdisjoint(first.validation_files)
    expected = {f"stdlib/pkg{i % 3}/module_{i}.py" for i in range(60)} | {f"purelib/lib{i}/core.py" for i in range(20)}
    assert set(first.train_files) | set(first.validation_files) == expected  # no site-packages, cache, txt, huge
    assert first.validation_files and len(first.validation_files) < len(first.train_files)
    assert first.train_files == sorted(first.train_files)
    # The streams are the files' bytes in key order, each followed by the separator.
    stdlib, purelib = fake_roots["stdlib"], fake_roots["purelib"]

    def content(key):
        label, relative = key.split("/", 1)
        with open(os.path.join(stdlib if label == "stdlib" else purelib, relative), "rb") as file:
            return file.read()

    joined = b"".join(content(key) + train_lm.FILE_SEPARATOR for key in first.validation_files)
    assert bytes(first.validation.tolist()) == joined
    # A file's split depends on its key only: the same files are validation without the other root.
    alone = train_lm.load_corpus(10**6, roots={"stdlib": stdlib}, validation_every=4)
    assert alone.validation_files == [key for key in first.validation_files if key.startswith("stdlib/")]


def test_corpus_byte_cap(fake_roots):
    full = train_lm.load_corpus(10**6, roots=fake_roots, validation_every=4)
    total = full.train.numel() + full.validation.numel() - len(full.train_files) - len(full.validation_files)
    capped = train_lm.load_corpus(total // 2, roots=fake_roots, validation_every=4)
    capped_total = (capped.train.numel() + capped.validation.numel() - len(capped.train_files)
                    - len(capped.validation_files))
    assert 0 < capped_total <= total // 2
    assert set(capped.train_files) <= set(full.train_files)
    assert set(capped.validation_files) <= set(full.validation_files)
    with pytest.raises(ValueError, match="'byte_cap'"):
        train_lm.load_corpus(0, roots=fake_roots)
    with pytest.raises(ValueError, match="no .py files"):
        train_lm.load_corpus(1000, roots={"stdlib": os.path.join(fake_roots["stdlib"], "missing")})


def test_real_corpus_loads_deterministically(stdlib_corpus):
    again = train_lm.load_corpus(400_000, roots={"stdlib": sysconfig.get_paths()["stdlib"]})
    assert again.digest == stdlib_corpus.digest and again.train_files == stdlib_corpus.train_files
    assert set(stdlib_corpus.train_files).isdisjoint(stdlib_corpus.validation_files)
    assert not any("site-packages" in key for key in stdlib_corpus.train_files)
    assert 300_000 < stdlib_corpus.train.numel() + stdlib_corpus.validation.numel() <= 400_000 + 2 * len(
        stdlib_corpus.train_files + stdlib_corpus.validation_files)
    assert stdlib_corpus.validation.numel() > 0


def test_batches_depend_on_the_seed_only(stdlib_corpus):
    def batch(seed):
        return stdlib_corpus.train_batch(torch.Generator().manual_seed(seed), 4, 16)

    assert batch(3).shape == (4, 17) and batch(3).dtype == torch.int64
    assert torch.equal(batch(3), batch(3)) and not torch.equal(batch(3), batch(4))
    assert int(batch(3).max()) < 256
    windows = stdlib_corpus.validation_windows(8, 16)
    assert windows.shape == (8, 17) and torch.equal(windows, stdlib_corpus.validation_windows(8, 16))
    assert torch.equal(windows[0], stdlib_corpus.validation[:17].long())  # the first window starts at 0
    with pytest.raises(ValueError, match="'validation_windows'"):
        stdlib_corpus.validation_windows(0, 16)


# ---------------------------------------------------------------------------------------------------------------
# Model, schedule, methods.

def test_lr_multiplier():
    values = [train_lm.lr_multiplier(step, 100, 0.1, 0.1) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[99] == pytest.approx(0.1)
    # After the warm-up (steps 0-9), cosine over steps 10..99: progress (54 - 10) / 89 at step 54.
    assert values[54] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    assert all(a >= b for a, b in itertools.pairwise(values[9:]))


def test_model_size_and_frugal_groups():
    model = train_lm.LlamaModel(train_lm.MODEL_SIZES["small"])
    assert sum(p.numel() for p in model.parameters()) == 10_818_432  # the issue's ~10M
    split_shapes = train_lm._split_shapes(model)
    assert len(split_shapes) == 6 * 7 and (256, 384) not in split_shapes  # every block Linear, not lm_head
    with pytest.raises(ValueError, match="'d_model'"):
        train_lm.LlamaModel(train_lm.ModelConfig(d_model=30, layers=1, heads=4, mlp_hidden=8, context=8))


def test_matched_svd_density_is_the_largest_within_the_columns_state():
    model = train_lm.LlamaModel(train_lm.MODEL_SIZES["small"])
    density = train_lm.matched_svd_density(model, train_lm.METHODS["frugal-columns"])
    shapes = train_lm._split_shapes(model)
    columns = train_lm.frugal_split_state_bytes(shapes, projection="columns", density=0.25)
    # At least the fp32 moments and int32 indices of a quarter of each matrix's columns.
    assert columns >= sum(2 * rows * round(0.25 * cols) * 4 + round(0.25 * cols) * 4 for rows, cols in shapes)

    def svd(value):
        return train_lm.frugal_split_state_bytes(shapes, projection="svd", state_free="none", density=value)

    assert svd(density) <= columns < svd(density + 0.001)
    assert svd(0.25) > columns  # the projector: at the same rho the low-rank baseline keeps more
    assert 0.15 < density < 0.25
    with pytest.raises(ValueError, match="'target'"):
        train_lm.matched_svd_density(model, train_lm.METHODS["frugal-blockwise"])


def _tiny_config(method, steps=24, **options):
    return train_lm.TrainConfig(method=method, seed=0, steps=steps, model=TINY, batch_tokens=256,
                                validation_windows=8, optimizer=train_lm.OptimizerSettings(lr=3e-3, update_gap=5),
                                **options)


@pytest.fixture(scope="module")
def tiny_runs(stdlib_corpus):
    torch.set_num_threads(1)
    return {method: train_lm.train(_tiny_config(method), stdlib_corpus) for method in ("adamw", "frugal-columns")}


@pytest.mark.parametrize("method", ["adamw", "frugal-columns"])
def test_tiny_model_learns(tiny_runs, method):
    result = tiny_runs[method]
    losses = [loss for _, loss in result.train_curve]
    assert len(result.train_curve) == 24 and result.train_curve[-1][0] == 24
    assert losses[0] == pytest.approx(math.log(256), abs=0.15)  # small random logits: ~uniform over bytes
    assert sum(losses[-4:]) / 4 < losses[0] - 0.8
    assert [step for step, _ in result.validation_curve] == list(range(2, 25, 2))
    assert result.final_validation_loss == result.validation_curve[-1][1] < math.log(256) - 0.5
    assert not result.diverged and result.tokens_per_second > 0 and result.peak_memory_bytes is None
    assert result.loss_backend in ("cpu", "reference") and result.parameter_dtype == "float32"


def test_state_bytes_counted_and_same_start(tiny_runs):
    model = train_lm.LlamaModel(TINY)
    tensors = list(model.parameters())
    elements = sum(p.numel() for p in tensors)
    # torch AdamW: two fp32 moments and a 4-byte step tensor per parameter tensor.
    assert tiny_runs["adamw"].state_bytes == 8 * elements + 4 * len(tensors)
    # FRUGAL columns: the moments and int32 indices of a quarter of each split matrix's columns, AdamW elsewhere.
    shapes = train_lm._split_shapes(model)
    split_elements = sum(rows * cols for rows, cols in shapes)
    frugal_split = train_lm.frugal_split_state_bytes(shapes, projection="columns", density=0.25)
    assert tiny_runs["frugal-columns"].state_bytes == frugal_split + 8 * (elements - split_elements)
    # Same initialization and first batch for every method of a seed: the same first loss, bit for bit.
    assert tiny_runs["adamw"].train_curve[0] == tiny_runs["frugal-columns"].train_curve[0]
    # (Adam's first step is lr * g / (|g| + eps), signSGD's to rounding: the methods part later.)
    assert tiny_runs["adamw"].train_curve[-1] != tiny_runs["frugal-columns"].train_curve[-1]


def test_bf16_methods_and_bad_arguments(stdlib_corpus):
    result = train_lm.train(_tiny_config("collage-plus", steps=3), stdlib_corpus)
    assert result.parameter_dtype == "bfloat16" and result.parameter_bytes == 2 * result.parameters
    assert result.state_bytes == 8 * result.parameters  # theta_lo, m, v, v_lo: four bf16 tensors
    # The GPU's mixed precision (fp32 parameters, bf16 autocast and loss) and the plain-PyTorch loss run here too.
    mixed = train_lm.train(_tiny_config("adamw", steps=2, mixed_precision=True, loss="logits"), stdlib_corpus)
    assert mixed.mixed_precision and mixed.loss_backend == "torch" and mixed.final_validation_loss < 6
    with pytest.raises(ValueError, match="'batch_tokens'"):
        train_lm.train(dataclasses.replace(_tiny_config("adamw"), batch_tokens=100), stdlib_corpus)
    with pytest.raises(ValueError, match="'method'"):
        train_lm.train(_tiny_config("adam"), stdlib_corpus)


# ---------------------------------------------------------------------------------------------------------------
# Aggregation and report, from made-up results.

def _fake(method, seed, loss, *, steps=100, state=800, parameters=100, dtype="float32"):
    return train_lm.RunResult(
        method=method, seed=seed, steps=steps, batch_tokens=64, parameter_dtype=dtype, parameters=parameters,
        parameter_bytes=(4 if dtype == "float32" else 2) * parameters, final_validation_loss=loss,
        final_train_loss=loss, validation_curve=[] if loss is None else [(steps, loss)],
        train_curve=[(steps, 3.0)], state_bytes=state, final_state_bytes=state, tokens_per_second=1000.0 + seed,
        peak_memory_bytes=None, seconds=1.0, diverged=loss is None, optimizer_options={"density": 0.194},
        loss_backend="cpu", mixed_precision=False)


FAKE_RUNS = [
    _fake("adamw", 0, 2.0), _fake("adamw", 1, 2.2),
    _fake("frugal-columns", 0, 2.2, state=200), _fake("frugal-columns", 1, 2.4, state=200),
    _fake("lowrank-svd", 0, 2.6, state=190), _fake("lowrank-svd", 1, 2.6, state=190),
    _fake("signsgd", 0, None, state=16), _fake("signsgd", 1, 2.9, state=16),
    _fake("adamw-bf16", 0, 2.1, state=400, dtype="bfloat16"), _fake("adamw-bf16", 1, 2.2, state=400, dtype="bfloat16"),
    _fake("collage-plus", 0, 2.0, state=800, dtype="bfloat16"),
    _fake("collage-plus", 1, 2.1, state=800, dtype="bfloat16"),
    _fake("adamw", 0, 1.5, steps=300), _fake("adamw", 1, 1.5, steps=300),
    _fake("frugal-columns", 1, 1.56, steps=300, state=200), _fake("frugal-columns", 0, 1.56, steps=300, state=200),
]


def test_aggregate_rows():
    summaries = {(s.steps, s.method): s for s in train_lm.aggregate(FAKE_RUNS)}
    assert [key for key in summaries][:2] == [(100, "adamw"), (100, "frugal-columns")]
    columns = summaries[(100, "frugal-columns")]
    assert columns.seeds == [0, 1] and columns.losses == [2.2, 2.4]
    assert columns.mean == pytest.approx(2.3) and columns.spread == pytest.approx(0.2)
    assert columns.std == pytest.approx(math.sqrt(0.02))
    assert columns.relative_pct == pytest.approx(100 * (2.3 / 2.1 - 1))
    assert columns.state_pct == pytest.approx(25.0) and columns.bytes_per_parameter == pytest.approx(6.0)
    assert columns.tokens_per_second == pytest.approx(1000.5)
    assert summaries[(100, "adamw")].relative_pct == 0 and summaries[(100, "adamw")].state_pct == 100
    signsgd = summaries[(100, "signsgd")]
    assert signsgd.diverged == 1 and signsgd.mean is None and signsgd.relative_pct is None
    assert signsgd.state_pct == pytest.approx(2.0)
    assert summaries[(100, "collage-plus")].bytes_per_parameter == pytest.approx(10.0)
    later = summaries[(300, "frugal-columns")]
    assert later.seeds == [0, 1] and later.relative_pct == pytest.approx(4.0) and later.spread == 0


def test_findings_from_the_numbers():
    lines = train_lm.findings(train_lm.aggregate(FAKE_RUNS))
    assert ("Low-rank baseline at equal memory: frugal-columns beats lowrank-svd at 100 steps: 2.3000 vs 2.6000 "
            "(-11.5%; seed noise 0.2000); state 25% vs 24% of AdamW's.") in lines
    assert ("Gap to AdamW, frugal-columns: +9.5% at 100 steps, +4.0% at 300 steps: -5.5 points from 100 to 300 "
            "steps (closer to AdamW).") in lines
    assert ("Collage: collage-plus ties with adamw-bf16 at 100 steps: 2.0500 vs 2.1500 (-4.7%; seed noise "
            "0.1000); collage-plus is lower in 2 of 2 seeds.") in lines
    assert not any("authors" in line for line in lines)
    issue = train_lm.findings(train_lm.aggregate(FAKE_RUNS), authors_budget=300)
    assert issue[:-1] == lines
    assert issue[-1] == ("Against the authors' code (issue: 1000 steps × 32k tokens): frugal-columns +4.0% at 300 "
                         "steps vs +6% (as good or within seed noise; noise 0.0%); state 25% vs 26% of AdamW's.")


def test_markdown_report(tmp_path):
    settings = {"device_type": "cpu", "size": "tiny", "model": dataclasses.asdict(TINY), "batch_tokens": 64,
                "budgets": [100, 300], "seeds": [0, 1], "lr": 1e-3, "warmup_fraction": 0.1, "min_lr_ratio": 0.1,
                "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0, "update_gap": 10,
                "validation_windows": 8, "mixed_precision": False, "loss": "linear-ce"}
    corpus = {"roots": {"stdlib": "/x"}, "byte_cap": 1000, "train_bytes": 6400, "validation_bytes": 100,
              "train_files": 3, "validation_files": 1, "sha256": "abc"}
    environment = {"device": "Some CPU (2 cores)", "device_type": "cpu", "date_utc": "2026-01-01T00:00:00+00:00",
                   "git_commit": "0123456789abcdef", "git_uncommitted_changes": False, "torch": "2.x",
                   "python": "3.11"}
    document = train_lm.results_document("python -m benchmarks.train_lm --x", environment, settings, corpus,
                                         FAKE_RUNS)
    text = train_lm.format_markdown(json.loads(json.dumps(document)))  # as read back from the JSON
    assert "**CPU smoke-scale run (not the issue's scale)** on Some CPU (2 cores), 2026-01-01T00:00:00+00:00, " \
           "commit 0123456" in text
    assert ("| frugal-columns | float32 | 2.3000 | 0.2000 | 2.2000, 2.4000 | +9.5% | 200 B | 25.0% | 6.00 | "
            "1,000 |") in text
    assert "| signsgd | float32 | diverged (1/2) |  | diverged, 2.9000 |" in text
    assert "## 100 steps (6,400 tokens)" in text and "## 300 steps (19,200 tokens)" in text
    assert "1, 3 epochs" in text
    assert "FRUGAL splits the 7 Linear weights of the blocks (38.3% of the parameters)" in text
    assert "density 0.194" in text
    assert "## Owed: the issue's GPU table" in text and train_lm.GPU_COMMAND in text
    assert "- Gap to AdamW, frugal-columns: +9.5% at 100 steps" in text
    assert train_lm.write_loss_plot(json.loads(json.dumps(document)), str(tmp_path / "curves.png")) in (
        None, "matplotlib is not installed")


# ---------------------------------------------------------------------------------------------------------------
# The command line.

def test_command_line_writes_and_resumes(tmp_path, capsys):
    arguments = ["--device", "cpu", "--size", "tiny", "--budgets", "2", "--seeds", "0", "--methods", "adamw",
                 "signsgd", "--batch-tokens", "128", "--corpus-bytes", "300000", "--validation-windows", "2",
                 "--out", str(tmp_path)]
    assert train_lm.main(arguments) == 0
    document = json.loads((tmp_path / "frugal.json").read_text())
    assert [(run["method"], run["seed"], run["steps"]) for run in document["runs"]] == [("adamw", 0, 2),
                                                                                         ("signsgd", 0, 2)]
    assert document["settings"]["update_gap"] == 10 and document["corpus"]["byte_cap"] == 300000
    assert "| signsgd | float32 |" in (tmp_path / "frugal.md").read_text()
    capsys.readouterr()
    assert train_lm.main(arguments + ["--seeds", "0", "1", "--methods", "adamw"]) == 0
    assert "1 runs to do (2 already in" in capsys.readouterr().err
    runs = json.loads((tmp_path / "frugal.json").read_text())["runs"]
    assert sorted((run["method"], run["seed"]) for run in runs) == [("adamw", 0), ("adamw", 1), ("signsgd", 0)]
    with pytest.raises(SystemExit):
        train_lm.main(["--device", "cpu", "--methods", "nope"])
    assert "--methods: unknown method(s) nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_lm.main(["--device", "cpu", "--size", "tiny", "--batch-tokens", "100"])
    assert "--batch-tokens (100) must be a multiple of the context (64)" in capsys.readouterr().err


def test_command_line_records_a_failing_method(tmp_path, monkeypatch):
    real_train = train_lm.train

    def train(config, corpus, **options):
        if config.method == "signsgd":
            raise RuntimeError("made-up failure")
        return real_train(config, corpus, **options)

    monkeypatch.setattr(train_lm, "train", train)
    assert train_lm.main(["--device", "cpu", "--size", "tiny", "--budgets", "2", "--seeds", "0", "--methods", "adamw",
                          "signsgd", "--batch-tokens", "64", "--corpus-bytes", "200000", "--validation-windows", "1",
                          "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "frugal.json").read_text())
    assert [run["method"] for run in document["runs"]] == ["adamw"]
    assert document["failures"] == [{"steps": 2, "seed": 0, "method": "signsgd",
                                     "error": "RuntimeError: made-up failure"}]
    assert "- signsgd, seed 0, 2 steps: RuntimeError: made-up failure" in (tmp_path / "frugal.md").read_text()
