"""Benchmark of the linear cross-entropy ``leanops.linear_cross_entropy`` (``leanops bench ce``): forward + backward
time and peak extra memory of a language model's loss head against the vocabulary size V.

Each method computes the mean cross-entropy of the logits hidden @ weight^T, hidden (N, D) and weight (V, D) both
requiring grad, against (N,) random targets, then ``torch.autograd.grad`` of the loss with respect to hidden and
weight. The methods:

- ``pytorch``: plain PyTorch, what Hugging Face does: logits = hidden @ weight.T in the input dtype, then
  ``F.cross_entropy(logits.float(), targets)``; it builds the N x V logits (twice, and their gradient), so it runs
  out of memory first;
- ``chunked``: ``leanops.cross_entropy.linear_cross_entropy_chunked``, the chunked primitives in plain PyTorch;
- ``triton``, ``cuda`` (on a GPU), ``cpu`` (on the CPU): the leanops kernels, where ``leanops.ops.CROSS_ENTROPY``
  has them and the backend is usable here (never Triton's interpreter: it is a correctness tool);
- peers, on a GPU, when installed: ``liger`` (Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``), ``cce``
  (Apple's cut-cross-entropy with its default ``filter_eps="auto"``: it skips the gradient entries whose softmax
  probability is below a dtype-dependent threshold, faster but not exact) and ``cce-exact`` (``filter_eps=None``).
  A peer that is not installed or cannot run here is a row saying why, never dropped.

Inputs come in two kinds (each row says which): ``trained-like`` (the default everywhere), hidden states whose target
logit stands out as after training, the plain loss about TRAINED_LIKE_LOSS (~2.5) whatever V: weight ~ N(0, s^2 / D)
(logit spread s = TRAINED_LIKE_LOGIT_STD), hidden = noise + a * weight[target] / |weight[target]|, noise ~ N(0, 1),
the margin a found by bisection on the first CALIBRATION_TOKENS tokens; and ``random`` (also the default on a GPU),
a model at initialisation: weight ~ N(0, 0.02^2) (Hugging Face's initializer_range), hidden ~ N(0, 1), loss about
log V + 0.02^2 D / 2. Each row records the plain loss of its inputs (``input_loss``).

Before any time is reported, each method's loss and gradients of hidden and weight are compared at CHECK_SHAPE with
plain PyTorch run in float64 on the same inputs (of the same kind): the relative error must stay within max(2 x the
error plain PyTorch makes in the benchmark dtype, a floor for the dtype) (benchmarks/measurement.py). A failed check
is a failure row, never a time.

The FLOP floor is 8 N D V per forward + backward (``leanops.plans.floor_flops``): the logits (2 N D V), their
recomputation in the backward pass (2 N D V; plain PyTorch keeps them instead, and needs 6 N D V) and the gradient
matmuls G W and G^T hidden (4 N D V). Each row's ``work`` is the matrix FLOPs its method's plan issues over that
floor (``plans.planned_flops`` for the leanops providers, 0.75 for plain PyTorch, unknown for the peers); on a GPU
each row also has the roofline time, max(floor FLOPs / measured matmul peak, floor bytes / measured copy
bandwidth), and the fraction of it the measured time reaches (benchmarks/measurement.py). ``logits_bytes`` = 4 N V,
the float32 logits a plain implementation materializes, for reference. Memory is the peak of what the call
allocates beyond the inputs already allocated: the CUDA caching allocator's peak on a GPU; on the CPU the growth of
the resident set size, sampled every ~1 ms by a background thread.

``targets=True`` (``leanops bench --targets``, scripts/gpu_check.sh) runs the issue's target cases only
(TARGET_CASES, trained-like inputs).
"""
import dataclasses
import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

import leanops
from leanops import cross_entropy, ops, plans

from . import common, measurement

FAMILY = "ce"
OP = "linear_cross_entropy"

