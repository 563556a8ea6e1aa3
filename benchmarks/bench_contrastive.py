"""Benchmark of the contrastive losses ``leanops.clip_loss`` and ``leanops.siglip_loss`` (``leanops bench clip``,
``leanops bench siglip``): forward + backward time and peak extra memory against the batch size B.

Each method computes the loss of (B, D) normalised random features x (image) and y (text), both requiring grad, and
a learnable 0-dim logit scale s (and bias b for SigLIP), then ``torch.autograd.grad`` of the loss with respect to
x, y, s (and b). The methods:

- ``pytorch``: plain PyTorch, open_clip's formulation (``leanops.baselines.clip_loss`` /
  ``siglip_loss``), run in the features' dtype; it builds the B x B logits, so it runs out of memory first;
- ``blockwise``: ``leanops.contrastive.clip_loss_blockwise`` / ``siglip_loss_blockwise``, the blockwise primitives
  in plain PyTorch (row blocks, O(block x B) memory);
- ``triton``, ``cuda`` (on a GPU), ``cpu`` (on the CPU): the leanops kernels, where ``leanops.ops.CONTRASTIVE``
  has them and the backend is usable here (never Triton's interpreter: it is a correctness tool);
- ``inf-cl`` (CLIP on a GPU only): Inf-CL (Cheng et al. 2024, ``pip install inf-cl``), when installed.

Before any time is reported, each method's loss and gradient of x are compared at B = CHECK_BATCH with plain
PyTorch run in float64 on the same inputs: the relative error must stay within max(2 x the error plain PyTorch
makes in the benchmark dtype, a floor for the dtype) (the flash-attention rule of ../shared/DESIGN.md). A failed
check is a failure row, never a time.

The FLOP floor is 8 B^2 D per forward + backward (``leanops.plans.floor_flops``): S = x y^T (2 B^2 D), its
recomputation in the backward pass (2 B^2 D; plain PyTorch keeps S instead, and needs 6 B^2 D), and the gradients
S_bar y, S_bar^T x (4 B^2 D). Each row's ``work`` is the matrix FLOPs its method's plan issues over that floor
(``plans.planned_flops`` for the leanops providers, 0.75 for plain PyTorch, unknown for Inf-CL); on a GPU each row
also has the roofline time, max(floor FLOPs / measured matmul peak, floor bytes / measured copy bandwidth), and the
fraction of it the measured time reaches (benchmarks/measurement.py).
Memory is the peak of what the call allocates beyond the inputs already allocated: the CUDA caching allocator's peak
on a GPU; on the CPU the growth of the resident set size, sampled every ~1 ms by a background thread.

``targets=True`` (``leanops bench --targets``, scripts/gpu_check.sh) runs the issue's target sizes only
(TARGET_BATCHES at D = TARGET_DIM).
"""
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from leanops import baselines, contrastive, ops, plans

from . import common, measurement

CHECK_BATCH = 256

METHOD_NOTES = {
    "pytorch": "plain PyTorch, open_clip's formulation (B x B logits)",
    "blockwise": "leanops blockwise primitives in plain PyTorch",
    "triton": "leanops Triton kernels",
    "cuda": "leanops CUDA kernels",
    "cpu": "leanops C++ CPU kernels",
    "inf-cl": "Inf-CL (cal_inf_loss, both directions)",
}
METHODS = tuple(METHOD_NOTES)
# The plan whose work each method's row shows (measurement.set_work): a leanops provider, "plain" (dense plain
# PyTorch) or None (unknown).
METHOD_PLANS = {"pytorch": "plain", "blockwise": "reference", "triton": "triton", "cuda": "cuda", "cpu": "cpu",
                "inf-cl": None}
# The target sizes (issue 14, one H100, bf16 forward + backward): CLIP B=32768 and 131072, SigLIP B=65536,
# at D=512.
TARGET_BATCHES = {"clip": [32768, 131072], "siglip": [65536]}
TARGET_DIM = 512


@dataclasses.dataclass
class ContrastiveRow(measurement.TimedRow):
    """A ``measurement.TimedRow`` (``elements`` is the batch size B) with what a contrastive loss adds: the shape
    and the check's errors."""
    batch: int = 0
    dim: int = 0
    loss_error: float | None = None
    grad_error: float | None = None
    loss_tolerance: float | None = None
    grad_tolerance: float | None = None


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One loss: its parameters' values and how each method computes it from (x, y, parameters)."""
    family: str
    op: str
    scale: float
    bias: float | None
    plain: Callable
    blockwise: Callable
    leanops: Callable  # (x, y, parameters, backend)
    inf_cl: Callable | None


