"""FRUGAL under DistributedDataParallel (gloo, two processes on the CPU): rank 0 draws every subspace and
broadcasts it, so ranks seeded differently still use the same subspaces and end with identical parameters."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from helpers import free_port, gloo_process_group

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # two processes, five projections

PROJECTIONS = ("blockwise", "columns", "rows", "random", "svd")


def _train_on_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from leanops.optim import FRUGAL

    with gloo_process_group(rank, world_size, port):
        results = {}
        for projection in PROJECTIONS:
            torch.manual_seed(0)  # the same initial model on every rank
            model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10),
                                        torch.nn.Tanh(), torch.nn.Linear(10, 3))
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            # A different seed per rank: only the broadcast keeps the subspaces equal.
            optimizer = FRUGAL(ddp.parameters(), lr=1e-2, density=0.5, update_gap=2, projection=projection,
                               on_switch="project", seed=1000 + rank)
            generator = torch.Generator().manual_seed(rank)  # different data per rank
            for _ in range(7):
                loss = ddp(torch.randn(8, 12, generator=generator)).square().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            for name, parameter in model.named_parameters():
                results[f"{projection}/{name}"] = parameter.detach().clone()
                for key in ("indices", "projector"):
                    if key in optimizer.state[parameter]:
                        results[f"{projection}/{name}/{key}"] = optimizer.state[parameter][key].clone()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ranks_share_rank_zeros_subspaces_and_end_identical(tmp_path):
    world_size = 2
    mp.spawn(_train_on_rank, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]
    assert ranks[0].keys() == ranks[1].keys()
    assert any(key.endswith("/indices") for key in ranks[0]) and any(key.endswith("/projector") for key in ranks[0])
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
