"""A small language-model training benchmark: validation loss and optimizer state of AdamW, FRUGAL and Collage.

A LLaMA-style decoder (~10M parameters on a GPU, a tiny one on the CPU) learns byte-level Python: the ``.py``
files of the standard library and of the installed packages, which every machine has offline. Each method trains
the same model from the same initialization on the same batches (per seed), for a fixed number of steps well under
one epoch, and the run reports its final validation loss (fixed validation windows), the bytes of optimizer state,
tokens/s, peak memory and its loss curves. Over seeds, each (budget, method) gets the mean and spread of the
validation loss, relative to AdamW's, and its state as a percentage of AdamW's; ``format_markdown`` writes the
table and findings computed from those numbers (never hand-written claims).

The pieces are reusable (``leanops demo`` builds on them):

- ``load_corpus``: the byte corpus, split into train/validation by a hash of each file's path;
- ``LlamaModel`` / ``ModelConfig`` / ``MODEL_SIZES``: the model, its loss through ``leanops.linear_cross_entropy``
  (or plain logits + ``F.cross_entropy``);
- ``METHODS`` / ``make_optimizer``: optimizer configurations by name;
- ``TrainConfig`` / ``train``: one run; ``aggregate``, ``findings``, ``format_markdown``, ``write_loss_plot``:
  the report;
- ``main``: ``python -m benchmarks.train_lm --device cuda --steps 1000 --batch-tokens 32768 --seeds 0 1
  --budgets 1000 3000 --out benchmarks/results/`` (writes ``<out>/frugal.md`` and ``<out>/frugal.json``; a second
  call with the same settings resumes, skipping the runs already in the JSON).

Defaults (sources in ``SOURCES``): one learning rate 1e-3 for every method, linear warm-up over the first 10% of
the steps then cosine decay to 10% of the peak (GaLore's and FRUGAL's pre-training scripts); FRUGAL density 0.25,
update_gap 200, state-free lr scale 1.0 and state-full lr scale 1.0 (the FRUGAL README: "in all main experiments",
1.0 for pre-training); betas (0.9, 0.999), eps 1e-8, gradient clipping at norm 1.0, no weight decay.
"""
import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shlex
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import leanops
from leanops import backends
from leanops import cross_entropy as leanops_cross_entropy
from leanops.optim import FRUGAL, CollageAdamW, frugal_param_groups

from . import common, measurement

PROGRAM = "benchmarks.train_lm"
VOCABULARY = 256  # bytes
FILE_SEPARATOR = b"\x00"  # between files: a byte that Python source practically never contains
MAX_FILE_BYTES = 1 << 20  # larger .py files are generated tables, not code
VALIDATION_EVERY = 20  # one file in 20 (by a hash of its path) is validation
LOSSES = ("linear-ce", "logits")

# ---------------------------------------------------------------------------------------------------------------
# Corpus.


@dataclasses.dataclass
class Corpus:
    """Byte-level token streams (uint8 tensors on the CPU) of the train and validation files, each file followed by
    FILE_SEPARATOR, with the file keys ("<root label>/<relative path>") of each split, in stream order."""
    train: torch.Tensor
    validation: torch.Tensor
    train_files: list[str]
    validation_files: list[str]
    roots: dict[str, str]
    byte_cap: int
    digest: str
    load_seconds: float

    def describe(self) -> dict:
        """Sizes and identity of the corpus, for the report and the JSON (not the bytes themselves)."""
        return {"roots": dict(self.roots), "byte_cap": self.byte_cap, "train_bytes": int(self.train.numel()),
                "validation_bytes": int(self.validation.numel()), "train_files": len(self.train_files),
                "validation_files": len(self.validation_files), "sha256": self.digest,
                "load_seconds": round(self.load_seconds, 2)}

    def train_batch(self, generator: torch.Generator, sequences: int, context: int) -> torch.Tensor:
        """`sequences` random windows of context + 1 bytes from the train stream, as a (sequences, context + 1)
        int64 tensor: inputs are [:, :-1], targets [:, 1:]. The starts come from `generator` only, so a seed gives
        the same batches to every method."""
        count = self.train.numel() - context
        if count < 1:
            raise ValueError(f"{PROGRAM}: the train stream ({self.train.numel()} bytes) is shorter than one window "
                             f"of context + 1 = {context + 1} bytes: raise the byte cap")
        starts = torch.randint(0, count, (sequences,), generator=generator)
        return self.train[starts[:, None] + torch.arange(context + 1)].long()

    def validation_windows(self, count: int, context: int) -> torch.Tensor:
        """`count` windows of context + 1 bytes evenly spaced over the validation stream: (count, context + 1)
        int64, the same for every run on this corpus."""
        last_start = self.validation.numel() - context - 1
        if count < 1:
            raise ValueError(f"{PROGRAM}: argument 'validation_windows' must be at least 1, got {count}")
        if last_start < 0:
            raise ValueError(f"{PROGRAM}: the validation stream ({self.validation.numel()} bytes) is shorter than "
                             f"one window of {context + 1} bytes: raise the byte cap")
        starts = torch.linspace(0, last_start, count).round().long()
        return self.validation[starts[:, None] + torch.arange(context + 1)].long()


def default_roots() -> dict[str, str]:
    """{"stdlib": the standard library's directory, "purelib": the installed packages' directory} of this
    interpreter (sysconfig); "platlib" too when it is a different directory."""
    paths = sysconfig.get_paths()
    roots = {"stdlib": paths["stdlib"], "purelib": paths["purelib"]}
    if os.path.realpath(paths["platlib"]) != os.path.realpath(paths["purelib"]):
        roots["platlib"] = paths["platlib"]
    return roots