# (N, D, V) per case. On a GPU: the V sweep at N=8192, D=2048 (the plots), then the other target cases.
GPU_SWEEP_SHAPE = (8192, 2048)
GPU_SWEEP_VOCABULARIES = (32768, 65536, 128256, 256000)
GPU_TARGET_CASES = ((8192, 2304, 256000), (32768, 4096, 128256))
GPU_QUICK_CASES = ((4096, 2048, 32768), (8192, 2048, 128256))
# The target cases (issue 14, one H100, bf16 forward + backward, trained-like inputs).
TARGET_CASES = ((8192, 2048, 128256), (32768, 4096, 128256))
TARGET_INPUT_KINDS = ("trained-like",)
CPU_DIM = 64
# quick -> (N, V values); 512 tokens by default keep the whole CPU run of `leanops bench` to a few minutes (the
# V sweep at 1024 tokens took 6 of its 7.6 minutes on 2 busy cores); --full adds V = 128256.
CPU_SWEEP = {False: (512, (8192, 32768, 50257)), True: (256, (4096, 16384))}
# The check's (N, D, V), per device type.
CHECK_SHAPE = {"cuda": (512, 512, 4096), "cpu": (256, 64, 2048)}

INPUT_KINDS = ("trained-like", "random")
TRAINED_LIKE_LOSS = 2.5
TRAINED_LIKE_LOGIT_STD = 2.0
RANDOM_WEIGHT_STD = 0.02
CALIBRATION_TOKENS = 256

METHOD_NOTES = {
    "pytorch": "plain PyTorch, Hugging Face's formulation (N x V logits)",
    "chunked": "leanops chunked primitives in plain PyTorch",
    "triton": "leanops Triton kernels",
    "cuda": "leanops CUDA kernels",
    "cpu": "leanops C++ CPU kernels",
    "liger": "Liger-Kernel LigerFusedLinearCrossEntropyLoss",
    "cce": "cut-cross-entropy, default filter_eps='auto' (inexact gradient filtering)",
    "cce-exact": "cut-cross-entropy, filter_eps=None",
}
METHODS = tuple(METHOD_NOTES)
# Peer -> (module to import, package to install).
PEERS = {
    "liger": ("liger_kernel.transformers.fused_linear_cross_entropy", "liger-kernel"),
    "cce": ("cut_cross_entropy", "cut-cross-entropy"),
    "cce-exact": ("cut_cross_entropy", "cut-cross-entropy"),
}
# The plan whose work each method's row shows (measurement.set_work): a leanops provider, "plain" (dense plain
# PyTorch) or None (unknown: the peers).
METHOD_PLANS = {"pytorch": "plain", "chunked": "reference", "triton": "triton", "cuda": "cuda", "cpu": "cpu",
                "liger": None, "cce": None, "cce-exact": None}
# The case name of the linear cross-entropy in leanops.plans.
PLANS_CASE = "cross_entropy"
# Checked quantity (row field prefix) -> its name in a failed check's note.
CHECKED = {"loss": "loss", "grad_hidden": "grad hidden", "grad_weight": "grad weight"}


@dataclasses.dataclass
class CrossEntropyRow(measurement.TimedRow):
    """A ``measurement.TimedRow`` (``elements`` is the vocabulary size V) with what the linear cross-entropy adds:
    the shape (N tokens, D, V), the input kind and its plain loss, the bytes of the float32 logits, and the check's
    errors."""
    tokens: int = 0
    dim: int = 0
    vocabulary: int = 0
    inputs: str = ""
    input_loss: float | None = None
    logits_bytes: int = 0
    loss_error: float | None = None
    grad_hidden_error: float | None = None
    grad_weight_error: float | None = None
    loss_tolerance: float | None = None
    grad_hidden_tolerance: float | None = None
    grad_weight_tolerance: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# Sizes and inputs.

def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def sweep_shape(device: torch.device, quick: bool) -> tuple[int, int]:
    """(N, D) of the V sweep (the plots; ``--size V`` runs this shape)."""
    return GPU_SWEEP_SHAPE if device.type == "cuda" else (CPU_SWEEP[quick][0], CPU_DIM)


