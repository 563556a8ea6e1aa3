"""Measurement helpers shared by the loss benchmarks (bench_contrastive, bench_cross_entropy): the forward +
backward timing driver, peak extra memory (CUDA caching allocator on a GPU, sampled resident set size on the CPU),
the check against float64 (normwise relative errors and their tolerances), the device's FLOP/s ceiling,
out-of-memory detection and formatting.

The rows of these benchmarks are ``TimedRow``s: what ``measure`` fills, and each benchmark's shape and check fields.
"""
import ctypes
import dataclasses
import gc
import math
import os
import threading
import time
from collections.abc import Callable

import torch

from . import common

# Measured ceiling on the H100, ../shared/DESIGN.md (bf16 matmul); used only when the device name contains "H100".
H100_BF16_PEAK_FLOPS = 747e12

# Seconds of timed calls one (method, size) may take: slow methods get fewer repeats (each row says how many).
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
    memory, and how many timed repeats the median is of."""
    flop_floor: float = 0.0
    tflops: float | None = None
    fraction_of_peak: float | None = None
    peak_extra_bytes: int | None = None
    out_of_memory: bool = False
    repeats: int | None = None


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's measured matmul ceiling for `dtype`, where one is known (H100, bfloat16), else None."""
    if device.type == "cuda" and dtype == torch.bfloat16 and "H100" in torch.cuda.get_device_name(device):
        return H100_BF16_PEAK_FLOPS
    return None


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
    budget = TIME_BUDGET_S[device.type]
    row.repeats = max(1, min(repeats, int(budget / max(call_seconds, 1e-9))))
    row.set_timing(common.time_calls(step, device, row.repeats, warmup=0, label=case_label(row)))  # warmed up
    row.tflops = row.flop_floor / (row.ms * 1e-3) / 1e12
    if peak is not None:
        row.fraction_of_peak = row.tflops * 1e12 / peak
    notes = [note for note in (row.note, memory_note) if note]
    if row.repeats < repeats:
        notes.append(f"{row.repeats} repeats (time budget {budget:.0f} s)")
    row.note = "; ".join(notes)


def case_label(row: common.Row) -> str:
    """A row's case as a short name: op, method, dtype and the sizes that identify it."""
    sizes = [f"{key}={getattr(row, key)}" for key in ("elements", "inputs", "tokens", "vocabulary", "shape")
             if getattr(row, key, None) not in (None, "", [])]
    return "/".join([row.op, row.backend, row.dtype] + sizes)


def measure_or_record(row: TimedRow, step: Callable[[], object], device: torch.device, repeats: int,
                      peak: float | None, where: str) -> None:
    """``measure``, with out of memory recorded as a row (``out_of_memory``, note "out of memory") and any other
    error as a failure row (note "failed at `where`: ..."), never a crash; device memory is freed afterwards."""
    try:
        measure(row, step, device, repeats, peak)
    except Exception as error:  # noqa: BLE001 - out of memory is a row; so is a crash at this size
        row.ms = row.tflops = row.fraction_of_peak = row.peak_extra_bytes = None
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
    """The note that says against which FLOP/s ceiling ``fraction_of_peak`` is given, or that none is known."""
    if peak is None:
        return f"no measured {dtype_name} FLOP/s ceiling for this device: fraction of peak left out"
    return (f"fraction of peak: of {peak / 1e12:.0f} TFLOP/s, the measured bf16 matmul ceiling of the H100 "
            "(../shared/DESIGN.md)")


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


# The table columns of what ``measure`` fills, in the order ``timing_cells`` gives them.
TIMING_HEADER = ["ms", "spread", "GFLOP floor", "TFLOP/s", "% of peak", "peak extra mem"]


def spread_cell(row: common.Row) -> str:
    """The run-to-run spread of a row's time: its interquartile range relative to the median, as "±x%" (half of
    it either side)."""
    if row.ms is None or row.ms_q1 is None or row.ms_q3 is None or row.ms <= 0:
        return ""
    return f"±{50 * (row.ms_q3 - row.ms_q1) / row.ms:.1f}%"


def timing_cells(row: common.Row) -> list[str]:
    """A row's cells under TIMING_HEADER ("" where there is no number)."""
    flop_floor = getattr(row, "flop_floor", None)
    fraction = getattr(row, "fraction_of_peak", None)
    return [format_number(row.ms, "{:.3f}"), spread_cell(row), format_number(flop_floor and flop_floor / 1e9, "{:.1f}"),
            format_number(getattr(row, "tflops", None), "{:.3g}"),
            format_number(None if fraction is None else 100 * fraction, "{:.1f}%"),
            format_bytes(getattr(row, "peak_extra_bytes", None))]


def format_titled_table(title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    """`title`, the table (``common.format_table``), then one "note: ..." line per note."""
    text = title + "\n" + common.format_table(header, rows)
    if notes:
        text += "\n" + "\n".join(f"note: {note}" for note in notes)
    return text
