"""leanops.optim.FRUGAL: AdamW on a gradient subspace plus a state-free step on the rest: the reference backend
(CPU, fp32) against torch, then the optimizer on every kernel provider against the reference backend (last section).

Exactness claims are bit for bit (torch.equal) against torch.optim.AdamW(foreach=False) and signSGD written out.
"""
import io

import pytest
import torch

import leanops
from helpers import provider_cases
from leanops import ops
from leanops.optim.frugal.options import resolve_backend
from leanops.optim import frugal_param_groups

def FRUGAL(params, **options):
    """The reference backend unless a test names another ("auto" would pick the C++ kernel on the CPU). A list of
    tensors goes as one explicit group: these tests split every tensor (bare parameters would split the 2-D ones
    only: tests/frugal/test_frugal_torch_conventions.py)."""
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [{"params": params}]
    return leanops.optim.FRUGAL(params, **{"backend": "reference", **options})

PROJECTIONS = ("blockwise", "columns", "rows", "random", "svd")
SHAPES = ((7, 11), (13, 5), (9,), (3, 4, 5))


def make_parameters(seed=0, shapes=SHAPES, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device=device, dtype=dtype))
            for shape in shapes]


def gradients(step, shapes=SHAPES):
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def run(optimizer, parameters, steps, start=0, shapes=SHAPES):
    for step in range(start, start + steps):
        for parameter, gradient in zip(parameters, gradients(step, shapes)):
            parameter.grad = gradient.to(parameter)
        optimizer.step()


@pytest.mark.parametrize("projection", ["blockwise", "columns", "rows"])
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


@pytest.mark.parametrize("projection", ["random", "svd"])
@pytest.mark.parametrize("on_switch", ["reset", "project"])
def test_density_one_random_and_svd_are_adamw(projection, on_switch):
    """At density 1 the projector is the identity (the whole space in the parameter's own coordinates: a rotated
    basis would be AdamW in rotated coordinates, 5% and more apart after a few switches), kept across switches with
    its moments: AdamW to float32 rounding (the update goes through I @ U, the remainder G - I I^T G is 0)."""
    ours, theirs = make_parameters(), make_parameters()
    options = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    frugal = FRUGAL(ours, density=1.0, update_gap=3, projection=projection, on_switch=on_switch, **options)
    adamw = torch.optim.AdamW(theirs, foreach=False, **options)
    run(frugal, ours, 9)
    run(adamw, theirs, 9)
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6)
    for parameter in ours:
        state = frugal.state[parameter]
        assert state["step"] == 9
        assert torch.equal(state["projector"], torch.eye(state["projector"].shape[0]))


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
    frugal = FRUGAL(ours, weight_decay=0.0, density=0.5, update_gap=100, projection="blockwise", state_free="none")
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


def assert_resume_is_bit_exact(options, dtype, steps, resume_at, shapes=SHAPES, device="cpu"):
    """`steps` steps straight, and `resume_at` steps, a checkpoint (parameters and optimizer, through torch.save),
    a fresh optimizer of another seed (the generator state comes from the checkpoint) loaded from it, the rest:
    the same parameters and compensation, bit for bit."""
    straight = make_parameters(shapes=shapes, dtype=dtype, device=device)
    optimizer = FRUGAL(straight, **options)
    run(optimizer, straight, steps, shapes=shapes)

    first = make_parameters(shapes=shapes, dtype=dtype, device=device)
    interrupted = FRUGAL(first, **options)
    run(interrupted, first, resume_at, shapes=shapes)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": interrupted.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(value.clone()) for value in checkpoint["params"]]
    second = FRUGAL(resumed, **{**options, "seed": 12345})
    second.load_state_dict(checkpoint["optimizer"])
    run(second, resumed, steps - resume_at, start=resume_at, shapes=shapes)
    for mine, reference in zip(resumed, straight):
        assert torch.equal(mine, reference)
        if "param_lo" in optimizer.state[reference]:
            assert torch.equal(second.state[mine]["param_lo"], optimizer.state[reference]["param_lo"])


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("on_switch", ["reset", "project"])
@pytest.mark.parametrize("precision", ["fp32", "collage"])
def test_checkpoint_round_trip_bit_for_bit(projection, on_switch, precision):
    """precision="collage" runs on bfloat16 parameters: the compensation travels in the checkpoint too. The 7th
    step, the first after the resume, switches."""
    options = dict(lr=1e-2, weight_decay=0.01, density=0.4, update_gap=3, projection=projection,
                   on_switch=on_switch, seed=7, precision=precision)
    assert_resume_is_bit_exact(options, torch.bfloat16 if precision == "collage" else torch.float32, steps=10,
                               resume_at=6)


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