def _hash_fraction(salt: str, key: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{salt}:{key}".encode()).digest()[:8], "big")


def list_python_files(roots: dict[str, str]) -> list[tuple[str, str, int]]:
    """Every ``.py`` file under the roots, as (key, path, size) sorted by key, the key being "<label>/<path
    relative to the root>". Package directories inside the standard library's tree (site-packages,
    dist-packages) belong to purelib, not stdlib; __pycache__ is skipped; a file reached twice (through another
    root) is listed once; files above MAX_FILE_BYTES are left out."""
    files, seen = [], set()
    for label, root in sorted(roots.items()):
        if not os.path.isdir(root):
            continue
        for directory, subdirectories, names in os.walk(root):
            subdirectories[:] = sorted(name for name in subdirectories
                                       if name not in ("site-packages", "dist-packages", "__pycache__"))
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                try:
                    real, size = os.path.realpath(path), os.path.getsize(path)
                except OSError:
                    continue
                if real in seen or size > MAX_FILE_BYTES or size == 0:
                    continue
                seen.add(real)
                files.append((f"{label}/{os.path.relpath(path, root)}", path, size))
    return sorted(files)


def load_corpus(byte_cap: int, *, roots: dict[str, str] | None = None,
                validation_every: int = VALIDATION_EVERY) -> Corpus:
    """The byte corpus of the ``.py`` files under `roots` (default: ``default_roots()``), at most `byte_cap`
    bytes of files in all.

    Deterministic: files are listed in sorted key order; a file is validation when a hash of its key is divisible
    by `validation_every` (so its split never depends on the cap or on the other files). Each split then gets its
    share of the cap (validation: byte_cap // validation_every, train: the rest), filled with files in the order
    of another hash of their keys (a mix of every root and package, not the alphabetically first ones), skipping
    any that would pass the share. The streams concatenate each split's chosen files in sorted key order.
    """
    if isinstance(byte_cap, bool) or not isinstance(byte_cap, int) or byte_cap < 1:
        raise ValueError(f"{PROGRAM}: argument 'byte_cap' must be a positive integer, got {byte_cap!r}")
    if isinstance(validation_every, bool) or not isinstance(validation_every, int) or validation_every < 2:
        raise ValueError(f"{PROGRAM}: argument 'validation_every' must be an integer >= 2, got {validation_every!r}")
    start = time.perf_counter()
    roots = dict(roots or default_roots())
    listed = list_python_files(roots)
    if not listed:
        raise ValueError(f"{PROGRAM}: no .py files under {roots}")
    shares = {"validation": byte_cap // validation_every}
    shares["train"] = byte_cap - shares["validation"]
    splits: dict[str, tuple[list[str], list[bytes]]] = {"train": ([], []), "validation": ([], [])}
    for split in splits:
        members = [item for item in listed
                   if (_hash_fraction("split", item[0]) % validation_every == 0) == (split == "validation")]
        chosen, total = [], 0
        for key, path, size in sorted(members, key=lambda item: (_hash_fraction("order", item[0]), item[0])):
            if total + size <= shares[split]:
                chosen.append((key, path))
                total += size
        for key, path in sorted(chosen):
            try:
                with open(path, "rb") as file:
                    content = file.read()
            except OSError:
                continue
            splits[split][0].append(key)
            splits[split][1].append(content + FILE_SEPARATOR)
    digest = hashlib.sha256()
    streams = {}
    for split, (_, contents) in splits.items():
        joined = b"".join(contents)
        digest.update(joined)
        streams[split] = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else \
            torch.zeros(0, dtype=torch.uint8)
    return Corpus(train=streams["train"], validation=streams["validation"], train_files=splits["train"][0],
                  validation_files=splits["validation"][0], roots=roots, byte_cap=byte_cap,
                  digest=digest.hexdigest()[:16], load_seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------------
# Model.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-style decoder: `layers` blocks of RMSNorm + causal attention with rotary position embeddings
    (`heads` heads) and RMSNorm + SwiGLU MLP (hidden size `mlp_hidden`), over byte tokens, windows of `context`."""
    d_model: int
    layers: int
    heads: int
    mlp_hidden: int
    context: int
    vocabulary: int = VOCABULARY

    def check(self) -> None:
        for name in ("d_model", "layers", "heads", "mlp_hidden", "context", "vocabulary"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{PROGRAM}: model argument '{name}' must be a positive integer, got {value!r}")
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            raise ValueError(f"{PROGRAM}: model argument 'd_model' ({self.d_model}) must be 'heads' ({self.heads}) "
                             "times an even head size (rotary embeddings rotate pairs)")


# tiny: the CPU default (~0.1M parameters); small: the issue's ~10M parameters (10.8M), the GPU default.
MODEL_SIZES = {
    "tiny": ModelConfig(d_model=64, layers=2, heads=4, mlp_hidden=176, context=64),
    "small": ModelConfig(d_model=384, layers=6, heads=6, mlp_hidden=1024, context=256),
}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, the statistics in float32 whatever x's dtype (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rotary_tables(length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, head_dim / 2), float32, of RoPE's angles position * 10000^(-2i / head_dim) (Su et al.
    2021). Made at every forward rather than kept as buffers: ``model.to(bfloat16)`` would round buffers."""
    inverse_frequency = 10000.0 ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inverse_frequency
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the (first half, second half) pairs of x's last dimension (LLaMA's rotate-half layout), in float32."""
    first, second = x.float().chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary embeddings, through F.scaled_dot_product_attention."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads = config.heads
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (projection(x).view(shape).transpose(1, 2) for projection in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, width))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """x + attention(norm(x)), then + mlp(norm(x)) (pre-norm)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model)
        self.attention = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LlamaModel(nn.Module):
    """Token embedding, `layers` blocks, a final RMSNorm and an untied output head ``lm_head`` (so that
    ``frugal_param_groups`` keeps the head, like the embedding and the norms, fully AdamW)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.check()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocabulary, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocabulary, bias=False)

    def initialize(self, generator: torch.Generator) -> None:
        """Normal(0, 0.02) weights, the residual outputs (o_proj, down_proj) scaled by 1/sqrt(2 layers) (GPT-2),
        norms at 1; drawn from `generator` in module order, so a seed gives every method the same start."""
        residual_std = 0.02 / math.sqrt(2 * self.config.layers)
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if name.endswith("norm.weight"):
                    parameter.fill_(1.0)
                    continue
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, length) int64 tokens -> (batch, length, d_model) final hidden states (after the final norm)."""
        x = self.embed_tokens(tokens)
        cos, sin = rotary_tables(tokens.shape[1], self.config.d_model // self.config.heads, tokens.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


def language_model_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                        loss: str = "linear-ce", backend: str = "auto", compute_dtype: torch.dtype | None = None,
                        reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of hidden @ weight^T against targets: ``leanops.linear_cross_entropy`` (loss="linear-ce",
    never building the logits) or plain PyTorch (loss="logits": the logits, then F.cross_entropy in float32).
    `compute_dtype` casts hidden and weight first (mixed precision: bfloat16 as autocast would)."""
    if loss not in LOSSES:
        raise ValueError(f"{PROGRAM}: argument 'loss' must be one of {LOSSES}, got {loss!r}")
    if compute_dtype is not None:
        hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if loss == "linear-ce":
        return leanops.linear_cross_entropy(hidden, weight, targets, reduction=reduction, backend=backend)
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction=reduction)


def resolve_loss_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> tuple[str, str]:
    """The linear cross-entropy backend to train with, by its concrete name, and a note ("" if none): `requested`
    when it names a backend; for "auto", the backend auto picks on this device and dtype when its loss and
    gradients on a small problem agree with the reference's (relative error within 1e-4 in float32, 2e-2 in 16
    bits), else "reference" with the reason: a backend that fails or has not been checked on this device must not
    decide the benchmark."""
    if requested != "auto":
        return requested, ""
    chosen = backends.resolve("leanops.linear_cross_entropy", "auto", device, dtype,
                              preference=leanops_cross_entropy.PREFERENCE,
                              implemented=leanops_cross_entropy.IMPLEMENTED)
    if chosen == "reference":
        return chosen, ""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(96, 48, generator=generator).to(device, dtype)
    weight = (torch.randn(VOCABULARY, 48, generator=generator) * 0.1).to(device, dtype)
    targets = torch.randint(0, VOCABULARY, (96,), generator=generator).to(device)

    def loss_and_gradients(backend):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        value = leanops.linear_cross_entropy(h, w, targets, backend=backend)
        value.backward()
        return [value.detach().float(), h.grad.float(), w.grad.float()]

    try:
        got, expected = loss_and_gradients(chosen), loss_and_gradients("reference")
    except Exception as error:  # noqa: BLE001 - any failure means: use the reference
        return "reference", (f"linear CE backend {chosen} failed on {device.type} ({type(error).__name__}: "
                             f"{error}); the reference served").splitlines()[0]
    limit = 1e-4 if dtype == torch.float32 else 2e-2
    errors = [measurement.relative_error(value, exact) for value, exact in zip(got, expected)]
    if not all(error <= limit for error in errors):  # a NaN fails
        return "reference", (f"linear CE backend {chosen} disagrees with the reference on {device.type} (relative "
                             f"errors {', '.join(f'{error:.1e}' for error in errors)} > {limit:g}); the reference "
                             "served")
    return chosen, ""


# ---------------------------------------------------------------------------------------------------------------
# Methods.


@dataclasses.dataclass
class Method:
    """One optimizer configuration: the dtype of the model's parameters, the optimizer ("adamw", "collage",
    "frugal") and its options. ``match_state_of``: for a low-rank (svd) FRUGAL, the method whose optimizer-state
    bytes the density is chosen to match (``matched_svd_density``)."""
    name: str
    description: str
    parameter_dtype: torch.dtype
    optimizer: str
    options: dict = dataclasses.field(default_factory=dict)
    match_state_of: str = ""


FRUGAL_DENSITY = 0.25
_METHOD_LIST = [
    Method("adamw", "torch.optim.AdamW, fp32 parameters (bf16 autocast on a GPU: fp32 master weights)",
           torch.float32, "adamw"),
    Method("frugal-blockwise", "FRUGAL rho=0.25, blockwise (random blocks), signSGD on the rest", torch.float32,
           "frugal", {"density": FRUGAL_DENSITY, "projection": "blockwise"}),
    Method("frugal-columns", "FRUGAL rho=0.25, random columns, signSGD on the rest", torch.float32, "frugal",
           {"density": FRUGAL_DENSITY, "projection": "columns"}),
    Method("lowrank-svd", "FRUGAL svd projection, no state-free update (GaLore-like low rank), density matched to "
           "frugal-columns' state bytes", torch.float32, "frugal", {"projection": "svd", "state_free": "none"},
           match_state_of="frugal-columns"),
    Method("signsgd", "FRUGAL rho=0: signSGD on every split matrix (AdamW on embeddings, norms, head)",
           torch.float32, "frugal", {"density": 0.0, "projection": "columns"}),
    Method("frugal-columns-project", "frugal-columns with on_switch='project' (kept moments of staying columns)",
           torch.float32, "frugal", {"density": FRUGAL_DENSITY, "projection": "columns", "on_switch": "project"}),
    Method("adamw-bf16", "torch.optim.AdamW on a bf16 model (pure bf16: no master weights)", torch.bfloat16,
           "adamw"),
    Method("collage-light", "leanops CollageAdamW mode='light' on the bf16 model", torch.bfloat16, "collage",
           {"mode": "light"}),
    Method("collage-plus", "leanops CollageAdamW mode='plus' on the bf16 model", torch.bfloat16, "collage",
           {"mode": "plus"}),
    Method("frugal-collage", "FRUGAL rho=0.25 columns, precision='collage', on the bf16 model", torch.bfloat16,
           "frugal", {"density": FRUGAL_DENSITY, "projection": "columns", "precision": "collage"}),
    # Not run by default (--methods): blockwise with kept state, and the low-rank baseline at the same rho.
    Method("frugal-blockwise-project", "frugal-blockwise with on_switch='project'", torch.float32, "frugal",
           {"density": FRUGAL_DENSITY, "projection": "blockwise", "on_switch": "project"}),
    Method("lowrank-svd-rho0.25", "FRUGAL svd rho=0.25, no state-free update (the paper's GaLore setting: more "
           "state than the others at the same rho)", torch.float32, "frugal",
           {"density": FRUGAL_DENSITY, "projection": "svd", "state_free": "none"}),
]
METHODS = {method.name: method for method in _METHOD_LIST}
DEFAULT_METHODS = ("adamw", "frugal-blockwise", "frugal-columns", "lowrank-svd", "signsgd", "frugal-columns-project",
                   "adamw-bf16", "collage-light", "collage-plus", "frugal-collage")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """What every method shares: the peak learning rate, AdamW's betas and eps, decoupled weight decay,
    FRUGAL's update_gap (steps between subspace switches), and the backend of CollageAdamW's step (every backend
    gives the reference's bits) and of FRUGAL's."""
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    update_gap: int = 200
    collage_backend: str = "auto"
    frugal_backend: str = "auto"


def _split_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(rows, columns) of each parameter FRUGAL splits in `model` (frugal_param_groups' split group)."""
    return [(parameter.shape[0], parameter.numel() // parameter.shape[0])
            for group in frugal_param_groups(model) if group["split"] for parameter in group["params"]]


@functools.cache
def _frugal_state_bytes_of_one(shape: tuple[int, int], device: str, dtype: torch.dtype, backend: str,
                               options: tuple) -> int:
    """FRUGAL's own ``state_bytes()`` for one split matrix of `shape` after a step (what it keeps depends on the
    backend: the kernels keep an inverse of the column indices)."""
    generator = torch.Generator().manual_seed(0)
    parameter = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
    parameter.grad = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    optimizer = FRUGAL([{"params": [parameter], "split": True}], **dict(options), backend=backend)
    optimizer.step()
    return optimizer.state_bytes()


def frugal_split_state_bytes(shapes: Sequence[tuple[int, int]], *, device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32, backend: str = "auto", **options) -> int:
    """The optimizer-state bytes FRUGAL(`options`) keeps for split matrices of `shapes` on `device` (its own count,
    measured after one step on one stand-in matrix per distinct shape; cached): the split part of a model's state,
    whatever FRUGAL stores (moments, indices, projectors, the kernels' inverse indices)."""
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[tuple(shape)] = counts.get(tuple(shape), 0) + 1
    frozen = tuple(sorted(options.items()))
    return sum(count * _frugal_state_bytes_of_one(shape, str(torch.device(device)), dtype, backend, frozen)
               for shape, count in counts.items())


def matched_svd_density(model: nn.Module, target: Method, *, backend: str = "auto") -> float:
    """The largest density (a multiple of 1/1000) at which FRUGAL's svd projection keeps no more state on
    `model`'s split matrices than `target` (a columns method) does, both as FRUGAL counts it on the model's device:
    the low-rank baseline at equal state memory. The svd projection also stores its projector, so at the same rho
    it keeps more (the issue's 34% against 26%). The state grows with the density in steps (rank = round(density
    * side)), so a bisection over the thousandths finds it."""
    if target.options.get("projection") != "columns":
        raise ValueError(f"{PROGRAM}: matched_svd_density: argument 'target' must be a columns method, got "
                         f"{target.name!r}")
    parameter = next(model.parameters())
    shapes = _split_shapes(model)
    where = {"device": parameter.device, "dtype": parameter.dtype, "backend": backend}
    budget = frugal_split_state_bytes(shapes, **where, projection="columns", density=target.options["density"])

    def svd_bytes(thousandths: int) -> int:
        return frugal_split_state_bytes(shapes, **where, projection="svd", state_free="none",
                                        density=thousandths / 1000)

    low, high = 0, 1000  # svd_bytes(low) <= budget (no state at density 0); find the last such thousandth
    if svd_bytes(high) <= budget:
        return 1.0
    while high - low > 1:
        middle = (low + high) // 2
        if svd_bytes(middle) <= budget:
            low = middle
        else:
            high = middle
    return low / 1000


def make_optimizer(method: Method, model: nn.Module, settings: OptimizerSettings, seed: int,
                   device: torch.device) -> tuple[torch.optim.Optimizer, dict]:
    """`method`'s optimizer over `model` (already in the method's dtype) and the options it was given (for the
    JSON). FRUGAL methods split ``frugal_param_groups(model)`` and draw subspaces from `seed`; AdamW is fused on a
    GPU."""
    common_options = {"lr": settings.lr, "betas": settings.betas, "eps": settings.eps,
                      "weight_decay": settings.weight_decay}
    if method.optimizer == "adamw":
        implementation = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(model.parameters(), **common_options, **implementation), \
            {**common_options, **implementation}
    if method.optimizer == "collage":
        options = {**common_options, **method.options, "backend": settings.collage_backend}
        return CollageAdamW(model.parameters(), **options), options
    if method.optimizer == "frugal":
        options = {"update_gap": settings.update_gap, **method.options}
        if method.match_state_of:
            options["density"] = matched_svd_density(model, METHODS[method.match_state_of],
                                                     backend=settings.frugal_backend)
        optimizer = FRUGAL(frugal_param_groups(model), **common_options, **options, seed=seed,
                           backend=settings.frugal_backend)
        return optimizer, {**common_options, **options, "seed": seed, "backend": settings.frugal_backend}
    raise ValueError(f"{PROGRAM}: method {method.name!r} has an unknown optimizer kind {method.optimizer!r}")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter state tensors (FRUGAL and CollageAdamW count their own with
    ``state_bytes()``; for torch's AdamW, the sum over its state tensors, step counters included)."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))


def lr_multiplier(step: int, total: int, warmup_fraction: float, min_ratio: float) -> float:
    """The learning-rate factor at optimizer step `step` (0-based) of `total`: linear warm-up (step + 1) / W over
    the first W = max(1, round(warmup_fraction * total)) steps, then cosine from 1 down to `min_ratio` at the last
    step."""
    warmup = max(1, round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------------------------
# One run.


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


def build_model(config: ModelConfig, seed: int, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    """The model initialized from `seed` in float32 on the CPU, then moved to `device` and `dtype` (a bf16 model
    starts from the rounded float32 initialization, so every method of a seed starts from the same weights)."""
    model = LlamaModel(config)
    model.initialize(torch.Generator().manual_seed(1_000_003 + seed))
    return model.to(device=device, dtype=dtype)


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


# ---------------------------------------------------------------------------------------------------------------
# Aggregation and findings.

# The issue's scale, and what the authors' FRUGAL code measured there (mean of two seeds, validation loss relative
# to AdamW's; state as % of AdamW's; about 5% spread between seeds).
ISSUE_SCALE = {"parameters": "~10M", "steps": 1000, "batch_tokens": 32768}
AUTHORS_GAP_PCT = {"frugal-columns": 6.0, "frugal-blockwise": 14.0, "lowrank-svd": 7.0, "signsgd": 17.0}
AUTHORS_STATE_PCT = {"frugal-columns": 26.0, "frugal-blockwise": 25.0, "lowrank-svd": 34.0, "signsgd": 2.0}


@dataclasses.dataclass
class Summary:
    """One (budget, method) over its seeds. ``spread`` is max - min of the final validation losses;
    ``relative_pct`` is (mean / AdamW's mean - 1) x 100 at the same budget, ``state_pct`` the mean state bytes
    as % of AdamW's, ``bytes_per_parameter`` (parameters + state) / parameter count. Means are None when a run
    diverged (``diverged`` counts them) or when AdamW was not run."""
    steps: int
    method: str
    seeds: list[int]
    losses: list[float | None]
    mean: float | None
    spread: float | None
    std: float | None
    diverged: int
    relative_pct: float | None
    state_bytes: float
    state_pct: float | None
    bytes_per_parameter: float
    tokens_per_second: float | None
    peak_memory_bytes: int | None


def aggregate(results: Sequence[RunResult]) -> list[Summary]:
    """Per (budget, method), in budget order then in order of first appearance, the mean and spread over seeds
    (``Summary``), relative to the "adamw" summary of the same budget."""
    groups: dict[tuple[int, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.steps, result.method), []).append(result)
    summaries = []
    for (steps, method), runs in sorted(groups.items(), key=lambda item: item[0][0]):
        runs = sorted(runs, key=lambda run: run.seed)
        losses = [run.final_validation_loss for run in runs]
        finite = [loss for loss in losses if loss is not None]
        complete = len(finite) == len(losses)
        mean = sum(finite) / len(finite) if complete else None
        spread = max(finite) - min(finite) if complete else None
        std = (math.sqrt(sum((loss - mean) ** 2 for loss in finite) / (len(finite) - 1))
               if complete and len(finite) > 1 else None)
        rates = [run.tokens_per_second for run in runs if run.tokens_per_second is not None]
        peaks = [run.peak_memory_bytes for run in runs if run.peak_memory_bytes is not None]
        state = sum(run.state_bytes for run in runs) / len(runs)
        summaries.append(Summary(
            steps=steps, method=method, seeds=[run.seed for run in runs], losses=losses, mean=mean, spread=spread,
            std=std, diverged=len(losses) - len(finite), relative_pct=None, state_bytes=state, state_pct=None,
            bytes_per_parameter=(runs[0].parameter_bytes + state) / runs[0].parameters,
            tokens_per_second=sum(rates) / len(rates) if rates else None, peak_memory_bytes=max(peaks) if peaks
            else None))
    baselines = {summary.steps: summary for summary in summaries if summary.method == "adamw"}
    for summary in summaries:
        baseline = baselines.get(summary.steps)
        if baseline is None:
            continue
        if summary.mean is not None and baseline.mean is not None:
            summary.relative_pct = 100 * (summary.mean / baseline.mean - 1)
        if baseline.state_bytes > 0:
            summary.state_pct = 100 * summary.state_bytes / baseline.state_bytes
    return summaries


def _pct(value: float | None) -> str:
    """A signed percentage with one decimal ("+0.0%" rather than "-0.0%"), "n/a" for None."""
    return "n/a" if value is None else f"{value + 0.0 if round(value, 1) else 0.0:+.1f}%"


def _noise(*summaries: Summary) -> float | None:
    """The seed noise of a comparison: the largest spread (max - min over seeds) among `summaries`."""
    spreads = [summary.spread for summary in summaries]
    return None if any(spread is None for spread in spreads) else max(spreads)


def compare(first: Summary, second: Summary) -> str:
    """How `first`'s mean validation loss compares with `second`'s: "beats" (lower by more than the seed noise),
    "loses to" (higher by more), or "ties" (within the noise), with the numbers."""
    if first.mean is None or second.mean is None:
        return (f"{first.method} and {second.method} cannot be compared at {first.steps} steps "
                f"(a run diverged or is missing)")
    difference = first.mean - second.mean
    noise = _noise(first, second)
    relative = 100 * difference / second.mean
    # A hair of tolerance: a difference equal to the noise must not flip on the last bit of a float subtraction.
    if noise is not None and abs(difference) <= noise * (1 + 1e-9) + 1e-12:
        verdict = "ties with"
    else:
        verdict = "beats" if difference < 0 else "loses to"
    noise_text = "n/a" if noise is None else f"{noise:.4f}"
    return (f"{first.method} {verdict} {second.method} at {first.steps} steps: {first.mean:.4f} vs "
            f"{second.mean:.4f} ({relative:+.1f}%; seed noise {noise_text})")


def findings(summaries: Sequence[Summary], *, authors_budget: int | None = None) -> list[str]:
    """The report's findings, each computed from `summaries` (no hand-written claims): FRUGAL against the
    low-rank baseline at (near) equal state memory; each method's gap to AdamW and how it changes from the
    shortest to the longest budget; on_switch="project" against "reset"; Collage plus against pure-bf16 AdamW
    (per seed too) and against AdamW; and, at budget `authors_budget` (None: not compared), leanops' gaps against
    the authors' numbers of the issue, "as good" when no worse than theirs plus the seed noise (the larger spread
    of the method and AdamW, as % of AdamW's loss)."""
    by_key = {(summary.steps, summary.method): summary for summary in summaries}
    budgets = sorted({summary.steps for summary in summaries})
    lines = []

    def get(steps, method):
        return by_key.get((steps, method))

    # FRUGAL vs the low-rank baseline at equal state memory.
    for steps in budgets:
        low_rank = get(steps, "lowrank-svd")
        if low_rank is None:
            continue
        for name in ("frugal-columns", "frugal-blockwise"):
            frugal = get(steps, name)
            if frugal is None:
                continue
            memory = (f"state {frugal.state_pct:.0f}% vs {low_rank.state_pct:.0f}% of AdamW's"
                      if frugal.state_pct is not None and low_rank.state_pct is not None else
                      f"state {frugal.state_bytes / max(low_rank.state_bytes, 1):.2f}x the low-rank baseline's")
            lines.append(f"Low-rank baseline at equal memory: {compare(frugal, low_rank)}; {memory}.")
    # Gap to AdamW, and its change with the budget.
    for method in dict.fromkeys(summary.method for summary in summaries):
        if method == "adamw":
            continue
        gaps = [(steps, get(steps, method).relative_pct) for steps in budgets
                if get(steps, method) is not None and get(steps, method).relative_pct is not None]
        if not gaps:
            continue
        text = ", ".join(f"{_pct(gap)} at {steps} steps" for steps, gap in gaps)
        if len(gaps) > 1:
            (first_steps, first), (last_steps, last) = gaps[0], gaps[-1]
            # Compared as printed (one decimal), so that -0.0 against +0.0 is not called a change.
            near, far = round(abs(last), 1), round(abs(first), 1)
            direction = "closer to AdamW" if near < far else "further from AdamW" if near > far else "as far from AdamW"
            text += f": {_pct(last - first).rstrip('%')} points from {first_steps} to {last_steps} steps ({direction})"
        lines.append(f"Gap to AdamW, {method}: {text}.")
    # on_switch = "project" against "reset".
    for steps in budgets:
        projected, reset = get(steps, "frugal-columns-project"), get(steps, "frugal-columns")
        if projected is not None and reset is not None:
            lines.append(f"on_switch='project': {compare(projected, reset)}.")
    # Collage plus against pure bf16.
    for steps in budgets:
        plus, bf16 = get(steps, "collage-plus"), get(steps, "adamw-bf16")
        if plus is None or bf16 is None:
            continue
        pairs = [(a, b) for a, b in zip(plus.losses, bf16.losses) if a is not None and b is not None]
        better = sum(a < b for a, b in pairs)
        lines.append(f"Collage: {compare(plus, bf16)}; collage-plus is lower in {better} of {len(pairs)} seeds.")
        adamw = get(steps, "adamw")
        if adamw is not None:
            lines.append(f"Collage against fp32 master weights: {compare(plus, adamw)}.")
    # Against the authors' numbers.
    for steps in [authors_budget] if authors_budget in budgets else []:
        for method, authors in AUTHORS_GAP_PCT.items():
            summary = get(steps, method)
            if summary is None or summary.relative_pct is None:
                continue
            adamw = get(steps, "adamw")
            noise = _noise(summary, adamw) if adamw is not None else None
            noise_pct = None if noise is None or adamw.mean is None else 100 * noise / adamw.mean
            within = noise_pct is not None and summary.relative_pct <= authors + noise_pct
            lines.append(f"Against the authors' code (issue: {ISSUE_SCALE['steps']} steps × 32k tokens): {method} "
                         f"{_pct(summary.relative_pct)} at {steps} steps vs {authors:+.0f}% "
                         f"({'as good or within seed noise' if within else 'worse than the seed noise allows'}; "
                         f"noise {'n/a' if noise_pct is None else f'{noise_pct:.1f}%'}); state "
                         f"{'n/a' if summary.state_pct is None else f'{summary.state_pct:.0f}%'} vs "
                         f"{AUTHORS_STATE_PCT[method]:.0f}% of AdamW's.")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Report.

SOURCES = [
    ("FRUGAL README (github.com/philip-zmushko/FRUGAL): update_gap 200 'in all main experiments, consistent with "
     "Galore'; density 0.25 by default; state-free (signSGD) lr scale 1.0 for pre-training (0.1 for fine-tuning); "
     "state-full lr scale 1.0 in all main experiments"),
    ("FRUGAL / GaLore C4 pre-training scripts: lr 1e-3 for AdamW and FRUGAL, betas (0.9, 0.999), eps 1e-8, cosine "
     "schedule after a linear warm-up of 10% of the steps (GaLore's cosine ends at 10% of the peak); GaLore itself "
     "was run there with lr 1e-2 and a 0.25 scale on the projected parameters, which this benchmark does not tune "
     "(one shared lr for every method)"),
]


def _format_summary_table(summaries: Sequence[Summary], steps: int, device_type: str) -> str:
    number = measurement.format_number
    header = ["method", "params", "val loss (mean)", "spread (max−min)", "per seed", "vs AdamW", "state",
              "state % of AdamW", "params+state B/param", "tokens/s", "peak memory"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for summary in summaries:
        if summary.steps != steps:
            continue
        method = METHODS.get(summary.method)
        dtype = str(method.parameter_dtype).removeprefix("torch.") if method else ""
        if dtype == "float32" and device_type == "cuda":
            dtype += " (bf16 autocast)"
        per_seed = ", ".join("diverged" if loss is None else f"{loss:.4f}" for loss in summary.losses)
        mean = f"diverged ({summary.diverged}/{len(summary.losses)})" if summary.diverged else \
            number(summary.mean, "{:.4f}")
        cells = [summary.method, dtype, mean, number(summary.spread, "{:.4f}"), per_seed,
                 "" if summary.method == "adamw" else _pct(summary.relative_pct),
                 measurement.format_bytes(round(summary.state_bytes)),
                 number(summary.state_pct, "{:.1f}%"), f"{summary.bytes_per_parameter:.2f}",
                 number(summary.tokens_per_second, "{:,.0f}"),
                 measurement.format_bytes(summary.peak_memory_bytes) or "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_markdown(document: dict) -> str:
    """The markdown report of a results document (``results_document``): heading with device, date, commit and
    versions, the settings, one table per budget, the findings (``findings``), the sources of the hyperparameters,
    and, for a run below the issue's scale, what is still owed and the command that produces it."""
    environment, settings, corpus = document["environment"], document["settings"], document["corpus"]
    results = [RunResult(**run) for run in document["runs"]]
    summaries = aggregate(results)
    device_type = environment["device_type"]
    model = settings["model"]
    issue_scale = (device_type == "cuda" and settings["size"] == "small"
                   and settings["batch_tokens"] == ISSUE_SCALE["batch_tokens"]
                   and ISSUE_SCALE["steps"] in settings["budgets"])
    scale = "issue-scale GPU run" if issue_scale else \
        f"{'CPU smoke-scale' if device_type == 'cpu' else 'reduced-scale'} run (not the issue's scale)"
    parameters = results[0].parameters if results else None
    precision = ("under bf16 autocast (fp32 master weights)" if settings["mixed_precision"] else "in fp32")
    epochs = ", ".join(f"{steps * settings['batch_tokens'] / corpus['train_bytes']:.3g}"
                       for steps in settings["budgets"])
    lines = [
        "# FRUGAL and Collage on a small language model (`benchmarks/train_lm.py`)",
        "",
        f"**{scale}** on {environment['device']}, {environment['date_utc']}, commit {environment['git_commit'][:7]}"
        + (" with uncommitted changes" if environment.get("git_uncommitted_changes") else "")
        + f", torch {environment['torch']}, Python {environment['python']}.",
        "",
        f"Command: `{document['command']}`",
        "",
        "## Setup",
        "",
        f"- Model: LLaMA-style decoder, {model['layers']} layers, d_model {model['d_model']}, {model['heads']} heads, "
        f"SwiGLU hidden {model['mlp_hidden']}, RoPE, RMSNorm, untied `lm_head`, context {model['context']}, "
        f"byte vocabulary 256"
        + (f": {parameters:,} parameters." if parameters else "."),
        (f"- Corpus: `.py` files of the standard library and installed packages ({', '.join(corpus['roots'])}), "
         f"cap {corpus['byte_cap']:,} bytes: {corpus['train_files']:,} train files ({corpus['train_bytes']:,} "
         f"bytes), {corpus['validation_files']:,} validation files ({corpus['validation_bytes']:,} bytes; 1 file in "
         f"{VALIDATION_EVERY} by a hash of its path), sha256 {corpus['sha256']}."),
        f"- Budgets: {', '.join(str(steps) for steps in settings['budgets'])} steps × {settings['batch_tokens']:,} "
        f"tokens ({epochs} epochs of the train bytes); seeds " + ", ".join(str(seed) for seed in settings["seeds"])
        + " (a seed fixes the initialization, the batches and FRUGAL's subspace draws, the same for every method).",
        (f"- Optimization: lr {settings['lr']:g} for every method, linear warm-up over "
         f"{settings['warmup_fraction']:.0%} of the steps then cosine to {settings['min_lr_ratio']:g}× the peak; "
         f"betas {tuple(settings['betas'])}, eps {settings['eps']:g}, weight decay {settings['weight_decay']:g}, "
         f"gradient clipping at {settings['grad_clip']:g}; FRUGAL density 0.25, update_gap "
         f"{settings['update_gap']}{'' if settings['update_gap'] == 200 else ' (the paper: 200)'}, signSGD on the state-free part with lr scale 1, `frugal_param_groups` "
         "(embedding, norms and `lm_head` fully AdamW), on_switch 'reset' unless the name says 'project'."),
        f"- Precision: fp32-parameter methods {precision}; bf16 methods keep the whole model in bf16. Loss: "
        + ("`leanops.linear_cross_entropy`" if settings["loss"] == "linear-ce" else "logits + F.cross_entropy")
        + f" (backend: {', '.join(sorted({run.loss_backend for run in results})) or 'n/a'}).",
        (f"- Validation: {settings['validation_windows']} fixed windows evenly spaced over the validation stream, "
         "every run the same; the table's loss is after the last step."),
        ("- State: optimizer-state bytes (moments, Collage compensation, FRUGAL indices/projectors; the largest "
         "seen after any step); params+state B/param adds the parameters in their storage dtype."),
    ]
    shapes = _split_shapes(LlamaModel(ModelConfig(**model)))
    split = sum(rows * columns for rows, columns in shapes)
    total = sum(parameter.numel() for parameter in LlamaModel(ModelConfig(**model)).parameters())
    lines.append(f"- FRUGAL splits the {len(shapes)} Linear weights of the blocks ({split / total:.1%} of the "
                 f"parameters); the embedding, the norms and `lm_head` ({1 - split / total:.1%}) keep full AdamW "
                 "state in every FRUGAL method, which sets a floor under its state % of AdamW's.")
    low_rank = [run for run in results if run.method == "lowrank-svd"]
    if low_rank:
        lines.append(f"- lowrank-svd: svd projection, no state-free update, density "
                     f"{low_rank[0].optimizer_options.get('density')} — the largest (in steps of 0.001) whose state "
                     "on the split matrices does not exceed frugal-columns' at rho 0.25 (the svd projector is "
                     "state too, so at the same rho it keeps more).")
    lines.append("")
    methods_used = dict.fromkeys(run.method for run in results)
    lines.append("Methods: " + "; ".join(f"`{name}`: {METHODS[name].description}" for name in methods_used
                                         if name in METHODS) + ".")
    for steps in sorted({summary.steps for summary in summaries}):
        lines += ["", f"## {steps} steps ({steps * settings['batch_tokens']:,} tokens)", "",
                  _format_summary_table(summaries, steps, device_type)]
    lines += ["", "## Findings (computed from the table)", ""]
    if not issue_scale:
        lines.append("At this scale the differences say little: the runs are far shorter and the model far "
                     "smaller than the issue's; treat these lines as a check that the pipeline and the report "
                     "work, not as evidence about the methods.")
        lines.append("")
    lines += [f"- {line}" for line in findings(summaries, authors_budget=ISSUE_SCALE["steps"] if issue_scale
                                               else None)]
    notes = sorted({note for run in results for note in run.notes})
    if notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in notes]
    failures = document.get("failures") or []
    if failures:
        lines += ["", "Runs that failed (not in the tables; a resumed run tries them again):"]
        lines += [f"- {failure['method']}, seed {failure['seed']}, {failure['steps']} steps: {failure['error']}"
                  for failure in failures]
    lines += ["", "## Hyperparameter sources", ""] + [f"- {source}" for source in SOURCES]
    if not issue_scale:
        lines += ["", "## Owed: the issue's GPU table", "",
                  ("The issue's table (~10M parameters, 1,000 steps × 32k tokens and a longer 3,000-step budget, "
                   "2 seeds, every method) has not been measured"
                   + (": no GPU was available to this run." if device_type == "cpu" else " by this run.")
                   + " On the H100:"),
                  "", "```bash", GPU_COMMAND, "```", "",
                  ("It writes benchmarks/results/frugal.md and frugal.json after every run; run the same command "
                   "again to resume (runs already in the JSON with the same settings are skipped), e.g. within the "
                   "device tool's 10-minute calls with `--max-minutes 9`.")]
    return "\n".join(lines) + "\n"


GPU_COMMAND = ("python -m benchmarks.train_lm --device cuda --steps 1000 --batch-tokens 32768 --seeds 0 1 "
               "--budgets 1000 3000 --out benchmarks/results/")


def write_loss_plot(document: dict, path: str) -> str | None:
    """A PNG of the validation-loss curves (mean over seeds, one line per method, one panel per budget) at `path`;
    returns why not (matplotlib missing) or None when written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        return f"matplotlib is not installed ({error})"
    results = [RunResult(**run) for run in document["runs"]]
    budgets = sorted({result.steps for result in results})
    figure = Figure(figsize=(6 * len(budgets), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    for index, steps in enumerate(budgets):
        axes = figure.add_subplot(1, len(budgets), index + 1)
        for method in dict.fromkeys(result.method for result in results):
            curves = [result.validation_curve for result in results
                      if result.steps == steps and result.method == method and not result.diverged]
            if not curves or any(len(curve) != len(curves[0]) for curve in curves):
                continue
            points = [step for step, _ in curves[0]]
            means = [sum(curve[i][1] for curve in curves) / len(curves) for i in range(len(points))]
            axes.plot(points, means, marker=".", label=method)
        axes.set_xlabel("step")
        axes.set_ylabel("validation loss (nats/byte)")
        axes.set_title(f"{steps} steps, {document['environment']['device']}", fontsize=9)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=110)
    return None


# ---------------------------------------------------------------------------------------------------------------
# The command line.

DEVICE_DEFAULTS = {
    # size, steps, batch tokens, corpus byte cap, validation windows, update_gap
    "cuda": {"size": "small", "steps": 1000, "batch_tokens": 32768, "corpus_bytes": 256 << 20,
             "validation_windows": 512, "update_gap": 200},
    "cpu": {"size": "tiny", "steps": 40, "batch_tokens": 1024, "corpus_bytes": 8 << 20, "validation_windows": 64,
            "update_gap": 10},
}
# The settings a resumed run must share with the JSON it adds to.
RESUME_KEYS = ("device_type", "size", "model", "batch_tokens", "lr", "warmup_fraction", "min_lr_ratio", "betas",
               "eps", "weight_decay", "grad_clip", "update_gap", "validation_windows", "mixed_precision", "loss",
               "loss_backend", "corpus_sha256")


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


def results_document(command: str, environment: dict, settings: dict, corpus: Corpus | dict,
                     runs: Sequence[RunResult], failures: Sequence[dict] = ()) -> dict:
    """The JSON document of a benchmark: how it was run, where, on which corpus, every run, and the runs that
    raised ({"steps", "seed", "method", "error"}; they are tried again on resume)."""
    return {"benchmark": "train_lm", "command": command, "environment": environment, "settings": settings,
            "corpus": corpus.describe() if isinstance(corpus, Corpus) else corpus,
            "runs": [dataclasses.asdict(run) for run in runs], "failures": list(failures)}


def _previous_runs(path: str, settings: dict) -> list[RunResult]:
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


def write_report(out_dir: str, name: str, document: dict, plot: bool = False) -> list[str]:
    """Write <out_dir>/<name>.json and <out_dir>/<name>.md (and the curves PNG with `plot`); return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, markdown_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
    text = json.dumps(document, indent=1)
    # One line per curve point ([step, loss]) rather than four: the JSON stays readable and diffable.
    text = re.sub(r"\[\s+(-?\d+),\s+(-?[\d.eE+-]+|NaN|Infinity|-Infinity|null)\s+\]", r"[\1, \2]", text)
    with open(json_path, "w", encoding="utf-8") as file:
        file.write(text + "\n")
    with open(markdown_path, "w", encoding="utf-8") as file:
        file.write(format_markdown(document))
    paths = [json_path, markdown_path]
    if plot:
        plot_path = os.path.join(out_dir, f"{name}-curves.png")
        if write_loss_plot(document, plot_path) is None:
            paths.append(plot_path)
    return paths


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
    runs = [] if arguments.fresh else _previous_runs(json_path, settings)
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


if __name__ == "__main__":
    sys.exit(main())
