"""leanops benchmarks: one ``bench_<family>.py`` per op family, run by ``leanops bench`` (see leanops.cli).

Benchmarks are not tests: tests assert correctness; benchmarks check that each backend agrees with the reference,
then measure it and write the results, with the device's name, under benchmarks/results/. ``targets.py`` puts the
issue's target table beside what was measured (``leanops bench --targets``); ``kernel_smoke.py`` calls every kernel
of a provider once, for compute-sanitizer (scripts/gpu_check.sh).
"""
