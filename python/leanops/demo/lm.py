"""``leanops demo lm`` (the default): a small byte-level LLaMA-style language model (``leanops.benchmarks.train_lm``)
trained on the ``.py`` files of Python's standard library (a corpus every machine has offline) five ways, with the
same seed, the same batches and the same token budget:

- ``plain``: logits + ``F.cross_entropy``, ``torch.optim.AdamW``; fp32 parameters (on a GPU: bf16 autocast over
  fp32 master weights);
- ``leanops-ce``: the chunked ``leanops.linear_cross_entropy`` (no N x V logits), ``torch.optim.AdamW``;
- ``collage``: a bf16 model, ``leanops.optim.CollageAdamW(mode="plus")``, leanops CE;
- ``frugal``: ``leanops.optim.FRUGAL`` (rho 0.25, columns) over ``frugal_param_groups``, leanops CE;
- ``frugal-collage``: a bf16 model, FRUGAL with ``precision="collage"``, leanops CE.

Per configuration it reports the validation loss, tokens/s, peak memory (GPU: ``torch.cuda.max_memory_allocated``
during the run minus what was allocated before it; CPU: the resident-set growth, sampled, in a fresh process) and
optimizer-state bytes per parameter, and writes ``<out>/demo-lm-<device>.{md,json,png}``. Because the vocabulary is
bytes (256), the N x V logits are small here; a separate measurement of the loss head alone at a large vocabulary
shows what the chunked cross-entropy buys there.
"""
import argparse
import dataclasses
import sysconfig
import time

import torch

from .. import ops
from .common import (PROGRAM, PeakMemory, busy_notes, command_of, cpu_memory_pass, error, format_bytes, heading,
                     log, measure_call, memory_description, peak_cell, write_outputs)

@dataclasses.dataclass(frozen=True)
class LMConfiguration:
    """One configuration of the language-model demo: a ``leanops.benchmarks.train_lm`` method (optimizer and
    parameter dtype) and a loss ("logits": plain PyTorch, "linear-ce": ``leanops.linear_cross_entropy``)."""
    name: str
    method: str
    loss: str
    description: str


LM_CONFIGURATIONS = (
    LMConfiguration("plain", "adamw", "logits",
                    "plain PyTorch: logits + F.cross_entropy, torch.optim.AdamW; fp32 parameters (on a GPU: bf16 "
                    "autocast over fp32 master weights)"),
    LMConfiguration("leanops-ce", "adamw", "linear-ce",
                    "leanops.linear_cross_entropy (chunked, no N x V logits), torch.optim.AdamW, parameters as in "
                    "plain"),
    LMConfiguration("collage", "collage-plus", "linear-ce",
                    "bf16 model, leanops.optim.CollageAdamW(mode='plus') (no fp32 master weights), leanops CE"),
    LMConfiguration("frugal", "frugal-columns", "linear-ce",
                    "leanops.optim.FRUGAL rho=0.25 columns over frugal_param_groups (AdamW state on a quarter of "
                    "each block matrix's columns, signSGD on the rest), parameters as in plain, leanops CE"),
    LMConfiguration("frugal-collage", "frugal-collage", "linear-ce",
                    "bf16 model, leanops.optim.FRUGAL rho=0.25 columns with precision='collage', leanops CE"),
)
LM_CONFIGURATION_NAMES = tuple(configuration.name for configuration in LM_CONFIGURATIONS)

