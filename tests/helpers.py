"""Shared test helpers: the (backend, device) cases of a family's providers (from its declaration in leanops.ops),
input generators, exactness assertions, and a free port for the torch.distributed tests."""
import contextlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import leanops
from leanops import backends


def _case(backend: str, device: str):
    marks = []
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    if backend == "triton":
        marks.append(pytest.mark.triton)
    return pytest.param(backend, device, marks=marks, id=f"{backend}-{device}")


# Every (backend, device) pair a kernel can serve; those this machine cannot run are skipped by their marks or by
# `require_backend`, and the skip reason says why.
BACKEND_CASES = [
    _case("reference", "cpu"),
    _case("cpu", "cpu"),
    _case("triton", "cpu"),
    _case("reference", "cuda"),
    _case("cuda", "cuda"),
    _case("triton", "cuda"),
]
KERNEL_BACKEND_CASES = [case for case in BACKEND_CASES if case.values[0] != "reference"]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


# The device each compiled provider serves (the others serve both).
NATIVE_DEVICE = {"cpu": "cpu", "cuda": "cuda"}


def provider_cases(family, devices=("cpu", "cuda"), backends_=None) -> list:
    """pytest params (backend, device) for every provider of `family` (a leanops.ops declaration) on `devices`,
    marked gpu / triton; a case this machine or build cannot run is skipped with the family's reason. The pairs no
    provider can ever serve (the C++ CPU kernels on CUDA tensors, the CUDA kernels on CPU tensors) are left out."""
    cases = []
    for provider in family.providers:
        if backends_ is not None and provider.backend not in backends_:
            continue
        for device in devices:
            if provider.backend in NATIVE_DEVICE and NATIVE_DEVICE[provider.backend] != device:
                continue
            marks = []
            if device == "cuda":
                marks.append(pytest.mark.gpu)
            if provider.backend == "triton":
                marks.append(pytest.mark.triton)
            reason = family.unavailable_reason(provider.backend, torch.device(device))
            if device == "cuda" and not torch.cuda.is_available():
                reason = "needs a CUDA device"
            if (provider.backend == "triton" and device == "cuda"
                    and leanops.backends.triton_interpreter_enabled()):
                reason = "Triton's interpreter is on: the Triton kernels run on CPU tensors"
            marks.append(pytest.mark.skipif(reason is not None, reason=f"{family.name} {provider.backend} on "
                                            f"{device}: {reason}"))
            cases.append(pytest.param(provider.backend, device, marks=marks, id=f"{provider.backend}-{device}"))
    return cases


# Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) computes tl.dot on bfloat16 wrongly.
INTERPRETER_BFLOAT16 = "Triton's interpreter computes tl.dot on bfloat16 wrongly; bfloat16 runs on the GPU"


def interpreted(backend: str, device: str) -> bool:
    """Whether this case runs the Triton kernels under the interpreter (slow: small sizes there)."""
    return backend == "triton" and device == "cpu"


def provider_dtype_cases(family, dtypes, sizes: dict, backends_=None, devices=("cpu", "cuda")) -> list:
    """pytest params (backend, device, dtype, size): provider_cases(family, devices, backends_) crossed with the
    dtypes each provider serves and `sizes[backend]` (a list of tuples; a provider missing from `sizes` gets none).
    bfloat16 under Triton's interpreter is skipped (INTERPRETER_BFLOAT16)."""
    cases = []
    for case in provider_cases(family, devices, backends_):
        backend, device = case.values
        served = family.provider(backend).dtypes
        for dtype in dtypes:
            if dtype not in served:
                continue
            marks = list(case.marks)
            if interpreted(backend, device) and dtype == torch.bfloat16:
                marks.append(pytest.mark.skip(reason=INTERPRETER_BFLOAT16))
            for size in sizes.get(backend, ()):
                name = str(dtype).removeprefix("torch.")
                cases.append(pytest.param(backend, device, dtype, size, marks=marks,
                                          id=f"{case.id}-{name}-{'x'.join(map(str, size))}"))
    return cases


