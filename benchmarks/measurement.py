"""Measurement helpers shared by the loss benchmarks (bench_contrastive, bench_cross_entropy): the forward +
backward timing driver, peak extra memory (CUDA caching allocator on a GPU, sampled resident set size on the CPU),
the check against float64 (normwise relative errors and their tolerances), the device's ceilings (matmul FLOP/s and
copy bandwidth, measured once per run on a GPU), the work each method's plan issues against the floor
(``leanops.plans``), the roofline time, out-of-memory detection and formatting.

Work and roofline (issue 14): ``work`` is the matrix FLOPs a method's plan issues for one forward + backward
(``plans.planned_flops`` for the leanops providers; dense plain PyTorch 6/8 of the floor, as it keeps S or the
logits instead of recomputing them; unknown, None, for the peers) divided by the floor (``plans.floor_flops``). On a
GPU, ``roofline_ms`` = max(floor FLOPs / measured matmul peak, floor bytes / measured copy bandwidth): no method can
be faster; ``fraction_of_roofline`` = roofline_ms / ms (1 = at the roofline). ``plan_roofline_ms`` is the same with
the FLOPs the method's plan issues.

The rows of these benchmarks are ``TimedRow``s: what ``measure`` fills, and each benchmark's shape and check fields.
"""
import ctypes
import dataclasses
import functools
import gc
import math
import os
import threading
import time
from collections.abc import Callable

import torch

from . import common

# How the device's ceilings are measured, once per run on a GPU: torch.matmul of two random square matrices of
# CEILING_MATMUL_SIZE in the benchmark dtype, and a device-to-device copy of CEILING_COPY_BYTES; the median of
# CEILING_REPEATS timed repeats after a warm-up. (On the H100: 747 TFLOP/s bf16, 2.95 TB/s copy, ../shared/DESIGN.md.)
CEILING_MATMUL_SIZE = 8192
CEILING_COPY_BYTES = 2**30
CEILING_REPEATS = 10
# Matrix work of plain PyTorch's dense forward + backward over the floor: S (or the logits) once in the forward
# (2 of 8) and the two gradient products (4 of 8); it keeps S instead of recomputing it, and pays in memory.
PLAIN_PYTORCH_WORK = 6 / 8

# Seconds of timed calls one (method, size) may take: slow methods get fewer repeats (each row says how many).
# ``leanops bench --targets`` lowers it (common.run_limits).
TIME_BUDGET_S = {"cuda": 15.0, "cpu": 10.0}
# The CPU memory sampler's period, and how long (at least) it watches repeated calls.
RSS_SAMPLE_INTERVAL_S = 1e-3
RSS_WATCH_S = 0.05
RSS_MIN_SAMPLES = 5  # fewer samples than this over the watched calls: too coarse, reported as n/a

# The smallest relative error a check tolerates, whatever plain PyTorch achieves: fp32, DESIGN.md's ~1e-5; bf16 and
# fp16, twice the normwise error of a correctly rounded gradient in that dtype (half an ulp is up to 2^-8 of the
# largest element in bf16, 2^-11 in fp16), so that a lucky plain-PyTorch rounding cannot fail an exact kernel.
ERROR_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# Plain PyTorch is the baseline; its own check only asks that it is finite and not grossly wrong.
PLAIN_ERROR_LIMIT = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclasses.dataclass
class TimedRow(common.Row):
    """A ``common.Row`` with what ``measure`` fills for a forward + backward: the FLOP floor (set by the
    benchmark) and the fraction of the device's peak it reaches, the peak extra memory, whether the call ran out of
    memory, and how many timed repeats the median is of; and the work model (``set_work``, ``set_roofline``): the
    matrix FLOPs the method's plan issues and their ratio to the floor, the roofline time and the fraction of it
    the measured time reaches."""
    flop_floor: float = 0.0
    tflops: float | None = None
    fraction_of_peak: float | None = None
    peak_extra_bytes: int | None = None
    out_of_memory: bool = False
    repeats: int | None = None
    planned_flops: float | None = None
    work: float | None = None
    roofline_ms: float | None = None
    plan_roofline_ms: float | None = None
    fraction_of_roofline: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# The device's ceilings and the work model.