def default_cases(device: torch.device, quick: bool, full: bool = False,
                  targets: bool = False) -> list[tuple[int, int, int]]:
    """The (N, D, V) cases of a run, in order (full: on the CPU, a Llama-3-sized vocabulary too; on a GPU the
    default already holds the issue's targets; targets: those only, on any device)."""
    if targets:
        return list(TARGET_CASES)
    if device.type == "cuda":
        if quick:
            return list(GPU_QUICK_CASES)
        return [GPU_SWEEP_SHAPE + (vocabulary,) for vocabulary in GPU_SWEEP_VOCABULARIES] + list(GPU_TARGET_CASES)
    tokens, vocabularies = CPU_SWEEP[quick]
    if full:
        vocabularies = vocabularies + (128256,)
    return [(tokens, CPU_DIM, vocabulary) for vocabulary in vocabularies]


def default_input_kinds(device: torch.device) -> tuple[str, ...]:
    """Both kinds on a GPU; trained-like only on the CPU, to keep CPU runs short."""
    return INPUT_KINDS if device.type == "cuda" else ("trained-like",)


def _trained_like_margin(noise: torch.Tensor, direction: torch.Tensor, weight: torch.Tensor,
                         targets: torch.Tensor) -> float:
    """The a for which the plain loss of (noise + a * direction) @ weight^T is TRAINED_LIKE_LOSS on the first
    CALIBRATION_TOKENS tokens (bisection: the loss falls as a grows)."""
    probe = slice(0, CALIBRATION_TOKENS)
    noise_logits = noise[probe] @ weight.T
    direction_logits = direction[probe] @ weight.T

    def loss(margin: float) -> float:
        return float(F.cross_entropy(noise_logits + margin * direction_logits, targets[probe]))

    low, high = 0.0, 1.0
    for _ in range(64):
        if loss(high) <= TRAINED_LIKE_LOSS:
            break
        low, high = high, 2 * high
    for _ in range(30):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if loss(middle) > TRAINED_LIKE_LOSS else (low, middle)
    return 0.5 * (low + high)


def make_inputs(kind: str, tokens: int, dim: int, vocabulary: int, dtype: torch.dtype, device: torch.device):
    """(hidden (N, D), weight (V, D), targets (N,)) of `kind` (module docstring); hidden and weight are leaves
    requiring grad."""
    targets = torch.randint(0, vocabulary, (tokens,), device=device)
    noise = torch.randn(tokens, dim, device=device)
    if kind == "random":
        weight = torch.randn(vocabulary, dim, device=device) * RANDOM_WEIGHT_STD
        hidden = noise
    elif kind == "trained-like":
        # Calibrated on the weight as rounded to `dtype`, the one the methods see.
        weight = (torch.randn(vocabulary, dim, device=device) * (TRAINED_LIKE_LOGIT_STD / math.sqrt(dim))
                  ).to(dtype).float()
        direction = F.normalize(weight[targets], dim=1)
        hidden = noise + _trained_like_margin(noise, direction, weight, targets) * direction
        del direction
    else:
        raise ValueError(f"unknown input kind {kind!r}; expected one of {INPUT_KINDS}")
    return hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), targets


def input_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> float:
    """The plain loss of the inputs (as plain_loss computes it, by chunks of tokens): how confident they are."""
    with torch.no_grad():
        total = sum(float(F.cross_entropy((hidden[rows] @ weight.T).float(), targets[rows], reduction="sum"))
                    for rows in (slice(start, start + chunk) for start in range(0, hidden.shape[0], chunk)))
    return total / hidden.shape[0]


# ---------------------------------------------------------------------------------------------------------------
# The methods.

def plain_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Hugging Face's loss head: the logits in the input dtype, the cross-entropy in float32 (float64 stays)."""
    logits = hidden @ weight.T
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)


def _liger_loss(hidden, weight, targets):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()(weight, hidden, targets)  # (lin_weight, _input, target)
    return loss[0] if isinstance(loss, tuple) else loss  # versions with return_z_loss return (loss, z_loss)


