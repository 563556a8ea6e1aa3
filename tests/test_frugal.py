"""leanops.optim.FRUGAL: AdamW on a gradient subspace plus a state-free step on the rest (the reference backend,
CPU, fp32; tests/test_frugal_kernels.py holds the kernels to it).

Exactness claims are bit for bit (torch.equal) against torch.optim.AdamW(foreach=False) and signSGD written out.
"""
import functools
import io

import pytest
import torch

import leanops
from leanops.optim import frugal_param_groups

# The reference backend unless a test names another: "auto" would pick the C++ kernel on the CPU.
FRUGAL = functools.partial(leanops.optim.FRUGAL, backend="reference")

PROJECTIONS = ("blockwise", "columns", "rows", "random", "svd")
SHAPES = ((7, 11), (13, 5), (9,), (3, 4, 5))


def make_parameters(seed=0, shapes=SHAPES):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def gradients(step, shapes=SHAPES):
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def run(optimizer, parameters, steps, start=0, shapes=SHAPES):
    for step in range(start, start + steps):
        for parameter, gradient in zip(parameters, gradients(step, shapes)):
            parameter.grad = gradient.to(parameter.dtype)
        optimizer.step()


@pytest.mark.parametrize("projection", ["blockwise", "columns"])
@pytest.mark.parametrize("on_switch", ["reset", "project"])
def test_density_one_is_adamw_bit_for_bit(projection, on_switch):
    ours, theirs = make_parameters(), make_parameters()
    options = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    frugal = FRUGAL(ours, density=1.0, update_gap=3, projection=projection, on_switch=on_switch, **options)
    adamw = torch.optim.AdamW(theirs, foreach=False, **options)
    run(frugal, ours, 8)
    run(adamw, theirs, 8)
    for mine, reference in zip(ours, theirs):
        assert torch.equal(mine, reference)


def test_unsplit_group_is_adamw_bit_for_bit():
    ours, theirs = make_parameters(), make_parameters()
    frugal = FRUGAL([{"params": ours, "split": False}], lr=3e-3, weight_decay=0.05, density=0.3,
                    projection="random", update_gap=2)
    adamw = torch.optim.AdamW(theirs, lr=3e-3, weight_decay=0.05, foreach=False)
    run(frugal, ours, 6)
    run(adamw, theirs, 6)
    for mine, reference in zip(ours, theirs):
        assert torch.equal(mine, reference)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_density_zero_is_signsgd(projection):
    ours, expected = make_parameters(), [p.detach().clone() for p in make_parameters()]
    lr, weight_decay = 1e-2, 0.1
    frugal = FRUGAL(ours, lr=lr, weight_decay=weight_decay, density=0.0, update_gap=2, projection=projection)
    for step in range(5):
        grads = gradients(step)
        for parameter, gradient in zip(ours, grads):
            parameter.grad = gradient.clone()
        frugal.step()
        for value, gradient in zip(expected, grads):
            value.mul_(1 - lr * weight_decay).add_(gradient.sign(), alpha=-lr)
    for mine, reference in zip(ours, expected):
        assert torch.equal(mine, reference)
    assert frugal.state_bytes() == sum(
        state["indices"].numel() * 4 for state in frugal.state.values() if "indices" in state)


@pytest.mark.parametrize("projection", ["columns", "rows"])
@pytest.mark.parametrize("state_free", ["none", "signsgd"])
def test_subspace_coordinates_get_adamw_of_the_submatrix(projection, state_free):
    shape = (9, 12)
    weight = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    start = weight.detach().clone()
    options = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    frugal = FRUGAL([weight], density=0.25, update_gap=100, projection=projection, state_free=state_free,
                    **options)
    dim = 1 if projection == "columns" else 0
    weight.grad = gradients(0, [shape])[0]
    frugal.step()
    indices = frugal.state[weight]["indices"]
    assert indices.dtype == torch.int32 and indices.numel() == round(0.25 * shape[dim])
    sub = torch.nn.Parameter(start.index_select(dim, indices.long()))
    adamw = torch.optim.AdamW([sub], foreach=False, **options)
    sub.grad = gradients(0, [shape])[0].index_select(dim, indices.long())
    adamw.step()
    expected_rest = start.clone()
    for step in range(1, 6):
        gradient = gradients(step, [shape])[0]
        weight.grad = gradient.clone()
        frugal.step()
        sub.grad = gradient.index_select(dim, indices.long())
        adamw.step()
    assert torch.equal(weight.detach().index_select(dim, indices.long()), sub.detach())
    complement = torch.ones(shape[dim], dtype=torch.bool)
    complement[indices.long()] = False
    rest = weight.detach().index_select(dim, complement.nonzero().flatten())
    if state_free == "none":
        assert torch.equal(rest, expected_rest.index_select(dim, complement.nonzero().flatten()))
    else:
        for step in range(6):
            expected_rest.add_(gradients(step, [shape])[0].sign(), alpha=-options["lr"])
        assert torch.equal(rest, expected_rest.index_select(dim, complement.nonzero().flatten()))


