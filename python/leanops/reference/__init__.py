"""Plain-PyTorch implementations of every leanops op: the oracle for the tests and the fallback backend.

They use only torch's own operators, run on any device, and (where a family says so) in float64.
"""
from . import contrastive, cross_entropy, mcf

__all__ = ["contrastive", "cross_entropy", "mcf"]
