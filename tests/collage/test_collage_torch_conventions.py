"""leanops.optim.CollageAdamW takes what torch.optim.AdamW takes (signature and defaults, tensor lr, maximize, the
flags), works with its schedulers, add_param_group and zero_grad, and gives float32/float64 parameters of a bf16
model torch.optim.AdamW's own update in the same step (issue 16). Kernel cases run on every CPU provider."""
import inspect
import io

import pytest
import torch

from helpers import provider_cases, interpreted
from leanops import ops
from leanops.optim import CollageAdamW

PROVIDERS = provider_cases(ops.COLLAGE, devices=("cpu",))
# The schedulers only change what the step reads from the groups: the compiled CPU kernel stands for the kernels
# there (the interpreted Triton ones are slow; maximize and tensor lr run on them).
HOST_PROVIDERS = provider_cases(ops.COLLAGE, devices=("cpu",), backends_=("reference", "cpu"))


def _gradients(shapes, dtypes, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator).to(dtype) for shape, dtype in zip(shapes, dtypes)]
            for _ in range(steps)]


def _parameters(shapes, dtypes, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape, dtype in
            zip(shapes, dtypes)]


def _run(optimizer, parameters, gradients, scheduler=None, negate=False):
    for step_gradients in gradients:
        for parameter, gradient in zip(parameters, step_gradients):
            parameter.grad = -gradient if negate else gradient.clone()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _assert_same_state(first, second, parameters_first, parameters_second):
    for a, b in zip(parameters_first, parameters_second):
        assert torch.equal(a, b)
        state_a, state_b = first.state[a], second.state[b]
        assert state_a.keys() == state_b.keys()
        for key, value in state_a.items():
            assert torch.equal(value, state_b[key]) if isinstance(value, torch.Tensor) else value == state_b[key], key


def test_signature_and_defaults_are_torch_adamws():
    """Every argument of torch.optim.AdamW, with its default and kind (positional or keyword-only); the default
    weight_decay is 0.01 (it was 0.0 before issue 16)."""
    torch_parameters = inspect.signature(torch.optim.AdamW.__init__).parameters
    ours = inspect.signature(CollageAdamW.__init__).parameters
    for name, parameter in torch_parameters.items():
        assert name in ours, name
        assert ours[name].default == parameter.default, name
        assert ours[name].kind == parameter.kind, name
    optimizer = CollageAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 0.01 and group["lr"] == 1e-3 and group["eps"] == 1e-8
    assert group["betas"] == (0.9, 0.999) and group["maximize"] is False
    assert group["foreach"] is None and group["fused"] is None


@pytest.mark.parametrize("name", ["amsgrad", "capturable", "differentiable"])
def test_refused_options_are_named_with_the_reason(name):
    parameter = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=rf"argument '{name}'=True is not supported: "):
        CollageAdamW([parameter], **{name: True})
    with pytest.raises(ValueError, match=rf"argument '{name}' \(parameter group 1\)=True is not supported"):
        CollageAdamW([{"params": [parameter]},
                      {"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], name: True}])


def test_flags_are_accepted_or_refused_by_name():
    parameter = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    for foreach in (None, True, False):
        for fused in (None, True, False):
            if foreach and fused:
                with pytest.raises(ValueError, match=r"'foreach' and 'fused'"):
                    CollageAdamW([parameter], foreach=foreach, fused=fused)
            else:
                CollageAdamW([parameter], foreach=foreach, fused=fused)
    with pytest.raises(ValueError, match=r"argument 'maximize'"):
        CollageAdamW([parameter], maximize="yes")
    with pytest.raises(ValueError, match=r"argument 'foreach'"):
        CollageAdamW([parameter], foreach=1)
    with pytest.raises(ValueError, match=r"argument 'lr'"):
        CollageAdamW([parameter], lr=torch.tensor([1e-3, 1e-3]))


@pytest.mark.parametrize("backend, device", PROVIDERS)
@pytest.mark.parametrize("mode", ["light", "plus"])
def test_maximize_is_minimizing_the_negated_gradient_bit_for_bit(backend, device, mode):
    """maximize=True on g equals maximize=False on -g, bit for bit, for 16-bit (kernels) and float32 (torch's AdamW)
    parameters; the caller's gradients are left as they were."""
    shapes = [(5, 7), (13,), (4, 3)]
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    gradients = _gradients(shapes, dtypes, 3)
    runs = []
    for maximize in (True, False):
        parameters = _parameters(shapes, dtypes)
        optimizer = CollageAdamW(parameters, lr=1e-2, weight_decay=0.1, mode=mode, maximize=maximize,
                                 backend=backend)
        _run(optimizer, parameters, gradients, negate=not maximize)
        runs.append((optimizer, parameters))
    _assert_same_state(runs[0][0], runs[1][0], runs[0][1], runs[1][1])
    for parameter, gradient in zip(runs[0][1], gradients[-1]):
        assert torch.equal(parameter.grad, gradient)  # not negated in place
    # and it moved along +g: the first step of a fresh run raises <g, theta>
    parameters = _parameters(shapes, dtypes)
    starts = [parameter.detach().clone() for parameter in parameters]
    optimizer = CollageAdamW(parameters, lr=1e-2, weight_decay=0.0, maximize=True, backend=backend)
    _run(optimizer, parameters, gradients[:1])
    for parameter, start, gradient in zip(parameters, starts, gradients[0]):
        assert ((parameter.detach().double() - start.double()) * gradient.double()).sum() > 0


@pytest.mark.parametrize("backend, device", PROVIDERS)
def test_tensor_lr_equals_float_lr(backend, device):
    shapes, dtypes = [(9,), (3, 4)], [torch.bfloat16, torch.float32]
    gradients = _gradients(shapes, dtypes, 3)
    runs = []
    for lr in (3e-3, torch.tensor(3e-3)):
        parameters = _parameters(shapes, dtypes)
        optimizer = CollageAdamW(parameters, lr=lr, betas=(0.8, 0.95), backend=backend)
        _run(optimizer, parameters, gradients)
        runs.append((optimizer, parameters))
    # bfloat16: the kernels read float(lr), the same float; float32: torch's AdamW with that lr
    _assert_same_state(runs[0][0], runs[1][0], runs[0][1], runs[1][1])
    assert isinstance(runs[1][0].param_groups[0]["lr"], torch.Tensor)


SCHEDULERS = {
    "LambdaLR": lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step),
    "CosineAnnealingLR": lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4),
    # cycle_momentum: it writes beta1 into group["betas"] at every step too
    "OneCycleLR": lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=6,
                                                                        cycle_momentum=True),
}


