"""What each backend takes, as data (issue 19 item 5): the optimizers, the shared norm and the
functional API read a :class:`Backend` record, never a function's name.

A backend is its step (``step(GroupTensors, GroupConfig)``: the three stages of docs/spec.md section 6;
``norms`` and ``apply``, the stages as the contract, stages.py), its stage function
(``clip(GroupTensors, GroupConfig, norms, stage)``: the functional API's "norms",
"clip", "both"), and what its kernels walk: the parameter dtypes it computes in place (a group of
other dtypes goes through the reference inside the backend), whether it walks memory linearly (then
every such parameter must be dense, its gradient in its layout, and at unit scope each output unit
contiguous), and the device types it runs on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, FrozenSet, Optional, Tuple

import torch

from .group_layout import units_contiguous
from .layout import check_dense_layout
from .stages import apply_with_norms, norm_parts

ALL_DTYPES: FrozenSet[torch.dtype] = frozenset({torch.float64, torch.float32, torch.bfloat16, torch.float16})


@dataclass(frozen=True)
class Backend:
    """One backend's functions and capabilities."""

    name: str  # "reference", "cpp", "triton", or "custom" for a step function given as ``backend``
    step: Callable
    clip: Optional[Callable]  # None: the functional stages of a custom step are the reference's
    kernel_dtypes: FrozenSet[torch.dtype]  # parameter dtypes its kernels walk in place
    walks_memory: bool  # kernels walk each tensor linearly from its data pointer
    devices: Tuple[str, ...]  # device types it runs on ("cpu" for Triton only under its interpreter)

    def norms(self, t, cfg) -> torch.Tensor:
        """Stage 1 (stages.py): float64 [T + 1], the per-tensor sums of squares and the non-finite count."""
        return norm_parts(self.clip or reference_backend().clip, t, cfg)

    def apply(self, t, cfg, norms: Optional[torch.Tensor] = None) -> None:
        """Stages 2 and 3 (stages.py) with reduced norms [T + 1], or the fused step with ``norms=None``."""
        apply_with_norms(self.step, t, cfg, norms)

    def check_layouts(self, group: int, pairs, columns, unit_scope: bool) -> None:
        """Raise the clear RuntimeError of the first (parameter, gradient) of ``pairs`` (``columns``: their
        positions in param group ``group``) that this backend's kernels cannot walk."""
        if not self.walks_memory:
            return
        for column, (p, g) in zip(columns, pairs):
            if p.dtype not in self.kernel_dtypes:
                continue
            check_dense_layout(self.name, column, p, g, None, group=group)
            if unit_scope and not units_contiguous(p):
                raise RuntimeError(
                    f"backend={self.name!r}: parameter {column} of param group {group} (shape {tuple(p.shape)}, "
                    f"strides {p.stride()}) does not keep each output unit (slice along dim 0) contiguous in "
                    "memory, which unit-scope clipping (AGC) needs; make it contiguous or use backend='reference'")


@functools.lru_cache(maxsize=None)  # one record per process (a failed import is not kept)
def reference_backend() -> Backend:
    from .reference import reference_clip, reference_step

    return Backend("reference", reference_step, reference_clip, ALL_DTYPES, walks_memory=False,
                   devices=("cpu", "cuda"))


@functools.lru_cache(maxsize=None)  # one record per process (a failed import is not kept)
def cpp_backend() -> Backend:
    from .cpp import cpp_clip, cpp_step

    return Backend("cpp", cpp_step, cpp_clip, ALL_DTYPES, walks_memory=True, devices=("cpu",))


@functools.lru_cache(maxsize=None)  # one record per process (a failed import is not kept)
def triton_backend() -> Backend:
    from .triton import triton_clip, triton_step

    return Backend("triton", triton_step, triton_clip, frozenset({torch.float32, torch.bfloat16, torch.float16}),
                   walks_memory=True, devices=("cuda", "cpu"))


def custom_backend(step: Callable) -> Backend:
    """A step function given as ``backend``: trusted to take any layout; its functional stages are the
    reference's."""
    return Backend("custom", step, None, ALL_DTYPES, walks_memory=False, devices=("cpu", "cuda"))


__all__ = ["ALL_DTYPES", "Backend", "cpp_backend", "custom_backend", "reference_backend", "triton_backend"]
