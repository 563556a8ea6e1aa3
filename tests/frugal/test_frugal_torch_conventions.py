"""leanops.optim.FRUGAL takes what torch.optim.AdamW takes (signature and defaults, tensor lr, maximize, the flags),
works with its schedulers, add_param_group and zero_grad, and, given bare parameters, splits only what looks like a
projection matrix and says so (issue 16). Kernel cases run on every CPU provider."""
import inspect
import warnings

import pytest
import torch

from helpers import provider_cases
from leanops import ops
from leanops.optim import FRUGAL, frugal_param_groups

PROVIDERS = provider_cases(ops.FRUGAL, devices=("cpu",))


def _parameters(shapes, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def _gradients(shapes, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(steps)]


def _run(optimizer, parameters, gradients, scheduler=None, negate=False):
    for step_gradients in gradients:
        for parameter, gradient in zip(parameters, step_gradients):
            parameter.grad = -gradient if negate else gradient.clone()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.up = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.gate = torch.nn.Linear(16, 1)
        self.lm_head = torch.nn.Linear(16, 20, bias=False)


def test_signature_and_defaults_are_torch_adamws():
    torch_parameters = inspect.signature(torch.optim.AdamW.__init__).parameters
    ours = inspect.signature(FRUGAL.__init__).parameters
    for name, parameter in torch_parameters.items():
        assert name in ours, name
        assert ours[name].default == parameter.default, name
        assert ours[name].kind == parameter.kind, name
    optimizer = FRUGAL([{"params": _parameters([(3, 4)])}])
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 0.01 and group["maximize"] is False and group["fused"] is None


@pytest.mark.parametrize("name", ["amsgrad", "capturable", "differentiable"])
def test_refused_options_are_named_with_the_reason(name):
    with pytest.raises(ValueError, match=rf"argument '{name}'=True is not supported: "):
        FRUGAL([{"params": _parameters([(3, 4)])}], **{name: True})
    with pytest.raises(ValueError, match=r"'foreach' and 'fused'"):
        FRUGAL([{"params": _parameters([(3, 4)])}], foreach=True, fused=True)
    FRUGAL([{"params": _parameters([(3, 4)])}], foreach=True, fused=False)  # accepted; changes nothing


def test_bare_parameters_split_only_projection_matrices_and_say_so():
    model = Tiny()
    with pytest.warns(UserWarning, match=r"splits the 3 of 8 tensors .*frugal_param_groups\(model\)"):
        optimizer = FRUGAL(model.parameters(), projection="columns")
    # Without the model, the embedding and the head are 2-D like a projection: split (the warning says so); the
    # 1 x 16 gate, the biases and the norm are not.
    split = optimizer.split_parameters()
    assert [(entry["group"], entry["index"], entry["shape"]) for entry in split] == [
        (0, 0, (20, 8)), (0, 1, (16, 8)), (0, 2, (20, 16))]
    assert [group["split"] for group in optimizer.param_groups] == [True, False]
    assert all(parameter.dim() != 2 or min(parameter.shape) == 1
               for parameter in optimizer.param_groups[1]["params"])
    text = repr(optimizer)
    assert "Split parameters: 3 of 8" in text and "group 0 index 0: (20, 8), columns" in text

    # Named parameters: the embedding and the head are told by their names.
    with pytest.warns(UserWarning, match=r"splits the 1 of 8 tensors .*not named like an embedding or a head"):
        named = FRUGAL(model.named_parameters())
    assert [(entry["name"], entry["shape"]) for entry in named.split_parameters()] == [("up.weight", (16, 8))]

    # Groups (frugal_param_groups, the recommended path) are taken as given, without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grouped = FRUGAL(frugal_param_groups(model))
    assert sorted(entry["shape"] for entry in grouped.split_parameters()) == [(1, 16), (16, 8)]


def test_bare_parameters_step_each_part_as_its_group_says():
    """The 1-D tensors of bare parameters get plain AdamW (torch.optim.AdamW's bits, reference backend); the
    matrices are split."""
    shapes = [(6, 9), (9,), (6,)]
    ours, theirs = _parameters(shapes), _parameters(shapes)
    gradients = _gradients(shapes, 3)
    with pytest.warns(UserWarning, match="splits the 1 of 3"):
        optimizer = FRUGAL(ours, lr=1e-2, density=0.5, projection="columns", backend="reference")
    _run(optimizer, ours, gradients)
    adamw = torch.optim.AdamW(theirs[1:], lr=1e-2, foreach=False)
    _run(adamw, theirs[1:], [step[1:] for step in gradients])
    for mine, reference in zip(ours[1:], theirs[1:]):
        assert torch.equal(mine, reference)
    assert "indices" in optimizer.state[ours[0]] and "indices" not in optimizer.state[ours[1]]


@pytest.mark.parametrize("backend, device", PROVIDERS)
@pytest.mark.parametrize("projection", ["blockwise", "columns", "rows", "svd"])
def test_maximize_is_minimizing_the_negated_gradient_bit_for_bit(backend, device, projection):
    """maximize=True on g equals maximize=False on -g bit for bit (AdamW on the subspace, the state-free step, the
    svd draw); the caller's gradients are left as they were."""
    shapes = [(6, 8), (5, 3), (7,)]
    gradients = _gradients(shapes, 3)
    runs = []
    for maximize in (True, False):
        parameters = _parameters(shapes)
        groups = [{"params": parameters[:2]}, {"params": parameters[2:], "split": False}]
        optimizer = FRUGAL(groups, lr=1e-2, weight_decay=0.1, density=0.5, update_gap=2, projection=projection,
                           maximize=maximize, backend=backend)
        _run(optimizer, parameters, gradients, negate=not maximize)
        runs.append((optimizer, parameters))
    (first, first_parameters), (second, second_parameters) = runs
    for a, b in zip(first_parameters, second_parameters):
        assert torch.equal(a, b)
        assert first.state.get(a, {}).keys() == second.state.get(b, {}).keys()
        for key, value in first.state.get(a, {}).items():
            other = second.state[b][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    for parameter, gradient in zip(first_parameters, gradients[-1]):
        assert torch.equal(parameter.grad, gradient)


@pytest.mark.parametrize("backend, device", PROVIDERS)
def test_tensor_lr_equals_float_lr(backend, device):
    shapes = [(6, 8), (7,)]
    gradients = _gradients(shapes, 3)
    runs = []
    for lr, betas in ((3e-3, (0.8, 0.95)), (torch.tensor(3e-3), (torch.tensor(0.8), 0.95))):
        parameters = _parameters(shapes)
        optimizer = FRUGAL([{"params": parameters}], lr=lr, betas=betas, density=0.5, projection="columns",
                           backend=backend)
        _run(optimizer, parameters, gradients)
        runs.append(parameters)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


SCHEDULERS = {
    "LambdaLR": lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step),
    "CosineAnnealingLR": lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4),
    "OneCycleLR": lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=6,
                                                                        cycle_momentum=True),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_schedulers_drive_lr_and_betas_as_on_adamw(scheduler, tensor_lr):
    """At density 1 (columns) the reference backend is torch.optim.AdamW(foreach=False) bit for bit: under the same
    scheduler (OneCycleLR also writes beta1) the trajectories stay equal."""
    shapes = [(5, 6), (4, 4)]
    gradients = _gradients(shapes, 5)
    ours, theirs = _parameters(shapes), _parameters(shapes)
    lr = (lambda: torch.tensor(1e-3)) if tensor_lr else (lambda: 1e-3)
    frugal = FRUGAL([{"params": ours}], lr=lr(), density=1.0, projection="columns", backend="reference")
    adamw = torch.optim.AdamW(theirs, lr=lr(), foreach=False)
    _run(frugal, ours, gradients, SCHEDULERS[scheduler](frugal))
    _run(adamw, theirs, gradients, SCHEDULERS[scheduler](adamw))
    assert float(frugal.param_groups[0]["lr"]) == float(adamw.param_groups[0]["lr"])
    for mine, reference in zip(ours, theirs):
        assert torch.equal(mine, reference)