@pytest.mark.parametrize("backend, device", HOST_PROVIDERS)
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_schedulers_drive_lr_and_betas(backend, device, scheduler, tensor_lr):
    """A scheduler on a mixed bf16/float32 CollageAdamW: the float32 parameters follow torch.optim.AdamW under the
    same scheduler bit for bit; the bfloat16 ones equal a CollageAdamW whose lr and betas are set by hand to the
    values the scheduler gave at each step."""
    shapes, dtypes = [(6, 5), (7,)], [torch.bfloat16, torch.float32]
    gradients = _gradients(shapes, dtypes, 5)
    lr = torch.tensor(1e-3) if tensor_lr else 1e-3
    parameters = _parameters(shapes, dtypes)
    optimizer = CollageAdamW(parameters, lr=lr, backend=backend)
    schedule = SCHEDULERS[scheduler](optimizer)
    seen = []
    for step_gradients in gradients:
        seen.append((float(optimizer.param_groups[0]["lr"]), tuple(map(float, optimizer.param_groups[0]["betas"]))))
        for parameter, gradient in zip(parameters, step_gradients):
            parameter.grad = gradient.clone()
        optimizer.step()
        schedule.step()
    assert len({value for value, _ in seen}) > 1  # the scheduler did move lr

    torch_parameter = _parameters(shapes, dtypes)[1]
    adamw = torch.optim.AdamW([torch_parameter], lr=torch.tensor(1e-3) if tensor_lr else 1e-3)
    torch_schedule = SCHEDULERS[scheduler](adamw)
    for step_gradients in gradients:
        torch_parameter.grad = step_gradients[1].clone()
        adamw.step()
        torch_schedule.step()
    assert torch.equal(parameters[1], torch_parameter)

    by_hand = _parameters(shapes, dtypes)[0]
    manual = CollageAdamW([by_hand], lr=1e-3, backend=backend)
    for (value, betas), step_gradients in zip(seen, gradients):
        manual.param_groups[0]["lr"], manual.param_groups[0]["betas"] = value, betas
        by_hand.grad = step_gradients[0].clone()
        manual.step()
    assert torch.equal(parameters[0], by_hand)