def marked(cases: list, *marks) -> list:
    """The same pytest params with `marks` added (e.g. pytest.mark.slow)."""
    return [pytest.param(*case.values, marks=list(case.marks) + list(marks), id=case.id) for case in cases]


def slow_when_interpreted(cases: list) -> list:
    """The same pytest params, those that run Triton's interpreter marked slow."""
    return [pytest.param(*case.values, marks=list(case.marks) + ([pytest.mark.slow] if interpreted(*case.values[:2])
                                                                 else []), id=case.id) for case in cases]


def assert_flash_attention_rule(what: str, actual: torch.Tensor, expected: torch.Tensor, plain: torch.Tensor, *,
                                floor: float = 1e-5, magnitude: float | None = None, dtype: torch.dtype | None = None,
                                device: torch.device | str | None = None) -> None:
    """A provider's output against float64, with the flash-attention rule.

    `expected` is a formula evaluated in float64 on the provider's inputs (upcast: 16-bit values are exact),
    `plain` the same formula in plain float32 PyTorch on the CPU. The largest error, relative to the largest
    |expected| (or to `magnitude`, the size of the terms of a sum that cancels), must be at most max(`floor`,
    2 x plain float32's error): the floor is float32 accuracy, and the factor 2 of plain float32 only binds for
    ill-conditioned inputs (logits ~1e4, where one float32 rounding of a logit moves a softmax weight by 1e-4).
    NaN and infinities never pass; `dtype` and `device`, when given, are checked too."""
    if dtype is not None:
        assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    if device is not None:
        assert actual.device.type == torch.device(device).type, f"{what}: on {actual.device}, expected {device}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().double().cpu()
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values in the result"
    if expected.numel() == 0:
        return
    expected = expected.double().cpu()
    size = max(magnitude if magnitude is not None else expected.abs().max().item(), 1e-30)
    error = (actual - expected).abs().max().item() / size
    plain_error = (plain.detach().double().cpu() - expected).abs().max().item() / size
    tolerance = max(floor, 2.0 * plain_error)
    assert error <= tolerance, (f"{what}: relative error {error:.3g} > {tolerance:.3g} (plain float32 PyTorch: "
                                f"{plain_error:.3g}, relative to {size:.4g})")


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next number of `dtype`: the relative error of one rounding to it."""
    return torch.finfo(dtype).eps / 2


def require_backend(backend: str, device: str) -> None:
    """Skip (with the reason) when this machine cannot run `backend` on `device`."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = backends.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable here: {reason}")


def spread_values(n: int, min_exponent: int, max_exponent: int, generator: torch.Generator) -> torch.Tensor:
    """float64 values with random signs, significands and binary exponents in [min_exponent, max_exponent]."""
    significand = 1.0 + torch.rand(n, dtype=torch.float64, generator=generator)
    exponent = torch.randint(min_exponent, max_exponent + 1, (n,), generator=generator).to(torch.float64)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
    return sign * significand * torch.exp2(exponent)


def hard_sum_operands(n: int, dtype: torch.dtype, generator: torch.Generator, binades: int):
    """Operand pairs (a, b) of `dtype` that stress a two_sum: independent values over many binades, near-total
    cancellation, tiny addends far below a's last bit, and exact sums."""
    a = spread_values(n, -binades, binades, generator).to(dtype)
    quarter = n // 4
    independent = spread_values(n, -binades, binades, generator)
    # b ~ -a, off by a few units in the last place: the sum cancels most bits.
    nudge = 1.0 + (torch.randint(-8, 9, (n,), generator=generator).to(torch.float64) * torch.finfo(dtype).eps)
    cancelling = -a.to(torch.float64) * nudge
    # b far below a: the whole of b is rounding error.
    shift = torch.randint(1, 40, (n,), generator=generator).to(torch.float64)
    tiny = a.to(torch.float64) * torch.exp2(-shift) * (1.0 + torch.rand(n, dtype=torch.float64, generator=generator))
    b = torch.cat([independent[:quarter], cancelling[quarter:2 * quarter], tiny[2 * quarter:3 * quarter],
                   -a.to(torch.float64)[3 * quarter:]]).to(dtype)
    # Keep every value finite and nonzero in the dtype (tiny addends may underflow: replace those).
    b = torch.where(torch.isfinite(b) & (b != 0), b, a)
    return a, b


