"""The constant threshold: eta = clipping_level for every scope column (the original's methods)."""

from __future__ import annotations

import torch

from ..methods import Threshold
from .policy import ThresholdInputs, ThresholdPolicy


def constant_threshold(x: ThresholdInputs) -> torch.Tensor:
    """eta = clipping_level for every column."""
    return torch.full_like(x.norms, x.clip.level)


CONSTANT = ThresholdPolicy(Threshold.CONSTANT, constant_threshold)

__all__ = ["CONSTANT", "constant_threshold"]