# Sizes of the language-model demo: "quick" (a CI smoke test, seconds), "cpu" (a few minutes), "cuda" (~10M
# parameters, a few hundred steps). The model is a train_lm.MODEL_SIZES name ("tiny": 0.13M parameters, "small":
# 10.8M) or train_lm.ModelConfig keyword arguments; "evaluations": validation passes per run (besides the one
# before the first step); head_* is the large-vocabulary loss-head measurement (tokens, vocabulary).
LM_SIZES = {
    "quick": {"model": {"d_model": 32, "layers": 1, "heads": 2, "mlp_hidden": 64, "context": 32}, "steps": 24,
              "batch_tokens": 256, "corpus_bytes": 1 << 20, "validation_windows": 16, "evaluations": 4,
              "update_gap": 8,
              # 64 MiB of float32 logits: well over one chunk of the CPU's 8 MiB panel budget (leanops/plans.py).
              "head_tokens": 512, "head_vocabulary": 32768},
    "cpu": {"model": "tiny", "steps": 200,
            "batch_tokens": 1024, "corpus_bytes": 8 << 20, "validation_windows": 64, "evaluations": 10,
            "update_gap": 50,
            "head_tokens": 1024, "head_vocabulary": 32000},
    "cuda": {"model": "small", "steps": 300,
             "batch_tokens": 32768, "corpus_bytes": 64 << 20, "validation_windows": 256, "evaluations": 10,
             "update_gap": 100,
             "head_tokens": 16384, "head_vocabulary": 128256},
}
LM_LR = 1e-3  # train_lm's shared learning rate (GaLore's and FRUGAL's pre-training scripts)


def lm_settings(arguments: argparse.Namespace, device) -> dict:
    """The demo's sizes for `device` (quick, cpu or cuda), with the command line's overrides."""
    from ..benchmarks import train_lm

    size = "quick" if arguments.quick else device.type
    settings = {"size": size, **LM_SIZES[size]}
    model = settings["model"]
    settings["model"] = dataclasses.asdict(train_lm.MODEL_SIZES[model]) if isinstance(model, str) else dict(model)
    for name in ("steps", "batch_tokens"):
        if getattr(arguments, name, None) is not None:
            settings[name] = getattr(arguments, name)
    settings["lr"] = arguments.lr if arguments.lr is not None else LM_LR
    settings["seed"] = arguments.seed
    settings["eval_every"] = max(1, settings["steps"] // settings["evaluations"])
    settings["log_every"] = max(1, settings["steps"] // 50)
    settings["configurations"] = list(arguments.configs or LM_CONFIGURATION_NAMES)
    settings["memory_steps"] = min(settings["steps"], 6)
    settings["mixed_precision"] = device.type == "cuda"
    settings["threads"] = torch.get_num_threads()
    return settings


def _train_config(configuration: LMConfiguration, settings: dict, device, *, steps: int | None = None,
                  validation_windows: int | None = None):
    from ..benchmarks import train_lm

    return train_lm.TrainConfig(
        method=configuration.method, seed=settings["seed"], steps=steps or settings["steps"],
        model=train_lm.ModelConfig(**settings["model"]), batch_tokens=settings["batch_tokens"],
        device=device.type,
        optimizer=train_lm.OptimizerSettings(lr=settings["lr"], update_gap=settings["update_gap"]),
        eval_every=None if steps else settings["eval_every"], log_every=None if steps else settings["log_every"],
        validation_windows=validation_windows or settings["validation_windows"],
        mixed_precision=settings["mixed_precision"], loss=configuration.loss)


def initial_validation_loss(config, corpus, device) -> float:
    """The validation loss of `config`'s model before any step (its initialization, in its dtype, with its loss),
    on the same windows as train_lm.train's validation."""
    from ..benchmarks import train_lm

    method = train_lm.METHODS[config.method]
    compute_dtype = torch.bfloat16 if config.mixed_precision and method.parameter_dtype == torch.float32 else None
    backend = train_lm.resolve_loss_backend(device, compute_dtype or method.parameter_dtype)[0] \
        if config.loss == "linear-ce" else ""
    model = train_lm.build_model(config.model, config.seed, device, method.parameter_dtype)
    windows = corpus.validation_windows(config.validation_windows, config.model.context).to(device)
    value = train_lm.evaluate(model, windows, config.batch_tokens // config.model.context, loss=config.loss,
                              backend=backend, compute_dtype=compute_dtype)
    del model, windows
    return value


def measure_loss_head(device, tokens: int, d_model: int, vocabulary: int, seed: int) -> dict:
    """Peak memory of one forward + backward of the loss head alone (hidden (tokens, d_model) times a (vocabulary,
    d_model) weight, cross-entropy), plain PyTorch (logits, then F.cross_entropy in float32) against
    ``leanops.linear_cross_entropy``; bf16 inputs on a GPU (as under autocast), fp32 on the CPU."""
    from ..benchmarks import measurement, train_lm

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, d_model, generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocabulary, d_model, generator=generator) * 0.02).to(device, dtype).requires_grad_()
    targets = torch.randint(0, vocabulary, (tokens,), generator=generator).to(device)

    def peak(step, seconds):
        return measurement.peak_extra_memory(step, device, seconds)

    # The lean plan by name: auto would build these logits densely on the CPU (leanops.plans.dense_logits_chosen).
    backend = ops.CROSS_ENTROPY.resolve("leanops.linear_cross_entropy", "auto", device, dtype).backend
    rows = []
    for name, loss in (("plain", "logits"), ("leanops", "linear-ce")):
        def step(loss=loss):
            value = train_lm.language_model_loss(hidden, weight, targets, loss=loss, backend=backend)
            torch.autograd.grad(value, (hidden, weight))

        try:
            rows.append({"loss": name, **measure_call(step, device, peak)})
        finally:
            measurement.free_device_memory(device)
    return {"tokens": tokens, "d_model": d_model, "vocabulary": vocabulary,
            "dtype": str(dtype).removeprefix("torch."), "logits_bytes_fp32": tokens * vocabulary * 4, "rows": rows}


