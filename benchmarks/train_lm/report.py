"""The report of ``benchmarks.train_lm``: per (budget, method) summaries over seeds (``aggregate``), the findings
computed from them (``findings``: never hand-written claims), the markdown (``format_markdown``), the loss-curve PNG
(``write_loss_plot``) and the files (``write_report``). The writers' helpers (``write_json``, ``markdown_table``,
``signed_percent``, ``commit_text``, ``new_figure``, ``label_step_axes``, ``save_figure``) serve ``leanops demo``
too."""
import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence

from .. import measurement
from .data import VALIDATION_EVERY
from .methods import METHODS, _split_shapes, frugal_split_fraction
from .model import LlamaModel, ModelConfig
from .run import RunResult

# The issue's scale, and what the authors' FRUGAL code measured there (mean of two seeds, validation loss relative
# to AdamW's; state as % of AdamW's; about 5% spread between seeds).
ISSUE_SCALE = {"parameters": "~10M", "steps": 1000, "batch_tokens": 32768}
AUTHORS_GAP_PCT = {"frugal-columns": 6.0, "frugal-blockwise": 14.0, "lowrank-svd": 7.0, "signsgd": 17.0}
AUTHORS_STATE_PCT = {"frugal-columns": 26.0, "frugal-blockwise": 25.0, "lowrank-svd": 34.0, "signsgd": 2.0}


@dataclasses.dataclass
class Summary:
    """One (budget, method) over its seeds. ``spread`` is max - min of the final validation losses;
    ``relative_pct`` is (mean / AdamW's mean - 1) x 100 at the same budget, ``state_pct`` the mean state bytes
    as % of AdamW's, ``bytes_per_parameter`` (parameters + state) / parameter count. Means are None when a run
    diverged (``diverged`` counts them) or when AdamW was not run."""
    steps: int
    method: str
    seeds: list[int]
    losses: list[float | None]
    mean: float | None
    spread: float | None
    std: float | None
    diverged: int
    relative_pct: float | None
    state_bytes: float
    state_pct: float | None
    bytes_per_parameter: float
    tokens_per_second: float | None
    peak_memory_bytes: int | None


def aggregate(results: Sequence[RunResult]) -> list[Summary]:
    """Per (budget, method), in budget order then in order of first appearance, the mean and spread over seeds
    (``Summary``), relative to the "adamw" summary of the same budget."""
    groups: dict[tuple[int, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.steps, result.method), []).append(result)
    summaries = []
    for (steps, method), runs in sorted(groups.items(), key=lambda item: item[0][0]):
        runs = sorted(runs, key=lambda run: run.seed)
        losses = [run.final_validation_loss for run in runs]
        finite = [loss for loss in losses if loss is not None]
        complete = len(finite) == len(losses)
        mean = sum(finite) / len(finite) if complete else None
        spread = max(finite) - min(finite) if complete else None
        std = (math.sqrt(sum((loss - mean) ** 2 for loss in finite) / (len(finite) - 1))
               if complete and len(finite) > 1 else None)
        rates = [run.tokens_per_second for run in runs if run.tokens_per_second is not None]
        peaks = [run.peak_memory_bytes for run in runs if run.peak_memory_bytes is not None]
        state = sum(run.state_bytes for run in runs) / len(runs)
        summaries.append(Summary(
            steps=steps, method=method, seeds=[run.seed for run in runs], losses=losses, mean=mean, spread=spread,
            std=std, diverged=len(losses) - len(finite), relative_pct=None, state_bytes=state, state_pct=None,
            bytes_per_parameter=(runs[0].parameter_bytes + state) / runs[0].parameters,
            tokens_per_second=sum(rates) / len(rates) if rates else None, peak_memory_bytes=max(peaks) if peaks
            else None))
    baselines = {summary.steps: summary for summary in summaries if summary.method == "adamw"}
    for summary in summaries:
        baseline = baselines.get(summary.steps)
        if baseline is None:
            continue
        if summary.mean is not None and baseline.mean is not None:
            summary.relative_pct = 100 * (summary.mean / baseline.mean - 1)
        if baseline.state_bytes > 0:
            summary.state_pct = 100 * summary.state_bytes / baseline.state_bytes
    return summaries