@dataclasses.dataclass(frozen=True)
class Ceilings:
    """What the device reaches, measured on it: matmul FLOP/s in one dtype and copy bandwidth (bytes read + written
    per second), and how they were measured."""
    dtype: str
    peak_flops: float
    bandwidth_bytes_per_s: float
    matmul_size: int
    matmul_ms: float
    copy_bytes: int
    copy_ms: float
    repeats: int
    tf32_allowed: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=None)
def _measured_ceilings(device_type: str, index: int | None, dtype: torch.dtype) -> Ceilings:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    size, repeats = CEILING_MATMUL_SIZE, CEILING_REPEATS
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the benchmark's random stream alone
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)  # random, never zeros (faster)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    result = torch.empty(size, size, device=device, dtype=dtype)
    matmul = common.time_calls(lambda: torch.matmul(a, b, out=result), device, repeats, warmup=3)
    del a, b, result
    elements = CEILING_COPY_BYTES // 4
    source = torch.rand(elements, device=device, generator=generator)
    destination = torch.empty_like(source)
    copy = common.time_calls(lambda: destination.copy_(source), device, repeats, warmup=3)
    del source, destination
    free_device_memory(device)
    return Ceilings(dtype=str(dtype).removeprefix("torch."), peak_flops=2.0 * size**3 / (matmul.median * 1e-3),
                    bandwidth_bytes_per_s=2.0 * CEILING_COPY_BYTES / (copy.median * 1e-3), matmul_size=size,
                    matmul_ms=matmul.median, copy_bytes=CEILING_COPY_BYTES, copy_ms=copy.median, repeats=repeats,
                    tf32_allowed=bool(torch.backends.cuda.matmul.allow_tf32))


def device_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings | None:
    """The device's matmul peak in `dtype` and its copy bandwidth, measured on the first call of a run (then
    remembered); None on the CPU, where the benchmarks give no roofline."""
    if device.type != "cuda":
        return None
    return _measured_ceilings(device.type, device.index, dtype)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's measured matmul ceiling for `dtype` (``device_ceilings``), else None (the CPU)."""
    ceilings = device_ceilings(device, dtype)
    return None if ceilings is None else ceilings.peak_flops


def set_work(row: TimedRow, case: str, plan: str | None, dtype: torch.dtype, device: torch.device,
             **sizes: int) -> str | None:
    """Set `row`'s ``planned_flops`` and ``work`` (planned / floor) for `plan`: a leanops provider ("reference",
    "cpu", "cuda", "triton": ``plans.planned_flops``), "plain" (dense plain PyTorch, PLAIN_PYTORCH_WORK of the floor)
    or None (unknown: the row shows "-"). Returns why the plan's work is unknown when ``leanops.plans`` could not
    count it (for a note), else None."""
    from leanops import plans

    row.planned_flops = row.work = None
    if plan is None:
        return None
    floor = plans.floor_flops(case, **sizes)
    if plan == "plain":
        planned = PLAIN_PYTORCH_WORK * floor
    else:
        try:
            planned = plans.planned_flops(case, plan, dtype=dtype, device_type=device.type, **sizes)
        except Exception as error:  # noqa: BLE001 - a plan that cannot be counted is a "-", with the reason noted
            return f"work of {plan} unknown: {type(error).__name__}: {error}".splitlines()[0]
    row.planned_flops = float(planned)
    row.work = row.planned_flops / floor if floor else None
    return None


