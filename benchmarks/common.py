"""Shared benchmark machinery: timing, the device's measured copy bandwidth, result rows, JSON output and tables.

Times are medians over repeats after warm-up: CUDA events on a GPU (they time the kernels, not the Python around
them), ``time.perf_counter`` on the CPU. Bandwidths are in GB/s (10**9 bytes per second), counting every byte read
and every byte written once.
"""
import contextlib
import csv
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import torch

import leanops
from leanops import info


# Whether the peers (other projects' implementations) are run: the CLI runs them only with --peers; a direct call
# of a family's run() does, as before. A peer that is not run is still a row saying why.
_PEERS = {"enabled": True}


@contextlib.contextmanager
def peers_enabled(enabled: bool):
    """Within the block, the families run their installed peers only if `enabled`."""
    previous = _PEERS["enabled"]
    _PEERS["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _PEERS["enabled"] = previous


def peer_not_requested_reason() -> str | None:
    """The note of a peer's row when peers are off (``leanops bench`` without --peers), else None."""
    return None if _PEERS["enabled"] else "not run (pass --peers to run the installed peers)"


# How long the rows of a family may take (``leanops bench --time-limit``, ``--targets``): a deadline on
# time.monotonic() after which no further row is measured (each such row says why), and the seconds of timed repeats
# one row may take (None: the device's default, measurement.TIME_BUDGET_S).
_LIMITS: dict = {"deadline": None, "why": "", "row_budget_s": None}


@contextlib.contextmanager
def run_limits(deadline: float | None = None, row_budget_s: float | None = None, why: str = "time limit"):
    """Within the block, rows are measured only until time.monotonic() reaches `deadline` (None: no limit; later
    rows get the note "not run: `why` reached") and each row's timed repeats stop after `row_budget_s` seconds
    (None: the default budget)."""
    previous = dict(_LIMITS)
    _LIMITS.update(deadline=deadline, why=why, row_budget_s=row_budget_s)
    try:
        yield
    finally:
        _LIMITS.update(previous)


def out_of_time_reason() -> str | None:
    """Why no more rows are measured (the deadline of ``run_limits`` has passed), else None."""
    if _LIMITS["deadline"] is None or time.monotonic() < _LIMITS["deadline"]:
        return None
    return f"not run: {_LIMITS['why']} reached"


def row_budget_s(default: float) -> float:
    """The seconds of timed repeats one row may take: the run's limit (``run_limits``) or `default`."""
    return default if _LIMITS["row_budget_s"] is None else _LIMITS["row_budget_s"]


class Progress:
    """Progress on stderr while ``leanops bench`` runs: the rows done of the family's total, the case just measured
    and an estimate of the time left in the family, from the time its rows took so far, e.g.

        [3/17] clip pytorch float32 B=32768 (family 2/6) 41 s, ~2 min left in clip

    On a terminal it is one line, rewritten in place; otherwise (a log) one line per finished row, prefixed
    "leanops bench: running". A family announces its row count with ``expect(report, total)`` once its report
    exists; without it the line shows the rows so far. ``begin``/``end`` bracket a family (the CLI calls them)."""

    def __init__(self, stream=None):
        self.stream = stream
        self.label, self.count, self.start = "", 0, 0.0
        self.rows: list | None = None
        self.total: int | None = None
        self.family_index: tuple[int, int] | None = None
        self.shown_rows = 0
        self.enabled = False

    @property
    def _stream(self):
        return self.stream or sys.stderr

    def begin(self, label: str, index: int | None = None, families: int | None = None) -> None:
        """A family begins (`index` of `families`, from 1, when the CLI runs several)."""
        self.label, self.count, self.start = label, 0, time.perf_counter()
        self.rows, self.total, self.shown_rows, self.enabled = None, None, 0, True
        self.family_index = (index, families) if index is not None and families and families > 1 else None
        self._show()

    def expect(self, report, total: int) -> None:
        """The family's `report` will have `total` rows (progress counts its rows as they are added)."""
        if self.enabled:
            self.rows, self.total = report.rows, int(total)

    def tick(self) -> None:
        """A timed measurement ended."""
        self.count += 1
        self._show()

    def end(self) -> None:
        if self.enabled and self._stream.isatty():
            self._stream.write("\r\033[K")
            self._stream.flush()
        elif self.enabled:
            self._show()  # a log: the rows after the last measurement (skipped, not run) complete the count
        self.label, self.rows, self.total, self.enabled = "", None, None, False

    def line(self) -> str:
        """The progress text now (without the terminal's control characters)."""
        elapsed = time.perf_counter() - self.start
        family = "" if self.family_index is None else f" (family {self.family_index[0]}/{self.family_index[1]})"
        if self.rows is None or self.total is None:
            return f"{self.label}{family}: {self.count} measurements, {format_duration(elapsed)}"
        done = min(len(self.rows), self.total)
        case = row_case(self.rows[-1]) if self.rows else ""
        text = f"[{done}/{self.total}] {self.label} {case}".rstrip() + f"{family} {format_duration(elapsed)}"
        if 0 < done < self.total:
            text += f", ~{format_duration(elapsed / done * (self.total - done))} left in {self.label}"
        return text

    def _show(self) -> None:
        if not self.enabled or not self.label:
            return
        if self._stream.isatty():
            self._stream.write("\r\033[K" + self.line()[:TABLE_WIDTH - 1])
            self._stream.flush()
        elif self.rows is not None and len(self.rows) > self.shown_rows:
            # A log: one line per row measured (skipped rows are counted with the next one).
            self.shown_rows = len(self.rows)
            self._stream.write(f"leanops bench: running {self.line()}\n")
            self._stream.flush()


def format_duration(seconds: float) -> str:
    """A duration for progress lines: "41 s", "2 min", "1 h 5 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min"


def row_case(row) -> str:
    """A row's case for progress lines: the method, dtype and size (B=, N/V=, or the element count)."""
    if getattr(row, "batch", None):
        size = f"B={row.batch}"
    elif getattr(row, "tokens", None):
        size = f"N={row.tokens} V={row.vocabulary}" + (f" {row.inputs}" if getattr(row, "inputs", None) else "")
    else:
        size = f"n={row.elements}"
    return f"{row.backend} {row.dtype} {size}"


PROGRESS = Progress()


@dataclasses.dataclass(frozen=True)
class Case:
    """A timed call as a benchmark family defines it: what pytest-benchmark times too (benchmarks/test_cases.py)."""
    label: str
    function: Callable[[], object]
    device: torch.device


_COLLECTED: dict[str, list[Case] | None] = {"cases": None}


@contextlib.contextmanager
def collecting():
    """Within the block, every ``time_calls`` also records its call as a Case (the yielded list), so that one
    definition of each benchmark case serves both ``leanops bench`` and pytest-benchmark."""
    previous = _COLLECTED["cases"]
    cases: list[Case] = []
    _COLLECTED["cases"] = cases
    try:
        yield cases
    finally:
        _COLLECTED["cases"] = previous


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (a no-op on the CPU, where ops run synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Repeated timings of one call, in milliseconds: the median and the quartiles (the run-to-run spread)."""
    median: float
    q1: float
    q3: float
    repeats: int


def time_calls(function: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2,
               label: str | None = None) -> Timing:
    """The median and quartiles of the time of one call of `function` on `device`, after `warmup` untimed calls.
    `label` names the case (for ``collecting``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if label is not None and _COLLECTED["cases"] is not None:
        _COLLECTED["cases"].append(Case(label, function, device))
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
    PROGRESS.tick()
    if len(times) == 1:
        return Timing(times[0], times[0], times[0], 1)
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return Timing(median, q1, q3, len(times))


def measure_ms(function: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """The median time in milliseconds of one call of `function` on `device`, after `warmup` untimed calls."""
    return time_calls(function, device, repeats, warmup).median


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


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def size_class(quick: bool, full: bool) -> str:
    """"quick" (small, fast), "default" (what suits the device) or "full" (every size, the largest too)."""
    if quick and full:
        raise ValueError("quick and full exclude each other")
    return "quick" if quick else "full" if full else "default"


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
    ms_q1: float | None = None  # the quartiles of the timed repeats: the run-to-run spread around ``ms``
    ms_q3: float | None = None

    def set_timing(self, timing: Timing) -> None:
        self.ms, self.ms_q1, self.ms_q3 = timing.median, timing.q1, timing.q3


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


def results_document(report: Report) -> dict:
    """`report` as the JSON document of ``write_results`` (environment, settings, notes, rows as dicts)."""
    return {
        "family": report.family,
        "environment": environment(report.device),
        "settings": report.settings,
        "copy_bandwidth_gbps": report.copy_bandwidth_gbps,
        "notes": report.notes,
        "rows": [dataclasses.asdict(row) for row in report.rows],
    }


def write_results(out_dir: str, report: Report) -> list[str]:
    """Write `report` as JSON to ``<out_dir>/<family>-<device type>.json`` and its rows as CSV beside it (one line
    per row, with the device, date, versions and commit in every line); return both paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{report.family}-{report.device.type}")
    document = results_document(report)
    where, rows = document["environment"], document["rows"]
    with open(stem + ".json", "w", encoding="utf-8") as file:
        json.dump(document, file, indent=2)
        file.write("\n")
    context = {"family": report.family, **{key: value for key, value in where.items() if not isinstance(value, dict)}}
    base = [field.name for field in dataclasses.fields(Row)]
    columns = list(context) + base + sorted({key for row in rows for key in row} - set(base))
    with open(stem + ".csv", "w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**context, **{key: json.dumps(value) if isinstance(value, (list, dict)) else value
                                           for key, value in row.items()}})
    return [stem + ".json", stem + ".csv"]


# The widest line of a printed table (a terminal's 120 columns); what does not fit is in the JSON and CSV files.
TABLE_WIDTH = 120


def fit_width(text: str, width: int = TABLE_WIDTH) -> str:
    """`text` with every line longer than `width` wrapped at spaces, its continuation lines indented under the
    text after a leading "note: " or "[n] " (footnotes, notes, titles); shorter lines are left alone."""
    lines = []
    for line in text.split("\n"):
        if len(line) <= width:
            lines.append(line)
            continue
        match = re.match(r"(note: |\[\d+\] |\s*)", line)
        indent = " " * len(match.group(1)) if match else ""
        lines.extend(textwrap.wrap(line, width=width, subsequent_indent=indent, break_long_words=True,
                                   break_on_hyphens=False) or [line[:width]])
    return "\n".join(lines)


def format_table(header: list[str], rows: list[list[str]], max_width: int | None = None) -> str:
    """Columns padded to their widest cell; the last column is left ragged.

    With `max_width`, a last-column cell (the note) that would make its line longer is replaced by a footnote mark
    "[n]" and its text follows the table, one line each (the same text gets the same mark)."""
    footnotes: dict[str, str] = {}
    if max_width is not None and header:
        fixed = [max(len(row[column]) for row in [header] + rows) for column in range(len(header) - 1)]
        room = max(max_width - sum(fixed) - 2 * len(fixed), len("[99]"))
        marked_rows = []
        for row in rows:
            note = row[-1]
            if len(note) > room:
                note = footnotes.setdefault(note, f"[{len(footnotes) + 1}]")
            marked_rows.append(row[:-1] + [note])
        rows = marked_rows
    widths = [max(len(row[column]) for row in [header] + rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.extend(f"{mark} {text}" for text, mark in footnotes.items())
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
    text = title + "\n" + format_table(header, rows, max_width=TABLE_WIDTH)
    if report.notes:
        text += "\n" + "\n".join(f"note: {note}" for note in report.notes)
    return text