def signed_percent(value: float | None) -> str:
    """A signed percentage with one decimal ("+0.0%" rather than "-0.0%"), "n/a" for None."""
    return "n/a" if value is None else f"{(value if round(value, 1) else 0.0) + 0.0:+.1f}%"


def _noise(*summaries: Summary) -> float | None:
    """The seed noise of a comparison: the largest spread (max - min over seeds) among `summaries`."""
    spreads = [summary.spread for summary in summaries]
    return None if any(spread is None for spread in spreads) else max(spreads)


def compare(first: Summary, second: Summary) -> str:
    """How `first`'s mean validation loss compares with `second`'s: "beats" (lower by more than the seed noise),
    "loses to" (higher by more), or "ties" (within the noise), with the numbers."""
    if first.mean is None or second.mean is None:
        return (f"{first.method} and {second.method} cannot be compared at {first.steps} steps "
                f"(a run diverged or is missing)")
    difference = first.mean - second.mean
    noise = _noise(first, second)
    relative = 100 * difference / second.mean
    # A hair of tolerance: a difference equal to the noise must not flip on the last bit of a float subtraction.
    if noise is not None and abs(difference) <= noise * (1 + 1e-9) + 1e-12:
        verdict = "ties with"
    else:
        verdict = "beats" if difference < 0 else "loses to"
    noise_text = "n/a" if noise is None else f"{noise:.4f}"
    return (f"{first.method} {verdict} {second.method} at {first.steps} steps: {first.mean:.4f} vs "
            f"{second.mean:.4f} ({relative:+.1f}%; seed noise {noise_text})")