def test_state_free_none_blockwise_leaves_inactive_tensors():
    ours = make_parameters()
    start = [p.detach().clone() for p in ours]
    frugal = FRUGAL(ours, density=0.5, update_gap=100, projection="blockwise", state_free="none")
    run(frugal, ours, 3)
    active = set(frugal._active_blocks[0].tolist())
    assert len(active) == 2
    for position, (parameter, initial) in enumerate(zip(ours, start)):
        assert torch.equal(parameter, initial) != (position in active)


@pytest.mark.parametrize("projection", ["columns", "rows"])
def test_switch_every_update_gap_reset_and_project(projection):
    shape = (10, 14)
    for on_switch in ("reset", "project"):
        weight = torch.nn.Parameter(torch.randn(shape))
        frugal = FRUGAL([weight], density=0.5, update_gap=3, projection=projection, on_switch=on_switch,
                        betas=(0.9, 0.999))
        dim = 1 if projection == "columns" else 0
        run(frugal, [weight], 3, shapes=[shape])
        state = frugal.state[weight]
        old_indices = state["indices"].clone()
        old_moments = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        assert state["step"] == 3
        run(frugal, [weight], 1, start=3, shapes=[shape])  # the 4th step switches
        new_indices = state["indices"]
        assert not torch.equal(new_indices, old_indices)
        gradient = gradients(3, [shape])[0].index_select(dim, new_indices.long())
        if on_switch == "reset":
            assert state["step"] == 1
            assert torch.equal(state["exp_avg"], torch.zeros_like(gradient).lerp_(gradient, 0.1))
            continue
        assert state["step"] == 4
        old_position = {index: position for position, index in enumerate(old_indices.tolist())}
        for position, index in enumerate(new_indices.tolist()):
            previous_m = (old_moments[0].select(dim, old_position[index]) if index in old_position
                          else torch.zeros(shape[1 - dim]))
            previous_v = (old_moments[1].select(dim, old_position[index]) if index in old_position
                          else torch.zeros(shape[1 - dim]))
            g = gradient.select(dim, position)
            assert torch.equal(state["exp_avg"].select(dim, position), previous_m.clone().lerp_(g, 0.1))
            assert torch.equal(state["exp_avg_sq"].select(dim, position),
                               previous_v.clone().mul_(0.999).addcmul_(g, g, value=1 - 0.999))


def test_switch_blockwise_and_projectors():
    ours = make_parameters(shapes=[(6, 8)] * 4)
    frugal = FRUGAL(ours, density=0.5, update_gap=2, projection="blockwise", block_order="ascending",
                    on_switch="reset")
    run(frugal, ours, 1, shapes=[(6, 8)] * 4)
    assert frugal._active_blocks[0].tolist() == [0, 1]
    run(frugal, ours, 2, start=1, shapes=[(6, 8)] * 4)
    assert frugal._active_blocks[0].tolist() == [2, 3]
    assert set(frugal.state) == {ours[2], ours[3]} and frugal.state[ours[2]]["step"] == 1
    weight = torch.nn.Parameter(torch.randn(6, 8))
    frugal = FRUGAL([weight], density=0.5, update_gap=2, projection="random", on_switch="project")
    run(frugal, [weight], 2, shapes=[(6, 8)])
    first = frugal.state[weight]["projector"].clone()
    assert torch.allclose(first.T @ first, torch.eye(3), atol=1e-6)
    run(frugal, [weight], 1, start=2, shapes=[(6, 8)])
    assert not torch.equal(frugal.state[weight]["projector"], first) and frugal.state[weight]["step"] == 3


