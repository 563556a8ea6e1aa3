"""The installation: without leanops._C (a build without the C++ extension, a failed one, or one for another torch),
`import leanops` still works, the reference and Triton providers serve, and every message names the cause and the
fix; setup.py compiles against the target environment's torch or stops saying what to do. (Choosing a provider:
tests/test_registry.py; the command line: tests/test_cli.py.)

The real `pip install` into fresh virtual environments is slow (minutes of compiling): it runs only with
LEANOPS_TEST_INSTALL=1 (test_pip_install_into_a_fresh_venv)."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        assert "Fix: rebuild leanops against the installed torch" in str(ours[0].message), ours[0].message
        a = torch.randn(6).bfloat16()
        s, e = leanops.mcf.two_sum(a, a)  # auto: the reference serves
        assert torch.equal(s, a + a)
        try:
            leanops.mcf.two_sum(a, a, backend="cpu")
        except leanops.BackendUnavailableError as error:
            assert "leanops._C is not available" in str(error), error
            assert "pip install --no-build-isolation" in str(error), error
        else:
            raise AssertionError("the cpu backend should be unavailable")
        from leanops import info
        text = info.format_info(info.collect())
        assert "not available:" in text and "fix: rebuild leanops" in text, text
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_an_extension_built_for_another_torch_is_refused():
    """A leanops._C that loads but reports another torch version than the installed one is not used: the cpu
    backend says which versions and how to rebuild (simulated: build_info reports another version)."""
    script = textwrap.dedent("""
        import sys, types, warnings
        fake = types.ModuleType("leanops._C")
        fake.build_info = lambda: {"cuda": False, "cuda_arch_list": "", "torch": "1.0.0+elsewhere"}
        sys.modules["leanops._C"] = fake
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, leanops
        ours = [str(w.message) for w in caught if "leanops._C" in str(w.message)]
        assert len(ours) == 1, ours
        expected = f"built against torch 1.0.0+elsewhere, but torch {torch.__version__} is installed"
        assert expected in ours[0], ours[0]
        a = torch.randn(6)
        try:
            leanops.mcf.two_sum(a, a, backend="cpu")
        except leanops.BackendUnavailableError as error:
            assert expected in str(error) and "pip install --no-build-isolation" in str(error), error
        else:
            raise AssertionError("the cpu backend should be refused")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("message, torch_cuda, cause", [
    ("libc10_cuda.so: cannot open shared object file: No such file or directory", None,
     "compiled against a CUDA build of torch, and the installed torch 2.13.0+cpu is a CPU-only build"),
    ("libcudart.so.13: cannot open shared object file", "12.8", "needs CUDA libraries that cannot be loaded"),
    ("/x/_C.so: undefined symbol: _ZN3c106detail14torchCheckFailEPKcS2_jRKSs", None,
     "compiled against another torch than the installed 2.13.0+cpu"),
    ("cannot import name '_C' from 'leanops'", None, "installed without its compiled kernels"),
])
def test_load_errors_name_the_cause_and_the_fix(message, torch_cuda, cause):
    from leanops import _extension

    text = _extension.explain_load_error(ImportError(message), "2.13.0+cpu", torch_cuda)
    assert cause in text, text
    assert message in text, text  # the loader's own words stay in the message
    assert "Fix: rebuild leanops against the installed torch 2.13.0+cpu: pip install --no-build-isolation" in text


def test_mismatch_error():
    from leanops import _extension

    assert _extension.mismatch_error("2.13.0+cpu", "2.13.0+cpu") is None
    assert _extension.mismatch_error("", "2.13.0+cpu") is None  # an old build that does not say
    text = _extension.mismatch_error("2.14.1+cu130", "2.13.0+cpu")
    assert "built against torch 2.14.1+cu130, but torch 2.13.0+cpu is installed" in text