def findings(summaries: Sequence[Summary], *, authors_budget: int | None = None) -> list[str]:
    """The report's findings, each computed from `summaries` (no hand-written claims): FRUGAL against the
    low-rank baseline at (near) equal state memory; each method's gap to AdamW and how it changes from the
    shortest to the longest budget; on_switch="project" against "reset"; Collage plus against pure-bf16 AdamW
    (per seed too) and against AdamW; and, at budget `authors_budget` (None: not compared), leanops' gaps against
    the authors' numbers of the issue, "as good" when no worse than theirs plus the seed noise (the larger spread
    of the method and AdamW, as % of AdamW's loss)."""
    by_key = {(summary.steps, summary.method): summary for summary in summaries}
    budgets = sorted({summary.steps for summary in summaries})
    lines = []

    def get(steps, method):
        return by_key.get((steps, method))

    # FRUGAL vs the low-rank baseline at equal state memory.
    for steps in budgets:
        low_rank = get(steps, "lowrank-svd")
        if low_rank is None:
            continue
        for name in ("frugal-columns", "frugal-blockwise"):
            frugal = get(steps, name)
            if frugal is None:
                continue
            memory = (f"state {frugal.state_pct:.0f}% vs {low_rank.state_pct:.0f}% of AdamW's"
                      if frugal.state_pct is not None and low_rank.state_pct is not None else
                      f"state {frugal.state_bytes / max(low_rank.state_bytes, 1):.2f}x the low-rank baseline's")
            lines.append(f"Low-rank baseline at equal memory: {compare(frugal, low_rank)}; {memory}.")
    # Gap to AdamW, and its change with the budget.
    for method in dict.fromkeys(summary.method for summary in summaries):
        if method == "adamw":
            continue
        gaps = [(steps, get(steps, method).relative_pct) for steps in budgets
                if get(steps, method) is not None and get(steps, method).relative_pct is not None]
        if not gaps:
            continue
        text = ", ".join(f"{signed_percent(gap)} at {steps} steps" for steps, gap in gaps)
        if len(gaps) > 1:
            (first_steps, first), (last_steps, last) = gaps[0], gaps[-1]
            # Compared as printed (one decimal), so that -0.0 against +0.0 is not called a change.
            near, far = round(abs(last), 1), round(abs(first), 1)
            direction = "closer to AdamW" if near < far else "further from AdamW" if near > far else "as far from AdamW"
            text += (f": {signed_percent(last - first).rstrip('%')} points from {first_steps} to {last_steps} steps "
                     f"({direction})")
        lines.append(f"Gap to AdamW, {method}: {text}.")
    # on_switch = "project" against "reset".
    for steps in budgets:
        projected, reset = get(steps, "frugal-columns-project"), get(steps, "frugal-columns")
        if projected is not None and reset is not None:
            lines.append(f"on_switch='project': {compare(projected, reset)}.")
    # Collage plus against pure bf16.
    for steps in budgets:
        plus, bf16 = get(steps, "collage-plus"), get(steps, "adamw-bf16")
        if plus is None or bf16 is None:
            continue
        pairs = [(a, b) for a, b in zip(plus.losses, bf16.losses) if a is not None and b is not None]
        better = sum(a < b for a, b in pairs)
        lines.append(f"Collage: {compare(plus, bf16)}; collage-plus is lower in {better} of {len(pairs)} seeds.")
        adamw = get(steps, "adamw")
        if adamw is not None:
            lines.append(f"Collage against fp32 master weights: {compare(plus, adamw)}.")
    # Against the authors' numbers.
    for steps in [authors_budget] if authors_budget in budgets else []:
        for method, authors in AUTHORS_GAP_PCT.items():
            summary = get(steps, method)
            if summary is None or summary.relative_pct is None:
                continue
            adamw = get(steps, "adamw")
            noise = _noise(summary, adamw) if adamw is not None else None
            noise_pct = None if noise is None or adamw.mean is None else 100 * noise / adamw.mean
            within = noise_pct is not None and summary.relative_pct <= authors + noise_pct
            lines.append(f"Against the authors' code (issue: {ISSUE_SCALE['steps']} steps × 32k tokens): {method} "
                         f"{signed_percent(summary.relative_pct)} at {steps} steps vs {authors:+.0f}% "
                         f"({'as good or within seed noise' if within else 'worse than the seed noise allows'}; "
                         f"noise {'n/a' if noise_pct is None else f'{noise_pct:.1f}%'}); state "
                         f"{'n/a' if summary.state_pct is None else f'{summary.state_pct:.0f}%'} vs "
                         f"{AUTHORS_STATE_PCT[method]:.0f}% of AdamW's.")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Report.

SOURCES = [
    ("FRUGAL README (github.com/philip-zmushko/FRUGAL): update_gap 200 'in all main experiments, consistent with "
     "Galore'; density 0.25 by default; state-free (signSGD) lr scale 1.0 for pre-training (0.1 for fine-tuning); "
     "state-full lr scale 1.0 in all main experiments"),
    ("FRUGAL / GaLore C4 pre-training scripts: lr 1e-3 for AdamW and FRUGAL, betas (0.9, 0.999), eps 1e-8, cosine "
     "schedule after a linear warm-up of 10% of the steps (GaLore's cosine ends at 10% of the peak); GaLore itself "
     "was run there with lr 1e-2 and a 0.25 scale on the projected parameters, which this benchmark does not tune "
     "(one shared lr for every method)"),
]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _format_summary_table(summaries: Sequence[Summary], steps: int, device_type: str) -> str:
    number = measurement.format_number
    header = ["method", "params", "val loss (mean)", "spread (max−min)", "per seed", "vs AdamW", "state",
              "state % of AdamW", "params+state B/param", "tokens/s", "peak memory"]
    rows = []
    for summary in summaries:
        if summary.steps != steps:
            continue
        method = METHODS.get(summary.method)
        dtype = str(method.parameter_dtype).removeprefix("torch.") if method else ""
        if dtype == "float32" and device_type == "cuda":
            dtype += " (bf16 autocast)"
        per_seed = ", ".join("diverged" if loss is None else f"{loss:.4f}" for loss in summary.losses)
        mean = f"diverged ({summary.diverged}/{len(summary.losses)})" if summary.diverged else \
            number(summary.mean, "{:.4f}")
        rows.append([summary.method, dtype, mean, number(summary.spread, "{:.4f}"), per_seed,
                     "" if summary.method == "adamw" else signed_percent(summary.relative_pct),
                     measurement.format_bytes(round(summary.state_bytes)),
                     number(summary.state_pct, "{:.1f}%"), f"{summary.bytes_per_parameter:.2f}",
                     number(summary.tokens_per_second, "{:,.0f}"),
                     measurement.format_bytes(summary.peak_memory_bytes) or "n/a"])
    return markdown_table(header, rows)