def _clip_plain(x, y, parameters):
    return baselines.clip_loss(x, y, parameters[0])


def _siglip_plain(x, y, parameters):
    return baselines.siglip_loss(x, y, parameters[0], parameters[1])


def _inf_cl_head_dim(dim: int) -> int:
    """Inf-CL views (B, D) as (B, D / head_dim, head_dim), head_dim in 16..256."""
    for head_dim in (256, 128, 64, 32, 16):
        if dim % head_dim == 0:
            return head_dim
    raise ValueError(f"Inf-CL needs D divisible by 16, 32, 64, 128 or 256; D = {dim}")


def _clip_inf_cl(x, y, parameters):
    """CLIP through Inf-CL: its ``cal_inf_loss(q, k, labels, scale, head_dim)`` is one direction (q -> k), so the
    loss is the mean of both. The scale is applied here, as ``scale * q``, exactly what cal_inf_loss does with its
    ``scale=`` argument: that argument's autograd wrapper (GradientGather, inf-cl 1.2.1) all-reduces the scale's
    gradient unconditionally, which fails without torch.distributed."""
    from inf_cl import cal_inf_loss

    scale = parameters[0]
    head_dim = _inf_cl_head_dim(x.shape[1])
    return 0.5 * (cal_inf_loss(scale * x, y, head_dim=head_dim) + cal_inf_loss(scale * y, x, head_dim=head_dim))


SPECS = {
    "clip": LossSpec(
        family="clip", op="clip_loss", scale=100.0, bias=None,  # 100: open_clip's clamp of exp(logit_scale)
        plain=_clip_plain,
        blockwise=lambda x, y, p: contrastive.clip_loss_blockwise(x, y, p[0]),
        leanops=lambda x, y, p, backend: contrastive.clip_loss(x, y, p[0], backend=backend),
        inf_cl=_clip_inf_cl),
    "siglip": LossSpec(
        family="siglip", op="siglip_loss", scale=10.0, bias=-10.0,  # SigLIP's initial values
        plain=_siglip_plain,
        blockwise=lambda x, y, p: contrastive.siglip_loss_blockwise(x, y, p[0], p[1]),
        leanops=lambda x, y, p, backend: contrastive.siglip_loss(x, y, p[0], p[1], backend=backend),
        inf_cl=None),
}


def default_batches(family: str, device: torch.device, quick: bool, full: bool = False,
                    targets: bool = False) -> list[int]:
    """The batch sizes of a run: quick, the default for the device, full (larger ones too), or the issue's targets
    (the same on any device)."""
    if targets:
        return list(TARGET_BATCHES[family])
    if device.type == "cuda":
        if quick:
            return [4096, 8192]
        batches = [8192, 16384, 32768, 65536, 131072] if family == "clip" else [8192, 16384, 32768, 65536]
        return batches + ([262144] if family == "clip" else [131072]) if full else batches
    return [256, 512] if quick else [512, 1024, 2048, 4096, 8192] if full else [512, 1024, 2048]


def default_dim_and_dtype(device: torch.device) -> tuple[int, torch.dtype]:
    return (512, torch.bfloat16) if device.type == "cuda" else (64, torch.float32)


def make_inputs(spec: LossSpec, batch: int, dim: int, dtype: torch.dtype, device: torch.device):
    """Normalised random features (leaves requiring grad) and the learnable 0-dim float32 parameters."""
    def features():
        return F.normalize(torch.randn(batch, dim, device=device), dim=1).to(dtype).requires_grad_()

    x, y = features(), features()
    values = (spec.scale,) if spec.bias is None else (spec.scale, spec.bias)
    parameters = tuple(torch.tensor(value, dtype=torch.float32, device=device, requires_grad=True)
                       for value in values)
    return x, y, parameters


def _method_function(spec: LossSpec, method: str) -> Callable:
    if method == "pytorch":
        return spec.plain
    if method == "blockwise":
        return spec.blockwise
    if method == "inf-cl":
        return spec.inf_cl
    return lambda x, y, parameters: spec.leanops(x, y, parameters, method)


