"""The ``leanops`` command line.

  leanops info                 versions, the device, how leanops._C was built, which backends are built and usable
  leanops bench [FAMILY ...]   check every usable backend against the reference, time it, write JSON and CSV to a
                               fresh folder (--out DIR to choose), print tables of at most 120 columns (the loss
                               families: each method's matrix work over the floor, and on a GPU the roofline
                               time); --targets: the issue's target sizes and the target table last
  leanops demo                 train a small model with plain PyTorch and with leanops, and compare them

``python -m leanops`` is the same command line.

Run ``leanops <command> --help`` for the options.
"""
import argparse
import importlib
import inspect
import json
import os
import sys
import time

# Each benchmark family is "module" or "module:function" of leanops.benchmarks, the function (default: run) being
# run(device, *, quick, repeats, elements, backend_names) -> leanops.benchmarks.common.Report. A module may also
# define format_report(report) -> str (its own table) and write_plots(out_dir, report) -> list of paths.
# A new family (optim) adds one line here.
BENCHMARK_FAMILIES = {
    "mcf": "leanops.benchmarks.bench_mcf",
    "clip": "leanops.benchmarks.bench_contrastive:run_clip",
    "siglip": "leanops.benchmarks.bench_contrastive:run_siglip",
    "ce": "leanops.benchmarks.bench_cross_entropy:run",
    "optim": "leanops.benchmarks.bench_optim",
    "scaling": "leanops.benchmarks.bench_scaling",
}
# The family that takes `input_kinds=` (--inputs).
INPUT_KIND_FAMILIES = ("ce",)
# Families that compute rather than measure: they need no device (--device is ignored).
DEVICE_FREE_FAMILIES = ("scaling",)
# The families of the target table (--targets without families runs these; leanops.benchmarks.targets).
TARGET_FAMILIES = ("clip", "siglip", "ce", "optim")
# With --targets, the seconds of timed repeats one row may take (fewer repeats for slow methods: the target run must
# fit one short GPU call, scripts/gpu_check.sh).
TARGET_ROW_BUDGET_S = 3.0


def _info(arguments) -> int:
    from . import info

    data = info.collect()
    print(json.dumps(data, indent=2) if arguments.json else info.format_info(data))
    return 0


def source_tree_root(directory: str) -> str | None:
    """The leanops source checkout that holds `directory` (the folder with setup.py and python/leanops), or None."""
    directory = os.path.realpath(directory)
    while True:
        if os.path.isfile(os.path.join(directory, "setup.py")) and \
                os.path.isfile(os.path.join(directory, "python", "leanops", "__init__.py")):
            return directory
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def default_out_dir(now: float | None = None, cwd: str | None = None) -> str:
    """A fresh folder for one run's results, never inside a leanops source checkout (whose committed results in
    benchmarks/results are written only on request, --out): ./leanops-results-<date>-<time> in the current
    folder, or, when that is inside a checkout, the same name under the user's cache folder
    ($XDG_CACHE_HOME/leanops, default ~/.cache/leanops). A name already taken gets a suffix -2, -3, ..."""
    cwd = cwd or os.getcwd()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    if source_tree_root(cwd) is None:
        base = cwd
    else:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "leanops")
    candidate = os.path.join(base, f"leanops-results-{stamp}")
    suffix = 2
    while os.path.exists(candidate):
        candidate, suffix = os.path.join(base, f"leanops-results-{stamp}-{suffix}"), suffix + 1
    return candidate


