"""Tile sizes chosen by timing candidates on the device, once per problem shape: autotuning for launchers.

Why not ``triton.autotune``: it times a kernel by re-running it on the caller's own arguments, which the
contrastive backward kernels cannot allow (they add into their outputs, with atomics or read-modify-write, so a
rerun doubles the result unless every output gets a reset hook), and their launchers run one kernel twice with the
roles of the arguments swapped. Here a candidate is a whole launch, ``run(tiles)``, that allocates its own outputs:
timing it has no side effects, and the launcher keeps explicit tile constants (which the Hopper compile report in
the tests also uses).

The first candidate is the default: it is used without timing off the GPU (Triton's interpreter), during CUDA graph
capture, and when the environment sets ``LEANOPS_TRITON_AUTOTUNE=0``. A candidate that fails to compile or launch
(too much shared memory, too many registers) is skipped; if every one fails, the first error is raised.
"""
import os
import statistics
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

# Timed runs per candidate, after one untimed run that compiles it and warms the caches.
REPEATS = 3


def _milliseconds_on_gpu(run: Callable[[], Any]) -> float:
    """Median of REPEATS CUDA-event timings of run() on the current stream."""
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def autotuning_enabled() -> bool:
    return os.environ.get("LEANOPS_TRITON_AUTOTUNE", "1") != "0"


class TileTuner:
    """Remembers, per key, the fastest of a list of tile candidates.

    `measure(run) -> milliseconds` times one candidate's launch (CUDA events by default; tests inject their own).
    """

    def __init__(self, measure: Callable[[Callable[[], Any]], float] = _milliseconds_on_gpu):
        self._measure = measure
        self._chosen: dict[Hashable, Any] = {}
        self.timings: dict[Hashable, list[tuple[Any, float | None]]] = {}  # per key: (candidate, ms or None)

    def choose(self, key: Hashable, device: torch.device, candidates: Sequence[Any],
               run: Callable[[Any], Any]) -> Any:
        """The candidate to launch with for `key`: the default (candidates[0]) where timing is not possible or
        not wanted, else the fastest, timed on the first call and remembered."""
        if not candidates:
            raise ValueError("TileTuner.choose: argument 'candidates' is empty")
        if (len(candidates) == 1 or device.type != "cuda" or not autotuning_enabled()
                or torch.cuda.is_current_stream_capturing()):
            return candidates[0]
        if key in self._chosen:
            return self._chosen[key]
        timings, first_error = [], None
        for candidate in candidates:
            try:
                timings.append((candidate, self._measure(lambda: run(candidate))))
            except Exception as error:  # noqa: BLE001 - out of shared memory or registers: not a usable tile
                timings.append((candidate, None))
                first_error = first_error or error
        usable = [(milliseconds, index) for index, (_, milliseconds) in enumerate(timings) if milliseconds is not None]
        if not usable:
            raise first_error
        self.timings[key] = timings
        self._chosen[key] = candidates[min(usable)[1]]
        return self._chosen[key]
