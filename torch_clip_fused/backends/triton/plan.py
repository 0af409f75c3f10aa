"""A param group's tensors addressed as one flat index space, for multi-tensor kernels.

The plan depends only on the parameters (and momentum buffers): it is built once per
``GroupLayout`` (torch_clip_fused/backends/group_layout.py) and kept while the layout holds.  Gradients
are new tensors on every step under ``zero_grad(set_to_none=True)``, so their data pointers live
in a separate table, ``grad_ptrs`` [T], uploaded only when they change (from a pinned staging
tensor of torch's caching host allocator, which hands a block out again only after the copy that
read it has completed, so a step never overwrites pointers the GPU has not read yet).

Tensors are bucketed by dtype; each bucket has

* a tensor table, int64 [T_b, TABLE_WIDTH], with the columns named in kernels/columns.py;
* a chunk table, int64 [C_b, CHUNK_WIDTH]: (row in the tensor table, first element, chunk id, one
  past the last element).

Chunks hold ``chunk`` elements (the last of a tensor fewer), except in a plan built for unit scope
(``unit_chunks``): a chunk then holds as many whole output units as fit, or, for a unit longer than
a chunk, one of the unit's equal pieces (``T_UNIT_CHUNKS`` of them), so that the norm pass sums each
unit in a fixed order.

Chunks of all buckets are numbered in the order of the step's tensor list, so a tensor's chunks
are contiguous: ``tensor_chunk_start[i] : tensor_chunk_start[i + 1]``.  Every tensor has at least
one chunk (an empty tensor's has no elements), so every tensor's norm is written every step.
The plan also owns the scratch the kernels write every step, so a step allocates nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch_clip_fused.kernels.columns import CHUNK_WIDTH, TABLE_WIDTH

from ..group_layout import units, units_contiguous
from ..layout import check_dense_layout
from ...thresholds import KERNEL_PARAMS

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
    scales: torch.Tensor  # float32 [T]: per-tensor (layer) or [0] global scale (kernels/clip_scales.py stored_scale)
    etas: torch.Tensor  # float32 [T]: thresholds
    clipped: torch.Tensor  # float32 [T]: clip decisions
    fscratch: torch.Tensor  # float32 [4]: global norm, mean threshold, fraction clipped
    iscratch: torch.Tensor  # int64 [1]: ok flag
    # unit scope and the relative threshold (AGC)
    partial_psq: torch.Tensor  # float64 [n_chunks]: per-chunk sums of the parameters' squares
    tensor_psq: torch.Tensor  # float64 [T]: per-tensor sums of the parameters' squares
    unit_sq: torch.Tensor  # float64 [max(U, 1)]: per-unit sums of squares of the gradients
    unit_psq: torch.Tensor  # float64 [max(U, 1)]: per-unit sums of squares of the parameters
    unit_scales: torch.Tensor  # float32 [max(U, 1)]: per-unit scales (stored_scale)
    unit_rand: torch.Tensor  # int64 [max(U, 1)]: each unit's Philox index (unit_offsets[i] + u)
    # settings read by the kernels from memory (a Python int >= 2**31 would reach a kernel as
    # uint32 and a Python float as float32), refreshed only when they change
    seed: torch.Tensor  # int64 [1]
    threshold_params: torch.Tensor  # float64 [KERNEL_PARAMS]: the threshold policy's kernel_params
    adam_consts: torch.Tensor  # float64 [2]: log2(beta1), log2(beta2) (AdamW's bias corrections)
    n_units: int = 0  # U: output units of the step's tensors (methods.Scope.UNIT)
    unit_chunks: bool = False  # the chunks keep output units whole (unit scope)
    has_v: bool = False  # AdamW's exp_avg_sq pointers in the tensor tables
    has_vmax: bool = False  # amsgrad's max_exp_avg_sq pointers in the tensor tables
    index_rows: Optional[list] = None  # GroupTensors.index_rows the tables were built with
    seed_value: Optional[int] = None
    params_value: Optional[tuple] = None
    betas_value: Optional[tuple] = None
    tensor_stats_index: Optional[object] = None  # per-tensor telemetry's index tensors (tensor_stats.py), built once

    def set_settings(self, seed: int, params: tuple) -> None:
        """The seed and the threshold policy's kernel_params (fills: no host sync)."""
        if seed != self.seed_value:
            self.seed.fill_(seed)
            self.seed_value = seed
        if params != self.params_value:
            if len(params) > KERNEL_PARAMS:
                raise ValueError(f"a threshold policy passes at most {KERNEL_PARAMS} kernel_params, got {params!r}")
            for j, value in enumerate(params):
                self.threshold_params[j].fill_(value)
            self.params_value = params

    def set_betas(self, beta1: float, beta2: float) -> None:
        """AdamW's betas, as float64 log2 (0 -> -inf: beta**t = 0), for the bias corrections."""
        if (beta1, beta2) != self.betas_value:
            for j, b in enumerate((beta1, beta2)):
                self.adam_consts[j].fill_(math.log2(b) if b > 0 else -math.inf)  # a fill: no host sync
            self.betas_value = (beta1, beta2)

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