def _cce_loss(hidden, weight, targets, **options):
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

    return cce_linear_cross_entropy(hidden, weight, targets, **options)


def method_function(method: str) -> Callable:
    """(hidden, weight, targets) -> mean loss, for `method`."""
    if method == "pytorch":
        return plain_loss
    if method == "chunked":
        return cross_entropy.linear_cross_entropy_chunked
    if method == "liger":
        return _liger_loss
    if method == "cce":
        return _cce_loss
    if method == "cce-exact":
        return lambda hidden, weight, targets: _cce_loss(hidden, weight, targets, filter_eps=None)
    return lambda hidden, weight, targets: leanops.linear_cross_entropy(hidden, weight, targets, backend=method)


def forward_backward(function: Callable, hidden, weight, targets):
    """One training step of the loss head: the loss and the gradients of hidden and weight (no .grad)."""
    loss = function(hidden, weight, targets)
    return (loss,) + torch.autograd.grad(loss, (hidden, weight))


def _peer_unavailable_reason(method: str, device: torch.device) -> str | None:
    if common.peer_not_requested_reason():
        return common.peer_not_requested_reason()
    module, package = PEERS[method]
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - any import failure means "not usable here", with the reason
        if isinstance(error, ModuleNotFoundError) and error.name == module.split(".")[0]:
            return f"not installed (pip install {package})"
        return f"failed to import: {type(error).__name__}: {error}".splitlines()[0]
    if device.type != "cuda":
        return f"{package}'s Triton kernels run on CUDA tensors only"
    return None


def unavailable_reason(method: str, device: torch.device) -> str | None:
    """Why `method` cannot run on `device`, or None when it can."""
    if method in ("pytorch", "chunked"):
        return None
    if method in PEERS:
        return _peer_unavailable_reason(method, device)
    return ops.CROSS_ENTROPY.unavailable_reason(method, device)


def candidate_methods(device: torch.device) -> list[str]:
    """Every method listed on this device type, plain PyTorch first; the peers are listed everywhere."""
    kernels = ["triton", "cuda"] if device.type == "cuda" else ["cpu"]
    return ["pytorch", "chunked"] + kernels + list(PEERS)


# ---------------------------------------------------------------------------------------------------------------
# The check against float64.

class Checker(measurement.Checker):
    """Compares methods with plain PyTorch in float64 on one set of inputs of one kind at CHECK_SHAPE (computed
    once)."""

    def __init__(self, kind: str, dtype: torch.dtype, device: torch.device):
        shape = CHECK_SHAPE[device.type]
        super().__init__(CHECKED, dtype, "(N, D, V)=({}, {}, {})".format(*shape))
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(1234)
            self.inputs = make_inputs(kind, *shape, dtype, device)
        hidden, weight, targets = self.inputs
        hidden64 = hidden.detach().to(torch.float64).requires_grad_()
        weight64 = weight.detach().to(torch.float64).requires_grad_()
        self.exact = [value.detach() for value in forward_backward(plain_loss, hidden64, weight64, targets)]
        self.plain_errors = self._errors(plain_loss)

    def _errors(self, function: Callable) -> list[float]:
        values = forward_backward(function, *self.inputs)
        return [measurement.relative_error(value, exact) for value, exact in zip(values, self.exact)]

    def errors(self, method: str) -> list[float]:
        return self._errors(method_function(method))


# ---------------------------------------------------------------------------------------------------------------
# The run.

def _methods(device: torch.device, backend_names: list[str] | None) -> list[str]:
    methods = candidate_methods(device)
    if backend_names:
        unknown = sorted(set(backend_names) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown} for ce; expected some of {METHODS}")
        methods = [method for method in methods if method == "pytorch" or method in backend_names]
    return methods


