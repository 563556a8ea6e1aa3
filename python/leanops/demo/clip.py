"""``leanops demo clip``: CLIP and SigLIP losses at a batch size plain PyTorch cannot hold.

A tiny two-tower model (two MLPs mapping the two views of synthetic pairs to D-dim normalised features, with a
learnable logit scale and, for SigLIP, a learnable bias) trains for a few steps with ``leanops.clip_loss`` and with
``leanops.siglip_loss`` at batch size B. The pairs are learnable: each is a random "concept" vector seen through two
fixed random maps (one of them non-linear) plus noise.

What it reports:

- the loss at every step and the top-1 retrieval accuracy (image -> text) on a held-out synthetic batch, before and
  after training;
- the peak memory of one leanops training step at B (towers, features, loss, backward, optimizer step), measured;
- what plain PyTorch's loss (``leanops.baselines``, which builds the B x B logits) needs at B, computed
  as ``plain_logits_bytes(B) = 3 * B^2 * 4``: the three B x B float32 matrices autograd keeps for the backward (CLIP:
  the similarity matrix and the two log-softmax outputs; SigLIP: the similarity matrix, the +-1 label matrix and the
  signed logits), a lower bound (the forward's other B x B temporaries and the backward's gradients come on top);
- plain PyTorch measured at a few smaller B, which shows its memory growing as B^2 (and the coefficient it
  actually reaches, used to extrapolate to B), beside leanops' at the same B; on a GPU, plain PyTorch is also tried
  at B itself (out of memory is recorded as the result); on the CPU it is not tried at B (it would allocate tens of
  GiB).

Writes ``<out>/demo-clip-<device>.{md,json,png}``.
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import leanops
from leanops import baselines

from .common import (PROGRAM, PeakMemory, busy_notes, command_of, cpu_memory_pass, format_bytes, heading, log,
                     measure_call, memory_description, peak_cell, write_outputs)

LOSSES = ("clip", "siglip")
PLAIN_SAVED_MATRICES = 3  # B x B float32 matrices plain PyTorch keeps for the backward (see plain_logits_bytes)
CLIP_LR = 5e-3

# Sizes: pairs per step, steps per loss, feature dim, tower hidden size, the smaller batches plain PyTorch is
# measured at, and the held-out batch of the retrieval accuracy.
CLIP_SIZES = {
    "quick": {"batch_size": 4096, "steps": 6, "dim": 32, "hidden": 128, "plain_batches": [512, 1024, 2048],
              "heldout": 512},
    "cpu": {"batch_size": 32768, "steps": 8, "dim": 32, "hidden": 256, "plain_batches": [1024, 2048, 4096],
            "heldout": 1024},
    "cuda": {"batch_size": 65536, "steps": 30, "dim": 128, "hidden": 512, "plain_batches": [4096, 8192, 16384],
             "heldout": 4096},
}
# The synthetic pairs: concept dimension, the two views' input dimensions, the noise on each view.
CONCEPT_DIM, IMAGE_DIM, TEXT_DIM, NOISE = 16, 64, 48, 0.5


def plain_logits_bytes(batch: int) -> int:
    """The bytes of the B x B float32 matrices plain PyTorch's CLIP or SigLIP loss keeps for its backward at batch
    `batch`: 3 * B^2 * 4 (a lower bound of its peak; see the module docstring)."""
    return PLAIN_SAVED_MATRICES * batch * batch * 4


class SyntheticPairs:
    """Paired views of random concepts: image = concept @ A + noise, text = tanh(concept @ C) + noise, with A and C
    fixed random maps drawn from `seed`. Pair i's views share concept i only, so matching them is learnable."""

    def __init__(self, seed: int):
        generator = torch.Generator().manual_seed(10_007 + seed)
        self.image_map = torch.randn(CONCEPT_DIM, IMAGE_DIM, generator=generator) / math.sqrt(CONCEPT_DIM)
        self.text_map = torch.randn(CONCEPT_DIM, TEXT_DIM, generator=generator) * (2 / math.sqrt(CONCEPT_DIM))

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        concept = torch.randn(size, CONCEPT_DIM, generator=generator)
        image = concept @ self.image_map + NOISE * torch.randn(size, IMAGE_DIM, generator=generator)
        text = torch.tanh(concept @ self.text_map) + NOISE * torch.randn(size, TEXT_DIM, generator=generator)
        return image, text