def set_roofline(row: TimedRow, ceilings: Ceilings | None) -> None:
    """Set `row`'s ``roofline_ms`` (floor FLOPs and floor bytes, ``flop_floor`` and ``bytes_moved``) and
    ``plan_roofline_ms`` (the plan's FLOPs) from the device's ceilings; nothing without them (the CPU)."""
    if ceilings is None:
        return

    def roofline(flops: float) -> float:
        return 1e3 * max(flops / ceilings.peak_flops, row.bytes_moved / ceilings.bandwidth_bytes_per_s)

    row.roofline_ms = roofline(row.flop_floor)
    row.plan_roofline_ms = None if row.planned_flops is None else roofline(row.planned_flops)


def ceilings_note(ceilings: Ceilings | None) -> str:
    """What the roofline columns stand on: the measured ceilings, or that the CPU has none."""
    if ceilings is None:
        return ("work: the matrix FLOPs the method's plan issues / the floor (leanops.plans; plain PyTorch 0.75: it "
                "keeps S or the logits; '-': unknown, the peers); no roofline on the CPU")
    return (f"work: the matrix FLOPs the method's plan issues / the floor (leanops.plans; plain PyTorch 0.75: it "
            f"keeps S or the logits; '-': unknown, the peers); roof ms = max(floor FLOPs / "
            f"{ceilings.peak_flops / 1e12:.0f} TFLOP/s, floor bytes / {ceilings.bandwidth_bytes_per_s / 1e9:.0f} "
            f"GB/s), measured here ({ceilings.matmul_size}^3 {ceilings.dtype} torch.matmul, "
            f"{ceilings.copy_bytes / 2**30:g} GiB device copy, median of {ceilings.repeats}); % roof = roof ms / ms")


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    """max |value - exact| / max |exact| (normwise), in float64; NaN if value has a NaN."""
    value, exact = value.detach().to(torch.float64), exact.detach().to(torch.float64)
    scale = exact.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((value - exact).abs().max() / scale)


def tolerance(dtype: torch.dtype, plain_error: float, plain: bool) -> float:
    """The relative error a method's check tolerates (the flash-attention rule of ../shared/DESIGN.md): max(2 x
    the error plain PyTorch makes in `dtype`, ERROR_FLOOR[dtype]); for plain PyTorch itself (`plain`),
    PLAIN_ERROR_LIMIT[dtype]."""
    if plain:
        return PLAIN_ERROR_LIMIT[dtype]
    return max(2 * plain_error, ERROR_FLOOR[dtype])


@dataclasses.dataclass
class CheckResult:
    """One method's check: passed or not, its relative error and tolerance per checked quantity (None where the
    method crashed), and what went wrong ("" when it passed)."""
    passed: bool
    errors: tuple[float | None, ...] = ()
    tolerances: tuple[float | None, ...] = ()
    problem: str = ""