def _bench(arguments, parser) -> int:
    import torch

    device_type = arguments.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device_free = bool(arguments.families) and set(arguments.families) <= set(DEVICE_FREE_FAMILIES)
    if device_type == "cuda" and not torch.cuda.is_available() and not device_free:
        parser.error("--device cuda, but no CUDA device is visible (see `leanops info`)")
    if arguments.repeats is not None and arguments.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {arguments.repeats}")
    if arguments.size is not None and arguments.size < 1:
        parser.error(f"--size must be at least 1, got {arguments.size}")
    if arguments.time_limit is not None and not arguments.time_limit > 0:
        parser.error(f"--time-limit must be a positive number of seconds, got {arguments.time_limit}")
    unknown = [family for family in arguments.families if family not in BENCHMARK_FAMILIES]
    if unknown:
        parser.error(f"unknown benchmark family {', '.join(unknown)}; choose from {', '.join(BENCHMARK_FAMILIES)}")
    if arguments.inputs and arguments.families and not set(arguments.families) & set(INPUT_KIND_FAMILIES):
        parser.error(f"--inputs applies to {', '.join(INPUT_KIND_FAMILIES)} only")
    device = torch.device(device_type)
    out_dir = arguments.out or default_out_dir()
    backend_names = arguments.backends.split(",") if arguments.backends else None

    from leanops.benchmarks import common, compare

    old_results = {}
    for path in arguments.compare or []:
        try:
            document = compare.load(path)
        except (OSError, ValueError) as error:
            parser.error(f"--compare: {error}")
        old_results[document["family"]] = document
    families = arguments.families or (list(old_results) if old_results else
                                      list(TARGET_FAMILIES) if arguments.targets else list(BENCHMARK_FAMILIES))
    unknown = [family for family in old_results if family not in BENCHMARK_FAMILIES]
    if unknown:
        parser.error(f"--compare: unknown benchmark family {', '.join(unknown)} in the old results")
    dtype = common.DTYPES[arguments.dtype] if arguments.dtype else None

    reports, tables, comparisons = [], [], []
    started = time.monotonic()
    for index, family in enumerate(families):
        module_name, _, function_name = BENCHMARK_FAMILIES[family].partition(":")
        module = importlib.import_module(module_name)
        run = getattr(module, function_name or "run")
        where = "(computed, no device)" if family in DEVICE_FREE_FAMILIES else f"on {device_type}"
        print(f"leanops bench: running {family} {where} ...", file=sys.stderr, flush=True)
        options = {"input_kinds": arguments.inputs.split(",")} if arguments.inputs and \
            family in INPUT_KIND_FAMILIES else {}
        for name, value in (("full", arguments.full), ("dtype", dtype), ("targets", arguments.targets)):
            if not value:
                continue
            if _accepts(run, name):
                options[name] = value
            else:
                print(f"leanops bench: --{name} does not apply to {family} (ignored)", file=sys.stderr)
        common.PROGRESS.begin(family, index + 1, len(families))
        row_budget = TARGET_ROW_BUDGET_S if arguments.targets else None
        # Family k (from 0) begins no row after (k + 1) x --time-limit from the start: what a family leaves unused
        # goes to the next ones.
        deadline = None if arguments.time_limit is None else started + (index + 1) * arguments.time_limit
        why = f"the time limit (--time-limit {arguments.time_limit:g} s a family)" if deadline else ""
        try:
            with common.peers_enabled(arguments.peers), common.run_limits(deadline, row_budget, why):
                report = run(device, quick=arguments.quick, repeats=arguments.repeats, elements=arguments.size,
                             backend_names=backend_names, **options)
        finally:
            common.PROGRESS.end()
        plot_paths = module.write_plots(out_dir, report) if hasattr(module, "write_plots") else []
        if family in old_results:
            comparisons.append((old_results[family], common.results_document(report)))
        paths = common.write_results(out_dir, report)
        for written in paths + plot_paths:
            print(f"leanops bench: wrote {written}", file=sys.stderr)
        reports.append(report)
        tables.append(getattr(module, "format_report", common.format_report)(report))
    # Every printed line fits common.TABLE_WIDTH (120) columns: long notes wrap; the details are in the JSON/CSV.
    print(common.fit_width("\n\n".join(tables)))
    for old_document, new_document in comparisons:
        print("\n" + common.fit_width(compare.format_comparison(old_document, new_document)))
    if arguments.targets:
        _print_targets(reports, out_dir, device_type)
    print(f"leanops bench: results in {out_dir}", file=sys.stderr)
    failures = sum(row.check == "failed" for report in reports for row in report.rows)
    if failures:
        print(f"leanops bench: {failures} backend check(s) FAILED: outputs differ from the reference",
              file=sys.stderr)
    return 1 if failures else 0


def _print_targets(reports, out_dir: str, device_type: str) -> None:
    """The issue's target table from this run's reports, printed last and written beside the results."""
    from leanops.benchmarks import common, targets

    documents = {report.family: common.results_document(report) for report in reports
                 if report.family in targets.FAMILIES}
    for written in targets.write(out_dir, documents, device_type):
        print(f"leanops bench: wrote {written}", file=sys.stderr)
    print("\n" + common.fit_width(targets.format_targets(documents)))


