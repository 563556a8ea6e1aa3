"""A computed (not measured) scaling model of the distributed contrastive losses (``leanops bench scaling``): per-GPU
extra memory and bytes sent per GPU per training step for ``clip_loss`` / ``siglip_loss`` with
``distributed="ring"`` and ``distributed="gather"``, beside open_clip's local loss and Inf-CL's reported numbers.

Nothing runs on a device and nothing needs ``torch.distributed``: every number comes from the formulas below, one
small function per mode and quantity (memory, traffic). The report does
not depend on ``--device``: it is always written as ``scaling-cpu.json`` (the host computes it).

Notation: B global batch, P ranks (GPUs), b = B / P local batch, D feature width, e bytes per feature element (2 for
bf16, 4 for fp32); statistics and gradient accumulators are float32 (4 bytes). "Extra memory" is what the loss
allocates beyond its input features (the two local (b, D) matrices), at its peak (the backward pass for every
mode here). "Bytes sent" is what one rank sends per training step, forward + backward.

The model counts the leading terms of what python/leanops/distributed_contrastive.py allocates and sends, for the
common case (scalar logit_scale, no group labels; per-anchor scales add two float32 (b, D) gradients per block
transiently, labels a few float32 (b, D) per-label sums); the kernels' own scratch (tiles, and on the CPU a float32
copy of the features) is not counted.

- ring (CLIP): rank p computes its image rows against each text block as the blocks come round the ring
  (point-to-point, the next block's transfer overlapping the current block's tiles); what belongs to a block (its
  column log-sum-exp forward, its float32 gradient backward) travels with it and comes home after P hops. Per rank
  at most two payloads are in flight. ``ring_clip_memory`` / ``ring_clip_forward_memory`` / ``ring_clip_bytes_sent``
  state the terms; the backward pass is the peak: 2·(b·D·e + 16·b) + 4·b·D·4 + 2·b·D·e + 8·b.
- ring (SigLIP): the same without per-row statistics (a pair's term needs no normaliser):
  2·b·D·e + 4·b·D·4 + 2·b·D·e.
- gather (CLIP, SigLIP): the text features (with their per-row values) are all-gathered once, each rank computes
  its image rows against every text, and the per-text results (CLIP's column statistics, the text gradients) are
  reduced to their owners: B·D·(e + 4) + 3·b·D·4 + 2·b·D·e (+ 20·B for CLIP's per-row values).
- open_clip-local (CLIP), for contrast: open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)`` in plain
  PyTorch: the gathered features, the b×B float32 logits of both directions with their softmax and gradient (3 such
  matrices per direction), and the gathered features' gradients:

    backward peak  2·B·D·e + 6·b·B·4 + 2·B·D·e
    bytes sent     all-gathers of both feature matrices forward, reduce-scatters of their gradients backward:
                   4·(P − 1)·b·D·e.

- inf-cl (paper): Inf-CL's own per-GPU memory for ViT-L/14 as reported in its paper (Cheng et al. 2024): 0.72 GiB
  at B = 128k on 8 GPUs and 1.44 GiB at B = 1024k on 32 GPUs; reference rows only (no traffic, no model), shown
  beside leanops ring at the same (B, P) for D = 768 in bf16. Inf-CL's figure may count memory this model does not
  (the model counts only the loss's own allocations beyond its input features); the two numbers are all we use.

The communication time is a lower bound: bytes sent / link bandwidth, at line rate, with no latency and no
contention; whether it hides behind the tile work is not modelled. A job on at most GPUS_PER_NODE = 8 GPUs is taken
to stay inside one node on NVLink (450 GB/s per GPU per direction, H100 SXM NVLink 4); a larger one is limited by
the slowest hop of its ring, InfiniBand NDR (400 Gb/s = 50 GB/s per GPU, one NIC per GPU). GB = 10**9 bytes, GiB =
2**30 bytes; batch sizes are powers of two (k = 1024: 128k = 131072, 1M = 1048576).
"""
import dataclasses

import torch

from . import common, measurement

