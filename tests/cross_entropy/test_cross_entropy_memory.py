"""Memory on the CPU: forward + backward of leanops.linear_cross_entropy (C++ CPU backend) at N = 4096, V = 50257,
D = 64, fp32, against the N x V fp32 logits a plain implementation holds (823 MB): the peak resident memory may
grow by less than a quarter of it.

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
    import torch
    import leanops
    import peak_rss

    # Two threads: the kernels keep one tile and one block x D accumulator per thread.
    torch.set_num_threads(2)
    N, V, D = 4096, 50257, 64
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=generator).requires_grad_(True)
    weight = (torch.randn(V, D, generator=generator) / D**0.5).requires_grad_(True)
    bias = torch.zeros(V).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[::7] = -100

    def loss_of(tokens):
        return leanops.linear_cross_entropy(hidden[:tokens], weight, targets[:tokens], bias=bias, z_loss=1e-4,
                                            label_smoothing=0.1, backend="cpu")

    # Warm up (thread pool, BLAS buffers, autograd machinery) on a few tokens, so that the baseline holds them.
    loss_of(16).backward()
    # The gradients themselves (N x D + V x D + V fp32 = 14 MB) are outputs, not working memory: held before.
    hidden.grad, weight.grad, bias.grad = (torch.zeros_like(t) for t in (hidden, weight, bias))

    def forward_and_backward():
        loss = loss_of(N)
        loss.backward()
        return loss

    growth, seconds, loss = peak_rss.peak_growth(forward_and_backward)
    assert torch.isfinite(loss) and bool(torch.isfinite(weight.grad).all()) and weight.grad.abs().sum() > 0
    print(growth, seconds)
""")


def test_forward_and_backward_stay_under_a_quarter_of_the_logits():
    """Budget 206 MB; the kernels need O(N + V) vectors and per thread one 128 x 512 tile and one block x D
    accumulator."""
    require_backend("cpu", "cpu")
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=600,
                            cwd=REPORTS)
    assert result.returncode == 0, result.stderr
    growth, seconds = (float(v) for v in result.stdout.split())
    budget = 0.25 * 4096 * 50257 * 4
    summary = f"peak RSS grew by {growth / 1e6:.1f} MB; forward + backward {seconds:.1f} s"
    print(summary)
    assert growth < budget, f"{summary}: over the budget of {budget / 1e6:.0f} MB"
