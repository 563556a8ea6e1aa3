"""CollageAdamW under DistributedDataParallel (gloo, two processes on the CPU): after a few steps on different
data per rank, every rank holds identical parameters and compensation (the all-reduced gradients are identical,
and so is the deterministic step)."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from helpers import free_port, gloo_process_group

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # two processes: tens of seconds on two cores


def _train_on_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from leanops import ops
    from leanops.optim import CollageAdamW

    with gloo_process_group(rank, world_size, port):
        torch.manual_seed(0)  # the same initial model on every rank
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        model = model.to(torch.bfloat16)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        backend = "cpu" if ops.COLLAGE.unavailable_reason("cpu", torch.device("cpu")) is None else "reference"
        optimizer = CollageAdamW(ddp.parameters(), lr=1e-3, weight_decay=0.01, backend=backend)
        generator = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for _ in range(5):
            x = torch.randn(8, 16, generator=generator).bfloat16()
            loss = ddp(x).float().square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        state = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
        state.update({f"{name}.lo": optimizer.state[parameter]["param_lo"].clone()
                      for name, parameter in model.named_parameters()})
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))


def test_every_rank_ends_with_identical_parameters(tmp_path):
    world_size = 2
    mp.spawn(_train_on_rank, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    states = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]
    assert states[0].keys() == states[1].keys() and len(states[0]) == 8
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
    torch.manual_seed(0)  # the ranks' initial model
    initial = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    assert not torch.equal(states[0]["0.weight"], initial[0].weight.detach().bfloat16())  # it trained
    assert states[0]["0.weight.lo"].abs().sum() > 0  # and the compensation holds low bits
