"""The CLIP loss's composite operator (leanops.ops.clip_per_anchor: the positive terms beside any provider's
primitives) through torch.library.opcheck, and the losses under torch.compile(fullgraph=True) in a small two-tower
model, on every provider. (tests/test_registry.py opchecks every primitive of every provider.)"""
import pytest
import torch

import leanops
from helpers import assert_compiled_matches_eager, provider_cases
from leanops.ops import CONTRASTIVE
from leanops.ops.clip_per_anchor import clip_per_anchor

CASES = provider_cases(CONTRASTIVE)


@pytest.mark.parametrize("backend,device", CASES)
def test_opcheck_clip_per_anchor(backend, device):
    """Schema, fake kernel and autograd registration of the composite, without and with group labels."""
    generator = torch.Generator().manual_seed(0)
    image, text = (torch.randn(19, 7, generator=generator).to(device) for _ in range(2))
    scale = (torch.rand(19, generator=generator) * 5 + 1).to(device)
    groups = torch.randint(0, 6, (19,), generator=generator).to(device)
    for labels in (None, groups):
        torch.library.opcheck(clip_per_anchor.default, (image, text, scale, labels, backend))
        torch.library.opcheck(clip_per_anchor.default, (image.clone().requires_grad_(True),
                                                        text.clone().requires_grad_(True),
                                                        scale.clone().requires_grad_(True), labels, backend))


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


@pytest.mark.parametrize("backend,device", CASES)
def test_torch_compile_full_graph_two_tower(backend, device):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(24, 16, generator=generator).to(device)
    texts = torch.randn(24, 12, generator=generator).to(device)
    labels = torch.randint(0, 10, (24,), generator=generator).to(device)
    assert_compiled_matches_eager(TwoTower, device, images, texts, labels, backend)
