"""The original's import path: ``from torch_clip_fused.optimizers import ClippedSGD``."""

from .clipped_sgd import ClippedSGD

__all__ = ["ClippedSGD"]