# ---------------------------------------------------------------------------------------------------------------
# The optimizer on every kernel provider (the C++ CPU kernel, the CUDA kernel with a GPU, the Triton kernel: under
# the interpreter on CPU tensors): it follows the reference backend over steps and subspace switches, for every
# projection (to float32 rounding: the reference is torch.optim.AdamW's own operations), keeps ρ=0 signSGD and
# "none" exact, and resumes from a checkpoint bit for bit across a switch. tests/frugal/test_frugal_primitives.py
# holds the kernels' primitive to the oracle's bits, sizes of several chunks included.

KERNELS = provider_cases(ops.FRUGAL, backends_=("cpu", "cuda", "triton"))
# Taller and wider matrices (both sides of the random/svd projection), 1-D, square, one row, 3-D.
KERNEL_SHAPES = ((13, 7), (6, 17), (5,), (9, 9), (1, 11), (2, 3, 4))
# update_gap 2 over 3 steps: the first draw, a step in the same subspace (the moments go on), a switch.
SWITCH_GAP, SWITCH_STEPS = 2, 3


def _value(parameter, optimizer):
    """The parameter as float32, with its Collage compensation when it has one."""
    value = parameter.detach().float()
    low = optimizer.state.get(parameter, {}).get("param_lo")
    return value + low.float() if low is not None else value


PRECISIONS = [pytest.param(torch.float32, "fp32", id="fp32"),
              pytest.param(torch.bfloat16, "collage", id="bf16-collage")]