def format_markdown(document: dict) -> str:
    """The markdown report of a results document (``results_document``): heading with device, date, commit and
    versions, the settings, one table per budget, the findings (``findings``), the sources of the hyperparameters,
    and, for a run below the issue's scale, what is still owed and the command that produces it."""
    environment, settings, corpus = document["environment"], document["settings"], document["corpus"]
    results = [RunResult(**run) for run in document["runs"]]
    summaries = aggregate(results)
    device_type = environment["device_type"]
    model = settings["model"]
    issue_scale = (device_type == "cuda" and settings["size"] == "small"
                   and settings["batch_tokens"] == ISSUE_SCALE["batch_tokens"]
                   and ISSUE_SCALE["steps"] in settings["budgets"])
    scale = "issue-scale GPU run" if issue_scale else \
        f"{'CPU smoke-scale' if device_type == 'cpu' else 'reduced-scale'} run (not the issue's scale)"
    parameters = results[0].parameters if results else None
    precision = ("under bf16 autocast (fp32 master weights)" if settings["mixed_precision"] else "in fp32")
    epochs = ", ".join(f"{steps * settings['batch_tokens'] / corpus['train_bytes']:.3g}"
                       for steps in settings["budgets"])
    lines = [
        "# FRUGAL and Collage on a small language model (`benchmarks/train_lm`)",
        "",
        f"**{scale}** on {environment['device']}, {environment['date_utc']}, commit {commit_text(environment)}, "
        f"torch {environment['torch']}, Python {environment['python']}.",
        "",
        f"Command: `{document['command']}`",
        "",
        "## Setup",
        "",
        f"- Model: LLaMA-style decoder, {model['layers']} layers, d_model {model['d_model']}, {model['heads']} heads, "
        f"SwiGLU hidden {model['mlp_hidden']}, RoPE, RMSNorm, untied `lm_head`, context {model['context']}, "
        f"byte vocabulary 256"
        + (f": {parameters:,} parameters." if parameters else "."),
        (f"- Corpus: `.py` files of the standard library and installed packages ({', '.join(corpus['roots'])}), "
         f"cap {corpus['byte_cap']:,} bytes: {corpus['train_files']:,} train files ({corpus['train_bytes']:,} "
         f"bytes), {corpus['validation_files']:,} validation files ({corpus['validation_bytes']:,} bytes; 1 file in "
         f"{VALIDATION_EVERY} by a hash of its path), sha256 {corpus['sha256']}."),
        f"- Budgets: {', '.join(str(steps) for steps in settings['budgets'])} steps × {settings['batch_tokens']:,} "
        f"tokens ({epochs} epochs of the train bytes); seeds " + ", ".join(str(seed) for seed in settings["seeds"])
        + " (a seed fixes the initialization, the batches and FRUGAL's subspace draws, the same for every method).",
        (f"- Optimization: lr {settings['lr']:g} for every method, linear warm-up over "
         f"{settings['warmup_fraction']:.0%} of the steps then cosine to {settings['min_lr_ratio']:g}× the peak; "
         f"betas {tuple(settings['betas'])}, eps {settings['eps']:g}, weight decay {settings['weight_decay']:g}, "
         f"gradient clipping at {settings['grad_clip']:g}; FRUGAL density 0.25, update_gap "
         f"{settings['update_gap']}{'' if settings['update_gap'] == 200 else ' (the paper: 200)'}, signSGD on the "
         "state-free part with lr scale 1, `frugal_param_groups` (embedding, norms and `lm_head` fully AdamW), "
         "on_switch 'reset' unless the name says 'project'."),
        f"- Precision: fp32-parameter methods {precision}; bf16 methods keep the whole model in bf16. Loss: "
        + ("`leanops.linear_cross_entropy`" if settings["loss"] == "linear-ce" else "logits + F.cross_entropy")
        + f" (backend: {', '.join(sorted({run.loss_backend for run in results})) or 'n/a'}).",
        (f"- Validation: {settings['validation_windows']} fixed windows evenly spaced over the validation stream, "
         "every run the same; the table's loss is after the last step."),
        ("- State: optimizer-state bytes (moments, Collage compensation, FRUGAL indices/projectors; the largest "
         "seen after any step); params+state B/param adds the parameters in their storage dtype."),
    ]
    language_model = LlamaModel(ModelConfig(**model))
    split = frugal_split_fraction(language_model)
    lines.append(f"- FRUGAL splits the {len(_split_shapes(language_model))} Linear weights of the blocks "
                 f"({split:.1%} of the parameters); the embedding, the norms and `lm_head` ({1 - split:.1%}) keep "
                 "full AdamW state in every FRUGAL method, which sets a floor under its state % of AdamW's.")
    low_rank = [run for run in results if run.method == "lowrank-svd"]
    if low_rank:
        lines.append(f"- lowrank-svd: svd projection, no state-free update, density "
                     f"{low_rank[0].optimizer_options.get('density')} — the largest (in steps of 0.001) whose state "
                     "on the split matrices does not exceed frugal-columns' at rho 0.25 (the svd projector is "
                     "state too, so at the same rho it keeps more).")
    lines.append("")
    methods_used = dict.fromkeys(run.method for run in results)
    lines.append("Methods: " + "; ".join(f"`{name}`: {METHODS[name].description}" for name in methods_used
                                         if name in METHODS) + ".")
    for steps in sorted({summary.steps for summary in summaries}):
        lines += ["", f"## {steps} steps ({steps * settings['batch_tokens']:,} tokens)", "",
                  _format_summary_table(summaries, steps, device_type)]
    lines += ["", "## Findings (computed from the table)", ""]
    if not issue_scale:
        lines.append("At this scale the differences say little: the runs are far shorter and the model far "
                     "smaller than the issue's; treat these lines as a check that the pipeline and the report "
                     "work, not as evidence about the methods.")
        lines.append("")
    lines += [f"- {line}" for line in findings(summaries, authors_budget=ISSUE_SCALE["steps"] if issue_scale
                                               else None)]
    notes = sorted({note for run in results for note in run.notes})
    if notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in notes]
    failures = document.get("failures") or []
    if failures:
        lines += ["", "Runs that failed (not in the tables; a resumed run tries them again):"]
        lines += [f"- {failure['method']}, seed {failure['seed']}, {failure['steps']} steps: {failure['error']}"
                  for failure in failures]
    lines += ["", "## Hyperparameter sources", ""] + [f"- {source}" for source in SOURCES]
    if not issue_scale:
        lines += ["", "## Owed: the issue's GPU table", "",
                  ("The issue's table (~10M parameters, 1,000 steps × 32k tokens and a longer 3,000-step budget, "
                   "2 seeds, every method) has not been measured"
                   + (": no GPU was available to this run." if device_type == "cpu" else " by this run.")
                   + " On the H100:"),
                  "", "```bash", GPU_COMMAND, "```", "",
                  ("It writes benchmarks/results/frugal.md and frugal.json after every run; run the same command "
                   "again to resume (runs already in the JSON with the same settings are skipped), e.g. within the "
                   "device tool's 10-minute calls with `--max-minutes 9`.")]
    return "\n".join(lines) + "\n"


