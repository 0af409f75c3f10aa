"""Which tensors a param group's step works on, kept between steps and re-checked cheaply.

A ``GroupLayout`` holds what depends only on the parameters: which of them have gradients
(``columns``), their flat offsets, the momentum buffers, and a slot where a backend keeps its
own per-group cache (the Triton multi-tensor plan).  Autograd gives new gradient tensors on every
step when ``zero_grad(set_to_none=True)`` (torch's default) is used, so the gradients themselves
are not part of the layout: each step :meth:`GroupLayout.refresh` re-reads their data pointers
into ``grad_ptrs`` with O(1) work per tensor (one C++ call when the extension is built, a few
Python list operations otherwise) and checks that everything the layout assumed still holds:

* the same parameters have gradients;
* no parameter was reallocated (``p.data = ...``);
* every gradient has its parameter's dtype, device, sizes and strides (the fused kernels walk
  gradient and parameter memory with the same offsets).

When a check fails the optimizer gathers the group again and builds a new layout, which raises
the clear error if the new tensors cannot be stepped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import List, Optional

import torch

UNCHANGED, CHANGED = -1, -2


def units(p: torch.Tensor) -> int:
    """The output units of a tensor at unit scope (methods.Scope.UNIT): its slices along dim 0 when it has
    two or more dimensions (matrix rows, conv filters), else the whole tensor is one unit (timm's
    ``unitwise_norm``)."""
    return p.shape[0] if p.dim() >= 2 else 1


def units_contiguous(p: torch.Tensor) -> bool:
    """Whether each unit of ``p`` occupies its own contiguous range of memory, unit u at
    [u * numel / units, (u + 1) * numel / units) from the data pointer (what the fused kernels walk):
    dim 0 is the outermost dimension (contiguous and channels_last tensors, not a transposed matrix)."""
    n = units(p)
    return n <= 1 or p.numel() == 0 or p.stride(0) == p.numel() // n


@dataclass
class GroupLayout:
    params: List[torch.Tensor]  # the group's parameters that have gradients, in group order
    columns: List[int]  # their positions in the group
    offsets: List[int]  # their first element's position in the group laid end to end
    device: torch.device
    has_grad: torch.Tensor  # uint8 [G] (CPU): which of the group's parameters are covered
    param_ptrs: torch.Tensor  # int64 [G] (CPU): the parameters' data pointers when built
    grad_ptrs: torch.Tensor  # int64 [T] (CPU): the gradients' data pointers, refreshed every step
    buffers: Optional[List[torch.Tensor]] = None  # momentum buffers, created on the first use
    buffers_version: int = -1  # the optimizer state's edit count when ``buffers`` was collected
    backend_cache: dict = field(default_factory=dict)  # a backend's own per-group state
    # the same facts as Python lists, for the refresh without the C++ extension
    has_grad_list: List[bool] = field(default_factory=list)
    param_ptr_list: List[int] = field(default_factory=list)
    grad_ptr_list: List[int] = field(default_factory=list)
    grad_strides: list = field(default_factory=list)
    grad_dtypes: list = field(default_factory=list)
    #: the arithmetic of norms, thresholds and scales: float64 for a float64 group
    norm_dtype: torch.dtype = torch.float32
    #: unit scope: the position of each stepped tensor's first unit among the group's units (units())
    unit_offsets: List[int] = field(default_factory=list)

    @classmethod
    def gather(cls, group_params: List[torch.Tensor]) -> "GroupLayout":
        """The layout of a group's current gradients (the caller validates them)."""
        columns = [i for i, p in enumerate(group_params) if p.grad is not None]
        starts = list(itertools.accumulate((p.numel() for p in group_params), initial=0))
        unit_starts = list(itertools.accumulate((units(p) for p in group_params), initial=0))
        params = [group_params[i] for i in columns]
        grads = [p.grad for p in params]
        layout = cls(
            params=params,
            columns=columns,
            offsets=[starts[i] for i in columns],
            unit_offsets=[unit_starts[i] for i in columns],
            device=params[0].device if params else torch.device("cpu"),
            norm_dtype=torch.float64 if params and all(p.dtype == torch.float64 for p in params) else torch.float32,
            has_grad=torch.tensor([p.grad is not None for p in group_params], dtype=torch.uint8),
            param_ptrs=torch.tensor([p.data_ptr() for p in group_params], dtype=torch.int64),
            grad_ptrs=torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64),
        )
        layout.has_grad_list = [p.grad is not None for p in group_params]
        layout.param_ptr_list = [p.data_ptr() for p in group_params]
        layout.grad_ptr_list = [g.data_ptr() for g in grads]
        layout.grad_strides = [g.stride() if g.layout is torch.strided else None for g in grads]
        layout.grad_dtypes = [g.dtype for g in grads]
        return layout

    def refresh(self, group_params: List[torch.Tensor]) -> int:
        """Re-read the gradient pointers: UNCHANGED or CHANGED when the layout still holds, else
        the group index of the first parameter that breaks it."""
        if len(group_params) != len(self.has_grad_list):  # parameters added to or removed from the group
            return 0
        ext = _extension()
        if ext is not None:
            return ext.refresh_grad_pointers(group_params, self.has_grad, self.param_ptrs, self.grad_ptrs)
        return _refresh_in_python(self, group_params)


def _refresh_in_python(layout: GroupLayout, group_params) -> int:
    """The C++ ``refresh_grad_pointers`` for machines where the extension is not built: the same
    answer from a few whole-list operations (gradient sizes, dtypes and devices are already
    enforced by torch when a gradient is assigned; strides are compared with the gathered ones)."""
    grads = [p.grad for p in group_params]
    if [g is not None for g in grads] != layout.has_grad_list or \
            list(map(torch.Tensor.data_ptr, group_params)) != layout.param_ptr_list:
        return _first_change(layout, group_params)
    present = [g for g in grads if g is not None]
    try:
        same = list(map(torch.Tensor.stride, present)) == layout.grad_strides and \
            [g.dtype for g in present] == layout.grad_dtypes
    except RuntimeError:  # a sparse gradient has no strides
        same = False
    if not same:
        return _first_change(layout, group_params)
    pointers = list(map(torch.Tensor.data_ptr, present))
    if pointers == layout.grad_ptr_list:
        return UNCHANGED
    layout.grad_ptr_list = pointers
    layout.grad_ptrs.copy_(torch.tensor(pointers, dtype=torch.int64))
    return CHANGED


def _first_change(layout: GroupLayout, group_params) -> int:
    k = 0
    for j, p in enumerate(group_params):
        g = p.grad
        if (g is not None) != layout.has_grad_list[j] or p.data_ptr() != layout.param_ptr_list[j]:
            return j
        if g is None:
            continue
        if g.layout is not torch.strided or g.stride() != layout.grad_strides[k] or g.dtype != layout.grad_dtypes[k]:
            return j
        k += 1
    return 0


def _extension():
    """The C++ extension when it is already loaded or the C++ backend is usable; None otherwise
    (the Python refresh is slower, not different)."""
    from . import cpp as cpp_backend

    return cpp_backend.loaded_extension()
