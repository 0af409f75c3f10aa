"""``skip_if_norm_above``: skip the step when the whole model's pre-clip gradient norm exceeds a fixed
value (Megatron-LM's ``grad_norm_skip_threshold``, optax's ``skip_large_updates``):

    skip  <=>  ||g|| > skip_if_norm_above      (a non-finite ||g|| is the non-finite policy's, not this rule's)
"""

from __future__ import annotations

import torch

from ..checks import bounded
from ..thresholds.policy import Setting
from .rule import SkipInputs, SkipRule


def optional_level(name: str):
    """The parser of a rule's switch: None (off) or a finite number >= 0."""
    def parse(value):
        return None if value is None else bounded(value, name, lambda x: x >= 0.0, f"None or {name} >= 0")
    return parse


def norm_above(x: SkipInputs) -> torch.Tensor:
    """bool []: ||g|| > skip_if_norm_above."""
    return x.norm > x.settings.skip_if_norm_above


NORM_ABOVE = SkipRule(
    settings=(Setting("skip_if_norm_above", None, optional_level("skip_if_norm_above"),
                      "skip the step when the pre-clip global gradient norm exceeds this (None: never)"),),
    decide=norm_above,
    doc=__doc__,
)

__all__ = ["NORM_ABOVE", "norm_above", "optional_level"]
