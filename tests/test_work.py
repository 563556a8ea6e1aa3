"""The matrix work each loss provider issues, counted independently of its plan, against the plan's own count
(leanops.plans.planned_flops, what `leanops bench` shows) and the floor: 8 B^2 D for CLIP and SigLIP, 8 N V D for
linear cross-entropy, one forward + one backward (issue 14: at most 1.15 x the floor at sizes that are multiples
of 128, independent of D: no recomputation per output chunk).

Independent counts:
- Triton, under the interpreter: every tl.dot the kernels execute (the interpreter's dot builder, wrapped);
- reference: every aten matrix product, through torch.utils.flop_counter.FlopCounterMode;
- cpu (the C++ kernels): every aten matrix product the C++ code calls through the dispatcher, recorded by
  torch.profiler with its shapes and priced by torch.utils.flop_counter's formulas.
At two values of D each, and with a memory budget small enough for several panels / chunks.
"""
import contextlib
import importlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from helpers import provider_cases

from leanops import plans
from leanops.ops import CONTRASTIVE, CROSS_ENTROPY

MAX_RATIO = 1.15
# (batch, features) and (tokens, vocabulary, features): multiples of 128 in the batch dimensions, two values of D.
CONTRASTIVE_SIZES = [(128, 32), (128, 64)]
CROSS_ENTROPY_SIZES = [(128, 256, 32), (128, 256, 64)]
# MiB: a few 16-row panels / 16-column chunks at these sizes (and the default budget: one panel).
BUDGETS = [None, "0.004"]


@contextlib.contextmanager
def counted_triton_dots():
    """Counts 2 m n k for every tl.dot the Triton interpreter executes inside the block: yields a one-element
    list holding the running total."""
    from triton.runtime import interpreter

    total = [0]
    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, accumulator, *args):
        rows, depth = a.data.shape[-2:]
        total[0] += 2 * rows * b.data.shape[-1] * depth
        return original(self, a, b, accumulator, *args)

    interpreter.InterpreterBuilder.create_dot = create_dot
    try:
        yield total
    finally:
        interpreter.InterpreterBuilder.create_dot = original


@contextlib.contextmanager
def counted_aten_products():
    """FLOPs of the aten matrix products run inside the block, including those the C++ kernels call through the
    dispatcher (torch.profiler records them with shapes; flop_counter's formulas price them)."""
    total = [0]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profiler:
        yield total
    formulas = {f"aten::{op.__name__.split('.')[0]}": formula for op, formula in flop_registry.items()
                if op.__name__.split(".")[0] in ("mm", "addmm", "bmm", "baddbmm")}
    for event in profiler.events():
        formula = formulas.get(event.name)
        if formula is None or not event.input_shapes:
            continue
        shapes = [shape for shape in event.input_shapes if shape]
        if event.name == "aten::mm":
            total[0] += formula(shapes[0], shapes[1])
        elif event.name == "aten::addmm":
            total[0] += formula(shapes[0], shapes[1], shapes[2])
        else:
            raise AssertionError(f"unexpected matrix product {event.name} {event.input_shapes}")


def _budget(monkeypatch, budget):
    if budget is None:
        monkeypatch.delenv("LEANOPS_PANEL_BUDGET_MIB", raising=False)
    else:
        monkeypatch.setenv("LEANOPS_PANEL_BUDGET_MIB", budget)


def _contrastive_step(operators, case, batch, features, generator):
    x = torch.randn(batch, features, generator=generator)
    y = torch.randn(batch, features, generator=generator)
    weights = torch.full((batch,), 1.0 / batch)
    if case == "clip":
        scale = torch.full((batch,), 10.0)
        row_lse, col_lse = operators.clip_forward(x, y, scale)
        operators.clip_backward(x, y, scale, row_lse, col_lse, weights, weights)
    else:
        scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
        groups = torch.arange(batch)
        operators.siglip_forward(x, y, scale, bias, groups)
        operators.siglip_backward(x, y, scale, bias, groups, weights)


def _cross_entropy_step(operators, tokens, vocabulary, features, generator):
    h = torch.randn(tokens, features, generator=generator)
    w = torch.randn(vocabulary, features, generator=generator) * 0.1
    bias = torch.randn(vocabulary, generator=generator)
    targets = torch.randint(0, vocabulary, (tokens,), generator=generator)
    statistics = operators.linear_ce_forward(h, w, bias, targets, 0.0)
    upstream = [torch.full((tokens,), 1.0 / tokens) for _ in range(4)]
    operators.linear_ce_backward(h, w, bias, targets, 0.0, statistics[0], *upstream)


