"""PNG plots of benchmark results: one line per method against a size (the batch size B of the contrastive losses,
the vocabulary size V of the linear cross-entropy), log-log.

matplotlib is optional: without it no plot is written and the report says so. The figures are drawn on matplotlib's
Agg canvas directly (no pyplot), so plotting neither needs a display nor changes the caller's matplotlib backend.
"""
import os
from collections.abc import Callable

from . import common

# (row attribute, y-axis label, file suffix, factor applied to the value)
BATCH_PLOTS = (
    ("peak_extra_bytes", "peak extra memory (MiB)", "memory", 1 / 2**20),
    ("ms", "forward + backward time (ms)", "time", 1.0),
)


def matplotlib_missing_reason() -> str | None:
    """None when matplotlib can be imported, else why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        return f"matplotlib is not installed ({error})"
    return None


def _batch(row) -> int:
    return getattr(row, "batch", None) or row.elements


def _method(row) -> str:
    return row.backend


def _series(rows, attribute: str, factor: float, x_of: Callable, label_of: Callable
            ) -> dict[str, tuple[list[int], list[float]]]:
    """For each line (in order of first appearance), its positive measurements of `attribute` against the size."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        value = getattr(row, attribute, None)
        if value is None or value <= 0:
            continue
        sizes, values = series.setdefault(label_of(row), ([], []))
        sizes.append(x_of(row))
        values.append(value * factor)
    return series


def _out_of_memory(rows, x_of: Callable, label_of: Callable) -> dict[str, list[int]]:
    marks: dict[str, list[int]] = {}
    for row in rows:
        if getattr(row, "out_of_memory", False):
            marks.setdefault(label_of(row), []).append(x_of(row))
    return marks


def write_batch_plots(out_dir: str, report: common.Report) -> list[str]:
    """Write ``<family>-<device type>-memory.png`` and ``-time.png`` into `out_dir`: memory and time against B,
    log-log, one line per method; a method that ran out of memory gets an "x" at those B on the time plot's top
    edge. Returns the paths written; without matplotlib, none, and a note in `report`."""
    dim = report.settings.get("dim")
    dtype = report.settings.get("dtype", "")
    return write_size_plots(out_dir, report, report.rows, x_of=_batch, label_of=_method, x_label="batch size B",
                            x_name="B", shape=f"D={dim}, {dtype}" if dim else dtype)


def write_size_plots(out_dir: str, report: common.Report, rows, *, x_of: Callable, label_of: Callable, x_label: str,
                     x_name: str, shape: str) -> list[str]:
    """Write ``<family>-<device type>-memory.png`` and ``-time.png`` into `out_dir`: memory and time of `rows`
    against the size ``x_of(row)`` (log-log), one line per ``label_of(row)``; a line that ran out of memory gets an
    "x" at those sizes on the time plot's top edge. `shape` (the fixed sizes and dtype) goes in the title. Returns
    the paths written; without matplotlib, none, and a note in `report`."""
    reason = matplotlib_missing_reason()
    if reason is not None:
        report.notes.append(f"plots skipped: {reason}")
        return []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from leanops import info

    os.makedirs(out_dir, exist_ok=True)
    device_name = info.device_name(report.device)
    paths = []
    for attribute, label, suffix, factor in BATCH_PLOTS:
        series = _series(rows, attribute, factor, x_of, label_of)
        if not series:
            report.notes.append(f"plot {suffix} skipped: no {attribute} was measured")
            continue
        figure = Figure(figsize=(7, 4.5), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for line, (sizes, values) in series.items():
            axes.plot(sizes, values, marker="o", label=line)
        if suffix == "time":
            for line, sizes in _out_of_memory(rows, x_of, label_of).items():
                top = max(value for _, values in series.values() for value in values)
                axes.scatter(sizes, [top] * len(sizes), marker="x", color="red", label=f"{line}: out of memory")
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel(x_label)
        axes.set_ylabel(label)
        axes.set_title(f"{report.family}: {suffix} vs {x_name} ({shape})\n{device_name}", fontsize=10)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        path = os.path.join(out_dir, f"{report.family}-{report.device.type}-{suffix}.png")
        figure.savefig(path, dpi=120)
        paths.append(path)
    return paths