def _forward_backward(function: Callable, x, y, parameters):
    """One training step of the loss: the loss and the gradients of every input (no .grad accumulation)."""
    loss = function(x, y, parameters)
    return (loss,) + torch.autograd.grad(loss, (x, y) + parameters)


# ---------------------------------------------------------------------------------------------------------------
# Which methods run here, and why the others do not.

def _inf_cl_unavailable_reason(spec: LossSpec, device: torch.device) -> str | None:
    if common.peer_not_requested_reason():
        return common.peer_not_requested_reason()
    if spec.inf_cl is None:
        return "Inf-CL has no sigmoid (SigLIP) loss"
    try:
        import inf_cl  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means "not usable here", with the reason
        if isinstance(error, ModuleNotFoundError) and error.name == "inf_cl":
            return "not installed (pip install inf-cl)"
        return f"failed to import: {type(error).__name__}: {error}"
    if device.type != "cuda":
        return "Inf-CL's Triton kernels run on CUDA tensors only"
    return None


def unavailable_reason(spec: LossSpec, method: str, device: torch.device) -> str | None:
    """Why `method` cannot run on `device`, or None when it can."""
    if method in ("pytorch", "blockwise"):
        return None
    if method == "inf-cl":
        return _inf_cl_unavailable_reason(spec, device)
    return ops.CONTRASTIVE.unavailable_reason(method, device)


def candidate_methods(spec: LossSpec, device: torch.device) -> list[str]:
    """Every method listed for this loss on this device type, plain PyTorch first."""
    kernels = ["triton", "cuda"] if device.type == "cuda" else ["cpu"]
    methods = ["pytorch", "blockwise"] + kernels
    if spec.inf_cl is not None:
        methods.append("inf-cl")
    return methods


# ---------------------------------------------------------------------------------------------------------------
# The check against float64.

