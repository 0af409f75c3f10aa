"""The pure-PyTorch reference backend: the readable oracle of every stage, and the fallback."""

from .step import (all_finite, reference_clip, clip_list, grad_norms, nearest_rank, norm_scales,
                   record_and_threshold, reference_step, sgd_direction)

__all__ = ["all_finite", "reference_clip", "clip_list", "grad_norms", "nearest_rank", "norm_scales",
           "record_and_threshold", "reference_step", "sgd_direction"]