class Checker:
    """Checks each method once, against plain PyTorch run in float64 on the same inputs: the relative error of
    every checked quantity must stay within ``tolerance`` (a NaN never passes; a crash is a failure).

    A subclass passes `quantities` (row field prefix -> label in messages: {"loss": "loss", "grad": "grad x"}),
    the benchmark dtype and `where` (the check's size, for messages), sets ``plain_errors`` (plain PyTorch's
    errors in the benchmark dtype, one per quantity) and defines ``errors(method)``.
    """
    PLAIN = "pytorch"

    def __init__(self, quantities: dict[str, str], dtype: torch.dtype, where: str):
        self.quantities, self.dtype, self.where = quantities, dtype, where
        self.plain_errors: list[float] = []
        self.results: dict[str, CheckResult] = {}

    def errors(self, method: str) -> list[float]:
        """`method`'s relative errors against float64, one per quantity."""
        raise NotImplementedError

    def check(self, method: str) -> CheckResult:
        """`method`'s check (computed on the first call)."""
        if method not in self.results:
            self.results[method] = self._check(method)
        return self.results[method]

    def _check(self, method: str) -> CheckResult:
        count = len(self.quantities)
        try:
            errors = tuple(self.errors(method))
        except Exception as error:  # noqa: BLE001 - a crashing method is a failure row, not a crash
            return CheckResult(False, (None,) * count, (None,) * count,
                               f"failed: {type(error).__name__}: {error}".splitlines()[0])
        tolerances = tuple(tolerance(self.dtype, plain_error, method == self.PLAIN)
                           for plain_error in self.plain_errors)
        # `not (error <= tolerance)`: a NaN error never passes.
        problems = [f"{label} relative error {error:.2e} > {limit:.2e} ({self.where}, vs float64)"
                    for label, error, limit in zip(self.quantities.values(), errors, tolerances)
                    if not error <= limit]
        return CheckResult(not problems, errors, tolerances, "; ".join(problems))

    def check_row(self, row: common.Row, method: str) -> bool:
        """Check `method` and record it in `row` (``<quantity>_error``, ``<quantity>_tolerance``; ``check``
        "passed", or "failed" with the problem as ``note``); returns whether it passed."""
        result = self.check(method)
        for field, error, limit in zip(self.quantities, result.errors, result.tolerances):
            setattr(row, f"{field}_error", error)
            setattr(row, f"{field}_tolerance", limit)
        row.check = "passed" if result.passed else "failed"
        if not result.passed:
            row.note = result.problem
        return result.passed


# ---------------------------------------------------------------------------------------------------------------
# Memory.

def release_cpu_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps freed blocks below its mmap threshold), so that the next
    call's resident-set growth counts what it allocates rather than what it reuses."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ResidentSetSampler:
    """Peak resident set size of this process while the block runs, sampled from /proc/self/statm by a thread."""

    def __init__(self, interval_s: float = RSS_SAMPLE_INTERVAL_S):
        self.interval_s = interval_s
        self.page_bytes = os.sysconf("SC_PAGE_SIZE")
        self.baseline = self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._file = None
        self._thread = None

    @staticmethod
    def supported() -> bool:
        """Whether this system has /proc/self/statm (Linux)."""
        return os.path.exists("/proc/self/statm")

    def _resident_bytes(self) -> int:
        return int(os.pread(self._file, 64, 0).split()[1]) * self.page_bytes

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._resident_bytes())
            self.samples += 1
            time.sleep(self.interval_s)

    def __enter__(self):
        self._file = os.open("/proc/self/statm", os.O_RDONLY)
        self.baseline = self.peak = self._resident_bytes()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exception):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._resident_bytes())
        os.close(self._file)
        return False

    @property
    def growth_bytes(self) -> int:
        """The peak resident set size seen minus the one on entering the block."""
        return self.peak - self.baseline


def memory_method(device: torch.device) -> str:
    """How ``peak_extra_memory`` measures on `device`, for a report's settings."""
    if device.type == "cuda":
        return "CUDA caching allocator: max_memory_allocated - memory_allocated before the call"
    return f"resident set growth, sampled every {RSS_SAMPLE_INTERVAL_S * 1e3:g} ms from /proc/self/statm"


def peak_extra_memory(step: Callable[[], object], device: torch.device, call_seconds: float
                      ) -> tuple[int | None, str]:
    """The peak memory one call of `step` allocates beyond what is allocated before it, and a note ("" or why
    there is no number)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, ""
    if not ResidentSetSampler.supported():
        return None, "memory n/a: no /proc/self/statm here"
    # Repeat short calls so the 1 ms sampler sees each phase several times; each call's memory is freed before the
    # next one, so repeating does not raise the peak.
    calls = max(3, math.ceil(RSS_WATCH_S / max(call_seconds, 1e-6)))
    gc.collect()
    release_cpu_heap()
    with ResidentSetSampler() as sampler:
        for _ in range(calls):
            step()
    if sampler.samples < RSS_MIN_SAMPLES:
        return None, f"memory n/a: only {sampler.samples} RSS samples ({call_seconds * 1e3:.2f} ms per call)"
    return sampler.growth_bytes, ""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the allocator running out of memory (CUDA, or the CPU allocator's RuntimeError)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError.
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def free_device_memory(device: torch.device) -> None:
    """Collect garbage and, on a GPU, hand the caching allocator's free blocks back to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Timing.

