"""The linear cross-entropy primitives as torch.library operators (opcheck: schema, fake kernel, autograd
registration) and the loss under torch.compile(fullgraph=True) in a tiny language-model head."""
import pytest
import torch

import leanops
from helpers import BACKEND_CASES, require_backend
from leanops import cross_entropy

NAMESPACE = {"reference": "leanops_reference", "triton": "leanops_triton", "cpu": "leanops", "cuda": "leanops"}


def _require(backend, device):
    require_backend(backend, device)
    if backend not in cross_entropy.IMPLEMENTED:
        pytest.skip(f"the {backend} backend has no linear cross-entropy kernels yet")


def _samples(device, with_bias):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 6, generator=generator).to(device)
    weight = torch.randn(19, 6, generator=generator).to(device)
    bias = torch.randn(19, generator=generator).to(device) if with_bias else torch.empty(0, device=device)
    targets = torch.randint(-1, 19, (11,), generator=generator).to(device)
    per_token = [torch.randn(11, generator=generator).to(device) for _ in range(5)]
    return hidden, weight, bias, targets, per_token


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_opcheck_primitives(backend, device, with_bias):
    _require(backend, device)
    operators = getattr(torch.ops, NAMESPACE[backend])
    hidden, weight, bias, targets, per_token = _samples(device, with_bias)
    lse = operators.linear_ce_forward(hidden, weight, bias, targets, 0.0)[0]
    differentiable = (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True),
                      bias.clone().requires_grad_(with_bias))
    for softcap in (0.0, 2.5):
        torch.library.opcheck(operators.linear_ce_forward.default, (hidden, weight, bias, targets, softcap))
        torch.library.opcheck(operators.linear_ce_forward.default, (*differentiable, targets, softcap))
        torch.library.opcheck(operators.linear_ce_backward.default,
                              (hidden, weight, bias, targets, softcap, lse, *per_token[1:]))


class TinyLanguageModelHead(torch.nn.Module):
    def __init__(self, vocabulary=37, dim=12):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocabulary, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocabulary)

    def forward(self, tokens, backend):
        hidden = torch.tanh(self.mix(self.embedding(tokens[:, :-1])))
        targets = tokens[:, 1:].clone()
        targets[:, 0] = -100  # an ignored position, as a padded batch has
        return leanops.linear_cross_entropy(hidden, self.head.weight, targets, bias=self.head.bias,
                                            label_smoothing=0.1, z_loss=1e-3, softcap=10.0, backend=backend)


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_torch_compile_full_graph(backend, device):
    _require(backend, device)
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 37, (3, 9), generator=generator).to(device)
    torch.manual_seed(2)
    eager_model = TinyLanguageModelHead().to(device)
    compiled_model = TinyLanguageModelHead().to(device)
    compiled_model.load_state_dict(eager_model.state_dict())

    eager_loss = eager_model(tokens, backend)
    eager_loss.backward()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    compiled_loss = compiled(tokens, backend)
    compiled_loss.backward()
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for (name, eager), compiled_parameter in zip(eager_model.named_parameters(), compiled_model.parameters()):
        assert torch.allclose(compiled_parameter.grad, eager.grad, rtol=1e-4, atol=1e-6), name
