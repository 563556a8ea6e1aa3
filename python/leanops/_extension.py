"""Loads the compiled operator library leanops._C, or records why it is not there.

A missing or broken extension is not an import error: the Triton and reference backends still serve, and one
warning says what happened and how to fix it (``extension_error``: the cause and the fix; ``leanops info`` and a
``backend="cpu"``/``"cuda"`` call that cannot be served say the same).

leanops._C links the torch it was compiled against and is used only beside that same torch version: a build for
another torch either fails to load (a CUDA build of torch's libraries missing beside a CPU torch, undefined symbols
of another release) or, where it loads, is refused, since its kernels would run against another ABI.
"""
import os
import warnings

import torch  # noqa: F401  - leanops._C links libtorch: torch must be loaded first

extension_error: str | None = None
build_info: dict = {}

# The folder holding setup.py when leanops is imported from a source checkout (an editable install), else None.
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not os.path.isfile(os.path.join(_SOURCE_ROOT, "setup.py")):
    _SOURCE_ROOT = None


def rebuild_command() -> str:
    """The command that rebuilds leanops._C against the installed torch."""
    if _SOURCE_ROOT is not None:
        return f"pip install --no-build-isolation -e {_SOURCE_ROOT}"
    return "pip install --no-build-isolation --force-reinstall --no-deps <the leanops source folder>"


def fix_text(torch_version: str | None = None) -> str:
    """What to do about a leanops._C that is missing or does not match torch `torch_version` (the installed)."""
    return f"Fix: rebuild leanops against the installed torch {torch_version or torch.__version__}: {rebuild_command()}"


def explain_load_error(error: BaseException, torch_version: str | None = None, torch_cuda: str | None = None) -> str:
    """The cause of a failed `from leanops import _C` in words, then the fix. `torch_version` and `torch_cuda`
    (default: the installed torch's) are parameters for tests."""
    torch_version = torch.__version__ if torch_version is None else torch_version
    torch_cuda = torch.version.cuda if torch_cuda is None and torch_version == torch.__version__ else torch_cuda
    text = f"{type(error).__name__}: {error}"
    cuda_libraries = ("libc10_cuda", "libtorch_cuda", "libcudart", "libcuda.so", "libnvrtc", "libcublas")
    if any(name in text for name in cuda_libraries) and torch_cuda is None:
        cause = (f"leanops._C was compiled against a CUDA build of torch, and the installed torch {torch_version} "
                 f"is a CPU-only build without CUDA libraries ({text})")
    elif any(name in text for name in cuda_libraries):
        cause = (f"leanops._C needs CUDA libraries that cannot be loaded beside torch {torch_version} (CUDA "
                 f"{torch_cuda}): it was compiled against another torch ({text})")
    elif "undefined symbol" in text or "version `" in text:
        cause = (f"leanops._C was compiled against another torch than the installed {torch_version}: its symbols "
                 f"do not match ({text})")
    elif isinstance(error, ImportError) and ("cannot import name '_C'" in text or "No module named" in text):
        cause = ("leanops was installed without its compiled kernels: the build of leanops._C was skipped or failed "
                 "(torch missing at build time, or a compiler error; `pip install -v` shows the compiler's output, "
                 f"LEANOPS_BUILD_STRICT=0 lets such a build install) ({text})")
    else:
        cause = f"leanops._C could not be loaded ({text})"
    return f"{cause}. {fix_text(torch_version)}"


def mismatch_error(built_with: str, installed: str) -> str | None:
    """Why a loaded leanops._C built against torch `built_with` is not used beside torch `installed`, or None when
    they are the same version."""
    if not built_with or built_with == installed:
        return None
    return (f"leanops._C was built against torch {built_with}, but torch {installed} is installed: its kernels are "
            f"not used. {fix_text(installed)}")


try:
    from leanops import _C  # type: ignore[attr-defined]

    build_info = dict(_C.build_info())
    extension_error = mismatch_error(str(build_info.get("torch", "")), torch.__version__)
    if extension_error is not None:
        _C = None
except (ImportError, OSError) as error:
    _C = None
    extension_error = explain_load_error(error)

if extension_error is not None:
    warnings.warn(
        "leanops: the compiled kernels (leanops._C) are not available, so the 'cpu' and 'cuda' backends are "
        f"off; the 'triton' and 'reference' backends still work. Cause: {extension_error}",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_loaded() -> bool:
    return _C is not None


def cuda_kernels_built() -> bool:
    return _C is not None and bool(build_info.get("cuda"))