def _notes(device: torch.device, dtype_name: str, peak: float | None,
           ceilings: measurement.Ceilings | None = None) -> list[str]:
    notes = [
        "time: forward + backward (loss, grads of hidden and weight), median; FLOP floor 8*N*D*V (the logits "
        "2NDV, recomputed in the backward 2NDV, the gradient matmuls G W and G^T h 4NDV)",
        f"inputs trained-like: weight ~ N(0, {TRAINED_LIKE_LOGIT_STD:g}^2/D), hidden = N(0, 1) noise + a * the "
        f"target's unit weight row, a set so that the plain loss of the first {CALIBRATION_TOKENS} tokens is "
        f"{TRAINED_LIKE_LOSS:g} (as after training; input_loss in the JSON: plain PyTorch's, all N tokens); "
        f"random: weight ~ N(0, {RANDOM_WEIGHT_STD:g}^2), hidden ~ N(0, 1), loss ~ log V + "
        f"{RANDOM_WEIGHT_STD:g}^2*D/2 (a model at initialisation)",
        "check: loss, grad hidden and grad weight vs plain PyTorch in float64 on the same inputs at (N, D, V) = "
        "({}, {}, {}); tolerance max(2 x plain PyTorch's error in {}, a floor for the dtype)".format(
            *CHECK_SHAPE[device.type], dtype_name),
        "logits_bytes (JSON): 4*N*V, the float32 logits a plain implementation materializes (plain PyTorch also "
        "keeps the logits in the input dtype and their gradient); loss (JSON input_loss): plain PyTorch's loss of "
        "the row's inputs",
        measurement.ceilings_note(ceilings),
        "cce filters the gradient (filter_eps='auto': softmax entries below a dtype-dependent threshold are "
        "skipped); cce-exact does not (filter_eps=None)",
        measurement.peak_note(peak, dtype_name),
    ]
    if device.type == "cpu":
        notes.extend(measurement.cpu_notes())
    return notes


def run(device: torch.device, *, quick: bool = False, repeats: int | None = None, elements: int | None = None,
        backend_names: list[str] | None = None, input_kinds: list[str] | None = None, full: bool = False,
        dtype: torch.dtype | None = None, targets: bool = False) -> common.Report:
    """``leanops bench ce``: check, time and measure the memory of every method on `device`.

    `elements` is a single vocabulary size V (at the sweep's N, D) overriding the cases; `backend_names`
    restricts the methods (any of METHODS; plain PyTorch always runs: it is the baseline); `input_kinds` (any of
    INPUT_KINDS) overrides default_input_kinds; `targets` runs the issue's target cases (TARGET_CASES, trained-like
    inputs unless `input_kinds` says otherwise).
    """
    repeats = repeats or (20 if device.type == "cuda" else 5)
    cases = [sweep_shape(device, quick) + (elements,)] if elements else default_cases(device, quick, full, targets)
    kinds = tuple(input_kinds) if input_kinds else TARGET_INPUT_KINDS if targets else default_input_kinds(device)
    unknown = sorted(set(kinds) - set(INPUT_KINDS))
    if unknown:
        raise ValueError(f"unknown input kind(s) {unknown} for ce; expected some of {INPUT_KINDS}")
    dtype = dtype or default_dtype(device)
    methods = _methods(device, backend_names)
    ceilings = measurement.device_ceilings(device, dtype)
    peak = None if ceilings is None else ceilings.peak_flops
    dtype_name = str(dtype).removeprefix("torch.")
    report = common.Report(FAMILY, device, rows=[], settings={
        "quick": quick, "targets": targets, "repeats": repeats, "cases": [list(case) for case in cases],
        "sweep_shape": list(sweep_shape(device, quick)), "dtype": dtype_name, "input_kinds": list(kinds),
        "trained_like_loss": TRAINED_LIKE_LOSS, "trained_like_logit_std": TRAINED_LIKE_LOGIT_STD,
        "random_weight_std": RANDOM_WEIGHT_STD, "calibration_tokens": CALIBRATION_TOKENS, "methods": methods,
        "check_shape": list(CHECK_SHAPE[device.type]), "peak_flops": peak,
        "ceilings": None if ceilings is None else ceilings.as_dict(),
        "time_budget_s": common.row_budget_s(measurement.TIME_BUDGET_S[device.type]),
        "memory": measurement.memory_method(device)})
    report.notes.extend(_notes(device, dtype_name, peak, ceilings))
    common.PROGRESS.expect(report, len(cases) * len(kinds) * len(methods))

    torch.manual_seed(0)
    checkers = {kind: Checker(kind, dtype, device) for kind in kinds}
    reasons = {method: unavailable_reason(method, device) for method in methods}
    for tokens, dim, vocabulary in cases:
        for kind in kinds:
            # Past the time limit (leanops bench --time-limit) the rows are listed without inputs, checks or times.
            inputs = None if common.out_of_time_reason() else make_inputs(kind, tokens, dim, vocabulary, dtype,
                                                                           device)
            loss = None if inputs is None else input_loss(*inputs)
            sizes = {"tokens": tokens, "vocabulary": vocabulary, "features": dim}
            for method in methods:
                row = CrossEntropyRow(
                    op=OP, backend=method, dtype=dtype_name, elements=vocabulary,
                    bytes_moved=plans.floor_bytes(PLANS_CASE, dtype, **sizes),  # read h, W; write their grads
                    check="skipped", tokens=tokens, dim=dim, vocabulary=vocabulary, inputs=kind, input_loss=loss,
                    flop_floor=float(plans.floor_flops(PLANS_CASE, **sizes)), logits_bytes=4 * tokens * vocabulary)
                work_problem = measurement.set_work(row, PLANS_CASE, METHOD_PLANS[method], dtype, device, **sizes)
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
                if not checkers[kind].check_row(row, method):
                    continue
                function = method_function(method)
                measurement.measure_or_record(row, lambda: forward_backward(function, *inputs), device, repeats,
                                              peak, f"(N, D, V)=({tokens}, {dim}, {vocabulary})")
            del inputs
            measurement.free_device_memory(device)
    return report


