"""leanops.linear_cross_entropy under torch.compile(fullgraph=True) in a tiny language-model head, on every provider
of leanops.ops.CROSS_ENTROPY. (tests/test_registry.py opchecks every primitive of every provider.)"""
import pytest
import torch

import leanops
from helpers import assert_compiled_matches_eager, provider_cases
from leanops.ops import CROSS_ENTROPY


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


@pytest.mark.parametrize("backend,device", provider_cases(CROSS_ENTROPY))
def test_torch_compile_full_graph(backend, device):
    tokens = torch.randint(0, 37, (3, 9), generator=torch.Generator().manual_seed(1)).to(device)
    assert_compiled_matches_eager(TinyLanguageModelHead, device, tokens, backend)
