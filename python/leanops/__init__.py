"""leanops: memory-efficient training ops for PyTorch.

Each op has a plain-PyTorch reference (``leanops.reference``), Triton kernels, and hand-written C++ CPU and CUDA
kernels; ``backend="auto"`` picks the fastest usable one (see ``leanops.backends``). ``leanops info`` on the command
line says what is built and usable here.
"""
from . import _extension  # noqa: F401  - loads leanops._C (or warns once why not) before anything uses it
from . import backends, mcf, nn, optim
from .backends import BackendUnavailableError
from .contrastive import clip_loss, siglip_loss
from .cross_entropy import linear_cross_entropy

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "backends", "clip_loss", "linear_cross_entropy", "mcf", "nn", "optim",
           "siglip_loss", "__version__"]