def _accepts(function, name: str) -> bool:
    """Whether `function` takes the keyword `name` (or any keyword, through **options)."""
    parameters = inspect.signature(function).parameters
    return name in parameters or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanops", description="Memory-efficient training ops for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info_parser = commands.add_parser("info", help="what is installed, built and usable here")
    info_parser.add_argument("--json", action="store_true", help="print the data as JSON")

    bench_parser = commands.add_parser(
        "bench", help="check and time the backends of op families",
        description="Check every usable backend against the reference (a mismatch is reported as a failure, "
                    "never as a time), time it, write <out>/<family>-<device>.json and print a table.")
    # No `choices=`: argparse rejects an empty list for nargs="*" with choices (checked in _bench instead).
    bench_parser.add_argument("families", nargs="*", metavar="FAMILY",
                              help=f"families to run (default: all of {', '.join(BENCHMARK_FAMILIES)})")
    bench_parser.add_argument("--device", choices=("cpu", "cuda"),
                              help="device type (default: cuda if a GPU is visible, else cpu)")
    sizes = bench_parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="smaller sizes, for a fast look")
    sizes.add_argument("--full", action="store_true",
                       help="every size, the largest too (default: sizes that suit the device; a CPU run takes a "
                            "few minutes)")
    sizes.add_argument("--targets", action="store_true",
                       help=f"the issue's target sizes only (default families: {', '.join(TARGET_FAMILIES)}; at most "
                            f"{TARGET_ROW_BUDGET_S:g} s of repeats per row), then the target table beside the "
                            "measured values, written as targets-<device>.md/.json (meant for a GPU: "
                            "scripts/gpu_check.sh)")
    bench_parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                              help="the dtype of the families that take one (mcf, clip, siglip, ce, scaling; "
                                   "default: bfloat16 on a GPU, float32 on the CPU)")
    bench_parser.add_argument("--peers", action="store_true",
                              help="also run every installed peer (inf-cl, liger-kernel, cut-cross-entropy, "
                                   "torch-optimi, torchao); without it their rows say they were not run")
    bench_parser.add_argument("--compare", nargs="+", metavar="OLD.json",
                              help="earlier results of a family (<family>-<device>.json): run the same families "
                                   "again and show what got faster or slower beyond the run-to-run spread")
    bench_parser.add_argument("--out", metavar="DIR",
                              help="directory for the JSON and CSV results (default: a fresh folder "
                                   "./leanops-results-<date>-<time>, or, inside a leanops source checkout, the "
                                   "same under ~/.cache/leanops: the committed benchmarks/results are written "
                                   "only when named here)")
    bench_parser.add_argument("--repeats", type=int, metavar="N",
                              help="timed repeats per measurement; the median is reported (default: 20 on a "
                                   "GPU, 5 on the CPU)")
    bench_parser.add_argument("--time-limit", type=float, metavar="S",
                              help="seconds each family may run, what one leaves unused going to the next (the "
                                   "k-th family begins no row after k x S from the start): later rows are listed "
                                   "as not run (default: no limit)")
    bench_parser.add_argument("--backends", metavar="NAME[,NAME]",
                              help="only these backends (the reference always runs: it is the oracle)")
    bench_parser.add_argument("--inputs", metavar="KIND[,KIND]",
                              help="ce only: input kinds, trained-like and/or random (default: both on a GPU, "
                                   "trained-like on the CPU)")
    # Hidden: the element count, overriding the family's default (tests use tiny sizes).
    bench_parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    bench_parser.set_defaults(subparser=bench_parser)

    from . import demo

    demo_parser = commands.add_parser(
        "demo", help="train a small model with plain PyTorch and with leanops, and compare them",
        description="`leanops demo` (lm): a byte-level LLaMA-style language model on Python's standard library, "
                    "plain PyTorch against leanops' linear cross-entropy, CollageAdamW and FRUGAL. `leanops demo "
                    "clip`: a two-tower model trained with the CLIP and SigLIP losses at a batch size whose logits "
                    "plain PyTorch could not hold.")
    demo.add_arguments(demo_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``leanops`` console script; returns the exit status."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "info":
        return _info(arguments)
    if arguments.command == "demo":
        from . import demo

        return demo.run(arguments)
    return _bench(arguments, arguments.subparser)


if __name__ == "__main__":
    sys.exit(main())
