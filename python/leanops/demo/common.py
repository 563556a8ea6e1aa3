"""What both demos share: progress lines and errors, the command line of a run, peak-memory measurement (and the
CPU memory pass in a fresh process), and the writer of ``<out>/demo-<which>-<device>.{png,json,md}``.

The report helpers themselves (JSON, markdown table, figures) are ``leanops.benchmarks.train_lm.report``'s, which
the language-model demo builds on; like every ``leanops.benchmarks`` import of the demo, they are imported where
used, so that the ``leanops`` command line starts without them.
"""
import argparse
import gc
import json
import os
import sys
import time

import torch

PROGRAM = "leanops demo"


def error(message: str) -> int:
    """Print `message` as the demo's error and return the exit status of a bad argument (2)."""
    print(f"{PROGRAM}: error: {message}", file=sys.stderr)
    return 2


def log(message: str) -> None:
    """A progress line, on stderr (the tables go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def command_of(arguments: argparse.Namespace) -> str:
    """The ``leanops demo`` command line equivalent to `arguments` (for the reports)."""
    parts = ["leanops", "demo", arguments.which]
    for name in ("device", "steps", "batch_tokens", "batch_size", "lr", "threads", "out"):
        value = getattr(arguments, name, None)
        if value is not None:
            parts += [f"--{name.replace('_', '-')}", str(value)]
    if getattr(arguments, "seed", 0):
        parts += ["--seed", str(arguments.seed)]
    if getattr(arguments, "configs", None):
        parts += ["--configs", *arguments.configs]
    for name in ("quick", "no_plot"):
        if getattr(arguments, name, False):
            parts.append(f"--{name.replace('_', '-')}")
    return " ".join(parts)


def busy_notes(device) -> list[str]:
    """The notes a run starts with: on the CPU, a warning when other processes already load it."""
    from ..benchmarks import measurement

    busy = measurement.busy_cpu_note() if device.type == "cpu" else ""
    return [busy] if busy else []


def format_bytes(count: int | None) -> str:
    """A byte count in B, KiB, MiB or GiB, "n/a" for None."""
    from ..benchmarks import measurement

    return "n/a" if count is None else measurement.format_bytes(int(count))


def peak_cell(row: dict) -> str:
    """A measurement's "peak_bytes" formatted, or its "note" (out of memory, ...) where there is no number."""
    if row.get("peak_bytes") is not None:
        return format_bytes(row["peak_bytes"])
    return row.get("note") or "n/a"


def memory_description(device, memory_pass: str | None = None) -> str:
    """What "peak memory" means on `device`, for the reports; on the CPU, `memory_pass` says what the separate
    memory pass (``memory_pass_in_fresh_process``) measured."""
    if device.type == "cuda":
        return ("torch.cuda.max_memory_allocated during the run minus torch.cuda.memory_allocated before it "
                "(the caching allocator's live tensors; exact)")
    text = ("growth of the process's resident set size, sampled every ~1 ms from /proc/self/statm after returning "
            "freed heap pages to the OS (malloc_trim): what the process held, allocator overhead included; spikes "
            "shorter than a sample can be missed")
    if memory_pass:
        text += (f"; measured in a separate pass, in a fresh process whose allocator (glibc, "
                 f"MALLOC_MMAP_THRESHOLD_=65536) returns every block of 64 KiB or more to the OS on free, so that "
                 f"no measurement inherits another's heap: {memory_pass}")
    return text


class PeakMemory:
    """The peak memory a block allocates beyond what was allocated on entering it (see ``memory_description``):
    ``bytes`` after the block, None where it cannot be measured (no /proc/self/statm). `collect`: run the garbage
    collector first (a tenth of a second with torch imported; pointless where the caller frees its tensors)."""

    def __init__(self, device, *, collect: bool = True):
        self.device = device
        self.collect = collect
        self.bytes = None
        self._before = 0
        self._sampler = None

    def __enter__(self):
        from ..benchmarks import measurement

        if self.collect:
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            measurement.release_cpu_heap()
            if measurement.ResidentSetSampler.supported():
                self._sampler = measurement.ResidentSetSampler().__enter__()
        return self

    def __exit__(self, *exception):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        elif self._sampler is not None:
            self._sampler.__exit__(*exception)
            self.bytes = self._sampler.growth_bytes
        return False


