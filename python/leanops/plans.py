"""The GPU-era plans of the loss primitives in numbers: the floors of their matrix work and bytes, the matrix work
each provider's plan issues, and the memory budget that sizes their panels and chunks.

Floors, one forward + one backward (matrix-multiply FLOPs; a multiply-add counts 2):
- CLIP and SigLIP, features (B, D): 8 B^2 D. S = X Y^T once in the forward (2 B^2 D), once recomputed in the
  backward (2 B^2 D), G Y and G^T X (2 B^2 D each).
- linear cross-entropy, hidden (N, D), weight (V, D): 8 N V D. The logits in the forward, recomputed once, G W and
  G^T h.

Every provider follows the same plan (issue 14): the forward computes each similarity / logit tile once; the
backward recomputes it once per row panel (CLIP, SigLIP) or vocabulary chunk (CE), writes the panel of G, and
forms the two gradient products from that panel as plain GEMMs. So the work is the floor independent of D; the
Triton kernels add only the padding of their tiles (none at sizes that are multiples of 128 on the GPU).

The panel size comes from a memory budget (``panel_budget_bytes``): the largest intermediate a primitive holds besides
its inputs, outputs and float32 gradient accumulators is one panel (P x B entries of G or S) or one chunk (N x Vc
of G). The budget trades memory for traffic: the panel plan adds its products into a float32 accumulator (grad_y,
grad_h) once per panel, 8 B^2 D / P bytes in all against 8 B^2 D FLOPs, so P rows give P FLOPs per byte of that
traffic; on an H100 (~250 FLOPs per byte at the balance point) P >= 512 keeps it a small fraction of the time.
So on the GPU: 64 MiB, but never fewer than 512 rows (B = 131072 in bfloat16: 128 MiB); on the CPU 8 MiB (the panel
stays in the last-level cache between its GEMM and its fused step: 20-30% faster than 32 MiB at small D, measured on
the 2-core VM; and the CPU memory tests hold a whole CLIP step at B = 16384 under 100 MiB). The C++ providers use
the same numbers (csrc/include/leanops/panel_host.h). ``LEANOPS_PANEL_BUDGET_MIB`` overrides the
budget (tests set a tiny one to run several panels at small sizes).
"""
from __future__ import annotations

import importlib
import math
import os

import torch

DEFAULT_PANEL_BUDGET_MIB = {"cuda": 64.0, "cpu": 8.0}
# Rows a GPU panel keeps at least (module docstring), unless the budget is set explicitly.
GPU_MINIMUM_PANEL_ROWS = 512
CASES = ("clip", "siglip", "cross_entropy")


def _budget_override() -> float | None:
    text = os.environ.get("LEANOPS_PANEL_BUDGET_MIB", "")
    if not text:
        return None
    try:
        budget = float(text)
    except ValueError:
        raise ValueError(f"LEANOPS_PANEL_BUDGET_MIB must be a positive number of MiB, got {text!r}") from None
    if not budget > 0:
        raise ValueError(f"LEANOPS_PANEL_BUDGET_MIB must be a positive number of MiB, got {text!r}")
    return budget


def panel_budget_bytes(device_type: str) -> int:
    """The memory budget of one panel or chunk on this device type, read on every call (``LEANOPS_PANEL_BUDGET_MIB``,
    a positive number of MiB, fractions allowed, overrides the default)."""
    budget = _budget_override()
    if budget is None:
        budget = DEFAULT_PANEL_BUDGET_MIB.get(device_type, DEFAULT_PANEL_BUDGET_MIB["cpu"])
    return int(budget * 2**20)


# The dense small-logits choice of ``backend="auto"`` (linear cross-entropy): on the CPU, plain PyTorch's dense
# logits + F.cross_entropy is GEMM-bound at 6 N V D FLOPs against the lean plan's 8 N V D: on the 2-core VM the cpu
# kernels take 1.1-1.25x plain's time at small logits (16-32 MiB) and 1.35x its CPU time when the cores are shared
# (benchmarks/results/cross_entropy-cpu-auto.md); while the N x V float32 logits fit this budget, ``auto`` computes
# the loss from them densely (plain PyTorch's FLOPs, a bounded memory cost). On a GPU there is none: memory is the
# point there. ``LEANOPS_DENSE_LOGITS_MIB`` overrides it (0: never dense).
DEFAULT_DENSE_LOGITS_MIB = {"cpu": 64.0}