def _implementation(family, backend):
    """What runs the provider's primitives: for the Python providers their module's functions themselves (the
    torch.library operator around them is opaque to FlopCounterMode), for the C++ ones the operators."""
    provider = family.provider(backend)
    return importlib.import_module(provider.module) if provider.module else provider.operators


def _count(backend, step):
    if backend == "triton":
        with counted_triton_dots() as total:
            step()
    elif backend == "reference":
        with FlopCounterMode(display=False) as counter:
            step()
        total = [counter.get_total_flops()]
    else:
        with counted_aten_products() as total:
            step()
    return total[0]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("size", CONTRASTIVE_SIZES)
@pytest.mark.parametrize("case", ["clip", "siglip"])
@pytest.mark.parametrize("backend,device", provider_cases(CONTRASTIVE, devices=("cpu",)))
def test_contrastive_work_is_counted_and_at_the_floor(backend, device, case, size, budget, monkeypatch):
    _budget(monkeypatch, budget)
    batch, features = size
    operators = _implementation(CONTRASTIVE, backend)
    counted = _count(backend, lambda: _contrastive_step(operators, case, batch, features,
                                                        torch.Generator().manual_seed(batch + features)))
    planned = plans.planned_flops(case, backend, dtype=torch.float32, device_type=device, batch=batch,
                                  features=features)
    floor = plans.floor_flops(case, batch=batch, features=features)
    assert counted == planned, f"{backend} {case}: counted {counted}, its plan says {planned}"
    assert counted <= MAX_RATIO * floor, f"{backend} {case}: {counted / floor:.2f} x the floor"


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("size", CROSS_ENTROPY_SIZES)
@pytest.mark.parametrize("backend,device", provider_cases(CROSS_ENTROPY, devices=("cpu",)))
def test_cross_entropy_work_is_counted_and_at_the_floor(backend, device, size, budget, monkeypatch):
    _budget(monkeypatch, budget)
    tokens, vocabulary, features = size
    operators = _implementation(CROSS_ENTROPY, backend)
    counted = _count(backend, lambda: _cross_entropy_step(operators, tokens, vocabulary, features,
                                                          torch.Generator().manual_seed(features)))
    planned = plans.planned_flops("cross_entropy", backend, dtype=torch.float32, device_type=device, tokens=tokens,
                                  vocabulary=vocabulary, features=features)
    floor = plans.floor_flops("cross_entropy", tokens=tokens, vocabulary=vocabulary, features=features)
    assert counted == planned, f"{backend}: counted {counted}, its plan says {planned}"
    assert counted <= MAX_RATIO * floor, f"{backend}: {counted / floor:.2f} x the floor"


def test_the_plan_of_the_gpu_triton_kernels_is_at_the_floor_at_the_target_sizes():
    """The Triton plan priced for the GPU's tiles (128 x 128 x 64, D padded to 16) at the issue's target sizes and
    at awkward ones: the floor at multiples of 128, and within the bound wherever the padding is small."""
    pytest.importorskip("triton")
    from leanops.triton_kernels import contrastive, cross_entropy

    with _no_cuda_properties():
        for case in ("clip", "siglip"):
            for batch, features in ((32768, 512), (65536, 512), (131072, 512), (32768, 1024)):
                planned = contrastive.planned_matrix_flops(case, torch.bfloat16, "cuda", batch, features)
                assert planned == plans.floor_flops(case, batch=batch, features=features), (case, batch, features)
        for tokens, vocabulary, features in ((8192, 128256, 2048), (32768, 128256, 4096)):
            planned = cross_entropy.planned_matrix_flops("cross_entropy", torch.bfloat16, "cuda", tokens, vocabulary,
                                                         features)
            floor = plans.floor_flops("cross_entropy", tokens=tokens, vocabulary=vocabulary, features=features)
            # V = 128256 is 1002 blocks of 128: the forward's splits and the chunks add no padding.
            assert planned == floor, (tokens, vocabulary, features, planned / floor)


@contextlib.contextmanager
def _no_cuda_properties():
    """The plan asks the device for its SM count (132 on an H100): answer for a machine without one."""
    class Properties:
        multi_processor_count = 132

    original = torch.cuda.get_device_properties
    torch.cuda.get_device_properties = lambda *_: Properties()
    try:
        yield
    finally:
        torch.cuda.get_device_properties = original
