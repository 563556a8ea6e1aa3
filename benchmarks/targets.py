"""The issue's target table (issue 14: one H100, bf16 forward + backward, time and peak extra memory) beside what was
measured: ``leanops bench --targets`` runs the target sizes and prints this table last; scripts/gpu_check.sh prints
it again at its very end from the run's JSON files, and writes it, with the device, date and commit, as
``targets-<device>.md`` and ``.json`` beside them (benchmarks/results/h100/ there):

    python -m leanops.benchmarks.targets DIR [--device cuda] [--out DIR2]

One line per method of each case: the leanops kernels (triton, cuda; ``met``: whether the target's time and
memory hold), plain PyTorch and the peers (measured in the same run, for comparison). A case or method the run did
not reach is a line saying so, never dropped.
"""
import argparse
import dataclasses
import json
import os
import sys

from . import common

GIB = 2**30
TARGET_PARAMS = 16 * 4096 * 4096  # bench_optim.TARGET_SIZE: 268M parameters


@dataclasses.dataclass(frozen=True)
class Target:
    """One line of the issue's table: the case as the issue names it (bf16 forward + backward; the CE cases on
    trained-like inputs, exact; Collage: one optimizer step), where its rows are (the family's results, the row
    fields that pick them), the target (ms, GiB or None), the methods held to it and the ones shown beside them."""
    case: str
    family: str
    match: dict
    target_ms: float
    target_gib: float | None
    leanops: tuple[str, ...]
    others: tuple[str, ...]

    @property
    def target(self) -> str:
        """The target as the table shows it, under "target (<=)": "12 ms, 0.3 GiB"."""
        memory = "" if self.target_gib is None else f", {self.target_gib:g} GiB"
        return f"{self.target_ms:g} ms{memory}"


_LOSS_KERNELS = ("triton", "cuda")
TARGETS = (
    Target("CLIP B=32768 D=512", "clip", {"batch": 32768, "dim": 512, "dtype": "bfloat16"}, 12, 0.3,
           _LOSS_KERNELS, ("pytorch", "inf-cl")),
    Target("CLIP B=131072 D=512", "clip", {"batch": 131072, "dim": 512, "dtype": "bfloat16"}, 190, 1.0,
           _LOSS_KERNELS, ("pytorch", "inf-cl")),
    Target("SigLIP B=65536 D=512", "siglip", {"batch": 65536, "dim": 512, "dtype": "bfloat16"}, 45, 0.5,
           _LOSS_KERNELS, ("pytorch",)),
    Target("CE N=8192 D=2048 V=128256", "ce",
           {"tokens": 8192, "dim": 2048, "vocabulary": 128256, "inputs": "trained-like", "dtype": "bfloat16"}, 31,
           0.6, _LOSS_KERNELS, ("pytorch", "liger", "cce", "cce-exact")),
    Target("CE N=32768 D=4096 V=128256", "ce",
           {"tokens": 32768, "dim": 4096, "vocabulary": 128256, "inputs": "trained-like", "dtype": "bfloat16"}, 210,
           1.3, _LOSS_KERNELS, ("pytorch", "liger", "cce-exact")),
    Target("Collage-light, 268M params", "optim", {"params": TARGET_PARAMS}, 1.75, None,
           ("collage-light-cuda", "collage-light-triton"), ("torch-fused-fp32", "optimi-kahan", "torchao-sr")),
    Target("Collage-plus, 268M params", "optim", {"params": TARGET_PARAMS}, 2.1, None,
           ("collage-plus-cuda", "collage-plus-triton"), ()),
)
FAMILIES = tuple(dict.fromkeys(target.family for target in TARGETS))


@dataclasses.dataclass
class Line:
    """One method of one target case as measured: time, memory, work, roofline fraction, whether the target holds
    (leanops methods only: "yes", "no (time)", "no (mem)", "no (both)", "n/a"; "" for the others) and why there is
    no time."""
    case: str
    target: str
    method: str
    ms: float | None = None
    peak_gib: float | None = None
    work: float | None = None
    fraction_of_roofline: float | None = None
    met: str = ""
    note: str = ""


def _verdict(target: Target, ms: float | None, gib: float | None) -> str:
    if ms is None:
        return "n/a"
    slow = ms > target.target_ms
    large = target.target_gib is not None and (gib is None or gib > target.target_gib)
    return "no (both)" if slow and large else "no (time)" if slow else "no (mem)" if large else "yes"


def _no_time_note(row: dict) -> str:
    if row.get("out_of_memory"):
        return "out of memory"
    if row.get("check") == "failed":
        return "check failed: " + row.get("note", "")
    return row.get("note", "") or "no time"