# ---------------------------------------------------------------------------------------------------------------
# Output.

# The input kinds as the table shows them (narrow); the JSON keeps the full names.
SHORT_INPUT_KINDS = {"trained-like": "trained", "random": "random"}


def format_report(report: common.Report) -> str:
    """A plain-text table of a ce report, at most common.TABLE_WIDTH columns: one line per ((N, D, V), input kind,
    method); the dtype in the title, the input loss and the logits' bytes in the JSON and CSV files."""
    from leanops import info

    roofline = report.settings.get("ceilings") is not None
    header = ["N", "D", "V", "inputs", "method"] + measurement.timing_header(roofline) + ["check", "note"]
    rows = [[str(row.tokens), str(row.dim), str(row.vocabulary), SHORT_INPUT_KINDS.get(row.inputs, row.inputs),
             row.backend] + measurement.timing_cells(row, roofline) + [row.check, row.note] for row in report.rows]
    title = (f"{report.family} ({OP}, {report.settings.get('dtype', '')}, forward + backward) on "
             f"{info.device_name(report.device)}")
    return measurement.format_titled_table(title, header, rows, report.notes)


def write_plots(out_dir: str, report: common.Report) -> list[str]:
    """Memory and time against V (log-log) at the sweep's (N, D) as PNG files in `out_dir`, one line per method
    (and input kind, when there are several); returns their paths (none without matplotlib, with a note added to
    the report)."""
    from . import plots

    tokens, dim = report.settings["sweep_shape"]
    several_kinds = len(report.settings["input_kinds"]) > 1
    rows = [row for row in report.rows if (row.tokens, row.dim) == (tokens, dim)]
    return plots.write_size_plots(
        out_dir, report, rows, x_of=lambda row: row.vocabulary,
        label_of=lambda row: f"{row.backend} ({row.inputs})" if several_kinds else row.backend,
        x_label="vocabulary size V", x_name="V", shape=f"N={tokens}, D={dim}, {report.settings['dtype']}")
