"""Every op family of leanops, each declared once (``leanops.ops.<family>``): its operators' schemas, fake kernels
and autograd, its providers (reference, cpu, cuda, triton) with the dtypes each serves, and the order ``auto`` tries
them per device. ``leanops.ops.registry`` derives the torch.library registrations and the choice of a provider from
these declarations; ``leanops info`` lists them. ARCHITECTURE.md walks a call through them."""
from .collage import COLLAGE
from .contrastive import CONTRASTIVE
from .cross_entropy import CROSS_ENTROPY
from .frugal import FRUGAL
from .mcf import MCF
from .registry import OpFamily, Provider

FAMILIES = (MCF, CONTRASTIVE, CROSS_ENTROPY, COLLAGE, FRUGAL)

__all__ = ["COLLAGE", "CONTRASTIVE", "CROSS_ENTROPY", "FAMILIES", "FRUGAL", "MCF", "OpFamily", "Provider"]
