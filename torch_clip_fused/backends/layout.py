"""Memory layouts the fused kernels accept.

The kernels walk a tensor's memory linearly from its data pointer, so a parameter must be
dense (no gaps, no overlap: contiguous, channels_last, transposed...) and its gradient and
momentum buffer must share its layout (autograd's gradients and ``zeros_like`` buffers do).
Elements are then visited in memory order, which is also the order of coordinate-scope random
draws in every backend.
"""

from __future__ import annotations

from typing import Optional

import torch


def is_dense(t: torch.Tensor) -> bool:
    """No gaps and no overlap: the strides of the dimensions longer than 1, sorted, are 1, then
    the products of the sizes (any permutation of a contiguous layout)."""
    if t.numel() == 0:
        return True  # nothing to walk
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same sizes and the same strides on every dimension longer than 1."""
    return a.shape == b.shape and all(
        sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1
    )


def check_dense_layout(backend: str, index: int, p: torch.Tensor, g: torch.Tensor, m: Optional[torch.Tensor],
                       group: Optional[int] = None) -> None:
    """Raise a clear error unless parameter ``index`` (of param group ``group``) can be walked
    linearly by a fused kernel."""
    where = f"parameter {index}" + ("" if group is None else f" of param group {group}")
    if not is_dense(p):
        raise RuntimeError(
            f"backend={backend!r}: {where} (shape {tuple(p.shape)}, strides {p.stride()}) is not "
            "dense in memory; make it contiguous or use backend='reference'"
        )
    for name, other in (("gradient", g), ("momentum buffer", m)):
        if other is None:
            continue
        if other.shape != p.shape:
            raise RuntimeError(f"backend={backend!r}: the {name} shape {tuple(other.shape)} of {where} does not "
                               f"match the parameter's {tuple(p.shape)}")
        if not same_layout(p, other):
            raise RuntimeError(
                f"backend={backend!r}: the {name} of {where} has strides {other.stride()} but the "
                f"parameter has {p.stride()}; give them the same memory layout or use backend='reference'"
            )