def _chunks(numel: int, n_units: int, chunk: int, unit_chunks: bool):
    """A tensor's chunks [(start, end)], its elements per unit, and the chunks per unit (0: chunks of whole
    units) -- at least one chunk (an empty tensor's is empty)."""
    unit_numel = numel // n_units if numel and n_units else 1
    if not unit_chunks or numel == 0:
        return [(s, min(s + chunk, numel)) for s in range(0, max(numel, 1), chunk)], unit_numel, 0
    if unit_numel <= chunk:
        step = (chunk // unit_numel) * unit_numel
        return [(s, min(s + step, numel)) for s in range(0, numel, step)], unit_numel, 0
    length = -(-unit_numel // -(-unit_numel // chunk))  # equal pieces of at most ``chunk``
    pieces = [(a, min(a + length, unit_numel)) for a in range(0, unit_numel, length)]
    return [(u * unit_numel + a, u * unit_numel + b) for u in range(n_units) for a, b in pieces], unit_numel, len(pieces)


def build_plan(params, grads, buffers: Optional[list], columns, offsets, chunk: int, v_buffers: Optional[list] = None,
               vmax_buffers: Optional[list] = None, unit_offsets: Optional[list] = None,
               unit_chunks: bool = False, index_rows: Optional[list] = None) -> MultiTensorPlan:
    """The plan of one param group's step; raises a clear error for a layout the kernels cannot walk.
    ``v_buffers`` / ``vmax_buffers``: AdamW's exp_avg_sq / max_exp_avg_sq; ``unit_offsets``: each tensor's
    first unit among the group's units (the Philox index base of unit scope); ``unit_chunks``: chunks
    that keep output units whole (unit scope); ``index_rows``: GroupTensors.index_rows (shards that are not
    one row-major range)."""
    global _builds
    device = params[0].device
    for i, (p, g) in enumerate(zip(params, grads)):
        check_dense_layout("triton", columns[i], p, g, None if buffers is None else buffers[i])
        for extra in (v_buffers, vmax_buffers):
            if extra is not None:
                check_dense_layout("triton", columns[i], p, g, extra[i])
        if unit_chunks and not units_contiguous(p):  # (the optimizers check first; the functional API here)
            raise RuntimeError(
                f"backend='triton': parameter {columns[i]} (shape {tuple(p.shape)}, strides {p.stride()}) does not keep "
                "each output unit (slice along dim 0) contiguous in memory, which unit-scope clipping (AGC) needs; make "
                "it contiguous or use backend='reference'")
    order = {}
    tensor_rows, chunk_rows = {}, {}
    tensor_chunk_start, next_chunk, next_unit, unit_rand = [], 0, 0, []
    for i, p in enumerate(params):
        m = None if buffers is None else buffers[i]
        v = None if v_buffers is None else v_buffers[i]
        vmax = None if vmax_buffers is None else vmax_buffers[i]
        rows = tensor_rows.setdefault(p.dtype, [])
        order.setdefault(p.dtype, len(order))
        tensor_chunk_start.append(next_chunk)
        local = len(rows)
        n_units = units(p)
        pieces, unit_numel, per_unit = _chunks(p.numel(), n_units, chunk, unit_chunks)
        inner, extra = (1, 0) if index_rows is None else index_rows[i]
        rows.append([p.data_ptr(), 0 if m is None else m.data_ptr(), p.numel(), offsets[i], columns[i], i,
                     0 if v is None else v.data_ptr(), 0 if vmax is None else vmax.data_ptr(), unit_numel, next_unit,
                     per_unit, inner, extra])
        first = unit_offsets[i] if unit_offsets else next_unit
        unit_rand.extend(range(first, first + n_units))
        next_unit += n_units
        for start, end in pieces:
            chunk_rows.setdefault(p.dtype, []).append([local, start, next_chunk, end])
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
        partial_psq=torch.zeros(c, dtype=torch.float64, device=device),
        tensor_psq=torch.zeros(n, dtype=torch.float64, device=device),
        unit_sq=torch.zeros(max(next_unit, 1), dtype=torch.float64, device=device),
        unit_psq=torch.zeros(max(next_unit, 1), dtype=torch.float64, device=device),
        unit_scales=torch.ones(max(next_unit, 1), **f32),
        unit_rand=_to_device(unit_rand or [0], device, 1).reshape(-1),
        seed=torch.zeros(1, dtype=torch.int64, device=device),
        threshold_params=torch.zeros(KERNEL_PARAMS, dtype=torch.float64, device=device),
        adam_consts=torch.zeros(2, dtype=torch.float64, device=device),
        n_units=next_unit,
        unit_chunks=unit_chunks,
        has_v=v_buffers is not None,
        has_vmax=vmax_buffers is not None,
        index_rows=index_rows,
    )
