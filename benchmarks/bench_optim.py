"""Benchmark of one optimizer step (``leanops bench optim``): AdamW on 16-bit parameters with leanops' CollageAdamW
against fp32 AdamW, plain bf16 AdamW and the compensated peers; and leanops' FRUGAL on the fp32 parameters.

Each method owns TENSORS parameter tensors (16 x 4096 x 4096 = 268M parameters on a GPU), their gradients set once;
the time is that of one ``optimizer.step()`` (median of repeats after a warm-up step that creates the state; CUDA
events on a GPU). The state changes at every step, which does not matter to a memory-bound step. The methods:

- ``torch-fused-fp32`` (GPU; ``torch-foreach-fp32`` on the CPU): ``torch.optim.AdamW(fused=True)`` (foreach) on
  float32 parameters, the optimizer of mixed-precision training (fp32 master weights and moments);
- ``torch-bf16``: ``torch.optim.AdamW(foreach=True)`` on bfloat16 parameters and moments, the lossy baseline;
- ``collage-<mode>-<backend>``: ``leanops.optim.CollageAdamW(mode=light|plus, backend=...)`` on bfloat16
  parameters, for the reference and every leanops backend with kernels here (``leanops.ops.COLLAGE``; never
  Triton's interpreter on the CPU);
- ``frugal-<projection>-<backend>``: ``leanops.optim.FRUGAL(density=0.25, projection=blockwise|columns,
  state_free="signsgd", backend=...)`` on float32 parameters, every tensor split (AdamW on a quarter of the tensors
  or of each tensor's columns, signSGD on the rest); the target is the time of fp32 AdamW's fused step;
- peers, on a GPU, when installed: ``optimi-kahan`` (optimi's ``AdamW(kahan_sum=True)``: bf16 parameters and
  moments, a bf16 Kahan compensation buffer) and ``torchao-sr`` (torchao's AdamW with ``bf16_stochastic_round=True``:
  bf16 parameters and moments, the parameter rounded stochastically). A peer that is not installed or cannot run
  here is a row saying why, never dropped.

The step is memory-bound: each row gives the bytes per parameter the method must move at the least (BYTES_MOVED),
the bandwidth that makes, and its fraction of the device's measured copy bandwidth (as ``leanops bench mcf``), and
the optimizer memory per parameter: the state tensors' bytes as counted after the step, the fp32 master copy where
there is one, and the bf16 model copy (``bytes_per_param_total``).

Before any time is reported: each Collage kernel backend's step must give bit for bit the results of
backend="reference" (CHECK_SHAPE, CHECK_STEPS steps: parameter, compensation and moments); and every method's
first step on a CHECK_SHAPE tensor is compared with torch's AdamW in float64 on the same values: the relative error
(2-norm) of the stored update (for the compensated methods, parameter + compensation) must stay within the
tolerance of its kind (UPDATE_TOLERANCE). FRUGAL's first step on FRUGAL_CHECK_TENSORS such tensors is compared
with its own update computed in float64 from the subspace it drew (AdamW there, signSGD elsewhere). A failed check
is a failure row, never a time.
"""
import dataclasses
import importlib
import importlib.util
import math

import torch

from leanops import backends, ops
from leanops.optim import FRUGAL, CollageAdamW, collage

from . import bench_mcf, common, measurement

FAMILY = "optim"
OP = "adamw_step"

# (tensors, elements per tensor) per (device type, quick).
SIZES = {("cuda", "default"): (16, 4096 * 4096), ("cuda", "quick"): (4, 4096 * 4096),
         ("cuda", "full"): (16, 4096 * 4096), ("cpu", "default"): (8, 512 * 512), ("cpu", "quick"): (4, 256 * 256),
         ("cpu", "full"): (16, 1024 * 1024)}
