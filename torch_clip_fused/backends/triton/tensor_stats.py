"""The Triton backend's per-tensor telemetry (torch_clip_fused/tensor_stats.py), read from what its two launches
leave in the plan's per-step scratch (plan.py): no pass over the gradients, no host sync, and the kernels
(hence every compiled variant and every result) unchanged.

With T tensors, C chunks and U units, after the apply pass:

* norms: ||x_i|| = sqrt(tensor_sq[i]) (the norm pass's float64 sums of squares, in its fixed order; with
  ``norm_type`` p its parts, ||x_i||_p = tensor_sq[i]^(1/p), norm_type.py), the
  given norms where norms were given, NaN where no norm was taken;
* scales: the scale stage's stored scales decoded (kernels/clip_scales.py stored_scale: s, or -(s * 2**64)
  below float32's normal range), scales[0] at global scope and scales[i] at layer scope; at unit scope the
  share of tensor i's units whose scale is below 1; at coordinate scope sum of clip_counts over tensor i's
  chunks / numel_i; 1 without clipping;
* a skipped step (the finish's stats[3] = 1): scales 1, fractions 0.

That is a handful of O(T + C + U) device operations after the two launches (the index tensors are built
once per plan), capturable in a CUDA graph like the step.
"""

from __future__ import annotations

import torch

from ...methods import Scope
from ...norm_type import from_parts
from ...tensor_stats import skipped_scales, write_columns
from ..group_layout import units

#: the inverse of kernels/clip_scales.py's SPLIT_POST
_SPLIT_PRE = 2.0**-64


class _Index:
    """Per plan, built once: each chunk's and each unit's tensor, and each tensor's elements and units
    (at least 1: an empty tensor's fraction is 0)."""

    def __init__(self, plan, params):
        device = plan.columns.device
        n = plan.n_tensors
        positions = torch.arange(n, dtype=torch.int64, device=device)
        chunks = plan.tensor_chunk_start[1:] - plan.tensor_chunk_start[:-1]
        self.chunk_tensor = torch.repeat_interleave(positions, chunks, output_size=plan.n_chunks)
        self.numels = torch.tensor([max(p.numel(), 1) for p in params], dtype=torch.float64, device=device)
        unit_counts = [units(p) for p in params]
        self.unit_tensor = torch.repeat_interleave(
            positions, torch.tensor(unit_counts, dtype=torch.int64, device=device), output_size=plan.n_units)
        self.units = torch.tensor([max(c, 1) for c in unit_counts], dtype=torch.float64, device=device)


def _index(plan, params) -> _Index:
    index = plan.tensor_stats_index
    if index is None:
        index = plan.tensor_stats_index = _Index(plan, params)
    return index


def _decoded(stored: torch.Tensor) -> torch.Tensor:
    """Stored float32 scales as float64 values s (kernels/clip_apply.py scale_factors: pre * |stored|)."""
    value = stored.to(torch.float64)
    return torch.where(stored < 0, -value * _SPLIT_PRE, value)


def write_tensor_stats(plan, t, cfg, norms_ran: bool) -> None:
    """The step's per-tensor telemetry into ``t.tensor_stats`` (module docstring), after the apply pass."""
    n = plan.n_tensors
    device = plan.columns.device
    if t.given_norms is not None:
        norms = t.given_norms[:-1].to(device)
    elif norms_ran:
        norms = from_parts(plan.tensor_sq, cfg.clip.norm_type)  # (p = 2: sqrt of the sums of squares)
    else:
        norms = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    scope = cfg.clip.method.scope
    fraction = scope in (Scope.UNIT, Scope.COORDINATE)
    if scope is None:
        scales = torch.ones(n, dtype=torch.float32, device=device)
    elif scope is Scope.GLOBAL:
        scales = _decoded(plan.scales[:1]).expand(n)
    elif scope is Scope.LAYER:
        scales = _decoded(plan.scales[:n])
    elif scope is Scope.UNIT:
        index = _index(plan, t.params)
        below = (_decoded(plan.unit_scales[:plan.n_units]) < 1).to(torch.float64)
        scales = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, index.unit_tensor, below)
        scales = scales / index.units
    else:
        index = _index(plan, t.params)
        hits = torch.zeros(n, dtype=torch.float64, device=device)
        scales = hits.index_add_(0, index.chunk_tensor, plan.clip_counts.to(torch.float64)) / index.numels
    write_columns(t.tensor_stats, plan.columns, norms, skipped_scales(scales, t.stats[3] == 0, fraction))


__all__ = ["write_tensor_stats"]
