"""A param group's tensors addressed as one flat index space, for multi-tensor kernels.

Tensors are bucketed by (param dtype, grad dtype); each bucket has

* a tensor table, int64 [T_b, TABLE_WIDTH]: grad / param / momentum data pointers, numel,
  flat offset (first element's position in the group laid end to end), column (position in
  the param group) and global index (position in the step's tensor list);
* a chunk table, int64 [C_b, 3]: (row in the tensor table, first element, global chunk id).

Chunks of all buckets are numbered in the order of the step's tensor list, so a tensor's
chunks are contiguous: ``tensor_chunk_start[i] : tensor_chunk_start[i + 1]``.  A plan is
built once and cached by the tensors' storage (pointers, sizes, dtypes): it is rebuilt only
when a parameter, gradient or momentum buffer is reallocated.  The plan also owns the
scratch buffers the kernels write every step, so a step allocates nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional

import torch

from torch_clip_fused.layout import check_dense_layout

TABLE_WIDTH = 8
G_PTR, P_PTR, M_PTR, NUMEL, FLAT_OFFSET, COLUMN, GLOBAL_INDEX = range(7)
_CACHE_SIZE = 32
_plans: "OrderedDict[tuple, MultiTensorPlan]" = OrderedDict()


@dataclass
class Bucket:
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    tensor_table: torch.Tensor
    chunk_table: torch.Tensor
    n_chunks: int


@dataclass
class MultiTensorPlan:
    buckets: List[Bucket]
    tensor_chunk_start: torch.Tensor  # int64 [T + 1]
    columns: torch.Tensor  # int64 [T]
    n_tensors: int
    n_chunks: int
    numel: int
    # scratch, overwritten every step
    partial_sq: torch.Tensor  # float32 [n_chunks]
    partial_bad: torch.Tensor  # int32 [n_chunks]
    clip_counts: torch.Tensor  # int64 [n_chunks]
    scales: torch.Tensor  # float32 [T]: per-tensor (layer) or [0] global scale
    etas: torch.Tensor  # float32 [T]
    clipped: torch.Tensor  # float32 [T]
    fscratch: torch.Tensor  # float32 [2]: global norm
    iscratch: torch.Tensor  # int64 [2]: ok flag, Philox key
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


def _to_device(rows, device) -> torch.Tensor:
    table = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1 if rows else 1)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _signature(params, grads, buffers, columns, offsets, chunk):
    return (chunk,) + tuple(
        (p.data_ptr(), g.data_ptr(), 0 if m is None else m.data_ptr(), p.numel(), p.dtype, g.dtype, c, o)
        for p, g, m, c, o in zip(params, grads, buffers, columns, offsets)
    )


def get_plan(params, grads, buffers: Optional[list], columns, offsets, chunk: int) -> MultiTensorPlan:
    """The cached plan for these tensors, built if their storage changed."""
    buffers = buffers if buffers is not None else [None] * len(params)
    key = _signature(params, grads, buffers, columns, offsets, chunk)
    plan = _plans.get(key)
    if plan is not None:
        _plans.move_to_end(key)
        return plan
    plan = _build(params, grads, buffers, columns, offsets, chunk)
    _plans[key] = plan
    if len(_plans) > _CACHE_SIZE:
        _plans.popitem(last=False)
    return plan


def _build(params, grads, buffers, columns, offsets, chunk) -> MultiTensorPlan:
    device = params[0].device
    for i, (p, g, m) in enumerate(zip(params, grads, buffers)):
        check_dense_layout("triton", i, p, g, m)
    order = {}
    tensor_rows, chunk_rows = {}, {}
    tensor_chunk_start, next_chunk = [], 0
    for i, (p, g, m) in enumerate(zip(params, grads, buffers)):
        key = (p.dtype, g.dtype)
        order.setdefault(key, len(order))
        rows = tensor_rows.setdefault(key, [])
        tensor_chunk_start.append(next_chunk)
        local = len(rows)
        rows.append([g.data_ptr(), p.data_ptr(), 0 if m is None else m.data_ptr(), p.numel(),
                     offsets[i], columns[i], i, 0])
        for start in range(0, p.numel(), chunk):
            chunk_rows.setdefault(key, []).append([local, start, next_chunk])
            next_chunk += 1
    tensor_chunk_start.append(next_chunk)
    buckets = [
        Bucket(key[0], key[1], _to_device(tensor_rows[key], device), _to_device(chunk_rows.get(key, []), device),
               len(chunk_rows.get(key, [])))
        for key in sorted(order, key=order.get)
    ]
    n, c = len(params), max(next_chunk, 1)
    f32 = dict(dtype=torch.float32, device=device)
    return MultiTensorPlan(
        buckets=buckets,
        tensor_chunk_start=_to_device(tensor_chunk_start, device).reshape(-1),
        columns=_to_device(list(columns), device).reshape(-1),
        n_tensors=n,
        n_chunks=next_chunk,
        numel=sum(p.numel() for p in params),
        partial_sq=torch.zeros(c, **f32),
        partial_bad=torch.zeros(c, dtype=torch.int32, device=device),
        clip_counts=torch.zeros(c, dtype=torch.int64, device=device),
        scales=torch.ones(n, **f32),
        etas=torch.zeros(n, **f32),
        clipped=torch.zeros(n, **f32),
        fscratch=torch.zeros(2, **f32),
        iscratch=torch.zeros(2, dtype=torch.int64, device=device),
        seed=torch.zeros(1, dtype=torch.int64, device=device),
        p_autoclip=torch.zeros(1, dtype=torch.float64, device=device),
    )
