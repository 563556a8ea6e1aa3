"""Shared test helpers: the (backend, device) cases this machine can run, input generators, and a free port for the
torch.distributed tests."""
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


def free_port() -> int:
    """A TCP port nobody listens on now, for a torch.distributed rendezvous on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_report_script(name: str) -> dict:
    """Run tests/<name> (a compile report script) in a process without TRITON_INTERPRET and return its JSON."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


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
