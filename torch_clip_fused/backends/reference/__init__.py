"""The pure-PyTorch reference backend: the readable oracle of every stage, and the fallback."""

from .step import all_finite, clip_list, grad_norms, norm_scales, reference_clip, reference_step, sgd_direction

__all__ = ["all_finite", "reference_clip", "clip_list", "grad_norms", "norm_scales", "reference_step",
           "sgd_direction"]
