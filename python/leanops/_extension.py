"""Loads the compiled operator library leanops._C, or records why it is not there.

A missing or broken extension is not an import error: the Triton and reference backends still serve, and one
warning says what happened and how to fix it.
"""
import warnings

import torch  # noqa: F401  - leanops._C links libtorch: torch must be loaded first

extension_error: str | None = None
build_info: dict = {}

try:
    from leanops import _C  # type: ignore[attr-defined]

    build_info = dict(_C.build_info())
except (ImportError, OSError) as error:
    _C = None
    extension_error = f"{type(error).__name__}: {error}"
    warnings.warn(
        "leanops: the compiled kernels (leanops._C) are not available, so the 'cpu' and 'cuda' backends are "
        f"off; the 'triton' and 'reference' backends still work. Reason: {extension_error}. "
        "Rebuild with: pip install --no-build-isolation -e .",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_loaded() -> bool:
    return _C is not None


def cuda_kernels_built() -> bool:
    return _C is not None and bool(build_info.get("cuda"))
