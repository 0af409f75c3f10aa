"""The original's import path: ``from torch_clip_fused.optimizers import ClippedSGD, ClippedSSTM``."""

from .optim import ClippedSGD
from .optim import ClippedSSTM

__all__ = ["ClippedSGD", "ClippedSSTM"]
