"""torch.library registrations: fake (meta) kernels for the C++ ops in the ``leanops`` namespace, and the Triton
kernels wrapped as custom ops in the ``leanops_triton`` namespace, so that ``torch.compile(fullgraph=True)`` traces
every backend without graph breaks. One module per op family.
"""
from . import clip_loss, collage, contrastive, cross_entropy, frugal, mcf

__all__ = ["clip_loss", "collage", "contrastive", "cross_entropy", "frugal", "mcf"]