class Tower(nn.Module):
    """Linear, GELU, Linear, then L2 normalisation."""

    def __init__(self, inputs: int, hidden: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


class TwoTower(nn.Module):
    """An image tower and a text tower, a learnable log logit scale (CLIP: log(1/0.07), SigLIP: log 10) and, for
    SigLIP, a learnable logit bias (-10), the papers' initializations."""

    def __init__(self, loss: str, hidden: int, dim: int):
        super().__init__()
        self.loss = loss
        self.image = Tower(IMAGE_DIM, hidden, dim)
        self.text = Tower(TEXT_DIM, hidden, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07) if loss == "clip" else math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if loss == "siglip" else None

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(image), self.text(text)

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=100.0)


def loss_value(name: str, image: torch.Tensor, text: torch.Tensor, scale, bias=None, *, plain: bool = False):
    """The CLIP or SigLIP loss of the features: leanops', or plain PyTorch's (the B x B logits)."""
    if name == "clip":
        function = baselines.clip_loss if plain else leanops.clip_loss
        return function(image, text, scale)
    function = baselines.siglip_loss if plain else leanops.siglip_loss
    return function(image, text, scale, bias)


@torch.no_grad()
def retrieval_accuracy(model: TwoTower, image: torch.Tensor, text: torch.Tensor) -> float:
    """Top-1 image -> text retrieval accuracy over the batch (chance: 1 / batch)."""
    image_features, text_features = model(image, text)
    best = (image_features @ text_features.T).argmax(dim=1)
    return float((best == torch.arange(image.shape[0], device=image.device)).float().mean())


