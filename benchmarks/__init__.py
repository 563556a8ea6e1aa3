"""leanops benchmarks: one ``bench_<family>.py`` per op family, run by ``leanops bench`` (see leanops.cli).

Benchmarks are not tests: tests assert correctness; benchmarks check that each backend agrees with the reference,
then measure it and write the results, with the device's name, under benchmarks/results/.
"""