FAMILY = "scaling"
# Global batches 32k ... 4M and GPU counts 8 ... 1024, powers of two; a (B, P) with B / P not a positive integer
# is skipped.
GLOBAL_BATCHES = tuple(32768 * 2**k for k in range(8))
GPU_COUNTS = tuple(8 * 2**k for k in range(8))
# The GPU counts printed per global batch (the JSON has every row).
PRINTED_GPUS = (8, 64, 1024)
FEATURE_DIM = 768  # ViT-L/14's embedding width (Inf-CL's comparison model)
DTYPE = torch.bfloat16
FLOAT32_BYTES = 4

GPUS_PER_NODE = 8
LINKS_GBPS = {"NVLink": 450.0, "IB NDR": 50.0}  # GB/s per GPU, one direction

# Inf-CL's reported per-GPU memory (ViT-L/14): (global batch, GPUs) -> GiB.
INF_CL_GIB = {(128 * 1024, 8): 0.72, (1024 * 1024, 32): 1.44}
INF_CL_NOTE = "reported by Inf-CL's paper"

# (loss, mode) in report order.
MODES = (("clip", "ring"), ("siglip", "ring"), ("clip", "gather"), ("siglip", "gather"), ("clip", "open_clip-local"))


@dataclasses.dataclass
class ScalingRow(common.Row):
    """A ``common.Row`` of the model (``op`` "clip_loss"/"siglip_loss", ``backend`` the mode, ``elements`` the
    global batch B, ``bytes_moved`` the bytes sent per GPU per step, ``check`` "computed", or "reported" for Inf-CL's
    rows; no time): the sizes, the extra memory per GPU, the bytes sent and the communication time's lower bound."""
    loss: str = ""
    mode: str = ""
    global_batch: int = 0
    gpus: int = 0
    local_batch: int = 0
    feature_dim: int = 0
    element_bytes: int = 0
    extra_memory_bytes: int | None = None
    extra_memory_gib: float | None = None
    forward_memory_bytes: int | None = None
    bytes_sent: int | None = None
    gib_sent: float | None = None
    link: str = ""
    link_gbps: float | None = None
    comm_ms_lower_bound: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# The model: one function per mode and quantity (b local batch, B global batch, P ranks, D width, e element bytes).

def ring_clip_memory(b: int, D: int, e: int) -> int:
    """Peak extra bytes per GPU of the CLIP ring's backward pass: 2 payloads in flight (a text block and 4 float32
    values per row: scale, column lse, column weight, positive coefficient), 4 float32 (b, D) matrices (the local
    image-gradient accumulator, the travelling text-gradient accumulator, the block's two gradients from the
    primitive), the two returned gradients in the feature dtype, and the travelling column-scale gradient."""
    return 2 * (b * D * e + 16 * b) + 4 * b * D * FLOAT32_BYTES + 2 * b * D * e + 8 * b


def ring_clip_forward_memory(b: int, D: int, e: int) -> int:
    """Peak extra bytes per GPU of the CLIP ring's forward pass: 2 payloads in flight (text block + scale per row),
    the travelling column lse with its received copy, the rows' lse and positive sums."""
    return 2 * (b * D * e + 4 * b) + 16 * b


def ring_clip_bytes_sent(b: int, P: int, D: int, e: int) -> int:
    """Bytes one rank sends per step in the CLIP ring. Forward: P - 1 payloads (block + scales), P hops of the column
    lse (it comes home). Backward: P - 1 payloads (block + 4 values per row), P hops of the float32 text-gradient
    accumulator and the column-scale gradient."""
    forward = (P - 1) * (b * D * e + 4 * b) + P * 4 * b
    backward = (P - 1) * (b * D * e + 16 * b) + P * (b * D * FLOAT32_BYTES + 4 * b)
    return forward + backward


def ring_siglip_memory(b: int, D: int, e: int) -> int:
    """Peak extra bytes per GPU of the SigLIP ring's backward pass: 2 text blocks in flight, the 4 float32 (b, D)
    matrices of the CLIP ring, the two returned gradients (no per-row statistics travel)."""
    return 2 * b * D * e + 4 * b * D * FLOAT32_BYTES + 2 * b * D * e


def ring_siglip_forward_memory(b: int, D: int, e: int) -> int:
    """Peak extra bytes per GPU of the SigLIP ring's forward pass: 2 text blocks in flight, the rows' loss sums."""
    return 2 * b * D * e + 4 * b