def float64_canonical_sum(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TwoSum in float64: (RN(x + y), exact remainder), a representation of the real x + y that is unique, so
    two pairs stand for the same real number exactly when their canonical sums are equal."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    s = x + y
    y_virtual = s - x
    return s, (x - (s - y_virtual)) + (y - y_virtual)


def assert_same_real(x, y, u, v, what: str) -> None:
    """x + y == u + v exactly, element for element (compared through float64 canonical sums)."""
    s1, e1 = float64_canonical_sum(x, y)
    s2, e2 = float64_canonical_sum(u, v)
    bad = (s1 != s2) | (e1 != e2)
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {bad.numel()} elements not exact, e.g. "
                                 f"{x[bad][:3].tolist()} + {y[bad][:3].tolist()} != {u[bad][:3].tolist()} + "
                                 f"{v[bad][:3].tolist()}")


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal values, shapes and dtypes (+0 and -0 count as equal; NaN never passes)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not bool(torch.isnan(actual).any()), f"{what}: NaN in the result"
    mismatch = actual.cpu() != expected.cpu()
    assert not bool(mismatch.any()), (f"{what}: {int(mismatch.sum())} elements differ, e.g. "
                                      f"{actual.cpu()[mismatch][:4].tolist()} vs "
                                      f"{expected.cpu()[mismatch][:4].tolist()}")


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The unit in the last place of each element of x (in x's dtype, returned as float64)."""
    x64 = x.to(torch.float64).abs()
    finfo = torch.finfo(x.dtype)
    exponent = torch.floor(torch.log2(torch.clamp(x64, min=finfo.smallest_normal)))
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}[x.dtype]
    return torch.exp2(exponent - mantissa_bits)


# Known defects of the production code, reported; a test that meets one expects it to fail (strict xfail), so that
# the fix shows (as an XPASS failure) and the expectation is removed with it.
def assert_compiled_matches_eager(make_model, device: str, *inputs) -> None:
    """Two models from make_model() with the same parameters: forward + backward eagerly and under
    torch.compile(fullgraph=True) (aot_eager on the CPU, inductor on the GPU) give the same loss and gradients (a
    graph break would raise)."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    eager_model = make_model().to(device)
    compiled_model = make_model().to(device)
    compiled_model.load_state_dict(eager_model.state_dict())
    eager_loss = eager_model(*inputs)
    eager_loss.backward()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    compiled_loss = compiled(*inputs)
    compiled_loss.backward()
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for (name, eager), compiled_parameter in zip(eager_model.named_parameters(), compiled_model.parameters()):
        assert torch.allclose(compiled_parameter.grad, eager.grad, rtol=1e-4, atol=1e-6), name


def free_port() -> int:
    """A TCP port nobody listens on now, for a torch.distributed rendezvous on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The compile report scripts (run in a subprocess by the tests): scripts/reports/ at the repository's root.
REPORTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "reports")


def run_report_script(name: str, *arguments: str) -> dict:
    """Run scripts/reports/<name> (a compile report script) with `arguments` in a process without TRITON_INTERPRET
    and return its JSON."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = os.path.join(REPORTS, name)
    result = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True, env=environment,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is off the 16-byte grid (kernels take their scalar loads)."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buffer[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view holding the values of t (every other element of a wider tensor)."""
    wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous()
    return view


