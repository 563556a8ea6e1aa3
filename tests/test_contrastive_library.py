"""The contrastive primitives as torch.library operators (opcheck: schema, fake kernel, autograd registration) and
the losses under torch.compile(fullgraph=True) in a small two-tower model."""
import pytest
import torch

import leanops
from helpers import BACKEND_CASES, require_backend
from leanops import contrastive

NAMESPACE = {"reference": "leanops_reference", "triton": "leanops_triton", "cpu": "leanops", "cuda": "leanops"}


def _require(backend, device):
    require_backend(backend, device)
    if backend not in contrastive.IMPLEMENTED:
        pytest.skip(f"the {backend} backend has no contrastive kernels yet")


def _samples(device):
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(19, 7, generator=generator).to(device)
    text = torch.randn(19, 7, generator=generator).to(device)
    scale = (torch.rand(19, generator=generator) * 5 + 1).to(device)
    groups = torch.randint(0, 6, (19,), generator=generator).to(device)
    weight = torch.rand(19, generator=generator).to(device)
    return image, text, scale, groups, weight


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_opcheck_primitives(backend, device):
    _require(backend, device)
    operators = getattr(torch.ops, NAMESPACE[backend])
    image, text, scale, groups, weight = _samples(device)
    row_lse, col_lse = operators.clip_forward(image, text, scale)
    s, b = torch.tensor(3.0, device=device), torch.tensor(-2.0, device=device)
    image_grad = image.clone().requires_grad_(True)
    cases = [
        (operators.clip_forward.default, (image, text, scale)),
        (operators.clip_forward.default, (image_grad, text, scale.clone().requires_grad_(True))),
        (operators.clip_backward.default, (image, text, scale, row_lse, col_lse, weight, weight.flip(0))),
        (operators.siglip_forward.default, (image, text, s, b, groups)),
        (operators.siglip_forward.default, (image_grad, text, s.clone().requires_grad_(True), b, groups)),
        (operators.siglip_backward.default, (image, text, s, b, groups, weight)),
    ]
    for operator, args in cases:
        torch.library.opcheck(operator, args)


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_opcheck_clip_per_anchor(backend, device):
    """The operator that joins the clip primitives with the positive terms (custom_ops/clip_loss.py)."""
    _require(backend, device)
    image, text, scale, groups, _ = _samples(device)
    operator = torch.ops.leanops_loss.clip_per_anchor.default
    for labels in (None, groups):
        torch.library.opcheck(operator, (image, text, scale, labels, NAMESPACE[backend]))
        torch.library.opcheck(operator, (image.clone().requires_grad_(True), text.clone().requires_grad_(True),
                                         scale.clone().requires_grad_(True), labels, NAMESPACE[backend]))


class TwoTower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image_tower = torch.nn.Linear(16, 8)
        self.text_tower = torch.nn.Linear(12, 8)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.0))
        self.bias = torch.nn.Parameter(torch.tensor(-1.0))

    def forward(self, images, texts, labels, backend):
        x = torch.nn.functional.normalize(self.image_tower(images), dim=-1)
        y = torch.nn.functional.normalize(self.text_tower(texts), dim=-1)
        clip = leanops.clip_loss(x, y, self.log_scale.exp(), labels=labels, backend=backend)
        siglip = leanops.siglip_loss(x, y, self.log_scale.exp(), self.bias, backend=backend)
        return clip + siglip


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_torch_compile_full_graph_two_tower(backend, device):
    _require(backend, device)
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(24, 16, generator=generator).to(device)
    texts = torch.randn(24, 12, generator=generator).to(device)
    labels = torch.randint(0, 10, (24,), generator=generator).to(device)
    torch.manual_seed(2)
    eager_model = TwoTower().to(device)
    compiled_model = TwoTower().to(device)
    compiled_model.load_state_dict(eager_model.state_dict())

    eager_loss = eager_model(images, texts, labels, backend)
    eager_loss.backward()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    compiled_loss = compiled(images, texts, labels, backend)
    compiled_loss.backward()
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for (name, eager), compiled_parameter in zip(eager_model.named_parameters(), compiled_model.parameters()):
        assert torch.allclose(compiled_parameter.grad, eager.grad, rtol=1e-4, atol=1e-6), name
