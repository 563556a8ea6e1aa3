"""The four backends, and where each can run: ``backend="auto" | "reference" | "triton" | "cuda" | "cpu"``.

- ``reference``: plain PyTorch (python/leanops/reference), chunked like the kernels, any device, float64 too;
- ``triton``: Triton kernels on a CUDA device (or on CPU tensors under ``TRITON_INTERPRET=1``, for tests);
- ``cuda``: the hand-written CUDA kernels of leanops._C;
- ``cpu``: the C++ CPU kernels of leanops._C.

What each op family has of them, the dtypes each serves and the order ``auto`` tries them in are declared per family
(``leanops.ops``: ``OpFamily.resolve`` picks the provider of a call). ``auto`` is the default, or whatever the
``LEANOPS_BACKEND`` environment variable names. Asking by name for a backend that cannot serve a call raises
``BackendUnavailableError`` saying which and why.
"""
import importlib.util
import os

import torch

from . import _extension

BACKENDS = ("reference", "triton", "cuda", "cpu")
AUTO = "auto"
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot serve this call (not built, wrong device, unsupported dtype)."""


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_backend() -> str:
    """The backend that ``backend="auto"`` stands for: ``LEANOPS_BACKEND`` if set, else ``auto``."""
    name = os.environ.get("LEANOPS_BACKEND", AUTO) or AUTO
    if name != AUTO and name not in BACKENDS:
        raise ValueError(f"environment variable LEANOPS_BACKEND={name!r} is not one of {(AUTO,) + BACKENDS}")
    return name


def build_reason(backend: str) -> str | None:
    """Why `backend`'s code is missing from this installation, whatever the device, or None."""
    if backend == "reference":
        return None
    if backend == "triton":
        return None if triton_installed() else "triton is not installed"
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"unknown backend {backend!r}; expected one of {(AUTO,) + BACKENDS}")
    if not _extension.extension_loaded():
        # The cause (the load error, in words) and the fix: _extension.explain_load_error / mismatch_error.
        return f"leanops._C is not available: {_extension.extension_error}"
    if backend == "cuda" and not _extension.cuda_kernels_built():
        return ("leanops._C was built without CUDA kernels (torch without CUDA, nvcc not found, or "
                f"LEANOPS_BUILD_CUDA=0); to build them, with a CUDA build of torch and nvcc: LEANOPS_BUILD_CUDA=1 "
                f"{_extension.rebuild_command()}")
    return None


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on tensors of `device`, or None when it can (what a family has of it aside)."""
    return build_reason(backend) or device_reason(backend, device)


def device_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend`'s code, where built, cannot run on tensors of `device`, or None when it can."""
    if backend == "reference":
        return None
    if backend == "cpu":
        return None if device.type == "cpu" else f"it runs on CPU tensors, and these are on {device}"
    if backend == "cuda":
        return None if device.type == "cuda" else f"it runs on CUDA tensors, and these are on {device}"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled()):
        return None
    if device.type == "cpu":
        return "on CPU tensors Triton runs only under its interpreter: set TRITON_INTERPRET=1 before importing leanops"
    return f"it runs on CUDA tensors, and these are on {device}"
