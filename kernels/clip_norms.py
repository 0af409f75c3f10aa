"""Norm pass (launch 1 of 2 per dtype bucket): sums of squares and the non-finite flag in one read
of the gradients, reduced to per-tensor and global norms, then the scales, in the same launch.

Every program (one per chunk) writes its chunk's partial sum of squares and non-finite flag.
The last program to finish a tensor's chunks (an atomic counter per tensor) adds that tensor's
partials in chunk order; the last program to finish a tensor (an atomic counter per step) adds
the tensors' sums in tensor order and runs the scale stage (clip_scales.py).  Both reductions
have a fixed order, so the results repeat bit for bit however the programs are scheduled; each
counter is set back to 0 by the program that finishes it, so the step can be replayed in a CUDA
graph.  Under ``clip_point="update"`` the squares are those of the final update direction; the
flag is always that of the gradient.

    ||g_t||^2 = sum over t's chunks c (in order) of sum_{i in c} g_i^2
    ||g||^2   = sum over tensors t (in order) of ||g_t||^2

With another norm type p (constexpr NORM, norm_parts.py) the chunks, tensors and the step combine parts
instead: sums of |g_i|^p in float64, or maxima of |g_i| (p = inf); the scale stage reads their norms.

Unit scope (the plan's chunks then hold whole units, or lie within one unit): a chunk of whole
units writes each unit's sum of squares (rows of [units, UNIT_EB] tiles, in column order) and their
sum as its partial; the chunks of a unit that spans several are added in chunk order by the
tensor's last program.  The relative threshold (AGC) sums the parameters' squares the same way, in
the same read (per unit, per tensor, and globally).

The squares are float32, summed in float32 lanes per chunk: right between two ends.  Squares of |x|
below 2**-63 (about 1e-19) are float32 subnormals or 0, so a chunk's sum below SMALL_SUMSQ may have
lost them (with a larger sum, what such squares lose is below 2**-36 of it); squares above 2**64
(|x| about 1.8e19) overflow.  A finite chunk (or unit tile) whose float32 sum is past either end,
rare (every element below about 1e-15, or one above 1e19), is read again and summed with float64
squares (``sum_again_in_float64``), which neither underflow nor overflow for float32 values.
"""

import triton
import triton.language as tl

from .clip_scales import scale_stage
from .norm_parts import NORM_INF, NORM_POWER, NORM_TWO, add_part, power_sum, reduce_parts
from .columns import T_COLUMN, T_UNIT_BASE, T_UNIT_CHUNKS, T_UNIT_NUMEL
from .sgd_math import (SCOPE_UNIT, THRESHOLD_RELATIVE, UNIT_EB, check_codes, decode_chunk, inverse_scale, load_grad,
                       sgd_direction, with_decay)

#: float32 sums of squares below this may have lost squares to underflow (2**-100)
SMALL_SUMSQ = tl.constexpr(7.888609052210118e-31)


@triton.jit
def sum_again_in_float64(sq, xmax, flag):
    """Whether a finite chunk's float32 sum of squares ``sq`` (as float64; ``xmax`` its largest |x|,
    ``flag`` its non-finite flag) is past either end of float32's squares."""
    return (flag == 0) & ((sq == float("inf")) | ((sq < SMALL_SUMSQ) & (xmax > 0)))


@triton.jit
def clip_source(g_ptr, p_ptr, m_ptr, offs, mask, sign, inv_scale, ready, weight_decay, momentum, dampening,
                HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, HAS_WD: tl.constexpr, CLIP_UPDATE: tl.constexpr):
    """(what the norms are taken of, the gradient): the gradient, or under clip_point="update" the
    final update direction; float32."""
    g = load_grad(g_ptr, offs, mask, sign, inv_scale)
    x = g
    if CLIP_UPDATE:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.zeros_like(g)
        if HAS_MOM:
            m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x, _ = sgd_direction(with_decay(g, p, weight_decay, HAS_WD), m, ready, momentum, dampening, HAS_MOM, NESTEROV)
    return x, g


