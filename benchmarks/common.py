"""Shared benchmark machinery: timing, the device's measured copy bandwidth, result rows, JSON output and tables.

Times are medians over repeats after warm-up: CUDA events on a GPU (they time the kernels, not the Python around
them), ``time.perf_counter`` on the CPU. Bandwidths are in GB/s (10**9 bytes per second), counting every byte read
and every byte written once.
"""
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

import leanops
from leanops import info


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (a no-op on the CPU, where ops run synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ms(function: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """The median time in milliseconds of one call of `function` on `device`, after `warmup` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        function()
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start, end in zip(starts, ends):
            start.record()
            function()
            end.record()
        synchronize(device)
        times = [start.elapsed_time(end) for start, end in zip(starts, ends)]
    else:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, buffer_bytes: int, repeats: int) -> float:
    """The device's memory bandwidth as measured by ``dst.copy_(src)`` of a `buffer_bytes` buffer (read + write).

    This is the ceiling a memory-bound elementwise kernel can hope for on this device, measured rather than taken
    from a data sheet; make the buffer much larger than the caches.
    """
    elements = buffer_bytes // 4
    source = torch.ones(elements, dtype=torch.float32, device=device)
    destination = torch.empty_like(source)
    milliseconds = measure_ms(lambda: destination.copy_(source), device, repeats)
    return gbps(2 * elements * 4, milliseconds)


def gbps(bytes_moved: int, milliseconds: float) -> float:
    return bytes_moved / (milliseconds * 1e-3) / 1e9


@dataclasses.dataclass
class Row:
    """One measurement, or one reason there is none.

    ``check`` is "passed" (the output equals the reference's bit for bit), "failed" (it does not: no time is
    reported), "oracle" (this is the reference the others are checked against) or "skipped" (``note`` says why).
    """
    op: str
    backend: str
    dtype: str
    elements: int
    bytes_moved: int
    check: str
    ms: float | None = None
    gbps: float | None = None
    fraction_of_copy: float | None = None
    note: str = ""


@dataclasses.dataclass
class Report:
    """What one family's benchmark measured on one device, and how it was run (``settings``: repeats, sizes...)."""
    family: str
    device: torch.device
    rows: list[Row]
    copy_bandwidth_gbps: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    settings: dict = dataclasses.field(default_factory=dict)


def git_commit() -> tuple[str, bool | None]:
    """The commit of the leanops checkout these benchmarks come from and whether it has uncommitted changes, or
    ("unknown", None) outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        changes = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit, bool(changes)


def environment(device: torch.device) -> dict:
    """Where and when a measurement was taken: device, date, versions, code revision."""
    commit, dirty = git_commit()
    return {
        "device": info.device_name(device),
        "device_type": device.type,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "leanops": leanops.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": info.package_version("triton"),
        "leanops_C_build": dict(leanops._extension.build_info),
        "git_commit": commit,
        "git_uncommitted_changes": dirty,
    }


def write_results(out_dir: str, report: Report) -> str:
    """Write `report` as JSON to ``<out_dir>/<family>-<device type>.json`` and return that path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{report.family}-{report.device.type}.json")
    document = {
        "family": report.family,
        "environment": environment(report.device),
        "settings": report.settings,
        "copy_bandwidth_gbps": report.copy_bandwidth_gbps,
        "notes": report.notes,
        "rows": [dataclasses.asdict(row) for row in report.rows],
    }
    with open(path, "w", encoding="utf-8") as file:
        json.dump(document, file, indent=2)
        file.write("\n")
    return path


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the last column is left ragged."""
    widths = [max(len(row[column]) for row in [header] + rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_report(report: Report) -> str:
    """A plain-text table of `report`'s rows, headed by the device and its copy bandwidth, followed by notes."""
    def number(value, pattern):
        return "" if value is None else pattern.format(value)

    header = ["op", "dtype", "elements", "backend", "ms", "GB/s", "% of copy", "check", "note"]
    rows = [[row.op, row.dtype, str(row.elements), row.backend, number(row.ms, "{:.3f}"), number(row.gbps, "{:.1f}"),
             number(None if row.fraction_of_copy is None else 100 * row.fraction_of_copy, "{:.0f}%"), row.check,
             row.note] for row in report.rows]
    title = f"{report.family} on {info.device_name(report.device)}"
    if report.copy_bandwidth_gbps is not None:
        title += f"; measured copy bandwidth {report.copy_bandwidth_gbps:.1f} GB/s"
    text = title + "\n" + format_table(header, rows)
    if report.notes:
        text += "\n" + "\n".join(f"note: {note}" for note in report.notes)
    return text
