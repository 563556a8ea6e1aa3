"""CollageAdamW and FRUGAL under FSDP2 (``fully_shard`` on a 1-D CPU mesh, gloo), world sizes 2 and 3.

One spawn per world size runs every case: a small model whose dim 0 sizes (7, 5, 2) are multiples of neither world
size (FSDP2 shards unevenly; with 3 ranks the last layer's last shard is empty) trains a few steps on different data
per rank, every rank seeded differently for FRUGAL. Rank 0 saves the initial parameters, every step's whole
(reduce-scattered, then gathered) gradients, the final parameters and the optimizer's state dict gathered to whole
tensors; the parent replays the gradients through the single-device optimizer and compares:

- CollageAdamW (light, plus) and FRUGAL blockwise / columns / rows: bit for bit (the sharded step is elementwise, or
  indexes the same coordinates), reference backend on float64 parameters and the C++ kernel on float32 (and FRUGAL
  precision "collage" on bfloat16), across subspace switches (update_gap 2, on_switch "project");
- FRUGAL random / svd: to float32 rounding (P^T G of a matrix sharded by rows is summed over the ranks);
- the gathered state dict loads into the single-device optimizer and equals its state (and the generator, step
  counter and active blocks: the ranks' differently seeded generators follow rank 0's), and loads back into a
  sharded optimizer, each rank cutting its pieces;
- torch.distributed.checkpoint (CollageAdamW light and plus, FRUGAL blockwise, columns and rows in precision fp32,
  blockwise and columns in precision collage): saved after 3 steps, loaded into a fresh model and optimizer (other
  initial values, other seeds), run on
  across a subspace switch: the same parameters as the uninterrupted run, bit for bit.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # two and three processes, eighteen cases each

WORLD_SIZES = (2, 3)
STEPS, SAVE_AT = 6, 3  # switches at steps 0, 2 and 4: one after the checkpoint
PROJECTIONS = ("blockwise", "columns", "rows", "random", "svd")
EXACT = ("blockwise", "columns", "rows")


def _cases() -> dict:
    """{name: (parameter dtype, optimizer options, whether a DCP checkpoint is taken and resumed)}."""
    from leanops import ops

    cpu = torch.device("cpu")
    kernel = "cpu" if ops.FRUGAL.unavailable_reason("cpu", cpu) is None else "reference"
    collage_backend = "cpu" if ops.COLLAGE.unavailable_reason("cpu", cpu) is None else "reference"
    cases = {f"collage-{mode}": (torch.bfloat16, dict(mode=mode, backend=collage_backend), True)
             for mode in ("light", "plus")}
    for projection in PROJECTIONS:
        # sgd for the projections compared to rounding: signSGD of a near-zero remainder may flip.
        options = dict(projection=projection, state_free="signsgd" if projection in EXACT else "sgd")
        cases[f"frugal-{projection}-reference"] = (torch.float64, dict(options, backend="reference"), False)
        cases[f"frugal-{projection}-{kernel}"] = (torch.float32, dict(options, backend=kernel),
                                                  projection in EXACT)
    for projection in ("blockwise", "columns"):
        cases[f"frugal-{projection}-collage-{kernel}"] = (
            torch.bfloat16, dict(projection=projection, precision="collage", backend=kernel), True)
    return cases


def _model(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 2)).to(dtype)


def _optimizer(name: str, options: dict, named_parameters, seed: int):
    """Layers 0 and 2 (weights and 1-D biases) split, the last layer plain AdamW (FRUGAL); one group (Collage)."""
    from leanops.optim import FRUGAL, CollageAdamW

    named_parameters = list(named_parameters)
    if name.startswith("collage"):
        return CollageAdamW([p for _, p in named_parameters], lr=1e-2, weight_decay=0.1, **options)
    groups = [{"params": [p for n, p in named_parameters if not n.startswith("4.")]},
              {"params": [p for n, p in named_parameters if n.startswith("4.")], "split": False}]
    return FRUGAL(groups, lr=1e-2, weight_decay=0.1, density=0.5, update_gap=2, on_switch="project", seed=seed,
                  **options)


def _batch(step: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(1000 * step + rank)).to(dtype)


def _train(model, optimizer, steps: range, rank: int, dtype: torch.dtype, gradients: list | None = None) -> None:
    for step in steps:
        loss = model(_batch(step, rank, dtype)).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        if gradients is not None:
            gradients.append({name: p.grad.full_tensor() for name, p in model.named_parameters()})
        optimizer.step()


def _whole(value):
    """A state dict with every DTensor gathered (collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {key: _whole(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole(item) for item in value]
    return value


def _sharded(dtype: torch.dtype, mesh, seed: int = 0):
    from torch.distributed.fsdp import fully_shard

    model = _model(dtype, seed)
    fully_shard(model, mesh=mesh)
    return model


def _on_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        results = {}
        for name, (dtype, options, resumed) in _cases().items():
            model = _sharded(dtype, mesh)
            initial = {n: p.full_tensor() for n, p in model.named_parameters()}
            optimizer = _optimizer(name, options, model.named_parameters(), seed=100 + rank)  # seeds differ
            gradients = []
            _train(model, optimizer, range(SAVE_AT), rank, dtype, gradients)
            checkpoint = os.path.join(out_dir, f"checkpoint-{name}")
            if resumed:
                model_state, optimizer_state = get_state_dict(model, optimizer)
                dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)
            _train(model, optimizer, range(SAVE_AT, STEPS), rank, dtype, gradients)
            whole = _whole(optimizer.state_dict())
            # The whole state dict loads into a sharded optimizer too (each rank cuts its pieces).
            reloaded = _optimizer(name, options, model.named_parameters(), seed=5)
            reloaded.load_state_dict(whole)
            results[name] = {"initial": initial, "gradients": gradients,
                             "final": {n: p.full_tensor() for n, p in model.named_parameters()},
                             "state_dict": whole, "reloaded": _whole(reloaded.state_dict())}
            if resumed:
                # A fresh model and optimizer (other initial values, other seeds; DCP's get_state_dict steps the
                # optimizer once with lr 0 to make its state), loaded from the checkpoint, run on.
                model = _sharded(dtype, mesh, seed=7)
                optimizer = _optimizer(name, options, model.named_parameters(), seed=900 + rank)
                model_state, optimizer_state = get_state_dict(model, optimizer)
                state = {"model": model_state, "optimizer": optimizer_state}
                dcp.load(state, checkpoint_id=checkpoint)
                set_state_dict(model, optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optimizer"])
                _train(model, optimizer, range(SAVE_AT, STEPS), rank, dtype)
                results[name]["resumed"] = {n: p.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


def _single_device(name: str, options: dict, recorded: dict):
    """The single-device optimizer stepped with the recorded whole gradients, from the same initial values."""
    parameters = {n: torch.nn.Parameter(value.clone()) for n, value in recorded["initial"].items()}
    optimizer = _optimizer(name, options, parameters.items(), seed=100)
    for gradients in recorded["gradients"]:
        for n, parameter in parameters.items():
            parameter.grad = gradients[n].clone()
        optimizer.step()
    return parameters, optimizer


def _assert_states(actual, expected, exact: bool, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            if exact or not value.is_floating_point():
                assert torch.equal(actual[key], value), f"{what}/{key}"
            else:
                torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=f"{what}/{key}")
        else:
            assert actual[key] == value, f"{what}/{key}"


def _assert_same_structure(actual, expected, what: str) -> None:
    """Equal nested dicts / lists, tensors equal bit for bit."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), what
        for key, value in expected.items():
            _assert_same_structure(actual[key], value, f"{what}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), what
        for index, (item, value) in enumerate(zip(actual, expected)):
            _assert_same_structure(item, value, f"{what}/{index}")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), what
    else:
        assert actual == expected, what


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sharded_steps_equal_single_device_and_dcp_round_trips(world_size, tmp_path):
    mp.spawn(_on_rank, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    resumed_cases = 0
    for name, (_, options, resumed) in _cases().items():
        recorded = results[name]
        exact = name.startswith("collage") or any(f"-{projection}-" in name for projection in EXACT)
        parameters, optimizer = _single_device(name, options, recorded)
        for n, parameter in parameters.items():
            what = f"world {world_size}, {name}, {n}"
            assert not torch.equal(parameter.detach(), recorded["initial"][n]), what  # it trained
            if exact:
                assert torch.equal(recorded["final"][n], parameter.detach()), what
            else:
                torch.testing.assert_close(recorded["final"][n], parameter.detach(), rtol=1e-5, atol=1e-6, msg=what)
        _assert_same_structure(recorded["reloaded"], recorded["state_dict"], f"world {world_size}, {name} reloaded")
        # The gathered sharded state dict is a single-device one.
        loaded = _optimizer(name, options, parameters.items(), seed=5)
        loaded.load_state_dict(recorded["state_dict"])
        expected_states = {parameter: state for parameter, state in optimizer.state.items() if state}
        assert {parameter for parameter, state in loaded.state.items() if state} == expected_states.keys(), name
        for parameter, expected in expected_states.items():
            _assert_states(loaded.state[parameter], expected, exact, f"world {world_size}, {name} state")
        if name.startswith("frugal"):
            assert loaded._steps_taken == optimizer._steps_taken == STEPS
            assert torch.equal(loaded._generator.get_state(), optimizer._generator.get_state()), name
            assert loaded._active_blocks.keys() == optimizer._active_blocks.keys(), name
            for index, blocks in optimizer._active_blocks.items():
                assert torch.equal(loaded._active_blocks[index], blocks), name
        if resumed:  # torch.distributed.checkpoint: the resumed run ends where the uninterrupted one does
            resumed_cases += 1
            for n, value in recorded["final"].items():
                assert torch.equal(recorded["resumed"][n], value), f"world {world_size}, DCP {name}, {n}"
    assert resumed_cases == 7