@triton.jit
def nonfinite(g):
    return ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)


@triton.jit
def chunk_sums(g_ptr, p_ptr, m_ptr, start, end, sign, inv_scale, ready, weight_decay, momentum, dampening,
               HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, HAS_WD: tl.constexpr, CLIP_UPDATE: tl.constexpr,
               WNORM: tl.constexpr, BLOCK: tl.constexpr, norm_p=2.0, NORM: tl.constexpr = 0):
    """(sum of squares of the norms' source, of the parameter (WNORM, else 0), non-finite flag of the
    gradient) over elements [start, end): float32 sums, again in float64 when a finite chunk's
    float32 sum is past either end of float32's squares (sum_again_in_float64).  Another norm type
    (norm_parts.py): the source's part instead of its sum of squares, max |x| (NORM_INF) or the float64
    sum of |x|^norm_p (NORM_POWER)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    pacc = tl.zeros([BLOCK], dtype=tl.float32)  # (WNORM only)
    xmax = tl.zeros([BLOCK], dtype=tl.float32)
    pmax = tl.zeros([BLOCK], dtype=tl.float32)  # (WNORM only)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    inf_acc = tl.zeros([BLOCK], dtype=tl.float32)  # (NORM_INF only)
    power_acc = tl.zeros([], dtype=tl.float64)  # (NORM_POWER only)
    n = (end - start).to(tl.int32)  # a chunk holds at most CHUNK elements
    for i in range(0, n, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < end
        x, g = clip_source(g_ptr, p_ptr, m_ptr, offs, mask, sign, inv_scale, ready, weight_decay, momentum,
                           dampening, HAS_MOM, NESTEROV, HAS_WD, CLIP_UPDATE)
        bad = bad | nonfinite(g)
        xmax = tl.maximum(xmax, tl.abs(x))
        if NORM == NORM_TWO:
            acc += x * x
        elif NORM == NORM_INF:
            inf_acc = add_part(inf_acc, tl.abs(x), NORM)
        else:
            power_acc += power_sum(x, mask, norm_p)
        if WNORM:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            pmax = tl.maximum(pmax, tl.abs(p))
            pacc += p * p
    sq = tl.sum(acc, axis=0).to(tl.float64)
    if NORM == NORM_INF:
        sq = reduce_parts(inf_acc, NORM).to(tl.float64)
    elif NORM == NORM_POWER:
        sq = power_acc
    psq = tl.zeros([], dtype=tl.float64)
    flag = tl.max(bad, axis=0)
    again = sum_again_in_float64(sq, tl.max(xmax, axis=0), flag) & (NORM == NORM_TWO)  # (parts: float64 already)
    if WNORM:
        psq = tl.sum(pacc, axis=0).to(tl.float64)
        again = again | sum_again_in_float64(psq, tl.max(pmax, axis=0), flag)
    if again:  # finite values whose float32 squares underflow or overflow: again in float64
        acc64 = tl.zeros([BLOCK], dtype=tl.float64)
        pacc64 = tl.zeros([BLOCK], dtype=tl.float64)
        for i in range(0, n, BLOCK):
            offs = start + i + tl.arange(0, BLOCK)
            mask = offs < end
            x, g = clip_source(g_ptr, p_ptr, m_ptr, offs, mask, sign, inv_scale, ready, weight_decay,
                               momentum, dampening, HAS_MOM, NESTEROV, HAS_WD, CLIP_UPDATE)
            acc64 += x.to(tl.float64) * x.to(tl.float64)
            if WNORM:
                p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float64)
                pacc64 += p * p
        sq = tl.sum(acc64, axis=0)
        if WNORM:
            psq = tl.sum(pacc64, axis=0)
    return sq, psq, flag


@triton.jit
def unit_tile_sums(g_ptr, p_ptr, start, n_units, unit_numel, unit_sq, unit_psq, sign, inv_scale,
                   WNORM: tl.constexpr, UB: tl.constexpr, EB: tl.constexpr):
    """A chunk of ``n_units`` whole units from ``start``: each unit's sums of squares (gradient, and
    parameter with WNORM) written to unit_sq[u] (unit_psq[u]) for u < n_units, from [UB, EB] tiles of
    UB units; returns (their sums, the gradient's non-finite flag)."""
    total = tl.zeros([UB], dtype=tl.float64)
    ptotal = tl.zeros([UB], dtype=tl.float64)
    bad = tl.zeros([UB], dtype=tl.int32)
    for r0 in range(0, n_units, UB):
        rows = r0 + tl.arange(0, UB)
        rmask = rows < n_units
        acc = tl.zeros([UB, EB], dtype=tl.float32)
        pacc = tl.zeros([UB, EB], dtype=tl.float32)
        gmax = tl.zeros([UB, EB], dtype=tl.float32)
        pmax = tl.zeros([UB, EB], dtype=tl.float32)
        rbad = tl.zeros([UB, EB], dtype=tl.int32)
        for c0 in range(0, unit_numel, EB):
            cols = c0 + tl.arange(0, EB)
            offs = start + rows[:, None] * unit_numel + cols[None, :]
            mask = rmask[:, None] & (cols[None, :] < unit_numel)
            g = load_grad(g_ptr, offs, mask, sign, inv_scale)
            rbad = rbad | nonfinite(g)
            gmax = tl.maximum(gmax, tl.abs(g))
            acc += g * g
            if WNORM:
                p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                pmax = tl.maximum(pmax, tl.abs(p))
                pacc += p * p
        usq = tl.sum(acc, axis=1).to(tl.float64)
        upsq = tl.sum(pacc, axis=1).to(tl.float64)
        row_bad = tl.max(rbad, axis=1)
        tile_bad = tl.max(row_bad, axis=0)
        again = sum_again_in_float64(usq, tl.max(gmax, axis=1), tile_bad)
        if WNORM:
            again = again | sum_again_in_float64(upsq, tl.max(pmax, axis=1), tile_bad)
        if tl.max(again.to(tl.int32), axis=0) != 0:  # a unit's float32 squares underflow or overflow: again in float64
            acc64 = tl.zeros([UB, EB], dtype=tl.float64)
            pacc64 = tl.zeros([UB, EB], dtype=tl.float64)
            for c0 in range(0, unit_numel, EB):
                cols = c0 + tl.arange(0, EB)
                offs = start + rows[:, None] * unit_numel + cols[None, :]
                mask = rmask[:, None] & (cols[None, :] < unit_numel)
                g = load_grad(g_ptr, offs, mask, sign, inv_scale).to(tl.float64)
                acc64 += g * g
                if WNORM:
                    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float64)
                    pacc64 += p * p
            usq = tl.sum(acc64, axis=1)
            upsq = tl.sum(pacc64, axis=1)
        tl.store(unit_sq + rows, usq, mask=rmask)
        if WNORM:
            tl.store(unit_psq + rows, upsq, mask=rmask)
        total += tl.where(rmask, usq, 0.0)
        ptotal += tl.where(rmask, upsq, 0.0)
        bad = tl.maximum(bad, row_bad)
    return tl.sum(total, axis=0), tl.sum(ptotal, axis=0), tl.max(bad, axis=0)


