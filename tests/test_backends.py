"""Backend choice: `auto`, the LEANOPS_BACKEND default, and a missing extension that must not break the import."""
import subprocess
import sys
import textwrap

import pytest
import torch

import leanops
from leanops import backends


def test_auto_picks_the_cpu_kernels_for_cpu_tensors():
    if backends.unavailable_reason("cpu", torch.device("cpu")) is not None:
        pytest.skip("leanops._C is not built here")
    assert backends.resolve("op", "auto", torch.device("cpu"), torch.bfloat16) == "cpu"
    assert backends.resolve("op", "auto", torch.device("cpu"), torch.float64) == "reference"


def test_leanops_backend_sets_the_default(monkeypatch):
    a = torch.randn(5).bfloat16()
    monkeypatch.setenv("LEANOPS_BACKEND", "reference")
    assert backends.resolve("op", "auto", a.device, a.dtype) == "reference"
    # An explicit argument other than auto wins over the environment.
    assert backends.resolve("op", "cpu", a.device, a.dtype) == "cpu" or backends.unavailable_reason(
        "cpu", a.device) is not None
    monkeypatch.setenv("LEANOPS_BACKEND", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(leanops.BackendUnavailableError, match="backend 'cuda'"):
            leanops.mcf.two_sum(a, a)
    monkeypatch.setenv("LEANOPS_BACKEND", "quantum")
    with pytest.raises(ValueError, match="LEANOPS_BACKEND='quantum'"):
        leanops.mcf.two_sum(a, a)


def test_import_works_without_the_extension():
    """With leanops._C unimportable, `import leanops` warns once and the reference and Triton backends serve."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["leanops._C"] = None  # makes `from leanops import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, leanops
        ours = [w for w in caught if "leanops._C" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        a = torch.randn(6).bfloat16()
        s, e = leanops.mcf.two_sum(a, a)  # auto: the reference serves
        assert torch.equal(s, a + a)
        try:
            leanops.mcf.two_sum(a, a, backend="cpu")
        except leanops.BackendUnavailableError as error:
            assert "leanops._C is not available" in str(error), error
        else:
            raise AssertionError("the cpu backend should be unavailable")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