def ring_siglip_bytes_sent(b: int, P: int, D: int, e: int) -> int:
    """Bytes one rank sends per step in the SigLIP ring: P - 1 blocks forward, P - 1 blocks and P hops of the float32
    text-gradient accumulator backward."""
    return 2 * (P - 1) * b * D * e + P * b * D * FLOAT32_BYTES


def gather_clip_memory(B: int, b: int, D: int, e: int) -> int:
    """Peak extra bytes per GPU of the CLIP gather mode (backward): the all-gathered text features and 4 float32
    values per row, one float32 text-gradient accumulator per block (B x D in all) and a column-scale gradient per
    row, the local image-gradient accumulator with the block's two gradients, the two returned gradients. Only the
    text side is gathered: each rank computes its image rows against every text."""
    return B * D * (e + FLOAT32_BYTES) + 20 * B + 3 * b * D * FLOAT32_BYTES + 2 * b * D * e


def gather_siglip_memory(B: int, b: int, D: int, e: int) -> int:
    """Peak extra bytes per GPU of the SigLIP gather mode (backward): as CLIP's without the per-row statistics."""
    return B * D * (e + FLOAT32_BYTES) + 3 * b * D * FLOAT32_BYTES + 2 * b * D * e


def gather_clip_bytes_sent(b: int, P: int, D: int, e: int) -> int:
    """Bytes one rank sends per step in the CLIP gather mode (ring collective algorithms, NCCL): forward all-gather of
    (text, scale) and two all-reduces of the B column statistics; backward all-gather of (text, 3 values per row)
    and reduce-scatters of the float32 text gradients and column-scale gradients."""
    forward = (P - 1) * b * (D * e + 4) + 2 * 2 * (P - 1) * b * 4
    backward = (P - 1) * b * (D * e + 12) + (P - 1) * b * (D * FLOAT32_BYTES + 4)
    return forward + backward


def gather_siglip_bytes_sent(b: int, P: int, D: int, e: int) -> int:
    """Bytes one rank sends per step in the SigLIP gather mode: the text all-gather forward and backward, the
    reduce-scatter of the float32 text gradients."""
    return 2 * (P - 1) * b * D * e + (P - 1) * b * D * FLOAT32_BYTES


def open_clip_memory(B: int, b: int, D: int, e: int) -> int:
    """Peak extra bytes per GPU of open_clip's local loss with gather-with-grad (backward): the gathered features,
    3 float32 b×B matrices per direction (logits, softmax, gradient), the gathered features' gradients."""
    return 2 * B * D * e + 6 * b * B * FLOAT32_BYTES + 2 * B * D * e


def open_clip_bytes_sent(b: int, P: int, D: int, e: int) -> int:
    """Bytes one rank sends per step with open_clip's gather-with-grad: all-gathers of both feature matrices forward,
    reduce-scatters of their gradients backward, (P - 1)·b·D·e each."""
    return 4 * (P - 1) * b * D * e


def extra_memory(loss: str, mode: str, B: int, P: int, D: int, e: int) -> tuple[int, int | None]:
    """(peak extra bytes per GPU, forward peak where the model has one separately (the ring), else None)."""
    b = B // P
    if mode == "ring":
        backward = {"clip": ring_clip_memory, "siglip": ring_siglip_memory}[loss](b, D, e)
        forward = {"clip": ring_clip_forward_memory, "siglip": ring_siglip_forward_memory}[loss](b, D, e)
        return max(backward, forward), forward
    if mode == "gather":
        return {"clip": gather_clip_memory, "siglip": gather_siglip_memory}[loss](B, b, D, e), None
    if mode == "open_clip-local":
        return open_clip_memory(B, b, D, e), None
    raise ValueError(f"unknown mode {mode!r}")


def bytes_sent(loss: str, mode: str, B: int, P: int, D: int, e: int) -> int:
    """Bytes one GPU sends per training step (forward + backward)."""
    b = B // P
    if mode == "ring":
        return {"clip": ring_clip_bytes_sent, "siglip": ring_siglip_bytes_sent}[loss](b, P, D, e)
    if mode == "gather":
        return {"clip": gather_clip_bytes_sent, "siglip": gather_siglip_bytes_sent}[loss](b, P, D, e)
    if mode == "open_clip-local":
        return open_clip_bytes_sent(b, P, D, e)
    raise ValueError(f"unknown mode {mode!r}")