@pytest.mark.parametrize("backend, device", PROVIDERS)
def test_bf16_model_with_float32_norms_takes_one_optimizer(backend, device):
    """bfloat16 Linear weights and float32 LayerNorm (and a float64 scale) in one CollageAdamW: the float32/float64
    parameters' trajectory is torch.optim.AdamW's bit for bit (same hyperparameters), the bfloat16 ones a
    CollageAdamW's over just them; the state dict round-trips and the float32 states carry no compensation."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    model[0].to(torch.bfloat16)
    model[2].to(torch.bfloat16)
    scale = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    parameters = list(model.parameters()) + [scale]
    options = dict(lr=2e-2, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05)
    steps = 2 if interpreted(backend, device) else 4
    gradients = [[torch.randn(p.shape, dtype=p.dtype) for p in parameters] for _ in range(steps)]

    starts = [parameter.detach().clone() for parameter in parameters]
    optimizer = CollageAdamW(parameters, backend=backend, **options)
    _run(optimizer, parameters, gradients)

    plain_index = [i for i, p in enumerate(parameters) if p.dtype in (torch.float32, torch.float64)]
    compensated_index = [i for i, p in enumerate(parameters) if p.dtype == torch.bfloat16]
    assert len(plain_index) == 3 and len(compensated_index) == 4
    fresh_parameters = [torch.nn.Parameter(start.clone()) for start in starts]

    theirs = [fresh_parameters[i] for i in plain_index]
    adamw = torch.optim.AdamW(theirs, **options)
    _run(adamw, theirs, [[step[i] for i in plain_index] for step in gradients])
    for i, reference in zip(plain_index, theirs):
        assert torch.equal(parameters[i], reference)
        state = optimizer.state[parameters[i]]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["step"] == steps
        assert torch.equal(state["exp_avg"], adamw.state[reference]["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], adamw.state[reference]["exp_avg_sq"])

    ours = [fresh_parameters[i] for i in compensated_index]
    collage_only = CollageAdamW(ours, backend=backend, **options)
    _run(collage_only, ours, [[step[i] for i in compensated_index] for step in gradients])
    for i, reference in zip(compensated_index, ours):
        assert torch.equal(parameters[i], reference)
        assert torch.equal(optimizer.state[parameters[i]]["param_lo"], collage_only.state[reference]["param_lo"])

    # state dict: round-trips (through torch.save / weights_only), and a compensation for a float32 parameter is
    # refused by check_state_dict, naming the parameter and the key
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    again = CollageAdamW(parameters, backend=backend, **options)
    again.load_state_dict(saved)
    _assert_same_state(optimizer, again, parameters, parameters)
    norm_position = plain_index[0]
    saved["state"][norm_position]["param_lo"] = torch.zeros_like(parameters[norm_position])
    with pytest.raises(ValueError, match=rf"parameter {norm_position} of group 0: unexpected state 'param_lo'"):
        again.load_state_dict(saved)


def test_add_param_group_is_checked_like_the_constructor():
    parameter = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    optimizer = CollageAdamW([parameter], backend="reference")
    for group, match in (
            ({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], "lr": -1.0}, r"argument 'lr'"),
            ({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], "mode": "x"}, r"'mode'"),
            ({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], "betas": (0.9, 1.5)},
             r"'betas'"),
            ({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], "amsgrad": True},
             r"'amsgrad' \(parameter group 1\)=True"),
            ({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], "capturable": True},
             r"'capturable'"),
            ({"params": [torch.zeros(2, dtype=torch.int32)]}, r"parameter 0 of group 1 has dtype torch.int32")):
        with pytest.raises(ValueError, match=match):
            optimizer.add_param_group(group)
        assert len(optimizer.param_groups) == 1  # nothing added
    extra = [torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16)), torch.nn.Parameter(torch.ones(2))]
    optimizer.add_param_group({"params": extra, "lr": 1e-2, "betas": [0.5, 0.9]})
    group = optimizer.param_groups[1]
    assert group["betas"] == (0.5, 0.9) and group["weight_decay"] == 0.01 and group["mode"] == "plus"
    for p in [parameter] + extra:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(not torch.equal(p, torch.ones_like(p)) for p in extra)


def test_zero_grad_sets_none_by_default():
    parameters = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = CollageAdamW(parameters, backend="reference")
    for parameter in parameters:
        parameter.grad = torch.ones_like(parameter)
    optimizer.zero_grad()
    assert all(parameter.grad is None for parameter in parameters)
    for parameter in parameters:
        parameter.grad = torch.ones_like(parameter)
    optimizer.zero_grad(set_to_none=False)
    assert all(torch.equal(parameter.grad, torch.zeros_like(parameter)) for parameter in parameters)


def test_a_state_dict_saved_before_the_flags_loads_with_the_defaults():
    parameter = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    optimizer = CollageAdamW([parameter], maximize=True, backend="reference")
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    saved = optimizer.state_dict()
    for name in ("maximize", "foreach", "capturable", "differentiable", "fused"):
        del saved["param_groups"][0][name]
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["maximize"] is True  # this optimizer's default fills the gap
    optimizer.step()
    saved = optimizer.state_dict()
    saved["param_groups"][0]["capturable"] = True
    with pytest.raises(ValueError, match=r"'capturable' \(parameter group 0 of argument 'state_dict'\)=True"):
        optimizer.load_state_dict(saved)
