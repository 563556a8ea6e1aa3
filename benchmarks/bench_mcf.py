"""Benchmark of the MCF error-free transformations ``leanops.mcf.two_sum`` and ``leanops.mcf.grow_``.

Both are elementwise and memory-bound, so each time is also given as bandwidth (two_sum reads a, b and writes s, e:
4 tensors; grow_ reads hi, lo, v and writes hi, lo: 5 tensors) and as a fraction of the device's measured copy
bandwidth. The ops are exact, so every backend must give the reference's bits: each backend's output is compared
with the reference's on the same inputs (``torch.equal``) before it is timed, and a mismatch is reported as a
failure, never as a time.
"""
import torch

from leanops import backends, mcf

from . import common, measurement

FAMILY = "mcf"
DTYPES = (torch.bfloat16, torch.float32)
# Bytes moved per element, in units of the element size: tensors read + tensors written.
TENSORS_MOVED = {"two_sum": 2 + 2, "grow_": 3 + 2}
TRITON_INTERPRETER_NOTE = "Triton interpreter: checks correctness; its time is not a performance figure"


def default_elements(device: torch.device, quick: bool, full: bool = False) -> int:
    if device.type == "cuda":
        return 2**24 if quick else 2**29 if full else 2**28
    return 2**18 if quick else 2**24 if full else 2**22


def copy_buffer_bytes(device: torch.device, quick: bool) -> int:
    """Large enough to spill every cache, so the copy measures memory, not cache, bandwidth."""
    if device.type == "cuda":
        return 2**28 if quick else 2**30
    return 2**26 if quick else 2**28


def candidate_backends(device: torch.device) -> tuple[str, ...]:
    """The backends that can serve tensors of this device type, reference first."""
    kernels = ("cuda", "triton") if device.type == "cuda" else ("cpu", "triton")
    return ("reference",) + kernels


def _random(shape: int, dtype: torch.dtype, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, dtype=torch.float32, device=device) * scale).to(dtype)


def _two_sum_case(elements: int, dtype: torch.dtype, device: torch.device):
    """Inputs for two_sum, and (run, outputs): run(backend) times one call; outputs(backend) are its results."""
    a = _random(elements, dtype, device)
    b = _random(elements, dtype, device, scale=1e-3)  # a small addend: the error term e is then mostly nonzero

    def outputs(backend):
        return mcf.two_sum(a, b, backend=backend)

    def run(backend):
        return lambda: mcf.two_sum(a, b, backend=backend)

    return outputs, run


def _grow_case(elements: int, dtype: torch.dtype, device: torch.device):
    """A normalised pair (hi, lo) of random values and a small update v. Each backend works on its own copy of the
    pair: grow_ is in place, so the timed repeats keep growing that copy, which is harmless for timing."""
    wide = torch.float64 if dtype == torch.float32 else torch.float32
    exact = torch.randn(elements, dtype=wide, device=device)
    hi = exact.to(dtype)
    lo = (exact - hi.to(wide)).to(dtype)
    v = _random(elements, dtype, device, scale=1e-4)
    pairs = {}

    def outputs(backend):
        pairs[backend] = (hi.clone(), lo.clone())
        return mcf.grow_(*pairs[backend], v, backend=backend)

    def run(backend):
        return lambda: mcf.grow_(*pairs[backend], v, backend=backend)

    return outputs, run


_SAME_SIZE_INTEGER = {2: torch.int16, 4: torch.int32, 8: torch.int64}
CASES = {"two_sum": _two_sum_case, "grow_": _grow_case}


def _mismatch(expected, got) -> str | None:
    """None when every output equals the reference's bit for bit, else what differs."""
    for index, (want, have) in enumerate(zip(expected, got)):
        if want.dtype != have.dtype or want.shape != have.shape:
            return f"output {index} is {have.dtype} {tuple(have.shape)}, expected {want.dtype} {tuple(want.shape)}"
        if not torch.equal(want, have):
            # Compare bit patterns: NaN != NaN would otherwise count as a difference even where both agree.
            bits = _SAME_SIZE_INTEGER[want.element_size()]
            differing = int((want.view(bits) != have.view(bits)).sum())
            return f"output {index}: {differing} of {want.numel()} elements differ from the reference"
    return None


