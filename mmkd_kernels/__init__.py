"""Fused losses of Multi-level Multilingual Knowledge Distillation, never storing an N×N matrix."""

from .backends import available_backends
from .functional import contrastive_loss, segment_mean, structure_loss
from .modules import ContrastiveLoss, StructureLoss

__all__ = [
    "ContrastiveLoss",
    "StructureLoss",
    "available_backends",
    "contrastive_loss",
    "segment_mean",
    "structure_loss",
]
__version__ = "0.1.0"
