"""The reference provider of every op family: the plain-PyTorch implementation of the same primitive the kernels
implement (chunked or blockwise where the kernels are, so memory stays O(B D) / O(N D)), on any device and in float64
too. The kernels are held to these: the MCF, Collage and FRUGAL kernels bit for bit, the loss kernels to float32
rounding. The dense formulas that build the B x B or N x V matrices are the tests' oracle (tests/oracles.py).
"""
from . import collage, contrastive, cross_entropy, frugal, mcf

__all__ = ["collage", "contrastive", "cross_entropy", "frugal", "mcf"]
