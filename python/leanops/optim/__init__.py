"""Optimizers that keep less state: ``CollageAdamW`` (16-bit parameters and moments without fp32 master weights,
compensated with multi-component floats) and ``FRUGAL`` (AdamW state only on a gradient subspace, a state-free
update on the rest; ``frugal_param_groups`` picks what is split). Both step plain tensors (one device, DDP) and FSDP2's
DTensor shards (``fully_shard``), and round-trip through ``torch.distributed.checkpoint``."""
from . import collage, frugal
from .collage import CollageAdamW
from .frugal import FRUGAL, frugal_param_groups

__all__ = ["FRUGAL", "CollageAdamW", "collage", "frugal", "frugal_param_groups"]