def measure_call(step, device, peak) -> dict:
    """Time and measure one call of `step` (a forward + backward): a warm-up call, a timed call, then
    ``peak(step, seconds)`` -> (peak bytes or None, note). Returns {"peak_bytes", "note", "ms"}; a call that raises
    is a result, not a crash: {"peak_bytes": None, "note": "out of memory" or "failed: ..."}."""
    from ..benchmarks import common, measurement

    try:
        step()  # warm-up
        common.synchronize(device)
        start = time.perf_counter()
        step()
        common.synchronize(device)
        seconds = time.perf_counter() - start
        peak_bytes, note = peak(step, seconds)
        return {"peak_bytes": peak_bytes, "note": note, "ms": 1e3 * seconds}
    except Exception as failure:  # noqa: BLE001 - out of memory is what plain PyTorch does at large sizes
        note = "out of memory" if measurement.is_out_of_memory(failure) else \
            f"failed: {type(failure).__name__}: {failure}".splitlines()[0]
        return {"peak_bytes": None, "note": note}


# glibc: serve every allocation of 64 KiB or more with its own mmap, returned to the OS on free (no dynamic
# threshold), so that the resident set follows the live tensors rather than the heap's history.
MEMORY_PASS_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}


def memory_pass_in_fresh_process(kind: str, settings: dict) -> tuple[dict | None, str]:
    """Demo `kind`'s CPU memory pass on `settings` in a fresh Python process (``python -m leanops.demo
    --memory-pass KIND SPEC OUT``) with MEMORY_PASS_ENVIRONMENT; returns its result and "", or None and why it
    failed."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="leanops-demo-") as directory:
        spec, out = os.path.join(directory, "spec.json"), os.path.join(directory, "out.json")
        with open(spec, "w", encoding="utf-8") as file:
            json.dump(settings, file)
        environment = {**os.environ, **MEMORY_PASS_ENVIRONMENT}
        try:
            completed = subprocess.run([sys.executable, "-m", "leanops.demo", "--memory-pass", kind, spec, out],
                                       env=environment, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.SubprocessError) as failure:
            return None, f"the memory pass could not run ({type(failure).__name__}: {failure})"
        if completed.returncode != 0 or not os.path.exists(out):
            tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["no output"]
            return None, f"the memory pass failed (exit status {completed.returncode}: {tail[0]})"
        with open(out, encoding="utf-8") as file:
            return json.load(file), ""


def cpu_memory_pass(kind: str, settings: dict, notes: list[str], memory_pass) -> dict:
    """Demo `kind`'s memory pass in a fresh process, or, where that fails, ``memory_pass(settings)`` in this one
    (with a note in `notes`)."""
    measured, problem = memory_pass_in_fresh_process(kind, settings)
    if measured is None:
        notes.append(problem + "; measured in this process instead (the allocator's reuse of freed memory makes "
                     "these figures less reliable)")
        measured = memory_pass(settings)
    return measured


def heading(title: str, environment: dict, command: str) -> list[str]:
    """The first lines of a demo report: title, device, date, commit, versions, command."""
    from ..benchmarks.train_lm import report

    return [f"# {title}", "",
            f"**{environment['device']}**, {environment['date_utc']}, commit {report.commit_text(environment)}, "
            f"leanops {environment['leanops']}, torch {environment['torch']}, Python {environment['python']}.", "",
            f"Command: `{command}`", ""]


def write_outputs(document: dict, out_dir: str, which: str, *, write_plot, markdown, tables, findings,
                  plot: bool = True) -> int:
    """Write <out>/demo-<which>-<device>.{png,json,md} (the PNG by `write_plot(document, path)`, which returns why
    there is none or None; the markdown from `markdown(document)` after the plot is known), log the paths, print
    each of `tables(document)` and the lines of `findings(document)`; returns 0."""
    from ..benchmarks.train_lm import report

    device_type = document["environment"]["device_type"]
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"demo-{which}-{device_type}")
    plot_reason = write_plot(document, stem + ".png") if plot else "--no-plot"
    document["plot"] = None if plot_reason else os.path.basename(stem + ".png")
    if plot_reason:
        document["notes"].append(f"no PNG: {plot_reason}")
    report.write_json(stem + ".json", document)
    with open(stem + ".md", "w", encoding="utf-8") as file:
        file.write(markdown(document))
    for path in (stem + ".json", stem + ".md"):
        log(f"{PROGRAM} {which}: wrote {path}")
    log(f"{PROGRAM} {which}: " + (f"wrote {stem}.png" if plot_reason is None else f"no PNG: {plot_reason}"))
    print("\n\n".join(table(document) for table in tables))
    for line in findings(document):
        print(f"- {line}")
    return 0