def lm_configurations(settings: dict) -> list[LMConfiguration]:
    return [configuration for configuration in LM_CONFIGURATIONS if configuration.name in settings["configurations"]]


def _load_corpus(settings: dict):
    from ..benchmarks import train_lm

    return train_lm.load_corpus(settings["corpus_bytes"], roots={"stdlib": sysconfig.get_paths()["stdlib"]})


def lm_memory_pass(settings: dict) -> dict:
    """Peak memory of each configuration's training (settings["memory_steps"] steps, then one validation pass) and
    of the large-vocabulary loss head, measured on the CPU in this process (``PeakMemory``): {"configurations":
    {name: bytes or None}, "loss_head": measure_loss_head's result}. Each configuration first runs two unmeasured
    steps (one-time set-up). Meant for a fresh process whose allocator returns every large block on free
    (``common.memory_pass_in_fresh_process``), so that one configuration's freed heap does not hide or inflate the
    next one's."""
    from ..benchmarks import train_lm

    device = torch.device("cpu")
    torch.set_num_threads(settings["threads"])
    corpus = _load_corpus(settings)
    configurations = lm_configurations(settings)
    steps = settings["memory_steps"]
    sequences = settings["batch_tokens"] // settings["model"]["context"]
    for configuration in configurations:
        train_lm.train(_train_config(configuration, settings, device, steps=2, validation_windows=1), corpus)
    peaks = {}
    for configuration in configurations:
        config = _train_config(configuration, settings, device, steps=steps,
                               validation_windows=min(settings["validation_windows"], sequences))
        config.eval_every = steps
        with PeakMemory(device) as peak:
            train_lm.train(config, corpus)
        peaks[configuration.name] = peak.bytes
    head = measure_loss_head(device, settings["head_tokens"], settings["model"]["d_model"],
                             settings["head_vocabulary"], settings["seed"])
    return {"configurations": peaks, "loss_head": head}