def dense_logits_budget_bytes(device_type: str) -> int:
    """The largest N x V float32 logits ``auto`` builds densely on this device type (0: never), read per call."""
    text = os.environ.get("LEANOPS_DENSE_LOGITS_MIB", "")
    if text:
        try:
            budget = float(text)
        except ValueError:
            raise ValueError(f"LEANOPS_DENSE_LOGITS_MIB must be a number of MiB >= 0, got {text!r}") from None
        if not budget >= 0:
            raise ValueError(f"LEANOPS_DENSE_LOGITS_MIB must be a number of MiB >= 0, got {text!r}")
    else:
        budget = DEFAULT_DENSE_LOGITS_MIB.get(device_type, 0.0)
    return int(budget * 2**20)


def dense_logits_chosen(device_type: str, tokens: int, vocabulary: int) -> bool:
    """Whether ``auto`` computes linear cross-entropy from dense logits here (DEFAULT_DENSE_LOGITS_MIB)."""
    return tokens * vocabulary * 4 <= dense_logits_budget_bytes(device_type)


def panel_rows(total_rows: int, columns: int, bytes_per_entry: int, multiple: int = 1,
               device_type: str = "cpu") -> int:
    """Rows per panel of a (total_rows x columns) matrix of `bytes_per_entry`-byte entries within the budget: at
    least `multiple` (the kernels' row block) and a multiple of it, on the GPU at least GPU_MINIMUM_PANEL_ROWS unless
    the budget is overridden, at most total_rows rounded up to `multiple`."""
    budget_rows = panel_budget_bytes(device_type) // max(columns * bytes_per_entry, 1)
    if device_type == "cuda" and _budget_override() is None:
        budget_rows = max(budget_rows, GPU_MINIMUM_PANEL_ROWS)
    rows = max(budget_rows // multiple, 1) * multiple
    return min(rows, math.ceil(max(total_rows, 1) / multiple) * multiple)


def floor_flops(case: str, **sizes: int) -> int:
    """The matrix FLOPs of one forward + backward that the math needs (module docstring)."""
    if case in ("clip", "siglip"):
        return 8 * sizes["batch"] ** 2 * sizes["features"]
    if case == "cross_entropy":
        return 8 * sizes["tokens"] * sizes["vocabulary"] * sizes["features"]
    raise ValueError(f"unknown case {case!r}; expected one of {CASES}")


def floor_bytes(case: str, dtype: torch.dtype, **sizes: int) -> int:
    """The DRAM bytes of one forward + backward that cannot be avoided: every input read once, every gradient
    written once (per-row statistics neglected)."""
    element = torch.empty((), dtype=dtype).element_size()
    if case in ("clip", "siglip"):
        return 4 * sizes["batch"] * sizes["features"] * element  # x, y read; grad_x, grad_y written
    if case == "cross_entropy":
        matrices = (sizes["tokens"] + sizes["vocabulary"]) * sizes["features"]
        return 2 * matrices * element
    raise ValueError(f"unknown case {case!r}; expected one of {CASES}")


def planned_flops(case: str, backend: str, dtype: torch.dtype = torch.float32, device_type: str = "cpu",
                  **sizes: int) -> int:
    """The matrix FLOPs that `backend`'s plan issues for one forward + backward of `case` at these sizes on this
    device type. The reference and the C++ providers (cpu, cuda) run the panel plan through exact-size GEMMs: the
    floor. The Triton provider pads each product to its tiles (triton_kernels/<family>.py:
    ``planned_matrix_flops``)."""
    floor_flops(case, **sizes)  # validates the case and the sizes
    if backend in ("reference", "cpu", "cuda"):
        return floor_flops(case, **sizes)
    if backend == "triton":
        family = "cross_entropy" if case == "cross_entropy" else "contrastive"
        module = importlib.import_module(f"leanops.triton_kernels.{family}")
        return module.planned_matrix_flops(case, dtype=dtype, device_type=device_type, **sizes)
    raise ValueError(f"unknown backend {backend!r}")
