"""Optimizers that keep less state: ``CollageAdamW`` (16-bit parameters and moments without fp32 master weights,
compensated with multi-component floats)."""
from . import collage
from .collage import CollageAdamW

__all__ = ["CollageAdamW", "collage"]
