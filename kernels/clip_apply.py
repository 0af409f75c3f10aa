"""Apply pass and finish.

``clip_apply_kernel`` (one program per chunk of a bucket) reads g, p and m once, applies the
scale (global, per tensor, or per coordinate with inline Philox draws), weight decay,
momentum (first-step initialisation included), nesterov, maximize and lr, and writes p and m
once, unless the group's ok flag says to skip.  ``clip_finish_kernel`` (one program) writes
the statistics, marks momentum buffers initialised and advances the step and skip counters.
"""

import triton
import triton.language as tl

from .sgd_math import (SCOPE_COORDINATE, SCOPE_GLOBAL, SCOPE_LAYER, SCOPE_NONE, coordinate_clip, decode_chunk,
                       inverse_scale, load_grad, sgd_direction)


@triton.jit
def clip_apply_kernel(
    tensor_table, chunk_table, scales, iscratch, ready_ptr, scale_ptr, lr_ptr, clip_counts,
    lr, sign, weight_decay, momentum, dampening, level, log2_beta,
    GDTYPE: tl.constexpr, PDTYPE: tl.constexpr, TABLE_WIDTH: tl.constexpr,
    SCOPE: tl.constexpr, RAND: tl.constexpr, SKIP: tl.constexpr, HAS_SCALE: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, UPDATE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    row, start, chunk_id, g_ptr, p_ptr, m_ptr, numel = decode_chunk(
        tensor_table, chunk_table, tl.program_id(0), GDTYPE, PDTYPE, TABLE_WIDTH)
    flat_offset = tl.load(row + 4)
    ready = tl.load(ready_ptr + tl.load(row + 5)) != 0
    ok = tl.load(iscratch) != 0
    key = tl.load(iscratch + 1)
    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float32)
    inv_scale = inverse_scale(scale_ptr, HAS_SCALE)
    s = 1.0
    if SCOPE == SCOPE_GLOBAL:
        s = tl.load(scales)
    if SCOPE == SCOPE_LAYER:
        s = tl.load(scales + tl.load(row + 6))
    n_clipped = tl.zeros([BLOCK], dtype=tl.int64)
    for i in range(0, tl.minimum(CHUNK, numel - start), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < numel
        g = load_grad(g_ptr, offs, mask, sign, inv_scale)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_MOM:
            m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if UPDATE:
            d, m_new = sgd_direction(g + weight_decay * p, m, ready, momentum, dampening, HAS_MOM, NESTEROV)
            if SCOPE == SCOPE_COORDINATE:
                d, hit = coordinate_clip(d, level, key, flat_offset + offs, log2_beta, RAND)
                n_clipped += (hit & mask).to(tl.int64)
            else:
                d = d * s
        else:
            if SCOPE == SCOPE_COORDINATE:
                g, hit = coordinate_clip(g, level, key, flat_offset + offs, log2_beta, RAND)
                n_clipped += (hit & mask).to(tl.int64)
            else:
                g = g * s
            d, m_new = sgd_direction(g + weight_decay * p, m, ready, momentum, dampening, HAS_MOM, NESTEROV)
        write = mask
        if SKIP:
            write = tl.where(ok, mask, False)
        tl.store(p_ptr + offs, (p - lr * d).to(PDTYPE), mask=write)
        if HAS_MOM:
            tl.store(m_ptr + offs, m_new.to(PDTYPE), mask=write)
    tl.store(clip_counts + chunk_id, tl.sum(n_clipped, axis=0))


@triton.jit
def clip_finish_kernel(
    iscratch, fscratch, etas, clipped, clip_counts, n_chunks, numel, n_tensors, columns, ready_ptr,
    stats, skipped, step_ptr, level,
    SCOPE: tl.constexpr, SKIP: tl.constexpr, HAS_MOM: tl.constexpr, BLOCK: tl.constexpr,
):
    ok = tl.full([], 1, tl.int64)
    if SKIP:
        ok = tl.load(iscratch)
    tl.store(stats, tl.load(fscratch))
    eta = level + 0.0 * ok
    fraction = 0.0 * ok
    if SCOPE == SCOPE_NONE:
        eta = float("inf") + 0.0 * ok
    if SCOPE == SCOPE_GLOBAL:
        eta = tl.load(etas)
        fraction = tl.load(clipped)
    if SCOPE == SCOPE_LAYER:
        e = tl.zeros([BLOCK], dtype=tl.float32)
        f = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, n_tensors, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            e += tl.load(etas + offs, mask=offs < n_tensors, other=0.0)
            f += tl.load(clipped + offs, mask=offs < n_tensors, other=0.0)
        eta = tl.sum(e, axis=0) / n_tensors
        fraction = tl.sum(f, axis=0) / n_tensors
    if SCOPE == SCOPE_COORDINATE:
        total = tl.zeros([BLOCK], dtype=tl.int64)
        for i in range(0, n_chunks, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            total += tl.load(clip_counts + offs, mask=offs < n_chunks, other=0)
        fraction = tl.sum(total, axis=0).to(tl.float32) / tl.maximum(numel, 1).to(tl.float32)
    tl.store(stats + 1, eta)
    tl.store(stats + 2, fraction * ok.to(tl.float32))  # a skipped step clips nothing
    tl.store(stats + 3, (1 - ok).to(tl.float32))
    tl.store(skipped, tl.load(skipped) + 1 - ok)
    tl.store(step_ptr, tl.load(step_ptr) + 1)
    if HAS_MOM:
        for i in range(0, n_tensors, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            cols = tl.load(columns + offs, mask=offs < n_tensors, other=0)
            old = tl.load(ready_ptr + cols, mask=offs < n_tensors, other=0)
            tl.store(ready_ptr + cols, old | ok.to(old.dtype), mask=offs < n_tensors)
