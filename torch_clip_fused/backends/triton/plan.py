"""A param group's tensors addressed as one flat index space, for multi-tensor kernels.

The plan depends only on the parameters (and momentum buffers): it is built once per
``GroupLayout`` (torch_clip_fused/backends/group_layout.py) and kept while the layout holds.  Gradients
are new tensors on every step under ``zero_grad(set_to_none=True)``, so their data pointers live
in a separate table, ``grad_ptrs`` [T], uploaded only when they change (from a pinned staging
tensor of torch's caching host allocator, which hands a block out again only after the copy that
read it has completed, so a step never overwrites pointers the GPU has not read yet).

Tensors are bucketed by dtype; each bucket has

* a tensor table, int64 [T_b, TABLE_WIDTH], with the columns named in kernels/columns.py;
* a chunk table, int64 [C_b, CHUNK_WIDTH]: (row in the tensor table, first element, chunk id).

Chunks of all buckets are numbered in the order of the step's tensor list, so a tensor's chunks
are contiguous: ``tensor_chunk_start[i] : tensor_chunk_start[i + 1]``.  Every tensor has at least
one chunk (an empty tensor's has no elements), so every tensor's norm is written every step.
The plan also owns the scratch the kernels write every step, so a step allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch_clip_fused.kernels.columns import CHUNK_WIDTH, TABLE_WIDTH

from ..layout import check_dense_layout

_builds = 0


def plan_builds() -> int:
    """How many plans this process has built (a plan is built once per parameter set)."""
    return _builds


@dataclass
class Bucket:
    dtype: torch.dtype
    tensor_table: torch.Tensor
    chunk_table: torch.Tensor
    n_chunks: int


@dataclass
class MultiTensorPlan:
    buckets: List[Bucket]
    chunk: int  # elements per chunk
    has_buffers: bool
    grad_ptrs: torch.Tensor  # int64 [T] on the device: gradient data pointers
    tensor_chunk_start: torch.Tensor  # int64 [T + 1]
    columns: torch.Tensor  # int64 [T]
    n_tensors: int
    n_chunks: int
    numel: int
    # scratch, overwritten every step
    partial_sq: torch.Tensor  # float64 [n_chunks]: per-chunk sums of squares (no overflow)
    partial_bad: torch.Tensor  # int32 [n_chunks]: per-chunk non-finite flags
    tensor_sq: torch.Tensor  # float64 [T]: per-tensor sums of squares
    tensor_bad: torch.Tensor  # int32 [T]: per-tensor non-finite flags
    tensor_done: torch.Tensor  # int32 [T]: chunks of the tensor done this step (back to 0 after)
    norm_done: torch.Tensor  # int32 [1]: tensors normed this step (back to 0 after)
    apply_done: torch.Tensor  # int32 [1]: chunks applied this step (back to 0 after)
    clip_counts: torch.Tensor  # int64 [n_chunks]: coordinates clipped per chunk
    scales: torch.Tensor  # float32 [T]: per-tensor (layer) or [0] global scale
    etas: torch.Tensor  # float32 [T]: thresholds
    clipped: torch.Tensor  # float32 [T]: clip decisions
    fscratch: torch.Tensor  # float32 [4]: global norm, mean threshold, fraction clipped
    iscratch: torch.Tensor  # int64 [1]: ok flag
    # settings read by the kernels from memory (a Python int >= 2**31 would reach a kernel as
    # uint32 and a Python float as float32), refreshed only when they change
    seed: torch.Tensor  # int64 [1]
    p_autoclip: torch.Tensor  # float64 [1]
    seed_value: Optional[int] = None
    p_value: Optional[float] = None

    def set_settings(self, seed: int, p_autoclip: float) -> None:
        if seed != self.seed_value:
            self.seed.fill_(seed)
            self.seed_value = seed
        if p_autoclip != self.p_value:
            self.p_autoclip.fill_(p_autoclip)
            self.p_value = p_autoclip

    def upload_grad_ptrs(self, host: torch.Tensor) -> None:
        """Copy this step's gradient pointers (int64 [T], CPU) to the device without a host sync."""
        if self.grad_ptrs.device.type == "cpu":
            if self.grad_ptrs.data_ptr() != host.data_ptr():
                self.grad_ptrs = host  # the layout's own tensor: refreshed in place, nothing to copy
            return
        staging = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        staging.copy_(host)
        self.grad_ptrs.copy_(staging, non_blocking=True)


def _to_device(rows, device, width) -> torch.Tensor:
    table = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), width)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def build_plan(params, grads, buffers: Optional[list], columns, offsets, chunk: int) -> MultiTensorPlan:
    """The plan of one param group's step; raises a clear error for a layout the kernels cannot walk."""
    global _builds
    device = params[0].device
    for i, (p, g) in enumerate(zip(params, grads)):
        check_dense_layout("triton", columns[i], p, g, None if buffers is None else buffers[i])
    order = {}
    tensor_rows, chunk_rows = {}, {}
    tensor_chunk_start, next_chunk = [], 0
    for i, p in enumerate(params):
        m = None if buffers is None else buffers[i]
        rows = tensor_rows.setdefault(p.dtype, [])
        order.setdefault(p.dtype, len(order))
        tensor_chunk_start.append(next_chunk)
        local = len(rows)
        rows.append([p.data_ptr(), 0 if m is None else m.data_ptr(), p.numel(), offsets[i], columns[i], i])
        for start in range(0, max(p.numel(), 1), chunk):
            chunk_rows.setdefault(p.dtype, []).append([local, start, next_chunk])
            next_chunk += 1
    tensor_chunk_start.append(next_chunk)
    buckets = [
        Bucket(dtype, _to_device(tensor_rows[dtype], device, TABLE_WIDTH.value),
               _to_device(chunk_rows[dtype], device, CHUNK_WIDTH.value), len(chunk_rows[dtype]))
        for dtype in sorted(order, key=order.get)
    ]
    n, c = len(params), next_chunk
    f32 = dict(dtype=torch.float32, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    _builds += 1
    return MultiTensorPlan(
        buckets=buckets,
        chunk=chunk,
        has_buffers=buffers is not None,
        grad_ptrs=torch.zeros(n, dtype=torch.int64, device=device),
        tensor_chunk_start=_to_device(tensor_chunk_start, device, 1).reshape(-1),
        columns=_to_device(list(columns), device, 1).reshape(-1),
        n_tensors=n,
        n_chunks=c,
        numel=sum(p.numel() for p in params),
        partial_sq=torch.zeros(c, dtype=torch.float64, device=device),
        partial_bad=torch.zeros(c, **i32),
        tensor_sq=torch.zeros(n, dtype=torch.float64, device=device),
        tensor_bad=torch.zeros(n, **i32),
        tensor_done=torch.zeros(n, **i32),
        norm_done=torch.zeros(1, **i32),
        apply_done=torch.zeros(1, **i32),
        clip_counts=torch.zeros(c, dtype=torch.int64, device=device),
        scales=torch.ones(n, **f32),
        etas=torch.zeros(n, **f32),
        clipped=torch.zeros(n, **f32),
        fscratch=torch.zeros(4, **f32),
        iscratch=torch.zeros(1, dtype=torch.int64, device=device),
        seed=torch.zeros(1, dtype=torch.int64, device=device),
        p_autoclip=torch.zeros(1, dtype=torch.float64, device=device),
    )