def run(device: torch.device, *, quick: bool = False, repeats: int | None = None, elements: int | None = None,
        backend_names: list[str] | None = None, full: bool = False, dtype: torch.dtype | None = None
        ) -> common.Report:
    """Check and time two_sum and grow_ on every usable backend for `device`, in bfloat16 and float32.

    `elements` overrides the size (default: 2**28 on a GPU, 2**22 on the CPU; with `quick`, 2**24 and 2**18; with
    `full`, 2**29 and 2**24); `backend_names` restricts the backends (the reference always runs: it is what the
    others are checked against); `dtype` runs that dtype only.
    """
    repeats = repeats or (20 if device.type == "cuda" else 5)
    elements = elements or default_elements(device, quick, full)
    dtypes = (dtype,) if dtype is not None else DTYPES
    names = candidate_backends(device)
    if backend_names:
        unknown = sorted(set(backend_names) - set(backends.BACKENDS))
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown}; expected some of {backends.BACKENDS}")
        names = [name for name in names if name == "reference" or name in backend_names]

    torch.manual_seed(0)
    copy_bandwidth = common.copy_bandwidth_gbps(device, copy_buffer_bytes(device, quick), repeats)
    report = common.Report(FAMILY, device, rows=[], copy_bandwidth_gbps=copy_bandwidth,
                           settings={"quick": quick, "full": full, "repeats": repeats, "elements": elements,
                                     "backends": list(names)})
    common.PROGRESS.expect(report, len(CASES) * len(dtypes) * len(names))
    if device.type == "cpu" and "triton" in names:
        if backends.unavailable_reason("triton", device) is None:
            report.notes.append(TRITON_INTERPRETER_NOTE)
        else:
            report.notes.append("triton is skipped on the CPU: its interpreter (TRITON_INTERPRET=1) is a "
                                "correctness tool, not a performance path")

    for op, make_case in CASES.items():
        for dtype in dtypes:
            outputs, timed_call = make_case(elements, dtype, device)
            bytes_moved = TENSORS_MOVED[op] * elements * dtype.itemsize
            # A copy: grow_ works in place, and timing the reference below keeps growing its pair.
            expected = tuple(tensor.clone() for tensor in outputs("reference"))
            for backend in names:
                row = common.Row(op=op, backend=backend, dtype=str(dtype).removeprefix("torch."),
                                 elements=elements, bytes_moved=bytes_moved, check="oracle")
                report.rows.append(row)
                reason = backends.unavailable_reason(backend, device)
                if reason is not None:
                    row.check, row.note = "skipped", reason
                    continue
                if backend != "reference":
                    try:
                        problem = _mismatch(expected, outputs(backend))
                    except Exception as error:  # noqa: BLE001 - a crashing backend is a failure row, not a crash
                        problem = f"{type(error).__name__}: {error}"
                    row.check = "passed" if problem is None else "failed"
                    if problem is not None:
                        row.note = problem
                        continue
                    if backend == "triton" and device.type == "cpu":
                        row.note = "interpreter"
                row.set_timing(common.time_calls(timed_call(backend), device, repeats,
                                                   label=measurement.case_label(row)))
                row.gbps = common.gbps(bytes_moved, row.ms)
                row.fraction_of_copy = row.gbps / copy_bandwidth
            del expected, outputs, timed_call  # free this case before the next one allocates
    if any(row.fraction_of_copy is not None and row.fraction_of_copy > 1 for row in report.rows):
        report.notes.append("some rows exceed the measured copy bandwidth: their working set is partly held in "
                            "cache; compare those backends with each other, not with the copy ceiling")
    return report

