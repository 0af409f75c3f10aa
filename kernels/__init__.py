"""Triton kernels of torch_clip_fused (installed as torch_clip_fused.kernels).

Importing this package needs triton; ``torch_clip_fused.backends`` turns the ImportError
into the ``backend="triton"`` error or the ``backend="auto"`` fallback.
"""

from .clipped_sgd_step import triton_step
from .multi_tensor import plan_builds

__all__ = ["plan_builds", "triton_step"]