class Checker(measurement.Checker):
    """Compares methods with plain PyTorch in float64 on one set of inputs at B = CHECK_BATCH (computed once)."""

    def __init__(self, spec: LossSpec, dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__({"loss": "loss", "grad": "grad x"}, dtype, f"B={CHECK_BATCH}")
        self.spec = spec
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(1234)
        self.x, self.y, self.parameters = make_inputs(spec, CHECK_BATCH, dim, dtype, device)
        torch.random.set_rng_state(generator_state)
        x64 = self.x.detach().to(torch.float64).requires_grad_()
        y64 = self.y.detach().to(torch.float64)
        parameters64 = tuple(p.detach().to(torch.float64) for p in self.parameters)
        loss64 = spec.plain(x64, y64, parameters64)
        (grad64,) = torch.autograd.grad(loss64, x64)
        self.exact = (loss64.detach(), grad64)
        self.plain_errors = self._errors(spec.plain)

    def _errors(self, function: Callable) -> tuple[float, float]:
        loss = function(self.x, self.y, self.parameters)
        (grad,) = torch.autograd.grad(loss, self.x)
        return measurement.relative_error(loss, self.exact[0]), measurement.relative_error(grad, self.exact[1])

    def errors(self, method: str) -> tuple[float, float]:
        return self._errors(_method_function(self.spec, method))


# ---------------------------------------------------------------------------------------------------------------
# The run.

def run_family(family: str, device: torch.device, *, quick: bool = False, repeats: int | None = None,
               elements: int | None = None, backend_names: list[str] | None = None, full: bool = False,
               dtype: torch.dtype | None = None, targets: bool = False) -> common.Report:
    """Check, time and measure the memory of every method of `family` ("clip" or "siglip") on `device`.

    `elements` is a single batch size B overriding the sweep; `backend_names` restricts the methods (any of
    METHODS; plain PyTorch always runs: it is the baseline); `full` adds larger batches; `targets` runs the issue's
    target sizes (TARGET_BATCHES, D = TARGET_DIM); `dtype` overrides the features' dtype (default: bfloat16 on a
    GPU, float32 on the CPU).
    """
    spec = SPECS[family]
    repeats = repeats or (20 if device.type == "cuda" else 5)
    batches = [elements] if elements else default_batches(family, device, quick, full, targets)
    dim, default_dtype = default_dim_and_dtype(device)
    dim = TARGET_DIM if targets else dim
    dtype = dtype or default_dtype
    methods = candidate_methods(spec, device)
    if backend_names:
        unknown = sorted(set(backend_names) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown} for {family}; expected some of {METHODS}")
        methods = [method for method in methods if method == "pytorch" or method in backend_names]
    ceilings = measurement.device_ceilings(device, dtype)
    peak = None if ceilings is None else ceilings.peak_flops
    dtype_name = str(dtype).removeprefix("torch.")
    report = common.Report(family, device, rows=[], settings={
        "quick": quick, "full": full, "targets": targets, "repeats": repeats, "batches": batches, "dim": dim,
        "dtype": dtype_name, "logit_scale": spec.scale, "logit_bias": spec.bias, "methods": methods,
        "check_batch": CHECK_BATCH, "peak_flops": peak,
        "ceilings": None if ceilings is None else ceilings.as_dict(),
        "time_budget_s": common.row_budget_s(measurement.TIME_BUDGET_S[device.type]),
        "memory": measurement.memory_method(device)})
    common.PROGRESS.expect(report, len(batches) * len(methods))
    report.notes.append(f"time: forward + backward (grads of features, scale{', bias' if spec.bias else ''}), "
                        f"median; FLOP floor 8*B^2*D (S, its recomputation, and the two gradient matmuls)")
    report.notes.append(measurement.ceilings_note(ceilings))
    report.notes.append(measurement.peak_note(peak, dtype_name))
    if device.type == "cpu":
        report.notes.extend(measurement.cpu_notes())
    if spec.inf_cl is None:
        report.notes.append("Inf-CL implements only the softmax (CLIP) loss: no SigLIP peer is benchmarked")

    torch.manual_seed(0)
    checker = Checker(spec, dim, dtype, device)
    reasons = {method: unavailable_reason(spec, method, device) for method in methods}
    for batch in batches:
        # Past the time limit (leanops bench --time-limit) the rows are listed without inputs, checks or times.
        inputs = None if common.out_of_time_reason() else make_inputs(spec, batch, dim, dtype, device)
        for method in methods:
            sizes = {"batch": batch, "features": dim}
            row = ContrastiveRow(op=spec.op, backend=method, dtype=dtype_name, elements=batch,
                                 bytes_moved=plans.floor_bytes(family, dtype, **sizes),  # read x, y; write grads
                                 check="skipped", batch=batch, dim=dim,
                                 flop_floor=float(plans.floor_flops(family, **sizes)))
            work_problem = measurement.set_work(row, family, METHOD_PLANS[method], dtype, device, **sizes)
            if work_problem and work_problem not in report.notes:
                report.notes.append(work_problem)
            measurement.set_roofline(row, ceilings)
            report.rows.append(row)
            if reasons[method] is not None:
                row.note = reasons[method]
                continue
            if inputs is None or common.out_of_time_reason():
                row.note = common.out_of_time_reason() or "not run: out of time"
                continue
            if not checker.check_row(row, method):
                continue
            function = _method_function(spec, method)
            measurement.measure_or_record(row, lambda: _forward_backward(function, *inputs), device, repeats, peak,
                                          f"B={batch}")
        del inputs
        measurement.free_device_memory(device)
    return report


def run_clip(device: torch.device, **options) -> common.Report:
    """``leanops bench clip``: see run_family."""
    return run_family("clip", device, **options)


def run_siglip(device: torch.device, **options) -> common.Report:
    """``leanops bench siglip``: see run_family."""
    return run_family("siglip", device, **options)


# ---------------------------------------------------------------------------------------------------------------
# Output.

def format_report(report: common.Report) -> str:
    """A plain-text table of a clip/siglip report, at most common.TABLE_WIDTH columns: one line per (B, method);
    the op, dtype and D in the title (the JSON and CSV files hold every field)."""
    from leanops import info

    roofline = report.settings.get("ceilings") is not None
    header = ["B", "method"] + measurement.timing_header(roofline) + ["check", "note"]
    rows = [[str(getattr(row, "batch", None) or row.elements), row.backend]
            + measurement.timing_cells(row, roofline) + [row.check, row.note] for row in report.rows]
    op = report.rows[0].op if report.rows else report.family
    title = (f"{report.family} ({op}, {report.settings.get('dtype', '')}, D={report.settings.get('dim', '')}, "
             f"forward + backward) on {info.device_name(report.device)}")
    return measurement.format_titled_table(title, header, rows, report.notes)


def write_plots(out_dir: str, report: common.Report) -> list[str]:
    """Memory and time against B (log-log) as PNG files in `out_dir`; returns their paths (none without
    matplotlib, with a note added to the report)."""
    from . import plots

    return plots.write_batch_plots(out_dir, report)
