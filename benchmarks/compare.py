"""``leanops bench --compare OLD.json``: what got faster or slower since an earlier run of a family.

Rows of the two runs are matched by what identifies a case (the op, the method, the dtype, the sizes and any other
field that is neither a measurement nor a note: ``identity``). A change is flagged only when it is beyond the
run-to-run spread of both runs: slower when the new run's first quartile is above the old run's third quartile,
faster when the new third quartile is below the old first quartile (``common.Timing``), and the median moved by
at least MIN_CHANGE; otherwise "within spread".
Rows without quartiles (older results) compare medians against ``FALLBACK_SPREAD``.
"""
import dataclasses
import json

from . import common

# Fields that are measurements or commentary, not what identifies a case.
MEASURED = {"ms", "ms_q1", "ms_q3", "gbps", "fraction_of_copy", "note", "check", "tflops", "fraction_of_peak",
            "peak_extra_bytes", "out_of_memory", "repeats", "state_bytes", "state_bytes_per_param",
            "bytes_per_param_total", "update_error", "update_tolerance", "loss_error", "grad_error",
            "grad_hidden_error", "grad_weight_error", "loss_tolerance", "grad_tolerance", "grad_hidden_tolerance",
            "grad_weight_tolerance", "extra_memory_gib", "gib_sent", "comm_ms_lower_bound",
            # The work model: properties of a plan and of the device's ceilings, not of the case (a plan that gets
            # leaner, or a floor counted anew, still compares with its earlier rows).
            "flop_floor", "planned_flops", "work", "roofline_ms", "plan_roofline_ms", "fraction_of_roofline"}
# Relative change of the median that counts as real when a row has no quartiles.
FALLBACK_SPREAD = 0.05
# Below this relative change of the median nothing is flagged, however tight the quartiles (a 0.1% change with
# non-overlapping quartiles is real but not worth a line).
MIN_CHANGE = 0.02


@dataclasses.dataclass
class Change:
    """One case present in both runs: its identity, old and new medians (ms), the ratio new/old and the verdict
    ("faster", "slower", "within spread", or "no time" where either run has none)."""
    case: str
    old_ms: float | None
    new_ms: float | None
    ratio: float | None
    verdict: str


def identity(row: dict) -> tuple:
    """What identifies a row's case: every field that is not a measurement, in a stable order."""
    return tuple(sorted((key, json.dumps(value, sort_keys=True)) for key, value in row.items()
                        if key not in MEASURED))


def _label(row: dict) -> str:
    parts = [str(row.get(key)) for key in ("op", "backend", "dtype") if row.get(key) not in (None, "")]
    sizes = [f"{key}={row[key]}" for key in ("elements", "inputs", "shape") if row.get(key) not in (None, "", [])]
    return " ".join(parts + sizes)


def verdict(old: dict, new: dict) -> str:
    if old.get("ms") is None or new.get("ms") is None:
        return "no time"
    quartiles = all(row.get(key) is not None for row in (old, new) for key in ("ms_q1", "ms_q3"))
    if abs(new["ms"] / old["ms"] - 1) < MIN_CHANGE:
        return "within spread"
    if quartiles:
        if new["ms_q1"] > old["ms_q3"]:
            return "slower"
        if new["ms_q3"] < old["ms_q1"]:
            return "faster"
        return "within spread"
    ratio = new["ms"] / old["ms"]
    if ratio > 1 + FALLBACK_SPREAD:
        return "slower"
    if ratio < 1 - FALLBACK_SPREAD:
        return "faster"
    return "within spread"


def compare(old_document: dict, new_document: dict) -> tuple[list[Change], list[str], list[str]]:
    """(changes of the cases in both runs, cases only in the old run, cases only in the new run)."""
    old_rows = {identity(row): row for row in old_document["rows"]}
    new_rows = {identity(row): row for row in new_document["rows"]}
    changes = []
    for key, new in new_rows.items():
        old = old_rows.get(key)
        if old is None:
            continue
        ratio = new["ms"] / old["ms"] if old.get("ms") and new.get("ms") is not None else None
        changes.append(Change(_label(new), old.get("ms"), new.get("ms"), ratio, verdict(old, new)))
    only_old = [_label(row) for key, row in old_rows.items() if key not in new_rows]
    only_new = [_label(row) for key, row in new_rows.items() if key not in old_rows]
    return changes, only_old, only_new


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as file:
        document = json.load(file)
    if not isinstance(document, dict) or "family" not in document or "rows" not in document:
        raise ValueError(f"{path} is not a `leanops bench` result (expected a JSON object with 'family' and 'rows')")
    return document


def format_comparison(old_document: dict, new_document: dict) -> str:
    """A table of every common case (old ms, new ms, change, verdict) and the cases found in one run only."""
    changes, only_old, only_new = compare(old_document, new_document)
    old_where, new_where = old_document.get("environment", {}), new_document.get("environment", {})
    title = (f"{new_document['family']}: this run ({new_where.get('device', '?')}, {new_where.get('date_utc', '?')}, "
             f"{str(new_where.get('git_commit', '?'))[:10]}) against {old_where.get('device', '?')}, "
             f"{old_where.get('date_utc', '?')}, {str(old_where.get('git_commit', '?'))[:10]}")
    rows = [[change.case, "" if change.old_ms is None else f"{change.old_ms:.3f}",
             "" if change.new_ms is None else f"{change.new_ms:.3f}",
             "" if change.ratio is None else f"{100 * (change.ratio - 1):+.1f}%", change.verdict]
            for change in changes]
    lines = [title, common.format_table(["case", "old ms", "new ms", "change", "verdict"], rows)]
    counts = {name: sum(change.verdict == name for change in changes) for name in ("faster", "slower")}
    lines.append(f"{counts['faster']} faster, {counts['slower']} slower beyond the run-to-run spread "
                 f"(interquartile ranges that do not overlap), {len(changes) - sum(counts.values())} unchanged "
                 "or without a time")
    if only_old:
        lines.append("only in the old run: " + "; ".join(only_old))
    if only_new:
        lines.append("only in this run: " + "; ".join(only_new))
    return "\n".join(lines)