def new_model(name: str, settings: dict, device) -> tuple[TwoTower, torch.optim.Optimizer]:
    """A two-tower model for loss `name`, initialized from the seed (the same for both losses), and its AdamW."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        model = TwoTower(name, settings["hidden"], settings["dim"])
    model = model.to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.0)


def training_step(name: str, model: TwoTower, optimizer, image: torch.Tensor, text: torch.Tensor) -> float:
    """Forward, loss (leanops'), backward and optimizer step; returns the loss."""
    image_features, text_features = model(image, text)
    value = loss_value(name, image_features, text_features, model.scale(), model.logit_bias)
    value.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(value.detach())


def train_loss(name: str, settings: dict, data: SyntheticPairs, heldout, device) -> dict:
    """Train a fresh two-tower model with loss `name` for settings["steps"] steps of settings["batch_size"] pairs;
    the loss per step, the retrieval accuracy before and after, and on a GPU the peak memory of each step."""
    model, optimizer = new_model(name, settings, device)
    heldout_image, heldout_text = (tensor.to(device) for tensor in heldout)
    before = retrieval_accuracy(model, heldout_image, heldout_text)
    from ..benchmarks.common import synchronize

    batches = torch.Generator().manual_seed(settings["seed"])
    losses, peaks, seconds = [], [], []
    for step in range(1, settings["steps"] + 1):
        image, text = (tensor.to(device) for tensor in data.batch(settings["batch_size"], batches))
        synchronize(device)
        start = time.perf_counter()
        if device.type == "cuda":
            with PeakMemory(device, collect=False) as peak:
                losses.append(training_step(name, model, optimizer, image, text))
            peaks.append(peak.bytes)
        else:
            losses.append(training_step(name, model, optimizer, image, text))
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        memory = f", peak {format_bytes(peaks[-1])}" if peaks else ""
        log(f"    {name}: step {step}/{settings['steps']}: loss {losses[-1]:.4f}, {seconds[-1]:.2f} s{memory}")
        del image, text
    after = retrieval_accuracy(model, heldout_image, heldout_text)
    return {"losses": losses, "peak_bytes": max(peaks) if peaks else None, "seconds_per_step": seconds,
            "retrieval_before": before, "retrieval_after": after,
            "final_logit_scale": float(model.scale().detach()),
            "final_logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach())}


def scaling_rows(settings: dict, device) -> list[dict]:
    """The loss alone (forward + backward), plain PyTorch and leanops, at each of settings["plain_batches"]."""
    rows = []
    for name in LOSSES:
        for size in settings["plain_batches"]:
            log(f"{PROGRAM} clip: loss alone at B = {size:,}: {name}, plain PyTorch and leanops")
            for plain in (True, False):
                row = loss_only_peak(name, size, settings["dim"], device, plain=plain, seed=settings["seed"])
                row["plain_logits_bytes"] = plain_logits_bytes(size)
                rows.append(row)
    return rows


def clip_memory_pass(settings: dict) -> dict:
    """The CPU memory pass (``common.memory_pass_in_fresh_process``): the peak of one training step at B for each
    loss (the second step of a fresh model: the optimizer state exists), and ``scaling_rows``."""
    device = torch.device("cpu")
    torch.set_num_threads(settings["threads"])
    data = SyntheticPairs(settings["seed"])
    for name in LOSSES:  # one-time kernel and thread-pool set-up
        loss_only_peak(name, 256, settings["dim"], device, plain=False, seed=settings["seed"])
    steps = {}
    for name in LOSSES:
        model, optimizer = new_model(name, settings, device)
        batches = torch.Generator().manual_seed(settings["seed"])
        image, text = data.batch(settings["batch_size"], batches)
        training_step(name, model, optimizer, image, text)
        image, text = data.batch(settings["batch_size"], batches)
        with PeakMemory(device) as peak:
            training_step(name, model, optimizer, image, text)
        steps[name] = peak.bytes
        del model, optimizer, image, text
    return {"training_step": steps, "scaling": scaling_rows(settings, device)}


def loss_step(name: str, batch: int, dim: int, device, *, plain: bool, seed: int):
    """One forward + backward of loss `name` alone (plain PyTorch's or leanops') on random normalised (batch, dim)
    features, as a function of no arguments that holds them."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).to(device).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).to(device).requires_grad_()
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True) if name == "siglip" else None
    inputs = (image, text, scale) + ((bias,) if bias is not None else ())

    def step():
        value = loss_value(name, image, text, scale, bias, plain=plain)
        torch.autograd.grad(value, inputs)

    return step


def loss_only_peak(name: str, batch: int, dim: int, device, *, plain: bool, seed: int) -> dict:
    """Peak memory of one forward + backward of the loss alone (``loss_step``), plain PyTorch's or leanops'
    (``PeakMemory``; on the CPU the largest over calls repeated for at least 50 ms, so that the 1 ms sampler sees
    each phase); out of memory is a result ("out of memory"), not a crash."""
    step = loss_step(name, batch, dim, device, plain=plain, seed=seed)

    def peak(step, seconds):
        calls = 1 if device.type == "cuda" else max(3, math.ceil(0.05 / max(seconds, 1e-6)))
        with PeakMemory(device, collect=False) as measured:
            for _ in range(calls):
                step()
        return measured.bytes, ""

    result = {"loss": name, "batch": batch, "implementation": "plain" if plain else "leanops",
              **measure_call(step, device, peak)}
    del step  # and the features it holds
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def clip_settings(arguments: argparse.Namespace, device) -> dict:
    size = "quick" if arguments.quick else device.type
    settings = {"size": size, **CLIP_SIZES[size]}
    if arguments.batch_size is not None:
        settings["batch_size"] = arguments.batch_size
    if arguments.steps is not None:
        settings["steps"] = arguments.steps
    batch = settings["batch_size"]
    settings["plain_batches"] = [b for b in settings["plain_batches"] if b <= batch // 2] or \
        sorted({max(1, batch // 4), max(1, batch // 2)})
    settings["heldout"] = min(settings["heldout"], batch)
    settings["lr"] = arguments.lr if arguments.lr is not None else CLIP_LR
    settings["seed"] = arguments.seed
    settings["threads"] = torch.get_num_threads()
    settings["data"] = {"concept_dim": CONCEPT_DIM, "image_dim": IMAGE_DIM, "text_dim": TEXT_DIM, "noise": NOISE}
    return settings


def device_memory_bytes(device) -> int | None:
    """The device's total memory (GPU memory, or the machine's RAM)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def run_clip(arguments: argparse.Namespace, device, out_dir: str) -> int:
    """The contrastive demo (see the module docstring)."""
    from ..benchmarks import common

    settings = clip_settings(arguments, device)
    started = time.perf_counter()
    batch = settings["batch_size"]
    environment = common.environment(device)
    total_memory = device_memory_bytes(device)
    log(f"{PROGRAM} clip: on {environment['device']}: B = {batch:,} pairs per step, "
        f"{settings['steps']} steps per loss; plain PyTorch's B x B logits at this B: >= "
        f"{format_bytes(plain_logits_bytes(batch))}")
    notes = busy_notes(device)
    data = SyntheticPairs(settings["seed"])
    heldout = data.batch(settings["heldout"], torch.Generator().manual_seed(1_000_000 + settings["seed"]))
    # Warm-up (one-time kernel and thread-pool set-up out of the measurements).
    for name in LOSSES:
        loss_only_peak(name, 256, settings["dim"], device, plain=False, seed=settings["seed"])
    results = {}
    for name in LOSSES:
        log(f"{PROGRAM} clip: training with leanops.{name}_loss at B = {batch:,}")
        result = train_loss(name, settings, data, heldout, device)
        result["plain_logits_bytes"] = plain_logits_bytes(batch)
        if device.type == "cuda":
            log(f"{PROGRAM} clip: trying plain PyTorch's {name} loss at B = {batch:,}")
            tried = loss_only_peak(name, batch, settings["dim"], device, plain=True, seed=settings["seed"])
            result["plain_at_batch"] = {"tried": True, "peak_bytes": tried["peak_bytes"], "note": tried["note"]}
        else:
            result["plain_at_batch"] = {
                "tried": False, "peak_bytes": None,
                "note": f"not tried on the CPU: it would allocate at least {format_bytes(plain_logits_bytes(batch))}"
                        + (f" of this machine's {format_bytes(total_memory)} RAM" if total_memory else "")}
        results[name] = result
        log(f"{PROGRAM} clip: {name}: loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}, "
            f"held-out retrieval {result['retrieval_before']:.1%} -> {result['retrieval_after']:.1%}")
    if device.type == "cuda":
        scaling = scaling_rows(settings, device)
    else:
        log(f"{PROGRAM} clip: memory pass (one training step at B = {batch:,} per loss, then the loss "
            f"alone at B = {', '.join(f'{b:,}' for b in settings['plain_batches'])}) in a fresh process")
        measured = cpu_memory_pass("clip", settings, notes, clip_memory_pass)
        for name in LOSSES:
            results[name]["peak_bytes"] = measured["training_step"].get(name)
        scaling = measured["scaling"]
    for name in LOSSES:
        log(f"{PROGRAM} clip: {name}: peak memory of a training step at B = {batch:,}: "
            f"{format_bytes(results[name]['peak_bytes'])}")
    for name in LOSSES:
        measured = [row for row in scaling if row["loss"] == name and row["implementation"] == "plain"
                    and row["peak_bytes"]]
        if measured:
            largest = max(measured, key=lambda row: row["batch"])
            coefficient = largest["peak_bytes"] / (largest["batch"] ** 2 * 4)
            results[name]["plain_coefficient"] = coefficient
            results[name]["plain_extrapolated_bytes"] = round(coefficient * batch * batch * 4)
        else:
            results[name]["plain_coefficient"] = results[name]["plain_extrapolated_bytes"] = None
    document = {"demo": "clip", "command": command_of(arguments), "environment": environment,
                "settings": settings, "device_memory_bytes": total_memory,
                "memory_method": memory_description(device, "one training step at B of each loss (the second step "
                                                    "of a fresh model) and the loss alone at each smaller B"),
                "plain_logits_formula": "3 * B^2 * 4 bytes: the B x B float32 matrices autograd keeps for the "
                                        "backward (CLIP: similarity + two log-softmax outputs; SigLIP: similarity, "
                                        "+-1 labels, signed logits); a lower bound of plain PyTorch's peak",
                "losses": results, "scaling": scaling, "notes": notes,
                "seconds": round(time.perf_counter() - started, 1)}
    return write_clip_outputs(document, out_dir, plot=not arguments.no_plot)


def write_clip_outputs(document: dict, out_dir: str, *, plot: bool = True) -> int:
    """Write <out>/demo-clip-<device>.{json,md,png}, print the tables and the findings; returns 0."""
    return write_outputs(document, out_dir, "clip", write_plot=write_clip_plot, markdown=format_clip_markdown,
                         tables=[clip_table, scaling_table], findings=clip_findings, plot=plot)


def _plain_tried(result: dict) -> str:
    tried = result["plain_at_batch"]
    if not tried["tried"]:
        return tried["note"]
    if tried["peak_bytes"] is not None:
        return f"tried: ran, peak {format_bytes(tried['peak_bytes'])}"
    return f"tried: {tried['note']}"


def clip_table(document: dict) -> str:
    """The training table (markdown)."""
    from ..benchmarks.train_lm import report

    settings = document["settings"]
    header = ["loss", "B", "loss: step 1 → last", f"held-out top-1 retrieval (of {settings['heldout']:,})",
              "leanops training step, peak memory (measured)", "s/step", "plain PyTorch at B: 3·B²·4 (computed)",
              "plain at B, extrapolated from measured", "plain PyTorch at B"]
    rows = []
    for name, result in document["losses"].items():
        losses = result["losses"]
        per_step = sorted(result["seconds_per_step"])[len(result["seconds_per_step"]) // 2]
        extrapolated = result.get("plain_extrapolated_bytes")
        rows.append([f"`leanops.{name}_loss`", f"{settings['batch_size']:,}", f"{losses[0]:.4f} → {losses[-1]:.4f}",
                     f"{result['retrieval_before']:.1%} → {result['retrieval_after']:.1%}",
                     format_bytes(result["peak_bytes"]), f"{per_step:.2f}",
                     format_bytes(result["plain_logits_bytes"]),
                     "n/a" if extrapolated is None else
                     f"{format_bytes(extrapolated)} ({result['plain_coefficient']:.1f}·B²·4)",
                     _plain_tried(result)])
    return report.markdown_table(header, rows)


def scaling_table(document: dict) -> str:
    """The loss-alone table (markdown): plain PyTorch against leanops at each smaller B."""
    from ..benchmarks.train_lm import report

    header = ["loss", "B", "plain PyTorch, peak (measured)", "plain / (B²·4)", "3·B²·4 (computed)",
              "leanops, peak (measured)"]
    rows = []
    by_key = {(row["loss"], row["batch"], row["implementation"]): row for row in document["scaling"]}
    for (name, batch, implementation), row in by_key.items():
        if implementation != "plain":
            continue
        lean = by_key.get((name, batch, "leanops"), {})
        ratio = "" if row["peak_bytes"] is None else f"{row['peak_bytes'] / (batch * batch * 4):.1f}"
        rows.append([name, f"{batch:,}", peak_cell(row), ratio, format_bytes(row["plain_logits_bytes"]),
                     peak_cell(lean)])
    return report.markdown_table(header, rows)


def clip_findings(document: dict) -> list[str]:
    settings = document["settings"]
    batch = settings["batch_size"]
    lines = []
    for name, result in document["losses"].items():
        losses = result["losses"]
        change = "fell" if losses[-1] < losses[0] else "did not fall"
        lines.append(f"{name}: at B = {batch:,} the loss {change} from {losses[0]:.4f} to {losses[-1]:.4f} in "
                     f"{len(losses)} steps and held-out retrieval went from {result['retrieval_before']:.1%} to "
                     f"{result['retrieval_after']:.1%} (chance {1 / settings['heldout']:.2%}); one leanops "
                     f"training step peaked at {format_bytes(result['peak_bytes'])}, while plain PyTorch's loss "
                     f"keeps at least {format_bytes(result['plain_logits_bytes'])} of B × B matrices at this B"
                     + (f" (extrapolated from its measured peak at smaller B: "
                        f"{format_bytes(result['plain_extrapolated_bytes'])})"
                        if result.get("plain_extrapolated_bytes") else "") + ".")
    memory = document.get("device_memory_bytes")
    if memory:
        what = "GPU memory" if document["environment"]["device_type"] == "cuda" else "RAM"
        needed = [result.get("plain_extrapolated_bytes") or result["plain_logits_bytes"]
                  for result in document["losses"].values()]
        largest = max(needed)
        verdict = "more than" if largest > memory else "within"
        lines.append(f"Plain PyTorch at B = {batch:,} would need up to {format_bytes(largest)} for its loss "
                     f"(extrapolated where measured, else the 3·B²·4 lower bound): {verdict} this device's "
                     f"{format_bytes(memory)} of {what}.")
    growth = {}
    for row in document["scaling"]:
        if row["implementation"] == "plain" and row["peak_bytes"]:
            growth.setdefault(row["loss"], []).append((row["batch"], row["peak_bytes"]))
    for name, points in growth.items():
        if len(points) >= 2:
            (small, low), (large, high) = min(points), max(points)
            exponent = math.log(high / low) / math.log(large / small)
            verdict = "quadratic, as the B × B logits are" if 1.8 <= exponent <= 2.2 else \
                "not the expected B^2: the measurement is coarse at these sizes"
            lines.append(f"Plain PyTorch's {name} loss (forward + backward) grows as B^{exponent:.2f} between "
                         f"B = {small:,} and {large:,} ({format_bytes(low)} → {format_bytes(high)}: "
                         f"{verdict}); leanops' stays at "
                         + ", ".join(format_bytes(row["peak_bytes"]) for row in sorted(
                             (row for row in document["scaling"] if row["loss"] == name
                              and row["implementation"] == "leanops" and row["peak_bytes"] is not None),
                             key=lambda row: row["batch"]))
                         + " at the same B.")
    return lines


def format_clip_markdown(document: dict) -> str:
    settings, environment = document["settings"], document["environment"]
    lines = heading("`leanops demo clip`: CLIP and SigLIP at a batch plain PyTorch cannot hold", environment,
                         document["command"])
    data = settings["data"]
    lines += [
        "## Setup", "",
        f"- Data: synthetic pairs: a random concept (dim {data['concept_dim']}) seen as image = concept·A + noise "
        f"(dim {data['image_dim']}) and text = tanh(concept·C) + noise (dim {data['text_dim']}), noise "
        f"{data['noise']}; a fresh batch every step, the same batches for both losses (seed {settings['seed']}).",
        f"- Model: two towers (Linear {settings['hidden']}, GELU, Linear {settings['dim']}, L2 normalisation), a "
        "learnable logit scale (CLIP init 1/0.07, SigLIP 10) and SigLIP's learnable bias (init -10); "
        f"torch AdamW lr {settings['lr']:g}, float32.",
        f"- B = {settings['batch_size']:,} pairs per step, {settings['steps']} steps per loss; retrieval: top-1 "
        f"image → text on a held-out batch of {settings['heldout']:,} pairs.",
        f"- Peak memory: {document['memory_method']}. The training step's figure covers the towers' activations, "
        "the features, the loss forward and backward and the optimizer step"
        + (" (the largest over the steps)." if environment["device_type"] == "cuda" else "."),
        f"- Plain PyTorch (`leanops.baselines`, open_clip's ClipLoss / SigLipLoss) at B: "
        f"{document['plain_logits_formula']}. Measured at smaller B (loss forward + backward alone, on random "
        "features), its peak gives the coefficient k of k·B²·4 used to extrapolate.",
        f"- Threads: {settings['threads']}.",
        "", "## Training at B", "", clip_table(document), "",
        "## Loss forward + backward alone at smaller B", "", scaling_table(document), "",
        "## What it shows (computed from the tables)", ""]
    lines += [f"- {line}" for line in clip_findings(document)]
    if document.get("plot"):
        lines += ["", f"![loss per step and memory against B]({document['plot']})"]
    if document.get("notes"):
        lines += ["", "Notes:"] + [f"- {note}" for note in document["notes"]]
    if environment["device_type"] == "cpu":
        lines += ["", "On a GPU, `leanops demo clip --device cuda` trains at B = 65,536 (D = 128) and tries plain "
                  "PyTorch at that B too."]
    return "\n".join(lines) + "\n"


def write_clip_plot(document: dict, path: str) -> str | None:
    """Loss per step (one panel per loss) and memory against B (plain measured, 3·B²·4, leanops measured)."""
    from ..benchmarks.train_lm import report

    try:
        figure = report.new_figure((13, 4))
    except ImportError as missing:
        return f"matplotlib is not installed ({missing}); `pip install matplotlib` for the PNG"
    environment, settings = document["environment"], document["settings"]
    for index, (name, result) in enumerate(document["losses"].items(), 1):
        axes = figure.add_subplot(1, 3, index)
        axes.plot(range(1, len(result["losses"]) + 1), result["losses"], marker=".")
        axes.set_xlabel("step")
        axes.set_ylabel(f"{name} loss")
        axes.set_title(f"leanops.{name}_loss, B = {settings['batch_size']:,}\n{environment['device']}, "
                       f"{environment['date_utc'][:10]}", fontsize=8)
        axes.grid(True, alpha=0.3)
    axes = figure.add_subplot(1, 3, 3)
    for name in document["losses"]:
        for implementation, marker in (("plain", "o"), ("leanops", "s")):
            points = sorted((row["batch"], row["peak_bytes"] / 2**20) for row in document["scaling"]
                            if row["loss"] == name and row["implementation"] == implementation and row["peak_bytes"])
            if points:
                axes.plot(*zip(*points), marker=marker, label=f"{name}, {implementation} (measured)")
        training = document["losses"][name].get("peak_bytes")
        if training:
            axes.plot([settings["batch_size"]], [training / 2**20], marker="*", markersize=10, linestyle="",
                      label=f"{name}, leanops training step at B")
    batches = sorted({row["batch"] for row in document["scaling"]} | {settings["batch_size"]})
    axes.plot(batches, [plain_logits_bytes(b) / 2**20 for b in batches], linestyle="--", color="gray",
              label="3·B²·4 (plain, computed)")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("B")
    axes.set_ylabel("peak memory (MiB)")
    axes.set_title("memory against B", fontsize=8)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=6, loc="upper left")
    report.save_figure(figure, path, dpi=100)
    return None
