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

from .layout import same_layout

UNCHANGED, CHANGED = -1, -2


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
    backend_cache: dict = field(default_factory=dict)  # a backend's own per-group state

    @classmethod
    def gather(cls, group_params: List[torch.Tensor]) -> "GroupLayout":
        """The layout of a group's current gradients (the caller validates them)."""
        columns = [i for i, p in enumerate(group_params) if p.grad is not None]
        starts = list(itertools.accumulate((p.numel() for p in group_params), initial=0))
        params = [group_params[i] for i in columns]
        return cls(
            params=params,
            columns=columns,
            offsets=[starts[i] for i in columns],
            device=params[0].device if params else torch.device("cpu"),
            has_grad=torch.tensor([p.grad is not None for p in group_params], dtype=torch.uint8),
            param_ptrs=torch.tensor([p.data_ptr() for p in group_params], dtype=torch.int64),
            grad_ptrs=torch.tensor([p.grad.data_ptr() for p in params], dtype=torch.int64),
        )

    def refresh(self, group_params: List[torch.Tensor]) -> int:
        """Re-read the gradient pointers: UNCHANGED or CHANGED when the layout still holds, else
        the group index of the first parameter that breaks it."""
        ext = _extension()
        if ext is not None:
            return ext.refresh_grad_pointers(group_params, self.has_grad, self.param_ptrs, self.grad_ptrs)
        return _refresh_in_python(group_params, self.has_grad, self.param_ptrs, self.grad_ptrs)


def _refresh_in_python(group_params, has_grad, param_ptrs, grad_ptrs) -> int:
    """The C++ ``refresh_grad_pointers`` for machines where the extension cannot be built."""
    grads = [p.grad for p in group_params]
    present = [g is not None for g in grads]
    if present != has_grad.tolist() or [p.data_ptr() for p in group_params] != param_ptrs.tolist():
        return next((j for j in range(len(group_params)) if present[j] != bool(has_grad[j])
                     or group_params[j].data_ptr() != int(param_ptrs[j])), 0)
    pointers = []
    for j, (p, g) in enumerate(zip(group_params, grads)):
        if g is None:
            continue
        if g.layout is not torch.strided or g.dtype != p.dtype or g.device != p.device or not same_layout(p, g):
            return j
        pointers.append(g.data_ptr())
    if pointers == grad_ptrs.tolist():
        return UNCHANGED
    grad_ptrs.copy_(torch.tensor(pointers, dtype=torch.int64))
    return CHANGED


def _extension():
    """The C++ extension when it is already loaded or the C++ backend is usable; None otherwise
    (the Python refresh is slower, not different)."""
    from . import cpp_backend

    return cpp_backend.loaded_extension()