def run_lm(arguments: argparse.Namespace, device, out_dir: str) -> int:
    """The language-model demo (see the module docstring)."""
    from ..benchmarks import common, measurement, train_lm

    settings = lm_settings(arguments, device)
    model_config = train_lm.ModelConfig(**settings["model"])
    try:
        model_config.check()
    except ValueError as problem:
        return error(str(problem))
    if settings["batch_tokens"] % model_config.context:
        return error(f"--batch-tokens ({settings['batch_tokens']}) must be a multiple of the context "
                     f"({model_config.context})")
    command = command_of(arguments)
    started = time.perf_counter()
    corpus = _load_corpus(settings)
    environment = common.environment(device)
    configurations = lm_configurations(settings)
    log(f"{PROGRAM} lm: {settings['size']} size on {environment['device']}: {len(configurations)} configurations x "
        f"{settings['steps']} steps x {settings['batch_tokens']:,} tokens; corpus: {corpus.train.numel():,} train "
        f"bytes of the standard library's .py files")
    notes = busy_notes(device)
    if device.type == "cuda":
        # Warm-up: two unrecorded steps of each configuration, so that one-time allocations (cuBLAS workspaces,
        # autotuning) do not land in the first configuration's peak.
        for configuration in configurations:
            train_lm.train(_train_config(configuration, settings, device, steps=2, validation_windows=1), corpus)
    entries = []
    for index, configuration in enumerate(configurations, 1):
        config = _train_config(configuration, settings, device)
        initial = initial_validation_loss(config, corpus, device)

        def progress(message, name=configuration.name):
            log(f"    {name}: {message.split(': ', 1)[-1]}")

        measurement.free_device_memory(device)
        if device.type == "cuda":
            with PeakMemory(device) as peak:
                result = train_lm.train(config, corpus, log=progress)
            peak_bytes = peak.bytes
        else:
            result = train_lm.train(config, corpus, log=progress)
            peak_bytes = None  # measured by the memory pass below
        entry = {"name": configuration.name, "description": configuration.description,
                 "method": configuration.method, "loss": configuration.loss,
                 "initial_validation_loss": initial, "peak_memory_bytes": peak_bytes,
                 "state_bytes_per_parameter": result.state_bytes / result.parameters,
                 "run": dataclasses.asdict(result)}
        entries.append(entry)
        final = "diverged" if result.final_validation_loss is None else f"{result.final_validation_loss:.4f}"
        rate = "n/a" if result.tokens_per_second is None else f"{result.tokens_per_second:,.0f}"
        memory = f", peak memory {format_bytes(peak_bytes)}" if device.type == "cuda" else ""
        log(f"{PROGRAM} lm: [{index}/{len(configurations)}] {configuration.name}: validation loss {initial:.4f} -> "
            f"{final}, {rate} tokens/s{memory}, optimizer state {entry['state_bytes_per_parameter']:.2f} B/param, "
            f"{result.seconds:.1f} s")
    if device.type == "cuda":
        log(f"{PROGRAM} lm: loss head alone at a large vocabulary ({settings['head_tokens']:,} tokens x "
            f"{settings['head_vocabulary']:,})")
        head = measure_loss_head(device, settings["head_tokens"], model_config.d_model,
                                 settings["head_vocabulary"], settings["seed"])
    else:
        log(f"{PROGRAM} lm: memory pass ({settings['memory_steps']} steps of each configuration, then the loss head "
            f"alone at {settings['head_tokens']:,} tokens x {settings['head_vocabulary']:,}) in a fresh process")
        measured = cpu_memory_pass("lm", settings, notes, lm_memory_pass)
        for entry in entries:
            entry["peak_memory_bytes"] = measured["configurations"].get(entry["name"])
            log(f"    {entry['name']}: peak memory {format_bytes(entry['peak_memory_bytes'])}")
        head = measured["loss_head"]
    document = {"demo": "lm", "command": command, "environment": environment, "settings": settings,
                "frugal_split_fraction": train_lm.frugal_split_fraction(train_lm.LlamaModel(model_config)),
                "corpus": corpus.describe(),
                "memory_method": memory_description(device, f"{settings['memory_steps']} training steps and one "
                                                    "validation pass of each configuration, after two unmeasured "
                                                    "steps"),
                "configurations": entries, "loss_head": head, "notes": notes,
                "seconds": round(time.perf_counter() - started, 1)}
    return write_lm_outputs(document, out_dir, plot=not arguments.no_plot)


def write_lm_outputs(document: dict, out_dir: str, *, plot: bool = True) -> int:
    """Write <out>/demo-lm-<device>.{json,md,png}, print the table and the findings; returns 0."""
    return write_outputs(document, out_dir, "lm", write_plot=write_lm_plot, markdown=format_lm_markdown,
                         tables=[lm_table], findings=lm_findings, plot=plot)