# The target size (issue 14: Collage-light / plus steps on 268M parameters), on any device.
TARGET_SIZE = (16, 4096 * 4096)
HYPERPARAMETERS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
PARAMETER_STD, GRADIENT_STD = 0.02, 1e-2
CHECK_SHAPE = (64, 64)
CHECK_STEPS = 3
# The bf16 model copy every method trains with (for fp32 AdamW, the copy mixed precision refreshes from the master).
MODEL_BYTES_PER_PARAM = 2

# Bytes per parameter a step must move at the least (read + write), per method kind.
BYTES_MOVED = {
    "fp32": 16 + 12,        # read p, g, m, v (fp32); write p, m, v
    "bf16": 8 + 6,          # the same in bf16
    "collage-light": 10 + 8,  # read theta, theta_lo, m, v, g; write theta, theta_lo, m, v
    "collage-plus": 12 + 10,  # light + v_lo read and written
    "optimi-kahan": 10 + 8,   # read p, kahan_comp, m, v, g; write p, kahan_comp, m, v
    "torchao-sr": 8 + 6,      # bf16 AdamW (+ random bits made in registers)
    # fp32: read p, g, write p (12), and for the FRUGAL_DENSITY state-full part read + write m, v (16 x 0.25).
    "frugal": 12 + 4,
}
FRUGAL_DENSITY = 0.25
FRUGAL_PROJECTIONS = ("blockwise", "columns")
FRUGAL_CHECK_TENSORS = 4  # blockwise: one of the four tensors is state-full
COMPENSATED_TOLERANCE = 1e-2
# How close the stored update must be to float64's, per accuracy kind, relative to the update (None: finite is
# enough, for the plain bf16 baseline; stochastic rounding: one bf16 spacing of the parameter, see update_error).
UPDATE_TOLERANCE = {"fp32": measurement.PLAIN_ERROR_LIMIT[torch.float32], "compensated": COMPENSATED_TOLERANCE,
                    "stochastic rounding": None, "round to nearest": None}

# Peer -> (module to import, package to install).
PEERS = {"optimi-kahan": ("optimi", "torch-optimi"), "torchao-sr": ("torchao", "torchao")}
TARGETS_MS = {"torch-fused-fp32": "3.43 (measured)", "optimi-kahan": "1.79 (measured)",
              "torchao-sr": "12.0 (measured)", "collage-light": "<= 1.75", "collage-plus": "<= 2.1",
              "frugal-blockwise": "<= torch-fused-fp32", "frugal-columns": "<= torch-fused-fp32"}
H100_COPY_TBPS = 2.95


@dataclasses.dataclass(frozen=True)
class Method:
    """One optimizer configuration: its row name, parameter dtype, kind (a BYTES_MOVED key), accuracy (an
    UPDATE_TOLERANCE key), the fp32 master bytes it keeps per parameter, for Collage its mode, for FRUGAL its
    projection, and for both the leanops backend."""
    name: str
    dtype: torch.dtype
    kind: str
    accuracy: str
    master_bytes_per_param: int = 0
    mode: str = ""
    backend: str = ""
    projection: str = ""


@dataclasses.dataclass
class OptimRow(measurement.TimedRow):
    """A ``measurement.TimedRow`` (``elements`` = parameters; ``peak_extra_bytes``: what one step allocates beyond
    the parameters and the state; no FLOP figures) with the sizes, the bytes per parameter moved and kept, and the
    check's error against float64."""
    tensors: int = 0
    shape: list = dataclasses.field(default_factory=list)
    params: int = 0
    bytes_per_param: int = 0
    accuracy: str = ""
    model_bytes_per_param: int = MODEL_BYTES_PER_PARAM
    master_bytes_per_param: int = 0
    state_bytes: int | None = None
    state_bytes_per_param: float | None = None
    bytes_per_param_total: float | None = None
    update_error: float | None = None
    update_tolerance: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# Sizes and methods.

