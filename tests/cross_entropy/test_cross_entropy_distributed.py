"""Vocabulary-parallel linear cross-entropy (gloo, 2 and 3 processes on the CPU): each rank holds an uneven slice of
the classifier; the loss equals the single-device loss (the dense oracle, tests/oracles.py), hidden's gradient is
the whole single-device one on every rank, and weight's and bias's gradients are the ranks' slices of the
single-device ones. Every option (bias, label smoothing, z-loss, softcap, squentropy, ignored tokens) and reduction;
float64 on the reference backend, float32 on the C++ kernels."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import leanops
import oracles
from helpers import free_port, gloo_process_group

pytestmark = pytest.mark.distributed

TOKENS, FEATURES, VOCABULARY = 7, 5, 11
OPTIONS = {
    "plain": {},
    "everything": dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0, squentropy=True),
}


def _inputs(dtype: torch.dtype, with_bias: bool):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(TOKENS, FEATURES, generator=generator, dtype=torch.float64).to(dtype)
    weight = torch.randn(VOCABULARY, FEATURES, generator=generator, dtype=torch.float64).to(dtype)
    bias = torch.randn(VOCABULARY, generator=generator, dtype=torch.float64).to(dtype) if with_bias else None
    targets = torch.randint(0, VOCABULARY, (TOKENS,), generator=generator)
    targets[2] = -100  # ignored
    return hidden, weight, bias, targets


def _slices(world_size: int) -> list[slice]:
    """Uneven vocabulary slices in rank order (the last rank's is the largest)."""
    bounds = [0] + [VOCABULARY * (r + 1) // (world_size + 1) for r in range(world_size - 1)] + [VOCABULARY]
    return [slice(bounds[r], bounds[r + 1]) for r in range(world_size)]


def _cases():
    for name in OPTIONS:
        for reduction in ("mean", "sum", "none"):
            yield name, reduction, True, "reference", torch.float64
    yield "plain", "mean", False, "reference", torch.float64
    yield "everything", "mean", True, "cpu", torch.float32


def _run(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with gloo_process_group(rank, world_size, port):
        results = {}
        mine = _slices(world_size)[rank]
        for case in _cases():
            name, reduction, with_bias, backend, dtype = case
            hidden, weight, bias, targets = _inputs(dtype, with_bias)
            hidden = hidden.clone().requires_grad_()
            weight = weight[mine].clone().requires_grad_()
            bias = bias[mine].clone().requires_grad_() if with_bias else None
            loss = leanops.linear_cross_entropy(hidden, weight, targets, bias=bias, reduction=reduction,
                                                backend=backend, group=dist.group.WORLD, **OPTIONS[name])
            (loss.sum() if reduction == "none" else loss).backward()
            results["/".join(map(str, case))] = {
                "loss": loss.detach(), "grad_hidden": hidden.grad, "grad_weight": weight.grad,
                "grad_bias": bias.grad if with_bias else torch.zeros(0)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_vocabulary_parallel_equals_single_device(world_size, tmp_path):
    mp.spawn(_run, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]
    slices = _slices(world_size)
    for case in _cases():
        key = "/".join(map(str, case))
        name, reduction, with_bias, backend, dtype = case
        hidden, weight, bias, targets = (t.double() if t is not None and t.is_floating_point() else t
                                         for t in _inputs(dtype, with_bias))
        hidden.requires_grad_(), weight.requires_grad_()
        if bias is not None:
            bias.requires_grad_()
        loss = oracles.linear_cross_entropy(hidden, weight, targets, bias, reduction=reduction, **OPTIONS[name])
        (loss.sum() if reduction == "none" else loss).backward()
        tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        for rank, result in enumerate(ranks):
            got = result[key]
            torch.testing.assert_close(got["loss"].double(), loss.detach(), **tolerance, msg=f"{key} loss")
            torch.testing.assert_close(got["grad_hidden"].double(), hidden.grad, **tolerance, msg=f"{key} hidden")
            torch.testing.assert_close(got["grad_weight"].double(), weight.grad[slices[rank]], **tolerance,
                                       msg=f"{key} weight")
            if with_bias:
                torch.testing.assert_close(got["grad_bias"].double(), bias.grad[slices[rank]], **tolerance,
                                           msg=f"{key} bias")


def test_group_without_a_process_group_is_refused():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="'group'.*init_process_group"):
        leanops.linear_cross_entropy(hidden, weight, torch.zeros(3, dtype=torch.int64), group=object())
