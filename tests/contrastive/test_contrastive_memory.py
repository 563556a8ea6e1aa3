"""Memory on the CPU: forward + backward of the public losses (C++ CPU backend) at B = 16384, D = 64, fp32 never
come near one B x B fp32 matrix (1 GiB): the peak resident memory may grow by less than a tenth of it.

The work runs in a fresh interpreter so that the measurement sees nothing of the test session's allocations;
it measures with scripts/reports/peak_rss.py."""
import subprocess
import sys
import textwrap

import pytest

from helpers import REPORTS, require_backend

# A fresh interpreter per case and a large problem: tens of seconds each.
pytestmark = pytest.mark.slow

_MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import leanops
    import peak_rss

    loss_name, with_labels = sys.argv[1], sys.argv[2] == "labels"
    # One thread: the memory does not depend on it (two tiles of scratch per thread), and it keeps the run short
    # in a build without OpenMP, where torch's threads would only serve MKL on each small tile matmul (see the
    # comment at the top of csrc/cpu/contrastive.cpp).
    torch.set_num_threads(1)
    B, D = 16384, 64
    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(B, D, generator=generator), dim=1).requires_grad_(True)
    text = torch.nn.functional.normalize(torch.randn(B, D, generator=generator), dim=1).requires_grad_(True)
    scale = torch.tensor(20.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    labels = torch.randint(0, B // 2, (B,), generator=generator) if with_labels else None

    def loss_of(n):
        if loss_name == "clip":
            return leanops.clip_loss(image[:n], text[:n], scale, labels=None, backend="cpu")
        return leanops.siglip_loss(image[:n], text[:n], scale, bias, labels=None, backend="cpu")

    # Warm up (thread pool, BLAS buffers, autograd machinery) on a small problem, so that the baseline holds them.
    loss_of(600).backward()
    for leaf in (image, text, scale, bias):
        leaf.grad = None
    # The gradients themselves (2 x B x D fp32 = 8 MiB) are outputs, not working memory: held before measuring.
    image.grad, text.grad = torch.zeros_like(image), torch.zeros_like(text)

    def forward_and_backward():
        if loss_name == "clip":
            loss = leanops.clip_loss(image, text, scale, labels=labels, backend="cpu")
        else:
            loss = leanops.siglip_loss(image, text, scale, bias, labels=labels, backend="cpu")
        loss.backward()
        return loss

    growth, seconds, loss = peak_rss.peak_growth(forward_and_backward)
    assert torch.isfinite(loss) and bool(torch.isfinite(image.grad).all()) and bool(torch.isfinite(text.grad).all())
    assert image.grad.abs().sum() > 0 and scale.grad is not None
    print(growth, seconds)
""")


@pytest.mark.parametrize("loss_name,labels", [("clip", "diagonal"), ("clip", "labels"), ("siglip", "labels")])
def test_forward_and_backward_stay_far_below_one_similarity_matrix(loss_name, labels):
    """Budget 102 MiB; the kernels need O(B * D + B + threads * block^2) and the positive terms O(chunk * D) without
    labels, a few B x D fp32 group tables with them (4 MiB each here)."""
    require_backend("cpu", "cpu")
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, loss_name, labels], capture_output=True,
                            text=True, timeout=600, cwd=REPORTS)
    assert result.returncode == 0, result.stderr
    growth, seconds = (float(v) for v in result.stdout.split())
    budget = 0.1 * 2**30
    summary = f"{loss_name} ({labels}): peak RSS grew by {growth / 2**20:.1f} MiB; forward + backward {seconds:.1f} s"
    print(summary)
    assert growth < budget, f"{summary}: over the budget of {budget / 2**20:.0f} MiB"
