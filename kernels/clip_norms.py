"""Norm pass: per-chunk sums of squares (float32) and a non-finite flag, in one read.

``clip_norm_kernel`` runs one program per chunk of a bucket and writes the chunk's partial
sum of squares and non-finite flag at its global chunk id; ``clip_reduce_kernel`` (one
program) adds the partials in chunk order into the global norm and the group's ``ok`` flag.
Both reductions have a fixed shape, so results repeat bit for bit.  Under
``clip_point="update"`` the squares are those of the final update direction; the flag is
always that of the gradient.
"""

import triton
import triton.language as tl

from .sgd_math import decode_chunk, inverse_scale, load_grad, sgd_direction


@triton.jit
def clip_norm_kernel(
    tensor_table, chunk_table, partial_sq, partial_bad, ready_ptr, scale_ptr,
    sign, weight_decay, momentum, dampening,
    GDTYPE: tl.constexpr, PDTYPE: tl.constexpr, TABLE_WIDTH: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, UPDATE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    row, start, chunk_id, g_ptr, p_ptr, m_ptr, numel = decode_chunk(
        tensor_table, chunk_table, tl.program_id(0), GDTYPE, PDTYPE, TABLE_WIDTH)
    inv_scale = inverse_scale(scale_ptr, HAS_SCALE)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    if UPDATE:
        ready = tl.load(ready_ptr + tl.load(row + 5)) != 0
    for i in range(0, tl.minimum(CHUNK, numel - start), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < numel
        g = load_grad(g_ptr, offs, mask, sign, inv_scale)
        bad = bad | ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)
        x = g
        if UPDATE:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            m = tl.zeros([BLOCK], dtype=tl.float32)
            if HAS_MOM:
                m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x, _ = sgd_direction(g + weight_decay * p, m, ready, momentum, dampening, HAS_MOM, NESTEROV)
        acc += x * x
    tl.store(partial_sq + chunk_id, tl.sum(acc, axis=0))
    tl.store(partial_bad + chunk_id, tl.max(bad, axis=0))


@triton.jit
def clip_reduce_kernel(
    partial_sq, partial_bad, n_chunks, found_inf_ptr, fscratch, iscratch,
    NORMS: tl.constexpr, CHECK: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
):
    """fscratch[0] = global norm (NaN without a norm pass); iscratch[0] = ok flag."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    if NORMS:
        for i in range(0, n_chunks, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            mask = offs < n_chunks
            acc += tl.load(partial_sq + offs, mask=mask, other=0.0)
            bad = tl.maximum(bad, tl.load(partial_bad + offs, mask=mask, other=0))
        tl.store(fscratch, tl.sqrt(tl.sum(acc, axis=0)))
    else:
        tl.store(fscratch, float("nan"))
    ok = tl.full([], 1, tl.int64)
    if CHECK:
        ok = (tl.max(bad, axis=0) == 0).to(tl.int64)
    if HAS_FOUND_INF:
        ok = ok & (tl.load(found_inf_ptr).to(tl.float32) == 0).to(tl.int64)
    tl.store(iscratch, ok)