def assert_layouts_give_the_same_bits(run, arguments: list, features=(0, 1)) -> None:
    """run(*arguments) (a tuple of tensors) with the arguments at `features` misaligned (scalar instead of 16-byte
    loads), and with every tensor argument of at least one element strided (copied by the kernels): the same bits."""
    expected = run(*arguments)
    misaligned = [misaligned_copy(a) if index in features else a for index, a in enumerate(arguments)]
    strided = [strided_copy(a) if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.numel() > 0 else a
               for a in arguments]
    for name, variant in (("misaligned", misaligned), ("strided", strided)):
        for index, (a, b) in enumerate(zip(run(*variant), expected)):
            assert torch.equal(a, b), f"{name} inputs: output {index} differs"


def assert_same_bits_on_every_call_and_stream(run) -> None:
    """run() (a CUDA computation returning tensors) twice on the current stream and once on a side stream: the
    outputs agree bitwise (no atomics, nothing that depends on the stream)."""
    first, second = run(), run()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        third = run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for index, (a, b, c) in enumerate(zip(first, second, third)):
        assert torch.equal(a, b) and torch.equal(a, c), f"output {index} differs between calls"


# Hopper's shared memory per block (227 KiB) and its register file per thread.
HOPPER_SHARED_BYTES = 227 * 1024
HOPPER_REGISTERS = 255


def assert_hopper_tiles_compile(report: dict, kernels: dict) -> None:
    """`report` (scripts/reports/hopper_loss_report.py: "kernel/dtype/candidate" -> what ptxas says) holds every
    kernel of `kernels` (name -> the dtypes it is compiled for) and nothing else, and every tile candidate compiles
    without register spills, within Hopper's registers and shared memory; 16-bit features run on the tensor cores
    (wgmma), float32 ones never (no TF32)."""
    compiled = {tuple(case.split("/")[:2]) for case in report}
    assert compiled == {(name, dtype) for name, dtypes in kernels.items() for dtype in dtypes}, sorted(compiled)
    for case, counts in report.items():
        assert counts["spill_stores"] == 0 and counts["spill_loads"] == 0, f"{case} spills registers: {counts}"
        assert counts["registers"] <= HOPPER_REGISTERS, case
        assert counts["shared_bytes"] <= HOPPER_SHARED_BYTES, f"{case} needs too much shared memory: {counts}"
        if "/bfloat16/" in case or "/float16/" in case:
            assert counts["wgmma"] > 0, f"{case}: 16-bit features should run on wgmma: {counts}"
        else:
            assert counts["wgmma"] == 0, f"{case}: float32 features must not use TF32 tensor cores: {counts}"


@contextlib.contextmanager
def gloo_process_group(rank: int, world_size: int, port: int):
    """This process as `rank` of a gloo process group on 127.0.0.1:`port`, destroyed on leaving the block."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


__all__ = ["leanops"]


def provider_grid(cases: list, points: list, slow=None) -> list:
    """pytest params (backend, device, *point): each of `cases` (provider_cases' params, their marks kept) crossed
    with each of `points` (pytest.param of the test's other arguments, with an id); the combinations for which
    slow(backend, device, *point) is true are marked slow too (e.g. all but a few of the interpreter's)."""
    grid = []
    for case in cases:
        for point in points:
            marks = list(case.marks)
            if slow is not None and slow(*case.values, *point.values):
                marks.append(pytest.mark.slow)
            grid.append(pytest.param(*case.values, *point.values, marks=marks, id=f"{case.id}-{point.id}"))
    return grid


def assert_same_state(actual, expected, what="state_dict"):
    """Nested dicts / lists equal, tensors bit for bit (dtype and shape included): an optimizer's state_dict before
    and after a refused load."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual.keys()) == list(expected.keys()), what
        for key, value in expected.items():
            assert_same_state(actual[key], value, f"{what}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), what
        for index, (item, value) in enumerate(zip(actual, expected)):
            assert_same_state(item, value, f"{what}/{index}")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, what
        assert torch.equal(actual, expected), what
    else:
        assert actual == expected, what