GPU_COMMAND = ("python -m benchmarks.train_lm --device cuda --steps 1000 --batch-tokens 32768 --seeds 0 1 "
               "--budgets 1000 3000 --out benchmarks/results/")


def write_loss_plot(document: dict, path: str) -> str | None:
    """A PNG of the validation-loss curves (mean over seeds, one line per method, one panel per budget) at `path`;
    returns why not (matplotlib missing) or None when written."""
    results = [RunResult(**run) for run in document["runs"]]
    budgets = sorted({result.steps for result in results})
    try:
        figure = new_figure((6 * len(budgets), 4.5))
    except ImportError as error:
        return f"matplotlib is not installed ({error})"
    for index, steps in enumerate(budgets):
        axes = figure.add_subplot(1, len(budgets), index + 1)
        for method in dict.fromkeys(result.method for result in results):
            curves = [result.validation_curve for result in results
                      if result.steps == steps and result.method == method and not result.diverged]
            if not curves or any(len(curve) != len(curves[0]) for curve in curves):
                continue
            points = [step for step, _ in curves[0]]
            means = [sum(curve[i][1] for curve in curves) / len(curves) for i in range(len(points))]
            axes.plot(points, means, marker=".", label=method)
        label_step_axes(axes, "validation loss (nats/byte)", f"{steps} steps, {document['environment']['device']}",
                        legend_fontsize=7)
    save_figure(figure, path, dpi=110)
    return None