def lm_table(document: dict) -> str:
    """The per-configuration table (markdown)."""
    from ..benchmarks.train_lm import report

    entries = document["configurations"]
    plain = next((entry for entry in entries if entry["name"] == "plain"), None)
    plain_loss = plain and plain["run"]["final_validation_loss"]
    cuda = document["environment"]["device_type"] == "cuda"
    header = ["configuration", "params", "loss", "optimizer", "val loss: start → end", "vs plain", "tokens/s",
              "peak memory (measured)", "optimizer state", "state B/param", "params+state B/param"]
    rows = []
    for entry in entries:
        run = entry["run"]
        dtype = run["parameter_dtype"] + (" (bf16 autocast)" if cuda and run["parameter_dtype"] == "float32" else "")
        final = run["final_validation_loss"]
        versus = "" if entry["name"] == "plain" or not plain_loss or final is None else \
            report.signed_percent(100 * (final / plain_loss - 1))
        optimizer = {"adamw": "torch AdamW", "collage-plus": "CollageAdamW plus", "frugal-columns": "FRUGAL ρ=0.25",
                     "frugal-collage": "FRUGAL ρ=0.25 + Collage"}.get(entry["method"], entry["method"])
        rows.append([
            f"`{entry['name']}`", dtype, "logits + F.cross_entropy" if entry["loss"] == "logits" else
            "leanops.linear_cross_entropy", optimizer,
            f"{entry['initial_validation_loss']:.4f} → " + ("diverged" if final is None else f"{final:.4f}"),
            versus, "n/a" if run["tokens_per_second"] is None else f"{run['tokens_per_second']:,.0f}",
            format_bytes(entry["peak_memory_bytes"]), format_bytes(run["state_bytes"]),
            f"{entry['state_bytes_per_parameter']:.2f}",
            f"{(run['parameter_bytes'] + run['state_bytes']) / run['parameters']:.2f}"])
    return report.markdown_table(header, rows)


def head_table(head: dict) -> str:
    """The loss-head measurement's table (markdown)."""
    from ..benchmarks.train_lm import report

    header = ["loss head", "peak memory of forward + backward (measured)", "ms"]
    rows = []
    for row in head["rows"]:
        label = "plain: logits + F.cross_entropy" if row["loss"] == "plain" else "leanops.linear_cross_entropy"
        ms = row.get("ms")
        rows.append([label, peak_cell(row) + (f" ({row['note']})" if row["note"] and row["peak_bytes"] is not None
                                              else ""),
                     "" if ms is None else f"{ms:.1f}"])
    return report.markdown_table(header, rows)


