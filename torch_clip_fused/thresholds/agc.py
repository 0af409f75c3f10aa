"""The relative threshold: adaptive gradient clipping (Brock et al., 2021, "High-Performance
Large-Scale Image Recognition Without Normalization"), as timm's ``adaptive_clip_grad``:

    eta = clipping_level * max(||w||, agc_eps)

with ||w|| the parameters' norm over the same scope as the gradient's (each output unit, tensor,
or the group's), summed by the norm pass in the gradients' read.  Stateless; the kernels' branch:
``csrc/clipped_sgd.cpp`` and ``kernels/clip_scales.py`` (code ``relative``).
"""

from __future__ import annotations

import torch

from ..checks import bounded
from ..methods import Threshold
from .policy import Setting, ThresholdInputs, ThresholdPolicy


def relative_threshold(x: ThresholdInputs) -> torch.Tensor:
    """eta = clipping_level * max(||w||, agc_eps): timm's ``unitwise_norm(p).clamp(min=eps) * clip_factor``."""
    return x.weights.clamp(min=x.clip.agc_eps) * x.clip.level


AGC = ThresholdPolicy(
    Threshold.RELATIVE, relative_threshold,
    settings=(Setting("agc_eps", 1e-3, lambda v: bounded(v, "agc_eps", lambda x: x >= 0.0, "agc_eps >= 0"),
                      "AGC's floor of the weight norm (timm's eps), >= 0"),),
    kernel_params=lambda clip: (clip.agc_eps,),
    needs_weights=True,
    default_level=0.01,  # timm's clip_factor
)

__all__ = ["AGC", "relative_threshold"]
