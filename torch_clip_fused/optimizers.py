"""The original's import path: ``from torch_clip_fused.optimizers import ClippedSGD, ClippedSSTM`` (and
``ClippedAdamW``, which the original did not have)."""

from .optim import ClippedAdamW, ClippedSGD, ClippedSSTM

__all__ = ["ClippedAdamW", "ClippedSGD", "ClippedSSTM"]
