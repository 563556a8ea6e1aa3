"""Backend choice: which implementation serves a call.

Every public op takes ``backend="auto" | "reference" | "triton" | "cuda" | "cpu"``:

- ``reference``: plain PyTorch (python/leanops/reference), any device, float64 too;
- ``triton``: Triton kernels on a CUDA device (or on CPU tensors under ``TRITON_INTERPRET=1``, for tests);
- ``cuda``: the hand-written CUDA kernels of leanops._C;
- ``cpu``: the C++ CPU kernels of leanops._C.

``auto`` (the default, or whatever the ``LEANOPS_BACKEND`` environment variable names) picks, for the tensors'
device, the first usable backend in the family's preference order (fastest measured first), and falls back to the
reference for a dtype no kernel supports. Asking by name for a backend that cannot serve the call raises
``BackendUnavailableError`` saying which and why.
"""
import importlib.util
import os

import torch

from . import _extension

BACKENDS = ("reference", "triton", "cuda", "cpu")
AUTO = "auto"
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Order in which `auto` tries the compiled backends on each device type. Both GPU backends are memory-bound for
# the elementwise families; see benchmarks/results/ for the measurements behind a family's order.
DEFAULT_PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


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


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on tensors of `device`, or None when it can."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if not _extension.extension_loaded():
            return f"leanops._C is not available ({_extension.extension_error})"
        if device.type != "cpu":
            return f"it runs on CPU tensors, and these are on {device}"
        return None
    if backend == "cuda":
        if not _extension.extension_loaded():
            return f"leanops._C is not available ({_extension.extension_error})"
        if not _extension.cuda_kernels_built():
            return "leanops._C was built without CUDA kernels (torch without CUDA, nvcc not found, or LEANOPS_BUILD_CUDA=0)"
        if device.type != "cuda":
            return f"it runs on CUDA tensors, and these are on {device}"
        return None
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreter_enabled():
            return None
        if device.type == "cpu":
            return "on CPU tensors Triton runs only under its interpreter: set TRITON_INTERPRET=1 before importing leanops"
        return f"it runs on CUDA tensors, and these are on {device}"
    raise ValueError(f"unknown backend {backend!r}; expected one of {(AUTO,) + BACKENDS}")


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype,
            kernel_dtypes: tuple = KERNEL_DTYPES, preference: dict | None = None,
            implemented: tuple = BACKENDS) -> str:
    """The concrete backend that serves `op` for tensors of this device and dtype.

    `kernel_dtypes` are the dtypes the compiled/Triton kernels of this op support; the reference supports all
    floating dtypes. `implemented` lists the backends that have this op at all (a family may lack one for a while).
    Raises ValueError for an unknown name and BackendUnavailableError for one that cannot serve.
    """
    if not isinstance(backend, str):
        raise TypeError(f"{op}: argument 'backend' must be a string, got {type(backend).__name__}")
    if backend == AUTO:
        backend = default_backend()
    if backend == AUTO:
        if dtype in kernel_dtypes:
            for candidate in (preference or DEFAULT_PREFERENCE).get(device.type, ()):
                if candidate in implemented and unavailable_reason(candidate, device) is None:
                    return candidate
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: argument 'backend' must be one of {(AUTO,) + BACKENDS}, got {backend!r}")
    reason = unavailable_reason(backend, device) if backend in implemented else f"it has no {backend} kernels yet"
    if reason is None and backend != "reference" and dtype not in kernel_dtypes:
        supported = ", ".join(str(d) for d in kernel_dtypes)
        reason = f"its kernels support {supported}, not {dtype}"
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {backend!r} cannot serve this call: {reason}")
    return backend


def compiled_backends_with(operator: str) -> tuple[str, ...]:
    """The backends of leanops._C that registered a kernel for `leanops::<operator>` (a stale or partial build
    may lack one), so that a family lists as implemented only what this build can serve."""
    if not _extension.extension_loaded() or not hasattr(torch.ops.leanops, operator):
        return ()
    return tuple(backend for backend, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                 if torch._C._dispatch_has_kernel_for_dispatch_key(f"leanops::{operator}", key))


def operator_namespace(backend: str) -> str:
    """The torch.ops namespace whose operators serve `backend`: the C++ kernels (cpu, cuda) register in
    ``leanops``, the Triton kernels in ``leanops_triton``, the plain-PyTorch versions in ``leanops_reference``."""
    if backend == "triton":
        return "leanops_triton"
    if backend in ("cpu", "cuda"):
        return "leanops"
    return "leanops_reference"