def square_shape(elements: int) -> tuple[int, int]:
    """(rows, columns) with rows * columns == elements, rows the largest divisor <= sqrt(elements)."""
    rows = math.isqrt(elements)
    while elements % rows:
        rows -= 1
    return rows, elements // rows


def default_size(device: torch.device, quick: bool, full: bool = False, targets: bool = False) -> tuple[int, int]:
    """(tensors, elements per tensor) of a run (a GPU's default is already the issue's 268M parameters; targets:
    those on any device)."""
    if targets:
        return TARGET_SIZE
    return SIZES[(device.type, common.size_class(quick, full))]


def fp32_method_name(device: torch.device) -> str:
    return "torch-fused-fp32" if device.type == "cuda" else "torch-foreach-fp32"


def collage_backends(device: torch.device) -> tuple[str, ...]:
    """The leanops backends listed for CollageAdamW on this device type, the reference first (no Triton on the CPU:
    its interpreter is a correctness tool)."""
    return ("reference", "cuda", "triton") if device.type == "cuda" else ("reference", "cpu")


def candidate_methods(device: torch.device) -> list[Method]:
    """Every method listed on this device type, torch's first; the peers are listed everywhere."""
    methods = [Method(fp32_method_name(device), torch.float32, "fp32", "fp32", master_bytes_per_param=4),
               Method("torch-bf16", torch.bfloat16, "bf16", "round to nearest")]
    for mode in collage.MODES:
        methods += [Method(f"collage-{mode}-{backend}", torch.bfloat16, f"collage-{mode}", "compensated",
                           mode=mode, backend=backend) for backend in collage_backends(device)]
    for projection in FRUGAL_PROJECTIONS:
        methods += [Method(f"frugal-{projection}-{backend}", torch.float32, "frugal", "fp32",
                           master_bytes_per_param=4, backend=backend, projection=projection)
                    for backend in collage_backends(device)]
    methods += [Method("optimi-kahan", torch.bfloat16, "optimi-kahan", "compensated"),
                Method("torchao-sr", torch.bfloat16, "torchao-sr", "stochastic rounding")]
    return methods


def _torchao_adamw():
    """torchao's AdamW with bf16 stochastic rounding: ``torchao.optim._AdamW`` (older releases:
    ``torchao.prototype.low_bit_optim._AdamW``)."""
    for module in ("torchao.optim", "torchao.prototype.low_bit_optim"):
        try:
            return importlib.import_module(module)._AdamW
        except (ModuleNotFoundError, AttributeError):
            continue
    raise ImportError("this torchao has no AdamW with bf16_stochastic_round (torchao.optim._AdamW)")


def _optimi_adamw():
    from optimi import AdamW

    return AdamW


PEER_CLASSES = {"optimi-kahan": _optimi_adamw, "torchao-sr": _torchao_adamw}