def lm_findings(document: dict) -> list[str]:
    """What the table shows, computed from it."""
    entries = {entry["name"]: entry for entry in document["configurations"]}
    settings = document["settings"]
    lines = []
    plain, chunked = entries.get("plain"), entries.get("leanops-ce")
    if plain and chunked:
        a, b = plain["run"]["final_validation_loss"], chunked["run"]["final_validation_loss"]
        start = abs(plain["initial_validation_loss"] - chunked["initial_validation_loss"])
        if a is not None and b is not None:
            lines.append(f"Same start, same data: `plain` and `leanops-ce` begin at validation loss "
                         f"{plain['initial_validation_loss']:.4f} and {chunked['initial_validation_loss']:.4f} "
                         f"(difference {start:.1e}) and end at {a:.4f} and {b:.4f} (difference {abs(a - b):.1e}): "
                         "the chunked cross-entropy computes the same loss and gradients without the logits.")
    logits_bytes = settings["batch_tokens"] * 256 * 4
    lines.append(f"With a byte vocabulary (V = 256) the N × V float32 logits of one step are only "
                 f"{format_bytes(logits_bytes)} ({settings['batch_tokens']:,} tokens × 256 × 4 B), so the "
                 "peak-memory column differs by the parameters, the optimizer state and the activations (bf16 "
                 "in the bf16 configurations), not by the loss head.")
    head = document.get("loss_head")
    if head:
        rows = {row["loss"]: row for row in head["rows"]}
        plain_head, lean_head = rows.get("plain", {}), rows.get("leanops", {})
        text = (f"Where the chunked CE matters — a large vocabulary: the loss head alone at {head['tokens']:,} "
                f"tokens × d_model {head['d_model']} × V = {head['vocabulary']:,} ({head['dtype']}), whose float32 "
                f"logits alone are {format_bytes(head['logits_bytes_fp32'])}, peaks at {peak_cell(plain_head)} in "
                f"plain PyTorch and {peak_cell(lean_head)} with leanops.linear_cross_entropy")
        if plain_head.get("peak_bytes") and lean_head.get("peak_bytes"):
            text += f" ({plain_head['peak_bytes'] / max(lean_head['peak_bytes'], 1):.0f}× less)"
        lines.append(text + ".")
    state = {name: entry["state_bytes_per_parameter"] for name, entry in entries.items()}
    parts = [f"`{name}` {value:.2f}" for name, value in state.items()]
    if parts:
        explained = []
        if "plain" in state or "leanops-ce" in state:
            explained.append("`torch.optim.AdamW` keeps two fp32 moments (8 B)")
        if "collage" in state:
            explained.append("CollageAdamW plus keeps bf16 moments and bf16 compensations (8 B) beside a bf16 model "
                             "with no fp32 master copy (parameters + state 10 B/param against 12 B for fp32 AdamW, "
                             "and 14 B for mixed precision's bf16 weights beside fp32 master weights and moments)")
        adamw = state.get("plain", state.get("leanops-ce"))
        frugal = [name for name in ("frugal", "frugal-collage") if name in state]
        if frugal:
            split = document.get("frugal_split_fraction")
            text = "; ".join(f"`{name}` keeps {state[name] / adamw:.0%} of AdamW's state" for name in frugal) \
                if adamw else ""
            if split is not None:
                text += (f"{' ' if text else ''}(FRUGAL keeps moments for a quarter of the columns of the block "
                         f"matrices, {split:.0%} of the parameters; the embedding, the norms and lm_head, "
                         f"{1 - split:.0%}, keep full AdamW state"
                         + ("; frugal-collage adds Collage's bf16 compensation of every parameter" if
                            "frugal-collage" in frugal else "") + ")")
            explained.append(text)
        lines.append("Optimizer state per parameter (B/param): " + ", ".join(parts) + ". "
                     + "; ".join(item for item in explained if item) + ".")
    plain_rate = plain and plain["run"]["tokens_per_second"]
    chunked_rate = chunked and chunked["run"]["tokens_per_second"]
    if plain_rate and chunked_rate:
        lines.append(f"Speed: `leanops-ce` ran at {chunked_rate / plain_rate:.0%} of `plain`'s tokens/s "
                     f"({chunked_rate:,.0f} against {plain_rate:,.0f}); with 256 classes the logits are cheap, so "
                     "the chunked loss has little to save here.")
    rates = {dtype: [entry["run"]["tokens_per_second"] for entry in entries.values()
                     if entry["run"]["parameter_dtype"] == dtype and entry["run"]["tokens_per_second"]]
             for dtype in ("float32", "bfloat16")}
    if document["environment"]["device_type"] == "cpu" and rates["float32"] and rates["bfloat16"]:
        fp32, bf16 = (sum(values) / len(values) for values in (rates["float32"], rates["bfloat16"]))
        lines.append(f"On this CPU the bf16 configurations ran at {bf16:,.0f} tokens/s on average against "
                     f"{fp32:,.0f} for the fp32 ones: that measures torch's CPU bf16 kernels (slow on CPUs without "
                     "native bf16 units), not the optimizers; on a GPU bf16 is the fast path.")
    return lines