def measure(row: TimedRow, step: Callable[[], object], device: torch.device, repeats: int,
            peak: float | None) -> None:
    """Fill `row` (its ``flop_floor`` set) with the time, throughput and peak extra memory of `step`, one
    forward + backward: ``ms`` (median), ``tflops``, ``fraction_of_peak`` (of `peak` FLOP/s, when known),
    ``peak_extra_bytes``, ``repeats`` (fewer than asked when the device's time budget runs out) and notes."""
    step()  # warm-up: compilation, autotuning, the matmul library's workspace
    common.synchronize(device)
    start = time.perf_counter()
    step()
    common.synchronize(device)
    call_seconds = time.perf_counter() - start
    row.peak_extra_bytes, memory_note = peak_extra_memory(step, device, call_seconds)
    budget = common.row_budget_s(TIME_BUDGET_S[device.type])
    row.repeats = max(1, min(repeats, int(budget / max(call_seconds, 1e-9))))
    row.set_timing(common.time_calls(step, device, row.repeats, warmup=0, label=case_label(row)))  # warmed up
    row.tflops = row.flop_floor / (row.ms * 1e-3) / 1e12
    if peak is not None:
        row.fraction_of_peak = row.tflops * 1e12 / peak
    if row.roofline_ms is not None:
        row.fraction_of_roofline = row.roofline_ms / row.ms
    notes = [note for note in (row.note, memory_note) if note]
    if row.repeats < repeats:
        notes.append(f"{row.repeats} repeats (time budget {budget:g} s)")
    row.note = "; ".join(notes)


def case_label(row: common.Row) -> str:
    """A row's case as a short name: op, method, dtype and the sizes that identify it."""
    sizes = [f"{key}={getattr(row, key)}" for key in ("elements", "inputs", "tokens", "vocabulary", "shape")
             if getattr(row, key, None) not in (None, "", [])]
    return "/".join([row.op, row.backend, row.dtype] + sizes)


def measure_or_record(row: TimedRow, step: Callable[[], object], device: torch.device, repeats: int,
                      peak: float | None, where: str) -> None:
    """``measure``, with out of memory recorded as a row (``out_of_memory``, note "out of memory") and any other
    error as a failure row (note "failed at `where`: ..."), never a crash; device memory is freed afterwards. Past
    the family's time limit (``common.run_limits``) nothing runs: the row's note says so."""
    out_of_time = common.out_of_time_reason()
    if out_of_time is not None:
        row.note = "; ".join(note for note in (row.note, out_of_time) if note)
        return
    try:
        measure(row, step, device, repeats, peak)
    except Exception as error:  # noqa: BLE001 - out of memory is a row; so is a crash at this size
        row.ms = row.tflops = row.fraction_of_peak = row.peak_extra_bytes = row.fraction_of_roofline = None
        if is_out_of_memory(error):
            row.out_of_memory, row.note = True, "out of memory"
        else:
            row.check = "failed"
            row.note = f"failed at {where}: {type(error).__name__}: {error}".splitlines()[0]
    finally:
        free_device_memory(device)


# ---------------------------------------------------------------------------------------------------------------
# Notes and formatting.

def busy_cpu_note() -> str:
    """A warning when other processes already load the CPU: CPU times are then worth little."""
    from leanops import info

    if not hasattr(os, "getloadavg"):
        return ""
    load, cores = os.getloadavg()[0], info.cpu_cores()
    if load < 0.5 * cores:
        return ""
    return (f"the CPU was busy when this run began (1-minute load average {load:.1f} on {cores} cores): other "
            "processes competed for it, so the CPU times are unreliable; the memory figures are not affected")


