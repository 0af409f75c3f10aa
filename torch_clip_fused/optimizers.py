"""The original's import path: ``from torch_clip_fused.optimizers import ClippedSGD, ClippedSSTM``."""

from .clipped_sgd import ClippedSGD
from .clipped_sstm import ClippedSSTM

__all__ = ["ClippedSGD", "ClippedSSTM"]
