"""The installation: without leanops._C (a build without the C++ extension, or a failed one), `import leanops` still
works and the reference and Triton providers serve. (Choosing a provider: tests/test_registry.py.)"""
import subprocess
import sys
import textwrap


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