def cpu_notes() -> list[str]:
    """The notes every CPU run of a loss benchmark carries: how memory is measured, a busy CPU, no Triton."""
    notes = ["memory on the CPU: resident-set growth sampled every ~1 ms, a lower bound of the true peak "
             "(short-lived buffers between samples are missed)"]
    busy = busy_cpu_note()
    if busy:
        notes.append(busy)
    notes.append("triton is not benchmarked on the CPU: its interpreter (TRITON_INTERPRET=1) is a correctness "
                 "tool, not a performance path")
    return notes


def peak_note(peak: float | None, dtype_name: str) -> str:
    """The note that says against which FLOP/s ceiling ``fraction_of_peak`` (JSON) is given, or that none is
    known."""
    if peak is None:
        return f"no measured {dtype_name} FLOP/s ceiling for this device: fraction of peak left out"
    return f"fraction_of_peak (JSON): of {peak / 1e12:.0f} TFLOP/s, the {dtype_name} torch.matmul measured here"


def format_bytes(count: int | None) -> str:
    """A byte count in B, KiB, MiB or GiB (one decimal); "" for None."""
    if count is None:
        return ""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def format_number(value, pattern: str) -> str:
    """`value` formatted with `pattern` ("{:.3f}"...), or "" for None."""
    return "" if value is None else pattern.format(value)


# The table columns of what ``measure`` fills, in the order ``timing_cells`` gives them; the roofline's two columns
# only where the device's ceilings were measured (a GPU). The FLOP floor, the fraction of peak and the plan's
# roofline are in the JSON and CSV files.
TIMING_HEADER = ["ms", "spread", "work", "TFLOP/s", "peak mem"]
ROOFLINE_HEADER = ["roof ms", "% roof"]


def timing_header(roofline: bool) -> list[str]:
    """The timing columns of a loss benchmark's table: TIMING_HEADER, with the roofline's after "TFLOP/s" when
    `roofline`."""
    if not roofline:
        return list(TIMING_HEADER)
    at = TIMING_HEADER.index("TFLOP/s") + 1
    return TIMING_HEADER[:at] + ROOFLINE_HEADER + TIMING_HEADER[at:]


def work_cell(row: common.Row) -> str:
    """The work column: planned matrix FLOPs / floor, as "1.00x"; "-" where unknown."""
    work = getattr(row, "work", None)
    return "-" if work is None else f"{work:.2f}x"


def spread_cell(row: common.Row) -> str:
    """The run-to-run spread of a row's time: its interquartile range relative to the median, as "±x%" (half of
    it either side)."""
    if row.ms is None or row.ms_q1 is None or row.ms_q3 is None or row.ms <= 0:
        return ""
    return f"±{50 * (row.ms_q3 - row.ms_q1) / row.ms:.1f}%"


def timing_cells(row: common.Row, roofline: bool = False) -> list[str]:
    """A row's cells under ``timing_header(roofline)`` ("" where there is no number)."""
    cells = [format_number(row.ms, "{:.3f}"), spread_cell(row), work_cell(row),
             format_number(getattr(row, "tflops", None), "{:.3g}")]
    if roofline:
        fraction = getattr(row, "fraction_of_roofline", None)
        cells += [format_number(getattr(row, "roofline_ms", None), "{:.3f}"),
                  format_number(None if fraction is None else 100 * fraction, "{:.0f}%")]
    return cells + [format_bytes(getattr(row, "peak_extra_bytes", None))]


def format_titled_table(title: str, header: list[str], rows: list[list[str]], notes: list[str],
                        width: int | None = common.TABLE_WIDTH) -> str:
    """`title`, the table (``common.format_table``: at most `width` columns, the rows' long notes as footnotes),
    then one "note: ..." line per note."""
    text = title + "\n" + common.format_table(header, rows, max_width=width)
    if notes:
        text += "\n" + "\n".join(f"note: {note}" for note in notes)
    return text