@pytest.mark.parametrize("backend, device", KERNELS)
@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("dtype, precision", PRECISIONS)
@pytest.mark.gpu_check
def test_optimizer_follows_the_reference_across_switches(backend, device, projection, dtype, precision):
    """Every mode of the kernel (blockwise: ADAMW and FREE; columns / rows: COLUMNS / ROWS; random / svd: ADAMW on
    the projected gradient, then FREE with an addend), both state-free rules and both switch policies, in float32
    and compensated bfloat16."""
    for state_free, on_switch in (("signsgd", "reset"), ("sgd", "project")):
        options = dict(lr=1e-2, weight_decay=0.1, density=0.4, update_gap=SWITCH_GAP, projection=projection,
                       state_free=state_free, on_switch=on_switch, precision=precision, seed=5)
        mine = make_parameters(shapes=KERNEL_SHAPES, dtype=dtype, device=device)
        theirs = make_parameters(shapes=KERNEL_SHAPES, dtype=dtype)
        kernel = FRUGAL(mine, **options, backend=backend)
        reference = FRUGAL(theirs, **options)
        run(kernel, mine, SWITCH_STEPS, shapes=KERNEL_SHAPES)
        run(reference, theirs, SWITCH_STEPS, shapes=KERNEL_SHAPES)
        for index, (a, b) in enumerate(zip(mine, theirs)):
            # float32 rounding apart (the reference is torch's AdamW operations, the kernels the oracle's order):
            # a few ulp of the parameters; compensated pairs carry float32-level values too.
            torch.testing.assert_close(_value(a, kernel).cpu(), _value(b, reference), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{state_free}/{on_switch} parameter {index}: {m}")
            for key in ("exp_avg", "exp_avg_sq", "step", "indices", "projector"):
                want = reference.state.get(b, {}).get(key)
                got = kernel.state.get(a, {}).get(key)
                assert (want is None) == (got is None), key
                if isinstance(want, torch.Tensor):
                    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
                else:
                    assert got == want


@pytest.mark.parametrize("backend, device", KERNELS)
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_kernel_density_zero_is_signsgd_and_none_leaves_the_remainder(backend, device, projection):
    parameters = make_parameters(shapes=KERNEL_SHAPES, device=device)
    initial = [p.detach().clone() for p in parameters]
    optimizer = FRUGAL(parameters, lr=1e-2, weight_decay=0.1, density=0.0, projection=projection, backend=backend)
    run(optimizer, parameters, 1, shapes=KERNEL_SHAPES)
    for parameter, start, gradient in zip(parameters, initial, gradients(0, KERNEL_SHAPES)):
        expected = start * torch.tensor(1 - 1e-2 * 0.1) - torch.tensor(1e-2) * gradient.to(device).sign()
        assert torch.equal(parameter.detach(), expected)
    parameters = make_parameters(shapes=KERNEL_SHAPES, device=device)
    initial = [p.detach().clone() for p in parameters]
    optimizer = FRUGAL(parameters, lr=1e-2, weight_decay=0.0, density=0.5, projection=projection, state_free="none",
                       backend=backend)
    run(optimizer, parameters, 2, shapes=KERNEL_SHAPES)
    for parameter, start in zip(parameters, initial):
        if projection == "blockwise":
            moved = parameter in optimizer.state and "exp_avg" in optimizer.state[parameter]
            assert torch.equal(parameter.detach(), start) != moved
        elif projection in ("columns", "rows"):
            dim = 1 if projection == "columns" else 0
            matrix, begin = parameter.detach().view(parameter.shape[0], -1), start.view(parameter.shape[0], -1)
            if parameter.dim() == 1:
                matrix, begin = parameter.detach().view(1, -1), start.view(1, -1)
            outside = torch.ones(matrix.shape[dim], dtype=torch.bool, device=device)
            outside[optimizer.state[parameter]["indices"].long()] = False
            assert torch.equal(matrix.index_select(dim, outside.nonzero().flatten()),
                               begin.index_select(dim, outside.nonzero().flatten()))


@pytest.mark.parametrize("backend, device", KERNELS)
@pytest.mark.parametrize("projection", ["blockwise", "columns", "svd"])
def test_kernel_checkpoint_resume_is_bit_exact_across_a_switch(backend, device, projection):
    """Resumed after step 2 of 4 with update_gap 2: the switch at step 3 comes after the resume."""
    options = dict(lr=1e-2, density=0.5, update_gap=SWITCH_GAP, projection=projection, precision="collage",
                   seed=9, backend=backend)
    assert_resume_is_bit_exact(options, torch.bfloat16, steps=4, resume_at=2, shapes=KERNEL_SHAPES, device=device)


@pytest.mark.parametrize("backend, device", [pytest.param("reference", "cpu", id="reference-cpu")] + KERNELS)
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_channels_last_parameters(backend, device, projection):
    """A conv weight stepped channels-last keeps its layout and gets the bits of the same values stepped contiguous
    (the matrix view is the logical one; the kernels step a contiguous copy), in float32 and compensated bfloat16."""
    generator = torch.Generator().manual_seed(21)
    shape = (4, 3, 2, 3)
    for dtype, precision in ((torch.float32, "fp32"), (torch.bfloat16, "collage")):
        start = torch.randn(shape, generator=generator).to(dtype)
        grads = [torch.randn(shape, generator=generator).to(dtype) for _ in range(SWITCH_STEPS)]
        results = []
        for memory_format in (torch.contiguous_format, torch.channels_last):
            parameter = torch.nn.Parameter(start.clone().to(device=device, memory_format=memory_format))
            others = make_parameters(shapes=((5, 3),), dtype=dtype, device=device)  # blockwise needs company
            optimizer = FRUGAL([parameter] + others, lr=1e-2, density=0.5, update_gap=SWITCH_GAP,
                               projection=projection, precision=precision, seed=2, backend=backend)
            for grad in grads:
                parameter.grad = grad.to(device)
                others[0].grad = torch.ones_like(others[0])
                optimizer.step()
            assert parameter.is_contiguous(memory_format=memory_format)
            results.append(_value(parameter, optimizer).cpu())
        assert torch.equal(results[0], results[1]), precision


def test_auto_picks_the_cpu_kernel_and_float64_the_reference():
    cpu = torch.device("cpu")
    reason = ops.FRUGAL.unavailable_reason("cpu", cpu, torch.float32)
    if reason is not None:
        pytest.skip(f"no FRUGAL cpu kernel: {reason}")
    parameter = torch.nn.Parameter(torch.zeros(3))
    assert resolve_backend("auto", parameter) == "cpu"
    assert resolve_backend("auto", parameter.double()) == "reference"
    with pytest.raises(leanops.BackendUnavailableError, match="float64"):
        resolve_backend("cpu", parameter.double())


@pytest.mark.parametrize("backend,device", provider_cases(ops.FRUGAL, devices=("cpu",)))
@pytest.mark.parametrize("density", [0.0, 0.5])
def test_signsgd_nan_gradient_reaches_the_parameter_on_every_backend(backend, device, density):
    """signSGD keeps a NaN gradient (reference.frugal.sign): the optimizer's reference backend too, not
    torch.sign(nan) = 0, which would drop it silently."""
    parameter = torch.nn.Parameter(torch.ones(4, 6))
    optimizer = leanops.optim.FRUGAL([{"params": [parameter]}], lr=0.1, density=density, projection="columns",
                                     state_free="signsgd", backend=backend)
    gradient = torch.full((4, 6), 0.5)
    gradient[1, 2] = float("nan")
    parameter.grad = gradient
    optimizer.step()
    nan = torch.isnan(parameter.detach())
    assert bool(nan.any()), f"{backend}: the NaN gradient was dropped"
    assert bool(torch.isfinite(parameter.detach()[~nan]).all())
