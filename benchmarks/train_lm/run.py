"""One run of ``benchmarks.train_lm`` and the results file: ``TrainConfig`` / ``train`` (the training loop, the
learning-rate schedule and the validation passes) give a ``RunResult``; ``results_document`` is the JSON of a
benchmark's runs, and ``previous_runs`` reads back the runs a resumed benchmark skips."""
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .. import common, measurement
from .data import PROGRAM, Corpus
from .methods import METHODS, OptimizerSettings, make_optimizer, optimizer_state_bytes, resolve_loss_backend
from .model import LOSSES, LlamaModel, ModelConfig, build_model, language_model_loss

# The settings a resumed run must share with the JSON it adds to.
RESUME_KEYS = ("device_type", "size", "model", "batch_tokens", "lr", "warmup_fraction", "min_lr_ratio", "betas",
               "eps", "weight_decay", "grad_clip", "update_gap", "validation_windows", "mixed_precision", "loss",
               "loss_backend", "corpus_sha256")


def lr_multiplier(step: int, total: int, warmup_fraction: float, min_ratio: float) -> float:
    """The learning-rate factor at optimizer step `step` (0-based) of `total`: linear warm-up (step + 1) / W over
    the first W = max(1, round(warmup_fraction * total)) steps, then cosine from 1 down to `min_ratio` at the last
    step."""
    warmup = max(1, round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclasses.dataclass
class TrainConfig:
    """One training run: `method` (a METHODS name) from seed `seed` for `steps` optimizer steps of `batch_tokens`
    tokens (batch_tokens / context windows), on `device`.

    ``mixed_precision`` (None: on a GPU) runs the fp32-parameter methods under bf16 autocast, their loss in bf16;
    ``eval_every`` / ``log_every`` (None: steps / 10, steps / 100) set how often the validation loss and the
    train-loss curve are recorded; ``loss`` and ``loss_backend`` choose the loss (``language_model_loss``).
    """
    method: str
    seed: int
    steps: int
    model: ModelConfig
    batch_tokens: int
    device: str = "cpu"
    optimizer: OptimizerSettings = OptimizerSettings()
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int | None = None
    log_every: int | None = None
    validation_windows: int = 512
    mixed_precision: bool | None = None
    loss: str = "linear-ce"
    loss_backend: str = "auto"

    def check(self) -> None:
        """A ValueError naming the argument for any bad value."""
        if self.method not in METHODS:
            raise ValueError(f"{PROGRAM}: argument 'method' must be one of {sorted(METHODS)}, got {self.method!r}")
        self.model.check()
        for name in ("steps", "batch_tokens", "validation_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{PROGRAM}: argument '{name}' must be a positive integer, got {value!r}")
        for name in ("eval_every", "log_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{PROGRAM}: argument '{name}' must be a positive integer or None, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{PROGRAM}: argument 'seed' must be an integer >= 0, got {self.seed!r}")
        if self.batch_tokens % self.model.context:
            raise ValueError(f"{PROGRAM}: argument 'batch_tokens' ({self.batch_tokens}) must be a multiple of the "
                             f"context ({self.model.context})")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"{PROGRAM}: argument 'warmup_fraction' must be in [0, 1), got {self.warmup_fraction!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"{PROGRAM}: argument 'min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio!r}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"{PROGRAM}: argument 'grad_clip' must be >= 0 (0: no clipping), got {self.grad_clip!r}")
        if not (math.isfinite(self.optimizer.lr) and self.optimizer.lr > 0):
            raise ValueError(f"{PROGRAM}: argument 'lr' must be a positive number, got {self.optimizer.lr!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"{PROGRAM}: argument 'loss' must be one of {LOSSES}, got {self.loss!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"{PROGRAM}: argument 'device' must be 'cpu' or 'cuda', got {self.device!r}")


@dataclasses.dataclass
class RunResult:
    """What one run measured. ``final_validation_loss`` is None when the run diverged (a non-finite loss); the
    curves are (step, loss) pairs, the train curve the mean over each ``log_every`` steps. ``state_bytes`` is the
    largest optimizer state seen after any step (FRUGAL's blockwise state changes with its active blocks),
    ``parameter_bytes`` the model's parameters in their storage dtype; ``tokens_per_second`` leaves out the
    validation passes and the first steps (compilation, autotuning); ``peak_memory_bytes`` is
    torch.cuda.max_memory_allocated on a GPU and None on the CPU."""
    method: str
    seed: int
    steps: int
    batch_tokens: int
    parameter_dtype: str
    parameters: int
    parameter_bytes: int
    final_validation_loss: float | None
    final_train_loss: float | None
    validation_curve: list[tuple[int, float]]
    train_curve: list[tuple[int, float]]
    state_bytes: int
    final_state_bytes: int
    tokens_per_second: float | None
    peak_memory_bytes: int | None
    seconds: float
    diverged: bool
    optimizer_options: dict
    loss_backend: str
    mixed_precision: bool
    notes: list[str] = dataclasses.field(default_factory=list)


@torch.no_grad()
def evaluate(model: LlamaModel, windows: torch.Tensor, sequences: int, *, loss: str, backend: str,
             compute_dtype: torch.dtype | None) -> float:
    """The mean loss per token over `windows` ((count, context + 1) tokens on the model's device), `sequences`
    windows at a time."""
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], sequences):
        chunk = windows[start:start + sequences]
        with _autocast(windows.device, compute_dtype):
            hidden = model(chunk[:, :-1])
        summed = language_model_loss(hidden, model.lm_head.weight, chunk[:, 1:], loss=loss, backend=backend,
                                     compute_dtype=compute_dtype, reduction="sum")
        total += float(summed)
        count += chunk[:, 1:].numel()
    return total / count


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train(config: TrainConfig, corpus: Corpus, *, log: Callable[[str], None] | None = None) -> RunResult:
    """Train `config.method` for `config.steps` steps on `corpus` and measure it (``RunResult``).

    The model is initialized from the seed; batches come from a torch.Generator seeded with the seed, so methods
    of one seed see the same weights and the same batches. Each step: forward, loss, backward, gradient clipping
    (``grad_clip``, 0: none), optimizer step, learning-rate schedule (``lr_multiplier``). The validation loss is
    taken every ``eval_every`` steps and after the last one on ``corpus.validation_windows`` (the same windows for
    every run). A non-finite train loss at a validation point ends the run as diverged.
    """
    config.check()
    method = METHODS[config.method]
    device = torch.device(config.device)
    steps = config.steps
    eval_every = config.eval_every or max(1, steps // 10)
    log_every = config.log_every or max(1, steps // 100)
    sequences = config.batch_tokens // config.model.context
    mixed = (device.type == "cuda") if config.mixed_precision is None else config.mixed_precision
    compute_dtype = torch.bfloat16 if mixed and method.parameter_dtype == torch.float32 else None
    loss_dtype = compute_dtype or method.parameter_dtype
    backend, backend_note = (resolve_loss_backend(device, loss_dtype, config.loss_backend)
                             if config.loss == "linear-ce" else ("", ""))

    measurement.free_device_memory(device)  # the previous run's model and state
    model = build_model(config.model, config.seed, device, method.parameter_dtype)
    optimizer, options = make_optimizer(method, model, config.optimizer, config.seed, device)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, steps, config.warmup_fraction, config.min_lr_ratio))
    batches = torch.Generator().manual_seed(config.seed)
    windows = corpus.validation_windows(config.validation_windows, config.model.context).to(device)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    timing_start_step = min(10, steps // 5)  # leave compilation and autotuning out of tokens/s
    # The clock runs over training steps only: it stops for each validation pass and restarts after it.
    train_seconds, timed_steps, clock, clock_step = 0.0, 0, None, 0
    run_start = time.perf_counter()
    losses: list[torch.Tensor] = []
    train_curve, validation_curve = [], []
    state_bytes = 0
    diverged = False
    for step in range(1, steps + 1):
        if step == timing_start_step + 1:
            common.synchronize(device)
            clock, clock_step = time.perf_counter(), step - 1
        tokens = corpus.train_batch(batches, sequences, config.model.context).to(device, non_blocking=True)
        with _autocast(device, compute_dtype):
            hidden = model(tokens[:, :-1])
        loss = language_model_loss(hidden, model.lm_head.weight, tokens[:, 1:], loss=config.loss, backend=backend,
                                   compute_dtype=compute_dtype)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        state_bytes = max(state_bytes, optimizer_state_bytes(optimizer))
        if step % log_every == 0 or step == steps:
            previous = train_curve[-1][0] if train_curve else 0
            train_curve.append((step, torch.stack(losses[previous:step]).float().mean()))
        if step % eval_every == 0 or step == steps:
            common.synchronize(device)
            if clock is not None:
                train_seconds += time.perf_counter() - clock
                timed_steps += step - clock_step
            if not math.isfinite(float(losses[-1])):
                diverged = True
                break
            validation_curve.append((step, evaluate(model, windows, sequences, loss=config.loss, backend=backend,
                                                    compute_dtype=compute_dtype)))
            if log is not None:
                log(f"  {config.method} seed {config.seed}: step {step}/{steps}, train {float(losses[-1]):.4f}, "
                    f"validation {validation_curve[-1][1]:.4f}")
            if not math.isfinite(validation_curve[-1][1]):
                diverged = True
                break
            if clock is not None:
                common.synchronize(device)
                clock, clock_step = time.perf_counter(), step
    seconds = time.perf_counter() - run_start
    parameters = sum(parameter.numel() for parameter in model.parameters())
    notes = [note for note in (backend_note,) if note]
    if diverged:
        notes.append(f"diverged: non-finite loss by step {len(losses)}")
    return RunResult(
        method=config.method, seed=config.seed, steps=steps, batch_tokens=config.batch_tokens,
        parameter_dtype=str(method.parameter_dtype).removeprefix("torch."), parameters=parameters,
        parameter_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        final_validation_loss=None if diverged else validation_curve[-1][1],
        final_train_loss=None if diverged else float(train_curve[-1][1]),
        validation_curve=validation_curve, train_curve=[(s, float(v)) for s, v in train_curve],
        state_bytes=state_bytes, final_state_bytes=optimizer_state_bytes(optimizer),
        tokens_per_second=timed_steps * config.batch_tokens / train_seconds if train_seconds > 0 and timed_steps
        else None,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        seconds=seconds, diverged=diverged, optimizer_options=_jsonable(options),
        loss_backend=backend or "torch", mixed_precision=compute_dtype is not None, notes=notes)


def _jsonable(value):
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


def results_document(command: str, environment: dict, settings: dict, corpus: Corpus | dict,
                     runs: Sequence[RunResult], failures: Sequence[dict] = ()) -> dict:
    """The JSON document of a benchmark: how it was run, where, on which corpus, every run, and the runs that
    raised ({"steps", "seed", "method", "error"}; they are tried again on resume)."""
    return {"benchmark": "train_lm", "command": command, "environment": environment, "settings": settings,
            "corpus": corpus.describe() if isinstance(corpus, Corpus) else corpus,
            "runs": [dataclasses.asdict(run) for run in runs], "failures": list(failures)}


def previous_runs(path: str, settings: dict) -> list[RunResult]:
    """The runs of an existing JSON at `path` made with the same RESUME_KEYS settings, else none (with a
    message when the settings differ)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as file:
        previous = json.load(file)
    differing = [key for key in RESUME_KEYS if previous.get("settings", {}).get(key) != settings[key]]
    if differing:
        print(f"{PROGRAM}: {path} was made with other settings ({', '.join(differing)}); starting afresh",
              file=sys.stderr)
        return []
    return [RunResult(**run) for run in previous["runs"]]