def test_add_param_group_is_checked_like_the_constructor():
    optimizer = FRUGAL([{"params": _parameters([(4, 5)])}], projection="blockwise", backend="reference")
    for group, match in (({"density": 2.0}, r"argument 'density' \(parameter group 1\)"),
                         ({"projection": "diagonal"}, r"'projection'"),
                         ({"update_gap": 0}, r"'update_gap'"),
                         ({"split": "yes"}, r"'split'"),
                         ({"lr": -1.0}, r"'lr'"),
                         ({"amsgrad": True}, r"'amsgrad' \(parameter group 1\)=True"),
                         ({"differentiable": True}, r"'differentiable'")):
        with pytest.raises(ValueError, match=match):
            optimizer.add_param_group({"params": _parameters([(3, 3)], seed=5), **group})
        assert len(optimizer.param_groups) == 1
    with pytest.raises(ValueError, match=r"parameter 0 of group 1 has dtype torch.int64"):
        optimizer.add_param_group({"params": [torch.zeros(3, dtype=torch.int64)]})
    assert len(optimizer.param_groups) == 1
    added = _parameters([(3, 6), (3, 6)], seed=6)
    optimizer.add_param_group({"params": added, "density": 0.5})
    assert optimizer.param_groups[1]["weight_decay"] == 0.01
    parameters = optimizer.param_groups[0]["params"] + added
    _run(optimizer, parameters, _gradients([p.shape for p in parameters], 2))
    assert len(optimizer._active_blocks[1]) == 1  # the new group's blocks are drawn at its first step


def test_zero_grad_sets_none_by_default():
    parameters = _parameters([(3, 4), (4,)])
    optimizer = FRUGAL([{"params": parameters}], backend="reference")
    for parameter in parameters:
        parameter.grad = torch.ones_like(parameter)
    optimizer.zero_grad()
    assert all(parameter.grad is None for parameter in parameters)


def test_a_state_dict_saved_before_the_flags_loads_with_the_defaults():
    parameters = _parameters([(4, 5)])
    optimizer = FRUGAL([{"params": parameters}], lr=torch.tensor(1e-2), projection="rows", backend="reference")
    _run(optimizer, parameters, _gradients([(4, 5)], 1))
    saved = optimizer.state_dict()
    for name in ("maximize", "foreach", "capturable", "differentiable", "fused"):
        del saved["param_groups"][0][name]
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["maximize"] is False
    _run(optimizer, parameters, _gradients([(4, 5)], 1, seed=3))
    saved = optimizer.state_dict()
    saved["param_groups"][0]["amsgrad"] = True
    with pytest.raises(ValueError, match=r"'amsgrad'"):
        optimizer.load_state_dict(saved)
