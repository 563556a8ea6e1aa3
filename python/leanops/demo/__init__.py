"""``leanops demo``: what each leanops piece buys, measured on this machine.

``leanops demo lm`` (the default, ``leanops.demo.lm``) trains a small byte-level LLaMA-style language model on the
``.py`` files of Python's standard library five ways (plain PyTorch; ``leanops.linear_cross_entropy``;
``CollageAdamW``; ``FRUGAL``; FRUGAL with Collage) with the same seed, batches and token budget, and reports the
validation loss, tokens/s, peak memory and optimizer-state bytes per parameter of each.

``leanops demo clip`` (``leanops.demo.clip``) trains a tiny two-tower model contrastively with ``leanops.clip_loss``
and ``leanops.siglip_loss`` at a batch size whose B x B logits plain PyTorch cannot hold.

This module is the command line: the arguments, their checks, and the dispatch to the two demos, which share
``leanops.demo.common`` and never import each other. The CLI wires it as ``demo.add_arguments(subparser)`` and
``demo.run(arguments)``; ``python -m leanops.demo`` runs it alone (``main``).
"""
import argparse
import gc
import json
import math
import os
import sys

import torch

from . import clip, common, lm
from .lm import LM_CONFIGURATION_NAMES, LM_LR

WHICH = ("lm", "clip")
DEMOS = {"lm": lm.run_lm, "clip": clip.run_clip}
# The CPU memory pass of each demo, run by ``main`` in the fresh process of ``common.memory_pass_in_fresh_process``.
MEMORY_PASSES = {"lm": lm.lm_memory_pass, "clip": clip.clip_memory_pass}


def default_out_dir() -> str:
    """benchmarks/results/demo when benchmarks/results exists here (a checkout), else ./leanops-results."""
    parent = os.path.join("benchmarks", "results")
    return os.path.join(parent, "demo") if os.path.isdir(parent) else "leanops-results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's arguments to `parser` (the ``leanops demo`` subparser)."""
    parser.add_argument("which", nargs="?", choices=WHICH, default="lm",
                        help="lm: a byte-level language model, plain PyTorch against leanops' loss and optimizers "
                             "(default); clip: CLIP and SigLIP losses at a batch plain PyTorch cannot hold")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="device type (default: cuda if a GPU is visible, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and a few dozen steps (lm) or a batch of a few thousand (clip): seconds")
    parser.add_argument("--out", metavar="DIR",
                        help="directory for demo-<which>-<device>.{md,json,png} (default: benchmarks/results/demo "
                             "if benchmarks/results exists here, else ./leanops-results)")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="optimizer steps (lm: per configuration, default 24 quick / 200 cpu / 300 cuda; clip: "
                             "per loss, default 6 quick / 8 cpu / 30 cuda)")
    parser.add_argument("--batch-tokens", type=int, metavar="N",
                        help="lm: tokens per step, a multiple of the context (default 256 quick / 1024 cpu / 32768 "
                             "cuda)")
    parser.add_argument("--batch-size", type=int, metavar="B",
                        help="clip: pairs per step (default 4096 quick / 32768 cpu / 65536 cuda)")
    parser.add_argument("--configs", nargs="+", choices=LM_CONFIGURATION_NAMES, metavar="NAME",
                        help=f"lm: configurations to run (default: all of {', '.join(LM_CONFIGURATION_NAMES)})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default: lm {LM_LR:g}, clip 5e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and the data (default 0)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")


def run(arguments: argparse.Namespace) -> int:
    """Run the demo `arguments.which` ("lm" or "clip"); returns the exit status (0, or 2 for a bad argument)."""
    which = getattr(arguments, "which", None) or "lm"
    if which not in WHICH:
        return common.error(f"unknown demo {which!r}; choose from {', '.join(WHICH)}")
    device_type = arguments.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        return common.error("--device cuda, but no CUDA device is visible (see `leanops info`)")
    for name in ("steps", "batch_tokens", "batch_size", "threads"):
        value = getattr(arguments, name, None)
        if value is not None and value < 1:
            return common.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if arguments.lr is not None and not (math.isfinite(arguments.lr) and arguments.lr > 0):
        return common.error(f"--lr must be a positive number, got {arguments.lr}")
    if arguments.seed < 0:
        return common.error(f"--seed must be >= 0, got {arguments.seed}")
    out_dir = arguments.out or default_out_dir()
    previous_threads = torch.get_num_threads()
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    try:
        return DEMOS[which](arguments, torch.device(device_type), out_dir)
    finally:
        torch.set_num_threads(previous_threads)


def main(argv: list[str] | None = None) -> int:
    """``python -m leanops.demo [lm|clip] ...`` (the same as ``leanops demo``). Internal: ``--memory-pass KIND SPEC
    OUT`` runs ``MEMORY_PASSES[KIND]`` on the settings in the JSON file SPEC and writes its result to OUT."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--memory-pass"] and len(argv) == 4:
        gc.freeze()  # what the imports made is permanent: each gc.collect() of the measurements stays cheap
        with open(argv[2], encoding="utf-8") as file:
            result = MEMORY_PASSES[argv[1]](json.load(file))
        with open(argv[3], "w", encoding="utf-8") as file:
            json.dump(result, file)
        return 0
    parser = argparse.ArgumentParser(prog=common.PROGRAM, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