def link(P: int) -> str:
    """The link that bounds a job on P GPUs: NVLink within one node, InfiniBand beyond."""
    return "NVLink" if P <= GPUS_PER_NODE else "IB NDR"


def comm_ms_lower_bound(sent: int, P: int) -> float:
    """The time in ms the bytes sent take at least at line rate on the bounding link (no latency, no contention)."""
    return sent / (LINKS_GBPS[link(P)] * 1e9) * 1e3


def valid_sizes(global_batches=GLOBAL_BATCHES, gpus=GPU_COUNTS) -> list[tuple[int, int]]:
    """The (B, P) pairs of the table: b = B / P a positive integer."""
    return [(B, P) for B in global_batches for P in gpus if B % P == 0 and B // P >= 1]


# ---------------------------------------------------------------------------------------------------------------
# The report.

def _model_row(loss: str, mode: str, B: int, P: int, D: int, dtype: torch.dtype) -> ScalingRow:
    e = dtype.itemsize
    memory, forward = extra_memory(loss, mode, B, P, D, e)
    sent = bytes_sent(loss, mode, B, P, D, e)
    return ScalingRow(op=f"{loss}_loss", backend=mode, dtype=str(dtype).removeprefix("torch."), elements=B,
                      bytes_moved=sent, check="computed", loss=loss, mode=mode, global_batch=B, gpus=P,
                      local_batch=B // P, feature_dim=D, element_bytes=e, extra_memory_bytes=memory,
                      extra_memory_gib=memory / 2**30, forward_memory_bytes=forward, bytes_sent=sent,
                      gib_sent=sent / 2**30, link=link(P), link_gbps=LINKS_GBPS[link(P)],
                      comm_ms_lower_bound=comm_ms_lower_bound(sent, P))


def _inf_cl_row(B: int, P: int, gib: float) -> ScalingRow:
    return ScalingRow(op="clip_loss", backend="inf-cl (paper)", dtype="", elements=B, bytes_moved=None,
                      check="reported", note=INF_CL_NOTE, loss="clip", mode="inf-cl (paper)", global_batch=B,
                      gpus=P, local_batch=B // P, feature_dim=FEATURE_DIM, extra_memory_bytes=round(gib * 2**30),
                      extra_memory_gib=gib)


def run(device: torch.device | None = None, *, quick: bool = False, repeats: int | None = None,
        elements: int | None = None, backend_names: list[str] | None = None, feature_dim: int = FEATURE_DIM,
        dtype: torch.dtype = DTYPE, global_batches=GLOBAL_BATCHES, gpus=GPU_COUNTS) -> common.Report:
    """``leanops bench scaling``: every (loss, mode) of MODES at every valid (B, P), then Inf-CL's reported rows.

    Computed, so ``device``, ``quick``, ``repeats``, ``elements`` and ``backend_names`` (the CLI's common options)
    change nothing; the report's device is the CPU that computed it. `feature_dim` and `dtype` (of the features)
    set D and e.
    """
    sizes = valid_sizes(global_batches, gpus)
    rows = [_model_row(loss, mode, B, P, feature_dim, dtype) for loss, mode in MODES for B, P in sizes]
    rows += [_inf_cl_row(B, P, gib) for (B, P), gib in INF_CL_GIB.items()]
    e = dtype.itemsize
    settings = {
        "computed": True, "feature_dim": feature_dim, "dtype": str(dtype).removeprefix("torch."),
        "element_bytes": e, "global_batches": list(global_batches), "gpus": list(gpus),
        "printed_gpus": list(PRINTED_GPUS), "gpus_per_node": GPUS_PER_NODE, "links_gbps": dict(LINKS_GBPS),
        "inf_cl_gib": [{"global_batch": B, "gpus": P, "gib": gib} for (B, P), gib in INF_CL_GIB.items()],
    }
    notes = [
        "computed from the formulas of leanops.benchmarks.bench_scaling, not measured; extra memory = what the "
        "loss allocates beyond its input features at its peak (the backward pass); sent = bytes one GPU sends per "
        "training step, forward + backward",
        f"D = {feature_dim}, {settings['dtype']} features (e = {e} bytes); statistics and gradient accumulators in "
        "float32; k = 1024, M = 1024k; GiB = 2**30 bytes",
        f"comm >= : bytes sent at line rate, no latency: NVLink {LINKS_GBPS['NVLink']:.0f} GB/s per GPU within one "
        f"node (P <= {GPUS_PER_NODE}), InfiniBand NDR 400 Gb/s = {LINKS_GBPS['IB NDR']:.0f} GB/s per GPU beyond",
        "SigLIP's rows (JSON) differ from CLIP's by CLIP's per-row statistics only (a few percent at most); "
        "open_clip-local gathers both feature matrices, leanops gather the text side only",
        "Inf-CL (paper): its reported per-GPU memory for ViT-L/14, not computed here; it may count memory this "
        "model does not (the model counts only the loss's allocations beyond its input features)",
    ]
    return common.Report(family=FAMILY, device=torch.device("cpu"), rows=rows, notes=notes, settings=settings)


# ---------------------------------------------------------------------------------------------------------------
# Output.

def batch_label(B: int) -> str:
    """128k, 1M ... (k = 1024); the integer where it is not a whole number of k."""
    if B % 2**20 == 0:
        return f"{B // 2**20}M"
    if B % 2**10 == 0:
        return f"{B // 2**10}k"
    return str(B)


def format_gib(value: float | None) -> str:
    """GiB to three significant digits, fixed above 1 (0.000458, 0.370, 7.51, 12.0, 49176)."""
    if value is None:
        return ""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:#.3g}"


# The modes printed (SigLIP's rows differ from CLIP's by CLIP's per-row statistics only: JSON only).
MODE_TITLES = {("clip", "ring"): "leanops ring, CLIP (distributed=\"ring\")",
               ("clip", "gather"): "leanops gather, CLIP (distributed=\"gather\")",
               ("clip", "open_clip-local"): "open_clip local loss with gather-with-grad, CLIP (plain PyTorch)"}
HEADER = ["B", "P", "b", "extra mem/GPU GiB", "sent/GPU/step GiB", "comm >= ms", "link"]


def _cells(row: ScalingRow) -> list[str]:
    return [batch_label(row.global_batch), str(row.gpus), str(row.local_batch), format_gib(row.extra_memory_gib),
            format_gib(row.gib_sent), measurement.format_number(row.comm_ms_lower_bound, "{:.1f}"), row.link]


def format_report(report: common.Report) -> str:
    """One table per mode at the printed GPU counts (every B), then Inf-CL's rows beside the CLIP ring's, then
    the notes. The JSON has every row."""
    printed = set(report.settings.get("printed_gpus", PRINTED_GPUS))
    settings = report.settings
    title = (f"{report.family}: computed (not measured) per-GPU extra memory and bytes sent per training step, "
             f"D = {settings.get('feature_dim')}, {settings.get('dtype')}; P in {sorted(printed)} shown, every P "
             f"in the JSON")
    sections = [title]
    for key, mode_title in MODE_TITLES.items():
        rows = [_cells(row) for row in report.rows if (row.loss, row.mode) == key and row.gpus in printed]
        if rows:
            sections.append(mode_title + "\n" + common.format_table(HEADER, rows))
    ring = {(row.global_batch, row.gpus): row for row in report.rows if (row.loss, row.mode) == ("clip", "ring")}
    comparison = []
    for row in report.rows:
        if row.mode != "inf-cl (paper)":
            continue
        comparison.append(["inf-cl (paper)"] + _cells(row)[:4] + ["", "", "", row.note])
        ours = ring.get((row.global_batch, row.gpus))
        if ours is not None:
            comparison.append(["leanops ring"] + _cells(ours) + ["computed"])
    if comparison:
        sections.append("Inf-CL's reported memory (ViT-L/14) beside leanops ring, CLIP\n" + common.format_table(
            ["mode"] + HEADER + ["source"], comparison))
    text = "\n\n".join(sections)
    if report.notes:
        text += "\n" + "\n".join(f"note: {note}" for note in report.notes)
    return text
