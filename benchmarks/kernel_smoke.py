"""One small call of every kernel of one leanops provider, for compute-sanitizer (scripts/gpu_check.sh, step
memcheck):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python -m leanops.benchmarks.kernel_smoke

Each op family is called once per dtype its kernels specialise on (bfloat16 and float32), forward and backward, at
awkward sizes (not multiples of any tile: partial tiles are where out-of-bounds accesses hide), so that every CUDA
kernel launches at least once while the sanitizer watches every memory access. Without PyTorch's caching allocator
(PYTORCH_NO_CUDA_MEMORY_CACHING=1) each tensor is its own allocation, so an access past its end is caught rather
than landing in a neighbour of the same pool block. Values are not checked here beyond being finite: the tests
check them (scripts/gpu_check.sh, step tests). A case that raises is reported and the run goes on; the exit status
is 1 if any case failed.

``--backend cpu --device cpu`` runs the same calls on the C++ CPU kernels (tests/tools check this module so).
"""
import argparse
import sys
import time
from collections.abc import Callable

import torch

import leanops
from leanops import mcf
from leanops.optim import FRUGAL, CollageAdamW

DTYPES = (torch.bfloat16, torch.float32)
ELEMENTS = 1000 + 3
CLIP_SHAPE = (130, 70)  # (B, D)
CE_SHAPE = (37, 70, 300)  # (N, D, V)
OPTIMIZER_SHAPES = ((37, 53), (1003,), (4, 5, 6))


def _finite(*values) -> None:
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AssertionError("non-finite values in a result")


def _mcf_cases(backend: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, Callable[[], None]]]:
    def random(scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(ELEMENTS, device=device) * scale).to(dtype)

    def grow_():
        hi, lo = random(), random(1e-3)
        _finite(*mcf.grow_(hi, lo, random(1e-4), backend=backend))

    def split_merge():
        hi, lo = mcf.split(torch.randn(ELEMENTS, device=device), dtype, backend=backend)
        _finite(hi, lo, mcf.merge(hi, lo, backend=backend))

    return [
        ("two_sum", lambda: _finite(*mcf.two_sum(random(), random(1e-3), backend=backend))),
        ("fast_two_sum", lambda: _finite(*mcf.fast_two_sum(random(4.0) + 8, random(1e-3), backend=backend))),
        ("two_prod", lambda: _finite(*mcf.two_prod(random(), random(), backend=backend))),
        ("grow_", grow_),
        ("scale", lambda: _finite(*mcf.scale(random(), random(1e-3), 0.5, 0.0, backend=backend))),
        ("split/merge", split_merge),
    ]


def _features(rows: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    features = torch.nn.functional.normalize(torch.randn(rows, dim, device=device), dim=1)
    return features.to(dtype).requires_grad_()


def _loss_cases(backend: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, Callable[[], None]]]:
    def clip():
        x, y = _features(*CLIP_SHAPE, dtype, device), _features(*CLIP_SHAPE, dtype, device)
        scale = torch.tensor(30.0, device=device, requires_grad=True)
        loss = leanops.clip_loss(x, y, scale, backend=backend)
        _finite(loss, *torch.autograd.grad(loss, (x, y, scale)))

    def siglip():
        x, y = _features(*CLIP_SHAPE, dtype, device), _features(*CLIP_SHAPE, dtype, device)
        scale = torch.tensor(10.0, device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        loss = leanops.siglip_loss(x, y, scale, bias, backend=backend)
        _finite(loss, *torch.autograd.grad(loss, (x, y, scale, bias)))

    def linear_cross_entropy(with_bias: bool, softcap: float | None):
        def call():
            tokens, dim, vocabulary = CE_SHAPE
            hidden = torch.randn(tokens, dim, device=device).to(dtype).requires_grad_()
            weight = (torch.randn(vocabulary, dim, device=device) * dim**-0.5).to(dtype).requires_grad_()
            bias = torch.randn(vocabulary, device=device).to(dtype).requires_grad_() if with_bias else None
            targets = torch.randint(0, vocabulary, (tokens,), device=device)
            loss = leanops.linear_cross_entropy(hidden, weight, targets, bias=bias, softcap=softcap, backend=backend)
            _finite(loss, *torch.autograd.grad(loss, [t for t in (hidden, weight, bias) if t is not None]))
        return call

    return [("clip_loss", clip), ("siglip_loss", siglip),
            ("linear_cross_entropy", linear_cross_entropy(False, None)),
            ("linear_cross_entropy bias softcap", linear_cross_entropy(True, 30.0))]


def _optimizer_cases(backend: str, device: torch.device) -> list[tuple[str, Callable[[], None]]]:
    def parameters(dtype: torch.dtype) -> list[torch.Tensor]:
        params = []
        for shape in OPTIMIZER_SHAPES:
            param = (torch.randn(shape, device=device) * 0.02).to(dtype)
            param.grad = (torch.randn(shape, device=device) * 1e-2).to(dtype)
            params.append(param)
        return params

    def step(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], dtype: torch.dtype):
        def call():
            params = parameters(dtype)
            optimizer = make(params)
            for _ in range(2):  # the first step creates the state, the second reads it
                optimizer.step()
            _finite(*params)
        return call

    cases = [(f"CollageAdamW {mode}", step(lambda params, mode=mode: CollageAdamW(
        params, lr=1e-3, weight_decay=0.01, mode=mode, backend=backend), torch.bfloat16))
        for mode in ("light", "plus")]
    # One explicit group: the split kernel steps every tensor (bare parameters would split only 2-D matrices).
    cases += [(f"FRUGAL {projection}", step(lambda params, projection=projection: FRUGAL(
        [{"params": params}], lr=1e-3, weight_decay=0.01, density=0.25, projection=projection, backend=backend), torch.float32))
        for projection in ("blockwise", "columns")]
    return cases


def cases(backend: str, device: torch.device) -> list[tuple[str, Callable[[], None]]]:
    """(name, call) of every kernel call of the run, in order."""
    result = []
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        result += [(f"{case} {name}", call) for case, call in _mcf_cases(backend, device, dtype)]
        result += [(f"{case} {name}", call) for case, call in _loss_cases(backend, device, dtype)]
    return result + _optimizer_cases(backend, device)


def run(backend: str, device: torch.device, out=sys.stdout) -> int:
    """Run every case; print one line each; return the number that failed."""
    torch.manual_seed(0)
    failures = 0
    for name, call in cases(backend, device):
        start = time.perf_counter()
        try:
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # a kernel's fault surfaces here, on its case's line
        except Exception as error:  # noqa: BLE001 - every case runs; the failures are counted and reported
            failures += 1
            print(f"FAILED {name}: {type(error).__name__}: {error}".splitlines()[0], file=out, flush=True)
            continue
        print(f"ok     {name} ({time.perf_counter() - start:.2f} s)", file=out, flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leanops.benchmarks.kernel_smoke", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--backend", default="cuda", help="the leanops provider (default: cuda)")
    parser.add_argument("--device", default=None, help="the device (default: cuda, or cpu for --backend cpu)")
    arguments = parser.parse_args(argv)
    device = torch.device(arguments.device or ("cpu" if arguments.backend == "cpu" else "cuda"))
    failures = run(arguments.backend, device)
    print(f"kernel_smoke: {failures} failed" if failures else "kernel_smoke: every case ran", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