@triton.jit
def clip_norm_kernel(
    tensor_table,  # int64 [T_b, TABLE_WIDTH]: this bucket's tensors (torch_clip_fused/backends/triton/plan.py)
    chunk_table,  # int64 [C_b, CHUNK_WIDTH]: this bucket's chunks
    grad_ptrs,  # int64 [T]: gradient data pointers of this step
    tensor_chunk_start,  # int64 [T + 1]: tensor t's chunks are [start[t], start[t + 1])
    partial_sq, partial_bad,  # float64 / int32 [C]: per-chunk results (written)
    tensor_sq, tensor_bad,  # float64 / int32 [T]: per-tensor results (written)
    tensor_done, done,  # int32 [T] / [1]: per-tensor chunk counters, step tensor counter
    n_tensors,  # tensors in the step (all buckets)
    ready_ptr,  # uint8 [G]: momentum buffer initialised, by column (CLIP_UPDATE)
    scale_ptr,  # float32 [1]: GradScaler's scale (HAS_SCALE)
    sign, weight_decay, momentum, dampening,  # float: -1 to maximize; SGD settings (CLIP_UPDATE)
    # the scale stage's arguments (clip_scales.scale_stage)
    columns, found_inf_ptr, step_ptr, seed_ptr, tstate, tsorted, tcounts, trows, tcols, tparams,
    scales, fscratch, iscratch, level, log2_beta, lr_ptr,
    # unit scope and the relative threshold (AGC)
    partial_psq, tensor_psq,  # float64 [C] / [T]: the parameters' sums of squares (relative threshold)
    unit_sq, unit_psq,  # float64 [U]: per-unit sums of squares of the gradients / parameters (unit scope)
    unit_rand,  # int64 [U]: each unit's Philox index (unit_offsets[i] + u)
    n_units,  # units in the step
    norm_p,  # float64: the norm type p (NORM_POWER)
    DTYPE: tl.constexpr,  # the bucket's parameter (= gradient) dtype
    HAS_SCALE: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, HAS_WD: tl.constexpr,
    CLIP_UPDATE: tl.constexpr,  # clip_point="update": the norms are those of the update direction
    CHECK: tl.constexpr,  # whether a non-finite gradient makes the step skip
    HAS_FOUND_INF: tl.constexpr,  # whether GradScaler's found_inf is read
    SCOPE: tl.constexpr, THRESHOLD: tl.constexpr, STATEFUL: tl.constexpr, RAND: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,  # elements per program and per inner step
    RBLOCK: tl.constexpr, ABLOCK: tl.constexpr,  # reduction width; AutoClip history block
    LR_IS_TENSOR: tl.constexpr,  # the step's lr is the tensor at lr_ptr (checked by the scale stage)
    NORM: tl.constexpr = 0,  # the norm type (norm_parts.py): 0 the 2-norm, 1 inf, 2 p = norm_p
):
    check_codes(SCOPE, RAND)
    tl.static_assert(not ((SCOPE == SCOPE_UNIT) and CLIP_UPDATE), "unit scope: clip_point='grad' only")
    tl.static_assert((NORM == NORM_TWO) or ((SCOPE != SCOPE_UNIT) and (THRESHOLD != THRESHOLD_RELATIVE)),
                     "norm types other than 2: not at unit scope or with the relative threshold")
    WNORM: tl.constexpr = THRESHOLD == THRESHOLD_RELATIVE  # the parameters' norms are needed too
    row, start, chunk_id, index, g_ptr, p_ptr, m_ptr, end = decode_chunk(
        tensor_table, chunk_table, grad_ptrs, tl.program_id(0), DTYPE)
    inv_scale = inverse_scale(scale_ptr, HAS_SCALE)
    ready = False
    if CLIP_UPDATE and HAS_MOM:
        ready = tl.load(ready_ptr + tl.load(row + T_COLUMN)) != 0
    if SCOPE == SCOPE_UNIT:
        tl.static_assert(BLOCK >= UNIT_EB, "unit scope: BLOCK >= UNIT_EB")
        unit_numel = tl.load(row + T_UNIT_NUMEL)
        unit_base = tl.load(row + T_UNIT_BASE)
        unit_chunks = tl.load(row + T_UNIT_CHUNKS)
        if end - start > unit_numel:  # several whole units
            chunk_sq, chunk_psq, flag = unit_tile_sums(
                g_ptr, p_ptr, start, (end - start) // unit_numel, unit_numel, unit_sq + unit_base + start // unit_numel,
                unit_psq + unit_base + start // unit_numel, sign, inv_scale, WNORM, BLOCK // UNIT_EB, UNIT_EB)
        else:  # one whole unit, or a part of one
            chunk_sq, chunk_psq, flag = chunk_sums(g_ptr, p_ptr, m_ptr, start, end, sign, inv_scale, ready,
                                                   weight_decay, momentum, dampening, HAS_MOM, NESTEROV, HAS_WD,
                                                   CLIP_UPDATE, WNORM, BLOCK)
            if (unit_chunks == 0) & (end > start):
                tl.store(unit_sq + unit_base + start // unit_numel, chunk_sq)
                if WNORM:
                    tl.store(unit_psq + unit_base + start // unit_numel, chunk_psq)
    else:
        chunk_sq, chunk_psq, flag = chunk_sums(g_ptr, p_ptr, m_ptr, start, end, sign, inv_scale, ready, weight_decay,
                                               momentum, dampening, HAS_MOM, NESTEROV, HAS_WD, CLIP_UPDATE, WNORM,
                                               BLOCK, norm_p, NORM)
    tl.store(partial_sq + chunk_id, chunk_sq)
    tl.store(partial_bad + chunk_id, flag)
    if WNORM:
        tl.store(partial_psq + chunk_id, chunk_psq)

    lo = tl.load(tensor_chunk_start + index)
    hi = tl.load(tensor_chunk_start + index + 1)
    if tl.atomic_add(tensor_done + index, 1) == hi - lo - 1:  # the tensor's last chunk
        tl.store(tensor_done + index, 0)
        sq = tl.zeros([RBLOCK], dtype=tl.float64)
        psq = tl.zeros([RBLOCK], dtype=tl.float64)
        flags = tl.zeros([RBLOCK], dtype=tl.int32)
        for k in range(lo, hi, RBLOCK):
            offs = k + tl.arange(0, RBLOCK)
            sq = add_part(sq, tl.load(partial_sq + offs, mask=offs < hi, other=0.0, volatile=True), NORM)
            flags = tl.maximum(flags, tl.load(partial_bad + offs, mask=offs < hi, other=0, volatile=True))
            if WNORM:
                psq += tl.load(partial_psq + offs, mask=offs < hi, other=0.0, volatile=True)
        tl.store(tensor_sq + index, reduce_parts(sq, NORM))
        tl.store(tensor_bad + index, tl.max(flags, axis=0))
        if WNORM:
            tl.store(tensor_psq + index, tl.sum(psq, axis=0))
        if SCOPE == SCOPE_UNIT:
            if unit_chunks > 0:  # units spanning chunks: each unit's chunks, in order
                for u in range(0, (hi - lo) // unit_chunks):
                    a = lo + u * unit_chunks
                    usq = tl.zeros([RBLOCK], dtype=tl.float64)
                    upsq = tl.zeros([RBLOCK], dtype=tl.float64)
                    for k in range(a, a + unit_chunks, RBLOCK):
                        offs = k + tl.arange(0, RBLOCK)
                        usq += tl.load(partial_sq + offs, mask=offs < a + unit_chunks, other=0.0, volatile=True)
                        if WNORM:
                            upsq += tl.load(partial_psq + offs, mask=offs < a + unit_chunks, other=0.0,
                                            volatile=True)
                    tl.store(unit_sq + unit_base + u, tl.sum(usq, axis=0))
                    if WNORM:
                        tl.store(unit_psq + unit_base + u, tl.sum(upsq, axis=0))
        if tl.atomic_add(done, 1) == n_tensors - 1:  # the step's last tensor
            tl.store(done, 0)
            scale_stage(tensor_sq, tensor_bad, n_tensors, columns, found_inf_ptr, step_ptr, seed_ptr,
                        tstate, tsorted, tcounts, trows, tcols, tparams, scales, fscratch, iscratch, level, log2_beta,
                        lr_ptr, tensor_psq, unit_sq,
                        unit_psq, unit_rand, n_units, CHECK, HAS_FOUND_INF, SCOPE, THRESHOLD, STATEFUL,
                        RAND, RBLOCK, ABLOCK, LR_IS_TENSOR, False, norm_p, NORM)
