"""A small language-model training benchmark: validation loss and optimizer state of AdamW, FRUGAL and Collage.

A LLaMA-style decoder (~10M parameters on a GPU, a tiny one on the CPU) learns byte-level Python: the ``.py``
files of the standard library and of the installed packages, which every machine has offline. Each method trains
the same model from the same initialization on the same batches (per seed), for a fixed number of steps well under
one epoch, and the run reports its final validation loss (fixed validation windows), the bytes of optimizer state,
tokens/s, peak memory and its loss curves. Over seeds, each (budget, method) gets the mean and spread of the
validation loss, relative to AdamW's, and its state as a percentage of AdamW's; ``format_markdown`` writes the
table and findings computed from those numbers (never hand-written claims).

The pieces, one module each, are reusable (``leanops demo`` builds on them); this package exports them all:

- ``data``: ``load_corpus``, the byte corpus, split into train/validation by a hash of each file's path;
- ``model``: ``LlamaModel`` / ``ModelConfig`` / ``MODEL_SIZES`` / ``build_model``, and ``language_model_loss``
  through ``leanops.linear_cross_entropy`` (or plain logits + ``F.cross_entropy``);
- ``methods``: ``METHODS`` / ``make_optimizer``, optimizer configurations by name, and ``resolve_loss_backend``;
- ``run``: ``TrainConfig`` / ``train``, one run; ``results_document``, the JSON of the runs;
- ``report``: ``aggregate``, ``findings``, ``format_markdown``, ``write_loss_plot``, ``write_report``;
- here, the command line, ``main``: ``python -m benchmarks.train_lm --device cuda --steps 1000 --batch-tokens
  32768 --seeds 0 1 --budgets 1000 3000 --out benchmarks/results/`` (writes ``<out>/frugal.md`` and
  ``<out>/frugal.json``; a second call with the same settings resumes, skipping the runs already in the JSON).

Defaults (sources in ``SOURCES``): one learning rate 1e-3 for every method, linear warm-up over the first 10% of
the steps then cosine decay to 10% of the peak (GaLore's and FRUGAL's pre-training scripts); FRUGAL density 0.25,
update_gap 200, state-free lr scale 1.0 and state-full lr scale 1.0 (the FRUGAL README: "in all main experiments",
1.0 for pre-training); betas (0.9, 0.999), eps 1e-8, gradient clipping at norm 1.0, no weight decay.
"""
import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence

import torch

from .. import common, measurement
from .data import (FILE_SEPARATOR, MAX_FILE_BYTES, PROGRAM, VALIDATION_EVERY, VOCABULARY, Corpus, default_roots,
                   list_python_files, load_corpus)
from .methods import (DEFAULT_METHODS, FRUGAL_DENSITY, METHODS, Method, OptimizerSettings, _split_shapes,
                      frugal_split_fraction, frugal_split_state_bytes, make_optimizer, matched_svd_density,
                      optimizer_state_bytes, resolve_loss_backend)
from .model import LOSSES, MODEL_SIZES, LlamaModel, ModelConfig, build_model, language_model_loss
from .report import (AUTHORS_GAP_PCT, AUTHORS_STATE_PCT, GPU_COMMAND, ISSUE_SCALE, SOURCES, Summary, aggregate,
                     compare, findings, format_markdown, write_loss_plot, write_report)
from .run import RESUME_KEYS, RunResult, TrainConfig, evaluate, lr_multiplier, previous_runs, results_document, train

__all__ = [
    "AUTHORS_GAP_PCT", "AUTHORS_STATE_PCT", "Corpus", "DEFAULT_METHODS", "DEVICE_DEFAULTS", "FILE_SEPARATOR",
    "FRUGAL_DENSITY", "GPU_COMMAND", "ISSUE_SCALE", "LOSSES", "LlamaModel", "MAX_FILE_BYTES", "METHODS", "MODEL_SIZES",
    "Method", "ModelConfig", "OptimizerSettings", "PROGRAM", "RESUME_KEYS", "RunResult", "SOURCES", "Summary",
    "TrainConfig", "VALIDATION_EVERY", "VOCABULARY", "_split_shapes", "aggregate", "build_model", "compare",
    "default_roots", "evaluate", "findings", "format_markdown", "frugal_split_fraction", "frugal_split_state_bytes",
    "language_model_loss", "list_python_files", "load_corpus", "lr_multiplier", "main", "make_optimizer",
    "matched_svd_density", "optimizer_state_bytes", "parse_arguments", "previous_runs", "resolve_loss_backend",
    "results_document", "settings_of", "train", "write_loss_plot", "write_report",
]