def make_optimizer(method: Method, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """`method`'s optimizer over `params`, with HYPERPARAMETERS."""
    if method.kind == "fp32":
        implementation = {"fused": True} if method.name == "torch-fused-fp32" else {"foreach": True}
        return torch.optim.AdamW(params, **HYPERPARAMETERS, **implementation)
    if method.kind == "bf16":
        return torch.optim.AdamW(params, **HYPERPARAMETERS, foreach=True)
    if method.mode:
        return CollageAdamW(params, **HYPERPARAMETERS, mode=method.mode, backend=method.backend)
    if method.projection:
        return FRUGAL([{"params": params}], **HYPERPARAMETERS, density=FRUGAL_DENSITY, projection=method.projection,
                      state_free="signsgd", backend=method.backend)
    if method.name == "optimi-kahan":
        return _optimi_adamw()(params, **HYPERPARAMETERS, kahan_sum=True)
    if method.name == "torchao-sr":
        return _torchao_adamw()(params, **HYPERPARAMETERS, bf16_stochastic_round=True)
    raise ValueError(f"unknown method {method.name!r}")


def compensation(method: Method, optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor | None:
    """The compensation term that, added to `param`, gives the method's effective parameter (None: there is none)."""
    if method.mode:
        return optimizer.state[param]["param_lo"]
    if method.name == "optimi-kahan":
        return optimizer.state[param]["kahan_comp"]  # optimi keeps (intended - stored) there
    return None


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (CollageAdamW and FRUGAL count their own: ``state_bytes()``)."""
    if isinstance(optimizer, (CollageAdamW, FRUGAL)):
        return optimizer.state_bytes()
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))


def _peer_unavailable_reason(method: Method, device: torch.device) -> str | None:
    if common.peer_not_requested_reason():
        return common.peer_not_requested_reason()
    module, package = PEERS[method.name]
    if importlib.util.find_spec(module) is None:
        return f"not installed (pip install {package})"
    try:
        PEER_CLASSES[method.name]()
    except Exception as error:  # noqa: BLE001 - installed but unusable: say why
        return f"failed to import: {type(error).__name__}: {error}".splitlines()[0]
    return None if device.type == "cuda" else "peers are benchmarked on a GPU only (leanops bench optim --device cuda)"


def unavailable_reason(method: Method, device: torch.device) -> str | None:
    """Why `method` cannot run on `device`, or None when it can."""
    if method.name in PEERS:
        return _peer_unavailable_reason(method, device)
    if not method.backend or method.backend == "reference":
        return None
    family = ops.FRUGAL if method.projection else ops.COLLAGE
    return family.unavailable_reason(method.backend, device)


def _selected(methods: list[Method], backend_names: list[str] | None) -> list[Method]:
    """`methods` restricted to `backend_names` (method names, or leanops backend names for the Collage rows of
    that backend); torch's baselines and the Collage reference always run."""
    if not backend_names:
        return methods
    known = sorted({method.name for device_type in ("cpu", "cuda")
                    for method in candidate_methods(torch.device(device_type))} | set(backends.BACKENDS))
    unknown = sorted(set(backend_names) - set(known))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} for optim; expected some of {known}")
    return [method for method in methods if method.kind in ("fp32", "bf16") or method.backend == "reference"
            or method.name in backend_names or (method.backend and method.backend in backend_names)]


# ---------------------------------------------------------------------------------------------------------------
# The checks.

def _check_values(seed: int, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A CHECK_SHAPE parameter and `steps` gradients, bfloat16 values (held in float64), the same on every device."""
    generator = torch.Generator().manual_seed(seed)

    def draw(std):
        return (torch.randn(CHECK_SHAPE, generator=generator) * std).to(torch.bfloat16).to(torch.float64)

    return draw(PARAMETER_STD), [draw(GRADIENT_STD) for _ in range(steps)]


def update_error(method: Method, device: torch.device) -> tuple[float, float | None]:
    """(relative error of `method`'s first stored update against torch's AdamW in float64 on the same values,
    |stored - exact| / |exact update| in the 2-norm; its tolerance: None where being finite is enough)."""
    start, (gradient,) = _check_values(1234, 1)
    exact = start.clone()
    exact.grad = gradient.clone()
    torch.optim.AdamW([exact], **HYPERPARAMETERS, foreach=False).step()
    param = start.to(method.dtype).to(device)
    param.grad = gradient.to(method.dtype).to(device)
    optimizer = make_optimizer(method, [param])
    optimizer.step()
    stored = param.detach().to(torch.float64)
    low = compensation(method, optimizer, param)
    if low is not None:
        stored = stored + low.to(torch.float64)
    norm = torch.linalg.vector_norm
    exact_update_norm = float(norm(exact.detach() - start))
    error = float(norm(stored.cpu() - exact.detach())) / exact_update_norm
    tolerance = UPDATE_TOLERANCE[method.accuracy]
    if method.accuracy == "stochastic rounding":
        # A stochastically rounded parameter is one of the two bf16 neighbours of the exact one: each element off
        # by at most one bf16 spacing, <= eps |x|, so the error's norm is <= eps |exact parameter|.
        tolerance = (torch.finfo(torch.bfloat16).eps * float(norm(exact.detach())) / exact_update_norm
                     + COMPENSATED_TOLERANCE)
    return error, tolerance


def frugal_update_error(method: Method, device: torch.device) -> tuple[float, float]:
    """(relative error of FRUGAL's first stored update on FRUGAL_CHECK_TENSORS CHECK_SHAPE tensors against the same
    update in float64: AdamW's first step on the subspace the optimizer drew, signSGD elsewhere, after decoupled
    weight decay; the float32 tolerance)."""
    starts, gradients = zip(*(_check_values(2000 + index, 1) for index in range(FRUGAL_CHECK_TENSORS)))
    params = []
    for start, (gradient,) in zip(starts, gradients):
        param = start.to(torch.float32).to(device)
        param.grad = gradient.to(torch.float32).to(device)
        params.append(param)
    optimizer = make_optimizer(method, params)
    optimizer.step()
    lr, (beta1, beta2), eps, weight_decay = (HYPERPARAMETERS[name] for name in ("lr", "betas", "eps",
                                                                                "weight_decay"))
    # AdamW's first step: m = (1 - beta1) g, v = (1 - beta2) g^2, bias-corrected: the update is g / (|g| + eps).
    adamw = lambda g: lr * g / (g.abs() + eps)  # noqa: E731
    errors, norms = 0.0, 0.0
    for param, start, (gradient,) in zip(params, starts, gradients):
        state = optimizer.state.get(param, {})
        full = torch.zeros(CHECK_SHAPE, dtype=torch.bool)
        if "indices" in state:
            full[:, state["indices"].long().cpu()] = True
        elif "exp_avg" in state:
            full[...] = True
        update = torch.where(full, adamw(gradient), lr * torch.sign(gradient))
        exact = start * (1 - lr * weight_decay) - update
        errors += float(torch.linalg.vector_norm(param.detach().cpu().double() - exact)) ** 2
        norms += float(torch.linalg.vector_norm(exact - start)) ** 2
    return math.sqrt(errors / norms), UPDATE_TOLERANCE["fp32"]


def check_update(row: OptimRow, method: Method, device: torch.device) -> bool:
    """The float64 check of `method`, recorded in `row` (``update_error``, ``update_tolerance``; a failure sets
    ``check`` "failed" and the problem as ``note``); returns whether it passed."""
    where = "{}x{} tensor, one step, vs torch AdamW in float64".format(*CHECK_SHAPE)
    if method.projection:
        where = "{} {}x{} tensors, one step, vs its update in float64".format(FRUGAL_CHECK_TENSORS, *CHECK_SHAPE)
    try:
        row.update_error, row.update_tolerance = (frugal_update_error if method.projection else update_error)(
            method, device)
    except Exception as error:  # noqa: BLE001 - a crashing method is a failure row, not a crash
        row.check, row.note = "failed", f"failed: {type(error).__name__}: {error}".splitlines()[0]
        return False
    limit = row.update_tolerance
    if limit is None:
        passed = math.isfinite(row.update_error)
        problem = f"update not finite ({where})"
    else:
        passed = row.update_error <= limit  # a NaN never passes
        problem = f"update relative error {row.update_error:.2e} > {limit:.2e} ({where})"
    row.check = "passed" if passed else "failed"
    if not passed:
        row.note = problem
    return passed


def collage_state(method: Method, backend: str, device: torch.device) -> list[torch.Tensor]:
    """Parameter, compensation and moments after CHECK_STEPS steps of `method`'s CollageAdamW on `backend`."""
    start, gradients = _check_values(4321, CHECK_STEPS)
    param = start.to(torch.bfloat16).to(device)
    optimizer = make_optimizer(dataclasses.replace(method, name=f"collage-{method.mode}-{backend}", backend=backend),
                               [param])
    for gradient in gradients:
        param.grad = gradient.to(torch.bfloat16).to(device)
        optimizer.step()
    state = optimizer.state[param]
    names = ("param_lo", "exp_avg", "exp_avg_sq") + (("exp_avg_sq_lo",) if method.mode == "plus" else ())
    return [param.detach()] + [state[name] for name in names]


def collage_mismatch(method: Method, device: torch.device) -> str | None:
    """None when `method`'s backend gives the reference's bits after CHECK_STEPS steps, else what differs."""
    try:
        problem = bench_mcf._mismatch(collage_state(method, "reference", device),
                                      collage_state(method, method.backend, device))
    except Exception as error:  # noqa: BLE001 - a crashing backend is a failure row, not a crash
        return f"failed: {type(error).__name__}: {error}".splitlines()[0]
    if problem is None:
        return None
    outputs = "theta, theta_lo, m, v" + (", v_lo" if method.mode == "plus" else "")
    return (f"not bit-identical to backend='reference' after {CHECK_STEPS} steps on a "
            f"{CHECK_SHAPE[0]}x{CHECK_SHAPE[1]} tensor (outputs {outputs}): {problem}")


# ---------------------------------------------------------------------------------------------------------------
# The run.

def _parameters(method: Method, tensors: int, shape: tuple[int, int], device: torch.device) -> list[torch.Tensor]:
    """`tensors` parameters of `shape` in the method's dtype, their gradients set."""
    params = []
    for _ in range(tensors):
        param = (torch.randn(shape, device=device) * PARAMETER_STD).to(method.dtype)
        param.grad = (torch.randn(shape, device=device) * GRADIENT_STD).to(method.dtype)
        params.append(param)
    return params


def measure_step(row: OptimRow, method: Method, tensors: int, shape: tuple[int, int], device: torch.device,
                 repeats: int, copy_bandwidth: float) -> None:
    """Time one step of `method` over `tensors` parameters of `shape` into `row`, then count the state it keeps.
    The parameters are made in the warm-up call, so that out of memory and crashes there are rows too
    (``measurement.measure_or_record``)."""
    built = {}

    def step():
        if not built:
            built["params"] = _parameters(method, tensors, shape, device)
            built["optimizer"] = make_optimizer(method, built["params"])
        built["optimizer"].step()

    measurement.measure_or_record(row, step, device, repeats, None, f"{tensors} x {shape[0]}x{shape[1]}")
    row.tflops = None  # a step is memory-bound: bandwidth, not FLOP/s
    if row.ms is not None:
        row.gbps = common.gbps(row.bytes_moved, row.ms)
        row.fraction_of_copy = row.gbps / copy_bandwidth
        row.state_bytes = state_bytes(built["optimizer"])
        row.state_bytes_per_param = row.state_bytes / row.params
        row.bytes_per_param_total = (row.model_bytes_per_param + row.master_bytes_per_param
                                     + row.state_bytes_per_param)
    built.clear()  # the next method's tensors reuse this memory


def _notes(device: torch.device, tensors: int, shape: tuple[int, int]) -> list[str]:
    hyper = ", ".join(f"{name}={value}" for name, value in HYPERPARAMETERS.items())
    notes = [
        f"time: one optimizer.step() over {tensors} tensors of {shape[0]}x{shape[1]} ({hyper}), median after a "
        "warm-up step; gradients set once, the state changes at every step",
        "bytes moved per parameter, the least a step must read + write: fp32 AdamW 28 (read p, g, m, v 16 + write "
        "p, m, v 12); bf16 AdamW 14; Collage light 18 (read theta, theta_lo, m, v, g 10 + write 8); Collage plus 22 "
        "(+ v_lo); optimi Kahan 18 (read p, comp, m, v, g + write p, comp, m, v); torchao SR 14; GB/s = these bytes "
        "/ time; % of copy: of the measured copy bandwidth above (H100: 2.95 TB/s measured, ../shared/DESIGN.md)",
        "memory per parameter: state = the optimizer's state tensors counted after the step (Collage: "
        "state_bytes()); total = bf16 model copy 2 + fp32 master 4 (fp32 AdamW only: mixed precision's master "
        "weights) + state; e.g. fp32 AdamW 2 + 4 + 8 = 14, Collage plus 2 + 8 = 10, light 2 + 6 = 8. Mixed "
        "precision's copy of the master into the bf16 model after each step (6 B/param more) is not timed",
        f"check: each Collage kernel backend equals backend='reference' bit for bit after {CHECK_STEPS} steps on a "
        f"{CHECK_SHAPE[0]}x{CHECK_SHAPE[1]} tensor (theta, theta_lo, m, v, v_lo); every method's first step on "
        "that tensor vs torch AdamW in float64: relative error of the stored update in the 2-norm (compensated: "
        f"parameter + compensation) within {measurement.PLAIN_ERROR_LIMIT[torch.float32]:g} (fp32), "
        f"{COMPENSATED_TOLERANCE:g} (compensated: Collage, optimi Kahan), one bf16 spacing of the parameter + "
        f"{COMPENSATED_TOLERANCE:g} (stochastic rounding); plain bf16 is the baseline: finite is enough",
        "targets (issue, H100, 268M parameters): torch AdamW fused fp32 3.43 ms, optimi Kahan 1.79 ms, torchao SR "
        "12.0 ms (measured there); leanops Collage light <= 1.75 ms, plus <= 2.1 ms (byte floors at 2.95 TB/s: "
        "light 1.64 ms, plus 2.00 ms, fp32 2.55 ms, bf16 1.27 ms)",
        f"FRUGAL (float32 parameters, every tensor split, density {FRUGAL_DENSITY}, signSGD on the rest, update_gap "
        "200: the timed steps do not switch): bytes moved 16 per parameter (read p, g and write p: 12, plus the "
        "moments of the state-full quarter: 16 x 0.25); state = the moments of that quarter (2 B/param) plus int32 "
        "column indices; its check: the first step vs the same update in float64 (AdamW on the drawn subspace, "
        f"signSGD elsewhere) within {measurement.PLAIN_ERROR_LIMIT[torch.float32]:g}; target: at most "
        "torch-fused-fp32's time (floor at 2.95 TB/s: 1.45 ms for 268M parameters)",
        "optimi uses the gradient as a scratch buffer (its step overwrites .grad); the repeated steps then run on "
        "that buffer, which does not change a memory-bound step's time",
    ]
    if device.type == "cpu":
        notes.extend(measurement.cpu_notes())
    return notes


def run(device: torch.device, *, quick: bool = False, repeats: int | None = None, elements: int | None = None,
        backend_names: list[str] | None = None, full: bool = False, targets: bool = False) -> common.Report:
    """``leanops bench optim``: check and time one step of every method on `device`.

    `elements` sets the parameter count per tensor (square-ish; the tensor count stays the default's);
    `backend_names` restricts the methods (method names, or leanops backend names for the Collage rows of that
    backend; torch's baselines and the Collage reference always run); `full` uses the largest sizes (SIZES);
    `targets` the issue's (TARGET_SIZE). The dtypes are the methods' own (fp32 / bf16), so there is no dtype
    option.
    """
    repeats = repeats or (20 if device.type == "cuda" else 5)
    tensors, default_elements = default_size(device, quick, full, targets)
    shape = square_shape(elements or default_elements)
    params = tensors * shape[0] * shape[1]
    methods = _selected(candidate_methods(device), backend_names)

    torch.manual_seed(0)
    copy_buffer = bench_mcf.copy_buffer_bytes(device, quick)  # the copy ceiling's buffer, whatever the size class
    copy_bandwidth = common.copy_bandwidth_gbps(device, copy_buffer, repeats)
    report = common.Report(FAMILY, device, rows=[], copy_bandwidth_gbps=copy_bandwidth, settings={
        "quick": quick, "targets": targets, "repeats": repeats, "tensors": tensors, "shape": list(shape),
        "params": params,
        "hyperparameters": {**HYPERPARAMETERS, "betas": list(HYPERPARAMETERS["betas"])},
        "parameter_std": PARAMETER_STD, "gradient_std": GRADIENT_STD, "check_shape": list(CHECK_SHAPE),
        "check_steps": CHECK_STEPS, "methods": [method.name for method in methods],
        "bytes_moved_per_param": dict(BYTES_MOVED), "copy_buffer_bytes": copy_buffer,
        "h100_copy_tbps": H100_COPY_TBPS, "targets_ms": dict(TARGETS_MS),
        "time_budget_s": common.row_budget_s(measurement.TIME_BUDGET_S[device.type]),
        "memory": measurement.memory_method(device)})
    report.notes.extend(_notes(device, tensors, shape))
    common.PROGRESS.expect(report, len(methods))

    for method in methods:
        bytes_per_param = BYTES_MOVED[method.kind]
        row = OptimRow(op=OP, backend=method.name, dtype=str(method.dtype).removeprefix("torch."), elements=params,
                       bytes_moved=bytes_per_param * params, check="skipped", tensors=tensors, shape=list(shape),
                       params=params, bytes_per_param=bytes_per_param, accuracy=method.accuracy,
                       master_bytes_per_param=method.master_bytes_per_param)
        report.rows.append(row)
        reason = unavailable_reason(method, device) or common.out_of_time_reason()
        if reason is not None:
            row.note = reason
            continue
        if not check_update(row, method, device):
            continue
        if method.mode and method.backend != "reference":
            problem = collage_mismatch(method, device)
            if problem is not None:
                row.check, row.note = "failed", problem
                continue
        measure_step(row, method, tensors, shape, device, repeats, copy_bandwidth)
    if any(row.fraction_of_copy is not None and row.fraction_of_copy > 1 for row in report.rows):
        report.notes.append("some rows exceed the measured copy bandwidth: their tensors are partly held in cache "
                            "at this size; compare those methods with each other, not with the copy ceiling")
    return report


# ---------------------------------------------------------------------------------------------------------------
# Output.

def format_report(report: common.Report) -> str:
    """A plain-text table of an optim report, at most common.TABLE_WIDTH columns: one line per method (the
    parameter count in the title; the dtype, bytes and errors in full in the JSON and CSV files)."""
    from leanops import info

    number = measurement.format_number
    header = ["method", "ms", "B/p", "GB/s", "% copy", "state B/p", "total B/p", "extra mem", "upd err", "check",
              "note"]
    rows = [[row.backend, number(row.ms, "{:.3f}"), str(row.bytes_per_param), number(row.gbps, "{:.1f}"),
             number(None if row.fraction_of_copy is None else 100 * row.fraction_of_copy, "{:.0f}%"),
             number(row.state_bytes_per_param, "{:.2f}"), number(row.bytes_per_param_total, "{:.2f}"),
             measurement.format_bytes(row.peak_extra_bytes), number(row.update_error, "{:.1e}"), row.check,
             row.note] for row in report.rows]
    title = (f"{report.family} (one AdamW step, {report.settings.get('params', '?')} parameters) on "
             f"{info.device_name(report.device)}")
    if report.copy_bandwidth_gbps is not None:
        title += f"; measured copy bandwidth {report.copy_bandwidth_gbps:.1f} GB/s"
    report_notes = ["columns: B/p = bytes per parameter a step must move; state B/p and total B/p = optimizer "
                    "memory per parameter (below); extra mem = what one step allocates beyond parameters and state; "
                    "upd err = the check's relative error of the first update vs float64"] + report.notes
    return measurement.format_titled_table(title, header, rows, report_notes)