def new_figure(figsize: tuple[float, float]):
    """A matplotlib Figure (constrained layout) on the Agg canvas: no pyplot, so no display is needed and the
    caller's matplotlib backend is left alone. ImportError where matplotlib is not installed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def label_step_axes(axes, ylabel: str, title: str, *, legend_fontsize: int) -> None:
    """A loss-against-step panel's labels: x "step", y `ylabel`, `title`, a light grid and the legend."""
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=legend_fontsize)


def save_figure(figure, path: str, *, dpi: int) -> None:
    """`figure` as a PNG at `path`, its directory made if missing."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=dpi)


def commit_text(environment: dict) -> str:
    """The short commit of a results environment, "with uncommitted changes" where the tree had some."""
    return environment["git_commit"][:7] + (" with uncommitted changes" if environment.get("git_uncommitted_changes")
                                            else "")


def write_json(path: str, document: dict) -> None:
    """`document` as indented JSON, one line per [step, value] pair (a curve point) rather than four: the JSON
    stays readable and diffable."""
    text = json.dumps(document, indent=1)
    text = re.sub(r"\[\s+(-?\d+),\s+(-?[\d.eE+-]+|NaN|Infinity|-Infinity|null)\s+\]", r"[\1, \2]", text)
    with open(path, "w", encoding="utf-8") as file:
        file.write(text + "\n")


def write_report(out_dir: str, name: str, document: dict, plot: bool = False) -> list[str]:
    """Write <out_dir>/<name>.json and <out_dir>/<name>.md (and the curves PNG with `plot`); return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, markdown_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
    write_json(json_path, document)
    with open(markdown_path, "w", encoding="utf-8") as file:
        file.write(format_markdown(document))
    paths = [json_path, markdown_path]
    if plot:
        plot_path = os.path.join(out_dir, f"{name}-curves.png")
        if write_loss_plot(document, plot_path) is None:
            paths.append(plot_path)
    return paths