DEVICE_DEFAULTS = {
    # size, steps, batch tokens, corpus byte cap, validation windows, update_gap
    "cuda": {"size": "small", "steps": 1000, "batch_tokens": 32768, "corpus_bytes": 256 << 20,
             "validation_windows": 512, "update_gap": 200},
    "cpu": {"size": "tiny", "steps": 40, "batch_tokens": 1024, "corpus_bytes": 8 << 20, "validation_windows": 64,
            "update_gap": 10},
}


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROGRAM}",
        description="Train a small LLaMA-style byte-level model on Python source with each optimizer and report "
                    "validation loss and optimizer state (writes <out>/<name>.md and <out>/<name>.json).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default=None,
                        help="model size (default: small on cuda, tiny on cpu)")
    parser.add_argument("--steps", type=int, default=None, help="the budget when --budgets is not given "
                        "(default: 1000 on cuda, 40 on cpu)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="step budgets to run (default: --steps)")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="tokens per step, a multiple of the context (default: 32768 on cuda, 1024 on cpu)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"method names, or 'all' (default: {' '.join(DEFAULT_METHODS)}); all: "
                             f"{' '.join(METHODS)}")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--update-gap", type=int, default=None, help="FRUGAL's steps between subspace switches "
                        "(default: 200 on cuda, the paper's; 10 on cpu, so that short runs switch)")
    parser.add_argument("--eval-every", type=int, default=None, help="default: a tenth of the budget")
    parser.add_argument("--validation-windows", type=int, default=None, help="default: 512 on cuda, 64 on cpu")
    parser.add_argument("--corpus-bytes", type=int, default=None,
                        help="byte cap of the corpus (default: 256 MiB on cuda, 8 MiB on cpu)")
    parser.add_argument("--loss", choices=LOSSES, default="linear-ce")
    parser.add_argument("--loss-backend", default="auto", help="linear_cross_entropy backend (default: auto, "
                        "checked against the reference on the device first)")
    parser.add_argument("--collage-backend", default="auto", help="CollageAdamW's backend (default: auto)")
    parser.add_argument("--frugal-backend", default="auto", help="FRUGAL's backend (default: auto)")
    parser.add_argument("--no-mixed-precision", action="store_true",
                        help="on cuda, train the fp32-parameter methods without bf16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--name", default="frugal", help="file name stem of the report (default: frugal)")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing <out>/<name>.json (no resume)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new run after this many minutes (resume later with the same command)")
    parser.add_argument("--plot", action="store_true", help="also write <out>/<name>-curves.png")
    parser.add_argument("--verbose", action="store_true", help="log every validation point of every run")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite <out>/<name>.md from the existing <out>/<name>.json")
    arguments = parser.parse_args(argv)
    device = arguments.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is visible")
    arguments.device = device
    for name, value in DEVICE_DEFAULTS[device].items():
        if getattr(arguments, name) is None:
            setattr(arguments, name, value)
    arguments.budgets = arguments.budgets or [arguments.steps]
    if arguments.methods is None:
        arguments.methods = list(DEFAULT_METHODS)
    elif arguments.methods == ["all"]:
        arguments.methods = list(METHODS)
    unknown = [name for name in arguments.methods if name not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    for name in ("budgets", "seeds"):
        if any(value < (1 if name == "budgets" else 0) for value in getattr(arguments, name)):
            parser.error(f"--{name}: every value must be {'at least 1' if name == 'budgets' else '>= 0'}, got "
                         f"{getattr(arguments, name)}")
    for name in ("steps", "batch_tokens", "update_gap", "validation_windows", "corpus_bytes"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(arguments, name)}")
    context = MODEL_SIZES[arguments.size].context
    if arguments.batch_tokens % context:
        parser.error(f"--batch-tokens ({arguments.batch_tokens}) must be a multiple of the context ({context}) of "
                     f"--size {arguments.size}")
    if arguments.threads is not None and arguments.threads < 1:
        parser.error(f"--threads must be at least 1, got {arguments.threads}")
    return arguments


def settings_of(arguments: argparse.Namespace, corpus: Corpus) -> dict:
    """The settings of a command-line run, as stored in the JSON."""
    return {
        "device_type": arguments.device, "size": arguments.size,
        "model": dataclasses.asdict(MODEL_SIZES[arguments.size]), "batch_tokens": arguments.batch_tokens,
        "budgets": list(arguments.budgets), "seeds": list(arguments.seeds), "methods": list(arguments.methods),
        "lr": arguments.lr, "warmup_fraction": arguments.warmup_fraction, "min_lr_ratio": arguments.min_lr_ratio,
        "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": arguments.weight_decay, "grad_clip": arguments.grad_clip,
        "update_gap": arguments.update_gap, "eval_every": arguments.eval_every,
        "validation_windows": arguments.validation_windows,
        "mixed_precision": arguments.device == "cuda" and not arguments.no_mixed_precision, "loss": arguments.loss,
        "loss_backend": arguments.loss_backend, "collage_backend": arguments.collage_backend,
        "frugal_backend": arguments.frugal_backend,
        "corpus_sha256": corpus.digest, "threads": torch.get_num_threads(),
    }


def _report_only(arguments: argparse.Namespace) -> int:
    """--report-only: the markdown (and with --plot the PNG) of an existing JSON, nothing run."""
    json_path = os.path.join(arguments.out, f"{arguments.name}.json")
    if not os.path.exists(json_path):
        print(f"{PROGRAM}: --report-only: {json_path} does not exist", file=sys.stderr)
        return 2
    with open(json_path, encoding="utf-8") as file:
        document = json.load(file)
    for path in write_report(arguments.out, arguments.name, document, plot=arguments.plot):
        print(f"{PROGRAM}: wrote {path}", file=sys.stderr)
    print(format_markdown(document))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run every (budget, seed, method) not yet in <out>/<name>.json, writing the JSON and the markdown report
    after each run, then print the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    arguments = parse_arguments(argv)
    if arguments.report_only:
        return _report_only(arguments)
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    command = f"python -m {PROGRAM} " + " ".join(shlex.quote(argument) for argument in argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    corpus = load_corpus(arguments.corpus_bytes)
    log(f"{PROGRAM}: corpus {corpus.train.numel():,} train bytes, {corpus.validation.numel():,} validation bytes "
        f"({corpus.load_seconds:.1f} s)")
    device = torch.device(arguments.device)
    settings = settings_of(arguments, corpus)
    json_path = os.path.join(arguments.out, f"{arguments.name}.json")
    runs = [] if arguments.fresh else previous_runs(json_path, settings)
    done = {(run.steps, run.seed, run.method) for run in runs}
    if runs:
        settings["budgets"] = sorted(set(settings["budgets"]) | {run.steps for run in runs})
        settings["seeds"] = sorted(set(settings["seeds"]) | {run.seed for run in runs})
    environment = common.environment(device)
    model = MODEL_SIZES[arguments.size]
    optimizer_settings = OptimizerSettings(lr=arguments.lr, weight_decay=arguments.weight_decay,
                                           update_gap=arguments.update_gap, collage_backend=arguments.collage_backend,
                                           frugal_backend=arguments.frugal_backend)
    failures: list[dict] = []
    pending = [(steps, seed, method) for steps in arguments.budgets for seed in arguments.seeds
               for method in arguments.methods if (steps, seed, method) not in done]
    log(f"{PROGRAM}: {len(pending)} runs to do ({len(done)} already in {json_path})")
    for index, (steps, seed, method) in enumerate(pending, 1):
        if arguments.max_minutes is not None and time.perf_counter() - started > 60 * arguments.max_minutes:
            log(f"{PROGRAM}: --max-minutes {arguments.max_minutes:g} reached; {len(pending) - index + 1} runs left "
                "(run the same command again to resume)")
            break
        config = TrainConfig(method=method, seed=seed, steps=steps, model=model,
                             batch_tokens=arguments.batch_tokens, device=arguments.device,
                             optimizer=optimizer_settings, warmup_fraction=arguments.warmup_fraction,
                             min_lr_ratio=arguments.min_lr_ratio, grad_clip=arguments.grad_clip,
                             eval_every=arguments.eval_every, validation_windows=arguments.validation_windows,
                             mixed_precision=settings["mixed_precision"], loss=arguments.loss,
                             loss_backend=arguments.loss_backend)
        try:
            result = train(config, corpus, log=log if arguments.verbose else None)
        except Exception as error:  # noqa: BLE001 - one failing method must not lose the others' runs
            message = f"{type(error).__name__}: {error}".splitlines()[0]
            failures.append({"steps": steps, "seed": seed, "method": method, "error": message})
            log(f"{PROGRAM}: [{index}/{len(pending)}] {steps} steps, seed {seed}, {method}: FAILED: {message}")
            measurement.free_device_memory(device)
            continue
        runs.append(result)
        loss = "diverged" if result.final_validation_loss is None else f"{result.final_validation_loss:.4f}"
        log(f"{PROGRAM}: [{index}/{len(pending)}] {steps} steps, seed {seed}, {method}: validation {loss}, state "
            f"{measurement.format_bytes(result.state_bytes)}, {result.seconds:.1f} s")
        document = results_document(command, environment, settings, corpus, runs, failures)
        write_report(arguments.out, arguments.name, document)
    document = results_document(command, environment, settings, corpus, runs, failures)
    for path in write_report(arguments.out, arguments.name, document, plot=arguments.plot):
        log(f"{PROGRAM}: wrote {path}")
    print(format_markdown(document))
    return 0