def format_lm_markdown(document: dict) -> str:
    environment, settings, corpus = document["environment"], document["settings"], document["corpus"]
    model = settings["model"]
    entries = document["configurations"]
    parameters = entries[0]["run"]["parameters"] if entries else None
    lines = heading("`leanops demo lm`: plain PyTorch against leanops on a byte-level language model", environment,
                    document["command"])
    tokens = settings["steps"] * settings["batch_tokens"]
    lines += [
        "## Setup", "",
        f"- Model: LLaMA-style decoder (`leanops.benchmarks.train_lm`), {model['layers']} layer(s), d_model "
        f"{model['d_model']}, {model['heads']} heads, SwiGLU hidden {model['mlp_hidden']}, RoPE, RMSNorm, untied "
        f"`lm_head`, context {model['context']}, byte vocabulary 256"
        + (f": {parameters:,} parameters." if parameters else "."),
        f"- Corpus: the standard library's `.py` files ({corpus['train_files']:,} train files, "
        f"{corpus['train_bytes']:,} bytes; {corpus['validation_files']:,} validation files, "
        f"{corpus['validation_bytes']:,} bytes; sha256 {corpus['sha256']}).",
        f"- Budget: {settings['steps']} steps × {settings['batch_tokens']:,} tokens = {tokens:,} tokens per "
        f"configuration, seed {settings['seed']}: every configuration starts from the same initialization (rounded "
        "to bf16 for the bf16 ones) and sees the same batches.",
        f"- Optimization: lr {settings['lr']:g}, linear warm-up over 10% of the steps then cosine to 0.1× the peak, "
        f"betas (0.9, 0.999), no weight decay, gradient clipping at 1; FRUGAL update_gap {settings['update_gap']}.",
        f"- Validation: {settings['validation_windows']} fixed windows of the validation files, the same for every "
        "configuration; \"start\" is the loss of the initialization, \"end\" after the last step.",
        f"- tokens/s: training steps only (validation passes and the first steps left out). Peak memory: "
        f"{document['memory_method']}. It counts the model, the optimizer state, the activations and the loss.",
        f"- Threads: {settings['threads']}. Configurations:",
    ]
    lines += [f"  - `{entry['name']}`: {entry['description']}." for entry in entries]
    lines += ["", "## Results", "", lm_table(document), ""]
    head = document.get("loss_head")
    if head:
        lines += [f"### The loss head alone at a large vocabulary ({head['tokens']:,} tokens, d_model "
                  f"{head['d_model']}, V = {head['vocabulary']:,}, {head['dtype']})", "",
                  f"The float32 logits alone would be {format_bytes(head['logits_bytes_fp32'])} "
                  f"({head['tokens']:,} × {head['vocabulary']:,} × 4 B).", "", head_table(head), ""]
    lines += ["## What it shows (computed from the tables)", ""]
    lines += [f"- {line}" for line in lm_findings(document)]
    if document.get("plot"):
        lines += ["", f"![validation and train loss]({document['plot']})"]
    notes = list(document.get("notes") or [])
    notes += sorted({note for entry in entries for note in entry["run"]["notes"]})
    if notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in notes]
    if environment["device_type"] == "cpu":
        lines += ["", "On a GPU, `leanops demo lm --device cuda` trains a ~10M-parameter model (6 layers, d_model "
                  "384, context 256) for 300 steps of 32,768 tokens under bf16 autocast."]
    return "\n".join(lines) + "\n"


def write_lm_plot(document: dict, path: str) -> str | None:
    """The loss curves (train and validation, one line per configuration) as a PNG at `path`; returns why not
    (matplotlib missing) or None when written."""
    from ..benchmarks.train_lm import report

    try:
        figure = report.new_figure((15, 4.2))
    except ImportError as missing:
        return f"matplotlib is not installed ({missing}); `pip install matplotlib` for the loss-curve PNG"
    train_axes, validation_axes, difference_axes = (figure.add_subplot(1, 3, index) for index in (1, 2, 3))
    plain = next((entry for entry in document["configurations"] if entry["name"] == "plain"), None)
    plain_points = {} if plain is None else dict([(0, plain["initial_validation_loss"])] + [
        tuple(point) for point in plain["run"]["validation_curve"]])
    for entry in document["configurations"]:
        run = entry["run"]
        style = {"linestyle": "--"} if entry["loss"] == "logits" else {}
        if run["train_curve"]:
            steps, losses = zip(*run["train_curve"])
            train_axes.plot(steps, losses, label=entry["name"], **style)
        points = [(0, entry["initial_validation_loss"])] + [tuple(point) for point in run["validation_curve"]]
        steps, losses = zip(*points)
        validation_axes.plot(steps, losses, marker=".", label=entry["name"], **style)
        differences = [(step, loss - plain_points[step]) for step, loss in points if step in plain_points]
        if differences:
            difference_axes.plot(*zip(*differences), marker=".", label=entry["name"], **style)
    environment = document["environment"]
    for axes, title in ((train_axes, "train loss"), (validation_axes, "validation loss"),
                        (difference_axes, "validation loss − plain's")):
        report.label_step_axes(axes, f"{title} (nats/byte)",
                               f"{title}, {environment['device']}, {environment['date_utc'][:10]}", legend_fontsize=8)
    report.save_figure(figure, path, dpi=100)
    return None