def _run_setup(command: str, fake_target_torch: str | None, *, torch_importable: bool = True):
    """Run setup.py's module code with `command` as its setup.py command and the target environment's torch faked
    as `fake_target_torch` (None: none); setup() itself is replaced by one that prints what it was given."""
    script = textwrap.dedent(f"""
        import importlib.metadata, os, sys, setuptools
        os.environ["LEANOPS_BUILD_CUDA"] = "0"
        if {not torch_importable!r}:
            sys.modules["torch"] = None
        real = importlib.metadata.distributions
        class Fake:
            version = {fake_target_torch!r}
            def locate_file(self, name):
                return "/fake/target/site-packages"
        def distributions(**kwargs):
            if "path" in kwargs:  # the target environment's site-packages
                return iter([Fake()] if Fake.version else [])
            return real(**kwargs)
        importlib.metadata.distributions = distributions
        setuptools.setup = lambda **kwargs: print("SETUP", kwargs["setup_requires"], kwargs["install_requires"])
        sys.argv = ["setup.py", {command!r}]
        sys.path.insert(0, {ROOT!r})
        os.chdir({ROOT!r})
        exec(compile(open("setup.py").read(), "setup.py", "exec"), {{"__name__": "__main__", "__file__": "setup.py"}})
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_setup_asks_for_the_target_environments_torch():
    """The build requirement (setup_requires, which setuptools hands to pip under build isolation) is exactly the
    target environment's torch, so the kernels are compiled against it."""
    result = _run_setup("egg_info", "2.13.0+cpu", torch_importable=False)
    assert result.returncode == 0, result.stderr
    assert "SETUP ['torch==2.13.0+cpu']" in result.stdout, result.stdout


def test_setup_refuses_to_compile_against_another_torch():
    """A build whose torch differs from the target environment's stops, saying both versions and what to run."""
    import torch

    result = _run_setup("bdist_wheel", "1.0.0+other")
    assert result.returncode != 0, result.stdout
    assert f"compile leanops._C against torch {torch.__version__.split('+')[0]}" in result.stderr, result.stderr
    assert "has torch 1.0.0+other" in result.stderr and "pip install --no-build-isolation ." in result.stderr


def test_setup_refuses_to_build_without_torch():
    """No torch at build time: the build stops (no install without kernels), saying what to install."""
    result = _run_setup("bdist_wheel", None, torch_importable=False)
    assert result.returncode != 0, result.stdout
    assert "torch is not importable in the build environment" in result.stderr, result.stderr
    assert "pip install torch==2.13.0" in result.stderr and "--no-build-isolation" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LEANOPS_TEST_INSTALL") != "1",
                    reason="slow (a fresh venv, torch, minutes of compiling): set LEANOPS_TEST_INSTALL=1")
@pytest.mark.parametrize("isolation", ["default", "--no-build-isolation"])
def test_pip_install_into_a_fresh_venv(tmp_path, isolation):
    """`pip install <checkout>` into a fresh venv with torch 2.13.0 (CPU) gives CPU kernels that load, with pip's
    build isolation and without (LEANOPS_TORCH overrides the torch requirement; CPU kernels only)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    torch_requirement = os.environ.get("LEANOPS_TORCH", "torch==2.13.0")
    subprocess.run([python, "-m", "pip", "install", "--quiet", torch_requirement, "numpy", "setuptools", "wheel",
                    "ninja"], check=True, timeout=1800)
    options = [] if isolation == "default" else [isolation]
    environment = {**os.environ, "LEANOPS_BUILD_CUDA": "0", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    install = subprocess.run([python, "-m", "pip", "install", *options, ROOT], capture_output=True, text=True,
                             env=environment, timeout=3600, cwd=str(tmp_path))
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]
    check = textwrap.dedent("""
        import torch, leanops
        from leanops import _extension
        assert _extension.extension_loaded(), _extension.extension_error
        h, w = torch.randn(8, 16), torch.randn(32, 16)
        target = torch.randint(0, 32, (8,))
        loss = leanops.linear_cross_entropy(h, w, target, backend="cpu")
        expected = torch.nn.functional.cross_entropy(h @ w.T, target)
        assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-5), (loss, expected)
        print("ok", torch.__version__)
    """)
    result = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