def lines(documents: dict[str, dict]) -> list[Line]:
    """Every target's lines from the results documents ({family: results document}, as common.results_document)."""
    result = []
    for target in TARGETS:
        document = documents.get(target.family)
        rows = [] if document is None else [row for row in document.get("rows", [])
                                             if all(row.get(key) == value for key, value in target.match.items())]
        by_method = {row["backend"]: row for row in rows}
        for method in target.leanops + target.others:
            line = Line(target.case, target.target, method)
            row = by_method.get(method)
            if row is None:
                line.note = (f"no {target.family} results" if document is None
                             else "not in the results (not run at this size)")
            else:
                line.ms = row.get("ms")
                bytes_ = row.get("peak_extra_bytes")
                line.peak_gib = None if bytes_ is None else bytes_ / GIB
                line.work, line.fraction_of_roofline = row.get("work"), row.get("fraction_of_roofline")
                line.note = "" if line.ms is not None else _no_time_note(row)
            if method in target.leanops:
                line.met = _verdict(target, line.ms, line.peak_gib)
            result.append(line)
    return result


def _number(value, pattern: str, empty: str = "") -> str:
    return empty if value is None else pattern.format(value)


def _cells(line: Line) -> list[str]:
    return [_number(line.ms, "{:.2f}", "-"), _number(line.peak_gib, "{:.2f}", "-"),
            _number(line.work, "{:.2f}x", "-"),
            _number(None if line.fraction_of_roofline is None else 100 * line.fraction_of_roofline, "{:.0f}%")]


HEADER = ["case", "target (<=)", "method", "ms", "GiB", "work", "% roof", "met", "note"]


def _rows(all_lines: list[Line]) -> list[list[str]]:
    rows, previous = [], None
    for line in all_lines:
        first = line.case != previous
        previous = line.case
        rows.append([line.case if first else "", line.target if first else "", line.method] + _cells(line)
                    + [line.met, line.note])
    return rows


def _where(documents: dict[str, dict]) -> dict:
    """The environment of the first document (device, date, versions, commit), {} without any."""
    for family in FAMILIES:
        if family in documents:
            return documents[family].get("environment", {})
    return {}


def _where_lines(environment: dict) -> list[str]:
    """Where and when: the device, date and commit; the versions."""
    if not environment:
        return ["no results"]
    commit = environment.get("git_commit", "unknown")
    dirty = " + uncommitted changes" if environment.get("git_uncommitted_changes") else ""
    return [f"measured on {environment.get('device', '?')}, {environment.get('date_utc', '?')}, commit "
            f"{commit[:12]}{dirty}", f"torch {environment.get('torch', '?')}, triton {environment.get('triton', '?')}"]


def format_targets(documents: dict[str, dict], width: int = common.TABLE_WIDTH) -> str:
    """The target table as plain text (at most `width` columns; long notes as footnotes)."""
    title = ["issue 14 targets: bf16 forward + backward (CE on trained-like inputs), Collage one step; ms, peak "
             "extra GiB"] + _where_lines(_where(documents))
    return "\n".join(title) + "\n" + common.format_table(HEADER, _rows(lines(documents)), max_width=width)


def markdown(documents: dict[str, dict]) -> str:
    """The target table as Markdown, headed by where and when it was measured."""
    environment = _where(documents)
    text = [f"# Issue 14 targets, measured\n\n{'; '.join(_where_lines(environment))}\n",
            "Cases: bf16 forward + backward (the CE cases on trained-like inputs, exact gradients), one optimizer step "
            "for Collage. Time: median; GiB: peak extra memory; work: matrix "
            "FLOPs the plan issues / the floor; % roof: roofline time (max of floor FLOPs / measured matmul peak, "
            "floor bytes / measured copy bandwidth) / measured time; met: the target's time and memory hold "
            "(leanops rows). Written by `leanops bench --targets` / `python -m leanops.benchmarks.targets`.\n",
            "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in _rows(lines(documents)):
        text.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    return "\n".join(text) + "\n"


def write(out_dir: str, documents: dict[str, dict], device_type: str) -> list[str]:
    """Write ``targets-<device_type>.md`` and ``.json`` (the lines, the environment) into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"targets-{device_type}")
    with open(stem + ".md", "w", encoding="utf-8") as file:
        file.write(markdown(documents))
    with open(stem + ".json", "w", encoding="utf-8") as file:
        json.dump({"environment": _where(documents), "families": sorted(documents),
                   "lines": [dataclasses.asdict(line) for line in lines(documents)]}, file, indent=2)
        file.write("\n")
    return [stem + ".md", stem + ".json"]


def load(results_dir: str, device_type: str) -> dict[str, dict]:
    """{family: results document} of the target families found in `results_dir` (``<family>-<device>.json``)."""
    documents = {}
    for family in FAMILIES:
        path = os.path.join(results_dir, f"{family}-{device_type}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as file:
                documents[family] = json.load(file)
    return documents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leanops.benchmarks.targets",
                                     description="Print (and write) the issue's target table from a results folder.")
    parser.add_argument("results", help="folder of <family>-<device>.json files (leanops bench --out)")
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"), help="device type of the files")
    parser.add_argument("--out", help="folder for targets-<device>.md/.json (default: the results folder)")
    arguments = parser.parse_args(argv)
    documents = load(arguments.results, arguments.device)
    paths = write(arguments.out or arguments.results, documents, arguments.device)
    for path in paths:
        print(f"targets: wrote {path}", file=sys.stderr)
    print(format_targets(documents))
    return 0 if documents else 1


if __name__ == "__main__":
    sys.exit(main())
