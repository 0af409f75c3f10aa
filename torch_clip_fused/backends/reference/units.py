"""Unit scope on the flat workspace: which unit each element belongs to, and per-unit norms.

At unit scope (``methods.Scope.UNIT``, the scope of adaptive gradient clipping: Brock et al., 2021,
"High-Performance Large-Scale Image Recognition Without Normalization") one norm is taken per
*output unit*: for a tensor x with x.dim() >= 2 the slices x[u] along dim 0 (the rows of a
matrix, the filters of a convolution), each normed over all its other dimensions; a tensor with
x.dim() <= 1 is one unit (timm's ``unitwise_norm``):

    ||x_u|| = sqrt(sum_{k} x[u, k...]^2)

The units of a step's tensors are laid end to end in the group's tensor order, tensor i's units at
``[base_i, base_i + units_i)`` of every per-unit vector; the Philox index of unit u of tensor i is
``unit_offsets[i] + u`` (its position among all the group's units).

The unit is the *logical* slice x[u], whatever the tensor's memory layout: the element -> unit map
is built through each tensor's own view of the workspace (its strides), once per layout, so a
transposed or channels-last tensor is handled as a contiguous one.  Per step, a unit's sum of
squares is one ``index_add_`` of float64 squares per workspace segment (a finite gradient always
has a finite norm), with no host synchronisation.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def units_of(shape: Sequence[int]) -> int:
    """The number of output units of a tensor of ``shape``: shape[0] for two or more dimensions, else 1."""
    return shape[0] if len(shape) >= 2 else 1


class UnitLayout:
    """The units of one step's tensors, on the workspace's segments (built once per layout).

    ``count``: the number of units U of the step's tensors; ``element_units[j]``: int64 flat
    [segment j's numel], the position (in [0, U)) of each element's unit; ``index``: int64 [U], the
    Philox index of each unit (None when no ``unit_offsets`` were given)."""

    def __init__(self, segments, shapes: List[Sequence[int]], unit_offsets: Optional[List[int]], device):
        counts = [units_of(s) for s in shapes]
        bases, base = [], 0
        for c in counts:
            bases.append(base)
            base += c
        self.count = base
        self.device = device
        self.element_units: List[torch.Tensor] = []
        for seg in segments:
            flat = torch.empty(seg.numel, dtype=torch.int64, device=device)
            for i, shape, stride, start in zip(seg.members, seg.shapes, seg.strides, seg.starts):
                view = flat.as_strided(shape, stride, start)  # the tensor's own layout in the workspace
                if len(shape) >= 2:
                    unit = torch.arange(bases[i], bases[i] + shape[0], dtype=torch.int64, device=device)
                    view.copy_(unit.view(-1, *([1] * (len(shape) - 1))).expand(shape))
                else:
                    view.fill_(bases[i])
            self.element_units.append(flat)
        self._counts, self._bases = counts, bases
        self._unit_tensor = None
        self.index = None
        if unit_offsets is not None:
            shift = torch.tensor([o - b for o, b in zip(unit_offsets, bases)], dtype=torch.int64, device=device)
            lengths = torch.tensor(counts, dtype=torch.int64, device=device)
            self.index = torch.arange(self.count, dtype=torch.int64, device=device) + torch.repeat_interleave(
                shift, lengths, output_size=self.count)

    def exact_norms(self, flats: List[torch.Tensor]) -> torch.Tensor:
        """||x_u|| of every unit ([U], float64) from the segments' flat buffers ``flats``: the squares
        float64 and summed per unit (right at both ends of the float32 range)."""
        sums = torch.zeros(self.count, dtype=torch.float64, device=self.device)
        for flat, units in zip(flats, self.element_units):
            sums.index_add_(0, units, flat.to(torch.float64).square())
        return sums.sqrt()

    def norms(self, flats: List[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """``exact_norms`` in ``dtype`` (a norm past float32's range is +inf in float32)."""
        return self.exact_norms(flats).to(dtype)

    def per_tensor_fraction(self, flags: torch.Tensor) -> torch.Tensor:
        """float64 [n]: the share of each tensor's units where ``flags`` (bool [U]) holds (0 for a tensor
        without units)."""
        if self._unit_tensor is None:
            counts = torch.tensor(self._counts, dtype=torch.int64, device=self.device)
            self._unit_tensor = (torch.repeat_interleave(torch.arange(len(self._counts), device=self.device), counts,
                                                         output_size=self.count),
                                 counts.clamp(min=1).to(torch.float64))
        index, per_tensor = self._unit_tensor
        hits = torch.zeros(len(self._counts), dtype=torch.float64, device=self.device)
        return hits.index_add_(0, index, flags.to(torch.float64)) / per_tensor

    def expand(self, j: int, per_unit: torch.Tensor) -> torch.Tensor:
        """A per-unit value ([U]) at each element of segment ``j`` (flat [numel])."""
        return per_unit.index_select(0, self.element_units[j])
