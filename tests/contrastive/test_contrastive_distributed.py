"""CLIP and SigLIP losses across ranks (gloo, 2 and 3 processes on the CPU): for the ring and gather modes, the loss
value equals the single-device loss of the concatenated batch (the dense oracle, tests/oracles.py), and the
gradients each rank receives, averaged as DistributedDataParallel averages them, equal the single-device gradients
(features, logit_scale, logit_bias). With group labels that span ranks, per-anchor scales, every reduction; float64
on the reference backend, float32 on the C++ kernels. A DDP run of a small two-tower model checks the parameter
gradients end to end."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import leanops
import oracles
from helpers import free_port, gloo_process_group

pytestmark = pytest.mark.distributed

LOCAL_BATCH, FEATURES = 5, 6


def _global_inputs(world_size: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch = LOCAL_BATCH * world_size
    image = torch.randn(batch, FEATURES, generator=generator, dtype=torch.float64)
    text = torch.randn(batch, FEATURES, generator=generator, dtype=torch.float64)
    image = torch.nn.functional.normalize(image, dim=1).to(dtype)
    text = torch.nn.functional.normalize(text, dim=1).to(dtype)
    # Groups of 1 to 3 samples, several spanning two ranks.
    labels = torch.tensor([index // 2 if index % 3 else index for index in range(batch)], dtype=torch.int64)
    per_anchor = (torch.rand(batch, generator=generator, dtype=torch.float64) * 5 + 8).to(dtype)
    return image, text, labels, per_anchor


def _cases():
    for loss in ("clip", "siglip"):
        for mode in ("ring", "gather"):
            for with_labels in (False, True):
                for reduction in ("mean", "sum", "none"):
                    scales = ("scalar", "per-anchor") if loss == "clip" else ("scalar",)
                    for scale in scales:
                        yield loss, mode, with_labels, reduction, scale, "reference", torch.float64
    for loss in ("clip", "siglip"):
        for mode in ("ring", "gather"):
            yield loss, mode, True, "mean", "scalar", "cpu", torch.float32


def _loss(loss, image, text, scale, bias, labels, reduction, backend, distributed=None):
    if loss == "clip":
        return leanops.clip_loss(image, text, scale, labels=labels, reduction=reduction, backend=backend,
                                 distributed=distributed)
    return leanops.siglip_loss(image, text, scale, bias, labels=labels, reduction=reduction, backend=backend,
                               distributed=distributed)


def _oracle(loss, image, text, scale, bias, labels, reduction):
    """The dense single-device loss (tests/oracles.py: open_clip's formulas)."""
    if loss == "clip":
        return oracles.clip_loss(image, text, scale, labels, reduction)
    return oracles.siglip_loss(image, text, scale, bias, labels, reduction)


def _objective(value, reduction):
    """What each rank backpropagates: the value, or for "none" a fixed weighting of its per-anchor values."""
    if reduction == "none":
        weights = torch.linspace(0.5, 1.5, value.shape[0], dtype=value.dtype)
        return (value * weights).sum()
    return value


def _run_cases(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with gloo_process_group(rank, world_size, port):
        results = {}
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for case in _cases():
            loss, mode, with_labels, reduction, scale_kind, backend, dtype = case
            image, text, labels, per_anchor = _global_inputs(world_size, dtype)
            image = image[rows].clone().requires_grad_()
            text = text[rows].clone().requires_grad_()
            scale = (per_anchor[rows].clone() if scale_kind == "per-anchor"
                     else torch.tensor(10.0, dtype=dtype)).requires_grad_()
            bias = torch.tensor(-3.0, dtype=dtype, requires_grad=True)
            value = _loss(loss, image, text, scale, bias, labels[rows] if with_labels else None, reduction, backend,
                          distributed=mode)
            _objective(value, reduction).backward()
            results["/".join(map(str, case))] = {
                "value": value.detach(), "grad_image": image.grad, "grad_text": text.grad, "grad_scale": scale.grad,
                "grad_bias": bias.grad if loss == "siglip" else torch.zeros(())}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _single_device(case, world_size):
    """The dense float64 loss of the concatenated batch and its gradients, as the ranks should see them after DDP."""
    loss, mode, with_labels, reduction, scale_kind, backend, dtype = case
    image, text, labels, per_anchor = _global_inputs(world_size, dtype)
    image, text = image.double().requires_grad_(), text.double().requires_grad_()
    scale = (per_anchor.double() if scale_kind == "per-anchor" else torch.tensor(10.0, dtype=torch.float64))
    scale.requires_grad_()
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    value = _oracle(loss, image, text, scale, bias, labels if with_labels else None, reduction)
    if reduction == "none":
        # Each rank weights its own values: the single-device objective is the sum of the ranks' objectives.
        objective = sum(_objective(value[r * LOCAL_BATCH:(r + 1) * LOCAL_BATCH], reduction) for r in range(world_size))
    else:
        objective = value
    objective.backward()
    return value.detach(), image.grad, text.grad, scale.grad, bias.grad


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_distributed_losses_equal_the_single_device_loss(world_size, tmp_path):
    mp.spawn(_run_cases, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]
    for case in _cases():
        key = "/".join(map(str, case))
        loss, mode, with_labels, reduction, scale_kind, backend, dtype = case
        tolerance = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
        value, grad_image, grad_text, grad_scale, grad_bias = _single_device(case, world_size)
        # "none" returns each rank's own values; "mean" and "sum" the whole batch's, on every rank.
        got = [ranks[r][key]["value"].double() for r in range(world_size)]
        if reduction == "none":
            torch.testing.assert_close(torch.cat(got), value, **tolerance, msg=key)
        else:
            for rank_value in got:
                torch.testing.assert_close(rank_value, value, **tolerance, msg=key)
        # DDP averages over the ranks: the ranks' gradients (features: theirs alone, P x their slice for mean and
        # sum) averaged must give the single-device gradient.
        factor = 1 if reduction == "none" else world_size
        features = torch.cat([ranks[r][key]["grad_image"].double() for r in range(world_size)]) / factor
        torch.testing.assert_close(features, grad_image, **tolerance, msg=f"{key} image")
        features = torch.cat([ranks[r][key]["grad_text"].double() for r in range(world_size)]) / factor
        torch.testing.assert_close(features, grad_text, **tolerance, msg=f"{key} text")
        if scale_kind == "per-anchor":
            scale = torch.cat([ranks[r][key]["grad_scale"].double() for r in range(world_size)]) / factor
        else:
            scale = sum(ranks[r][key]["grad_scale"].double() for r in range(world_size)) / factor
        torch.testing.assert_close(scale, grad_scale, **tolerance, msg=f"{key} scale")
        if loss == "siglip":
            bias = sum(ranks[r][key]["grad_bias"].double() for r in range(world_size)) / factor
            torch.testing.assert_close(bias, grad_bias, **tolerance, msg=f"{key} bias")


# ---------------------------------------------------------------------------------------------------------------
# End to end under DistributedDataParallel.

def _towers(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({
        "image": torch.nn.Linear(7, FEATURES, dtype=torch.float64),
        "text": torch.nn.Linear(9, FEATURES, dtype=torch.float64),
    })


class _TwoTower(torch.nn.Module):
    """Two linear towers, a learnable log scale and, for SigLIP, a learnable bias."""

    def __init__(self, with_bias: bool):
        super().__init__()
        self.towers = _towers()
        self.log_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.tensor(-2.0, dtype=torch.float64)) if with_bias else None

    def forward(self, images, texts):
        return self.towers["image"](images), self.towers["text"](texts), self.log_scale.exp(), self.bias


def _tower_batch(world_size: int):
    generator = torch.Generator().manual_seed(7)
    batch = LOCAL_BATCH * world_size
    return (torch.randn(batch, 7, generator=generator, dtype=torch.float64),
            torch.randn(batch, 9, generator=generator, dtype=torch.float64),
            torch.arange(batch) // 2)


def _train_ddp(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with gloo_process_group(rank, world_size, port):
        images, texts, labels = _tower_batch(world_size)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {}
        for loss in ("clip", "siglip"):
            for mode in ("ring", "gather"):
                model = torch.nn.parallel.DistributedDataParallel(_TwoTower(with_bias=loss == "siglip"))
                image, text, scale, bias = model(images[rows], texts[rows])
                # Through the nn modules, as open_clip training code would call them.
                if loss == "clip":
                    criterion = leanops.nn.ClipLoss(backend="reference", distributed=mode)
                    value = criterion(image, text, scale, labels=labels[rows])
                else:
                    criterion = leanops.nn.SigLipLoss(backend="reference", distributed=mode)
                    value = criterion(image, text, scale, bias, labels=labels[rows])
                value.backward()
                for name, parameter in model.module.named_parameters():
                    results[f"{loss}/{mode}/{name}"] = parameter.grad.clone()
                results[f"{loss}/{mode}/value"] = value.detach()
        torch.save(results, os.path.join(out_dir, f"ddp{rank}.pt"))


@pytest.mark.slow
def test_ddp_parameter_gradients_equal_single_process(tmp_path):
    world_size = 2
    mp.spawn(_train_ddp, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"ddp{rank}.pt", weights_only=True) for rank in range(world_size)]
    images, texts, labels = _tower_batch(world_size)
    for loss in ("clip", "siglip"):
        model = _TwoTower(with_bias=loss == "siglip")
        image, text, scale, bias = model(images, texts)
        value = _oracle(loss, image, text, scale, bias, labels, "mean")
        value.backward()
        for mode in ("ring", "gather"):
            for rank in ranks:
                torch.testing.assert_close(rank[f"{loss}/{mode}/value"], value.detach())
                for name, parameter in model.named_parameters():
                    torch.testing.assert_close(rank[f"{loss}/{mode}/{name}"], parameter.grad, rtol=1e-9,
                                               atol=1e-12, msg=f"{loss}/{mode}/{name}")


def test_bad_distributed_arguments_are_refused_before_any_work():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="'distributed'"):
        leanops.clip_loss(x, x, 10.0, distributed="allreduce")
    with pytest.raises(ValueError, match="'group'"):
        leanops.siglip_loss(x, x, 10.0, 0.0, group=object())
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            leanops.clip_loss(x, x, 10.0, distributed="ring")