@pytest.mark.parametrize("projection", ["columns", "rows", "random", "svd", "blockwise"])
def test_state_bytes_match_density(projection):
    shapes = [(64, 96)] * 4
    parameters = make_parameters(shapes=shapes)
    density = 0.25
    frugal = FRUGAL(parameters, density=density, projection=projection)
    run(frugal, parameters, 1, shapes=shapes)
    numel = sum(p.numel() for p in parameters)
    if projection == "columns":
        index_bytes = 4 * 4 * 24
    elif projection == "rows":
        index_bytes = 4 * 4 * 16
    elif projection in ("random", "svd"):
        index_bytes = 4 * (64 * 16) * 4  # the (m x r) projectors, float32
    else:
        index_bytes = 0
    assert frugal.state_bytes() == pytest.approx(density * 8 * numel + index_bytes, rel=0.02)
    for state in frugal.state.values():
        if "indices" in state:
            assert state["indices"].dtype == torch.int32


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("on_switch", ["reset", "project"])
@pytest.mark.parametrize("precision", ["fp32", "collage"])
def test_checkpoint_round_trip_bit_for_bit(projection, on_switch, precision):
    """precision="collage" runs on bfloat16 parameters: the compensation travels in the checkpoint too."""
    options = dict(lr=1e-2, weight_decay=0.01, density=0.4, update_gap=3, projection=projection,
                   on_switch=on_switch, seed=7, precision=precision)
    dtype = torch.bfloat16 if precision == "collage" else torch.float32

    def make():
        return [torch.nn.Parameter(p.detach().to(dtype)) for p in make_parameters()]

    straight = make()
    optimizer = FRUGAL(straight, **options)
    run(optimizer, straight, 10)

    first = make()
    optimizer = FRUGAL(first, **options)
    run(optimizer, first, 6)  # the next step (the 7th) switches
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(value.clone()) for value in checkpoint["params"]]
    optimizer = FRUGAL(resumed, **{**options, "seed": 12345})  # the generator state comes from the checkpoint
    optimizer.load_state_dict(checkpoint["optimizer"])
    run(optimizer, resumed, 4, start=6)
    for mine, reference in zip(resumed, straight):
        assert torch.equal(mine, reference)


def test_frugal_param_groups_on_a_tiny_model():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, 8)
            self.up = torch.nn.Linear(8, 16)
            self.down = torch.nn.Linear(16, 8, bias=False)
            self.norm = torch.nn.LayerNorm(8)
            self.lm_head = torch.nn.Linear(8, 20, bias=False)

    model = Tiny()
    groups = frugal_param_groups(model)
    split = {id(p) for g in groups if g["split"] for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in split}
    assert names == {"up.weight", "down.weight"}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    model.lm_head.weight = model.embed.weight  # tied, and not named like a head
    model.out = model.lm_head
    del model.lm_head
    groups = frugal_param_groups(model)
    names = {name for name, p in model.named_parameters()
             if any(p is q for g in groups if g["split"] for q in g["params"])}
    assert names == {"up.weight", "down.weight"}
    FRUGAL(groups, projection="columns")


@pytest.mark.parametrize("argument, value", [
    ("density", 1.5), ("density", -0.1), ("projection", "diagonal"), ("block_order", "sideways"),
    ("state_free", "adam"), ("on_switch", "keep"), ("precision", "fp8"), ("update_gap", 0), ("update_gap", 1.5),
    ("lr", -1e-3), ("eps", float("nan")), ("weight_decay", -1.0), ("betas", (0.9, 1.0)),
    ("state_free_lr_scale", -1.0), ("state_full_lr_scale", float("inf")), ("seed", "zero"), ("backend", "gpu"),
])
def test_bad_input_names_the_argument(argument, value):
    with pytest.raises(ValueError, match=f"'{argument}'"):
        FRUGAL(make_parameters(), **{argument: value})


def test_bad_group_option_names_the_argument_and_group():
    with pytest.raises(ValueError, match=r"'density' \(parameter group 1\)"):
        FRUGAL([{"params": make_parameters()[:1]}, {"params": make_parameters()[1:], "density": 2.0}])
    with pytest.raises(ValueError, match="'split'"):
        FRUGAL([{"params": make_parameters(), "split": "yes"}])


