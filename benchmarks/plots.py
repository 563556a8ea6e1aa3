"""PNG plots of benchmark results: one line per method against the batch size, log-log.

matplotlib is optional: without it no plot is written and the report says so. The figures are drawn on matplotlib's
Agg canvas directly (no pyplot), so plotting neither needs a display nor changes the caller's matplotlib backend.
"""
import os

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


def _series(rows, attribute: str, factor: float) -> dict[str, tuple[list[int], list[float]]]:
    """For each method (in order of first appearance), its positive measurements of `attribute` against B."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        value = getattr(row, attribute, None)
        if value is None or value <= 0:
            continue
        batches, values = series.setdefault(row.backend, ([], []))
        batches.append(getattr(row, "batch", None) or row.elements)
        values.append(value * factor)
    return series


def _out_of_memory(rows) -> dict[str, list[int]]:
    marks: dict[str, list[int]] = {}
    for row in rows:
        if getattr(row, "out_of_memory", False):
            marks.setdefault(row.backend, []).append(getattr(row, "batch", None) or row.elements)
    return marks


def write_batch_plots(out_dir: str, report: common.Report) -> list[str]:
    """Write ``<family>-<device type>-memory.png`` and ``-time.png`` into `out_dir`: memory and time against B,
    log-log, one line per method; a method that ran out of memory gets an "x" at those B on the time plot's top
    edge. Returns the paths written; without matplotlib, none, and a note in `report`."""
    reason = matplotlib_missing_reason()
    if reason is not None:
        report.notes.append(f"plots skipped: {reason}")
        return []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from leanops import info

    os.makedirs(out_dir, exist_ok=True)
    device_name = info.device_name(report.device)
    dtype = report.settings.get("dtype", "")
    dim = report.settings.get("dim")
    paths = []
    for attribute, label, suffix, factor in BATCH_PLOTS:
        series = _series(report.rows, attribute, factor)
        if not series:
            report.notes.append(f"plot {suffix} skipped: no {attribute} was measured")
            continue
        figure = Figure(figsize=(7, 4.5), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for method, (batches, values) in series.items():
            axes.plot(batches, values, marker="o", label=method)
        if suffix == "time":
            for method, batches in _out_of_memory(report.rows).items():
                top = max(value for _, values in series.values() for value in values)
                axes.scatter(batches, [top] * len(batches), marker="x", color="red",
                             label=f"{method}: out of memory")
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("batch size B")
        axes.set_ylabel(label)
        shape = f"D={dim}, {dtype}" if dim else dtype
        axes.set_title(f"{report.family}: {suffix} vs B ({shape})\n{device_name}", fontsize=10)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        path = os.path.join(out_dir, f"{report.family}-{report.device.type}-{suffix}.png")
        figure.savefig(path, dpi=120)
        paths.append(path)
    return paths
