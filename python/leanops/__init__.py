"""leanops: memory-efficient training ops for PyTorch.

Each op family is declared once in ``leanops.ops``: a plain-PyTorch reference (``leanops.reference``), Triton
kernels, and hand-written C++ CPU and CUDA kernels; ``backend="auto"`` picks the first usable one in the family's
order (see ``leanops.backends``). ``leanops info`` on the command line says what is built and usable here;
ARCHITECTURE.md walks a call from a public function to each kernel.
"""
from . import _extension  # noqa: F401  - loads leanops._C (or warns once why not) before anything uses it
from . import backends, distill, mcf, nn, ops, optim
from .backends import BackendUnavailableError
from .contrastive import clip_loss, siglip_loss
from .cross_entropy import linear_cross_entropy

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "backends", "clip_loss", "distill", "linear_cross_entropy", "mcf", "nn", "ops",
           "optim", "siglip_loss", "__version__"]
