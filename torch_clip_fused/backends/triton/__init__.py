"""The Triton backend: the multi-tensor plan and the launches of the kernels in
``torch_clip_fused.kernels``.  Importing it needs triton; ``dispatch`` turns the ImportError into
the ``backend="triton"`` error or the ``backend="auto"`` fallback."""

from .plan import plan_builds
from .step import triton_clip, triton_step

__all__ = ["plan_builds", "triton_clip", "triton_step"]