def test_unusable_backends_and_unknown_precision_are_refused():
    with pytest.raises(ValueError, match="'precision'"):
        FRUGAL(make_parameters(), precision="bf16")
    if not torch.cuda.is_available():
        with pytest.raises(leanops.BackendUnavailableError, match="backend 'cuda' cannot serve"):
            FRUGAL(make_parameters(), backend="cuda")
    # float64 parameters: the kernels support float32, bfloat16 and float16 only.
    with pytest.raises(leanops.BackendUnavailableError, match="float64"):
        FRUGAL([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], backend="cpu")
    FRUGAL(make_parameters(), backend="reference")


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_random_projection_project_carries_moments(shape):
    weight = torch.nn.Parameter(torch.randn(shape))
    frugal = FRUGAL([weight], density=0.5, update_gap=2, projection="random", on_switch="project",
                    betas=(0.9, 0.999))
    run(frugal, [weight], 2, shapes=[shape])
    state = frugal.state[weight]
    old_projector, old_m, old_v = state["projector"].clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    run(frugal, [weight], 1, start=2, shapes=[shape])
    new_projector = state["projector"]
    mixing = new_projector.T @ old_projector
    gradient = gradients(2, [shape])[0]
    if shape[0] <= shape[1]:
        carried_m, carried_v = mixing @ old_m, (mixing * mixing) @ old_v
        projected = new_projector.T @ gradient
    else:
        carried_m, carried_v = old_m @ mixing.T, old_v @ (mixing * mixing).T
        projected = gradient @ new_projector
    assert state["step"] == 3
    torch.testing.assert_close(state["exp_avg"], carried_m.lerp(projected, 0.1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(state["exp_avg_sq"], carried_v * 0.999 + 0.001 * projected ** 2,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("projection", ["blockwise", "columns", "random"])
def test_collage_precision_keeps_the_updates_that_bfloat16_rounds_away(projection):
    """precision="collage": bfloat16 parameters ~1 and lr 1e-4 (each update far below bf16's half-ulp): the stored
    pair realises the float32 FRUGAL run's change to within 1%, while rounding to bfloat16 after each step (precision
    "fp32" on bfloat16 parameters) loses all of it. Same seed, hence the same subspaces, in all three runs."""
    generator = torch.Generator().manual_seed(11)
    starts = [(1 + 0.5 * torch.rand(shape, generator=generator)).bfloat16() for shape in ((8, 12), (12, 8), (6, 6))]
    # state_free="sgd": updates that vary from step to step, as AdamW's do. A constant update (signSGD's) repeats
    # one rounding error of the pair with one sign and can miss by a few percent (tests/test_mcf_grow_scale.py).
    options = dict(lr=1e-4, density=0.5, update_gap=5, projection=projection, state_free="sgd", seed=3)
    exact = [torch.nn.Parameter(start.float()) for start in starts]
    ours = [torch.nn.Parameter(start.clone()) for start in starts]
    plain = [torch.nn.Parameter(start.clone()) for start in starts]
    optimizers = [FRUGAL(exact, **options), FRUGAL(ours, precision="collage", **options), FRUGAL(plain, **options)]
    for _ in range(200):
        grads = [(1 + 0.5 * torch.randn(start.shape, generator=generator)).bfloat16() for start in starts]
        for parameters, cast in ((exact, torch.float32), (ours, torch.bfloat16), (plain, torch.bfloat16)):
            for parameter, grad in zip(parameters, grads):
                parameter.grad = grad.to(cast)
        for optimizer in optimizers:
            optimizer.step()
    intended = torch.cat([(p.detach().double() - s.double()).flatten() for p, s in zip(exact, starts)])
    realised = torch.cat([(p.detach().double() + optimizers[1].state[p]["param_lo"].double()
                           - s.double()).flatten() for p, s in zip(ours, starts)])
    lost = torch.cat([(p.detach().double() - s.double()).flatten() for p, s in zip(plain, starts)])
    ratio = ((realised * intended).sum() / (intended * intended).sum()).item()
    assert abs(ratio - 1) < 0.01, ratio
    assert ((lost * intended).sum() / (intended * intended).sum()).abs().item() < 0.05
