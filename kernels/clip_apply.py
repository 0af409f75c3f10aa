"""Apply pass (launch 2 of 2 per dtype bucket): the scales and the update rule, then the finish.

Every program (one per chunk) reads g, p and m (and AdamW's v, vmax) once, applies the scale
(global, per tensor, per output unit, or per coordinate with inline Philox draws), weight decay,
momentum (first-step initialisation included), nesterov, maximize and lr, and writes p and m (v,
vmax) once, unless the group's ok flag says to skip:

    clip_point="grad":    g' = s g;  d = g' + wd p;  m' = mu m + (1 - tau) d  (m' = d on the
                          first step);  d = d + mu m' (nesterov) or m'
    clip_point="update":  d from the raw g as above;  d = s(d) d
    p' = p - lr d                       (RULE_SGD; p and m rounded to DTYPE to nearest, or
                                         stochastically with STOCH_ROUND: docs/spec.md section 3.1)
    g' = s g written back, p untouched  (RULE_CLIP_ONLY: the functional API)
    AdamW on g' = s g                   (RULE_ADAMW: adamw_math.py; clip_point="grad" only)

At unit scope s is the scale of the element's unit, scales[unit base + offset // unit numel]
(chunks hold whole units, or lie within one).  A scale is applied as x * pre * post (scale_factors:
pre = 1 and post = s, or for a scale stored below float32's normal range pre = 2**-64 and post =
|stored| = s * 2**64, so that x * s is rounded once).

The last program to finish (an atomic counter, set back to 0 by that program) writes the
statistics, marks the momentum buffers initialised (SGD) or adds the step to AdamW's step counts,
and advances the step and skip counters.
"""

import triton
import triton.language as tl

from .adamw_math import adamw_scalars, adamw_update
from .columns import (T_COLUMN, T_FLAT_OFFSET, T_INDEX_EXTRA, T_INDEX_INNER, T_UNIT_BASE, T_UNIT_NUMEL, T_V_PTR,
                      T_VMAX_PTR)
from .sgd_math import (RULE_ADAMW, RULE_CLIP_ONLY, RULE_SGD, SCOPE_COORDINATE, SCOPE_GLOBAL, SCOPE_LAYER,
                       SCOPE_NONE, SCOPE_UNIT, SPLIT_PRE, SR_INDEX, check_codes, coordinate_clip, decode_chunk, element_index,
                       inverse_scale, load_grad, lr_ok, sgd_direction, stochastic_round, with_decay)


@triton.jit
def step_ok(iscratch, found_inf_ptr, NORMS: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """The ok flag: the norm pass's when it ran, else GradScaler's found_inf alone."""
    if NORMS:
        ok = tl.load(iscratch)
    else:
        ok = tl.full([], 1, tl.int64)
        if HAS_FOUND_INF:
            ok = (tl.load(found_inf_ptr).to(tl.float32) == 0).to(tl.int64)
    return ok


@triton.jit
def scale_factors(stored):
    """(pre, post) of a stored scale (kernels/clip_scales.py stored_scale): the scale is pre * post."""
    return tl.where(stored < 0, SPLIT_PRE, 1.0), tl.abs(stored)


@triton.jit
def scale_block(x, s_pre, s, local, mask, unit_scales, unit_div, level, key, index, log2_beta, n_clipped,
                SCOPE: tl.constexpr, RAND: tl.constexpr):
    """A block of the clipping source x scaled at the method's scope: per coordinate (sign(x) level where
    clipped, Philox draws at ``index``; the hits added to ``n_clipped``), per output unit (its scale looked
    up: ``local`` // ``unit_div`` within the chunk's units), or by the global / per-tensor scale
    ``s_pre * s`` (scale_factors).  Returns (x', n_clipped)."""
    if SCOPE == SCOPE_COORDINATE:
        x, hit = coordinate_clip(x, level, key, index, log2_beta, RAND)
        n_clipped += (hit & mask).to(tl.int64)
    elif SCOPE == SCOPE_UNIT:
        u_pre, u = scale_factors(tl.load(unit_scales + local // unit_div, mask=mask, other=1.0))
        x = x * u_pre * u
    else:
        x = x * s_pre * s
    return x, n_clipped


@triton.jit
def clip_apply_kernel(
    tensor_table,  # int64 [T_b, TABLE_WIDTH]: this bucket's tensors (torch_clip_fused/backends/triton/plan.py)
    chunk_table,  # int64 [C_b, CHUNK_WIDTH]: this bucket's chunks
    grad_ptrs,  # int64 [T]: gradient data pointers of this step
    scales,  # float32: the scale stage's global ([0]), per-tensor ([T]) or per-unit ([U]) scales
    iscratch,  # int64 [1]: the ok flag written by the norm pass (NORMS)
    found_inf_ptr,  # float32 [1]: GradScaler's found_inf (HAS_FOUND_INF)
    step_ptr, seed_ptr,  # int64 [1]: step() calls so far (advanced by the finish), Philox seed
    ready_ptr,  # uint8 [G]: momentum buffer initialised, by column
    scale_ptr,  # float32 [1]: GradScaler's scale (HAS_SCALE)
    lr_ptr,  # learning-rate tensor (LR_IS_TENSOR)
    clip_counts,  # int64 [C]: coordinates clipped per chunk (written)
    done,  # int32 [1]: chunks applied this step (back to 0 after)
    n_chunks,  # chunks in the step (all buckets)
    # the finish's arguments
    fscratch,  # float32 [4]: global norm, mean threshold, fraction clipped (from the norm pass)
    columns, n_tensors, numel,  # int64 [T]; tensors and elements in the step
    stats,  # float32 [4] (written): norm, threshold, clipped fraction, skipped
    skipped,  # int64 [1]: skipped steps so far
    lr, sign, weight_decay, momentum, dampening, level, log2_beta,
    adam_steps,  # float32 [G]: AdamW steps taken per column (RULE_ADAMW; the finish adds ok)
    adam_consts,  # float64 [2]: log2(beta1), log2(beta2) (RULE_ADAMW)
    one_minus_beta1, beta2, one_minus_beta2, eps,  # AdamW's settings (RULE_ADAMW)
    DTYPE: tl.constexpr,  # the bucket's parameter (= gradient) dtype
    SCOPE: tl.constexpr, RAND: tl.constexpr,
    NORMS: tl.constexpr,  # whether the norm pass ran this step
    SKIP: tl.constexpr,  # whether a not-ok step leaves everything untouched
    HAS_FOUND_INF: tl.constexpr, HAS_SCALE: tl.constexpr, LR_IS_TENSOR: tl.constexpr,
    HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, HAS_WD: tl.constexpr,
    CLIP_UPDATE: tl.constexpr,  # clip_point="update": the scales apply to the update direction
    RULE: tl.constexpr,  # the update rule after clipping (methods.UPDATE_CODES)
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
    STOCH_ROUND: tl.constexpr,  # p and m rounded stochastically (DTYPE bfloat16 / float16 only)
    AMSGRAD: tl.constexpr = False,  # AdamW keeps max_exp_avg_sq (RULE_ADAMW)
):
    tl.static_assert((RULE == RULE_SGD) or (RULE == RULE_CLIP_ONLY) or (RULE == RULE_ADAMW), "unknown RULE code")
    tl.static_assert(not ((RULE == RULE_ADAMW) and (CLIP_UPDATE or HAS_MOM or STOCH_ROUND)),
                     "AdamW: clip_point='grad', no SGD momentum flags, no stochastic rounding")
    tl.static_assert(not ((SCOPE == SCOPE_UNIT) and CLIP_UPDATE), "unit scope: clip_point='grad' only")
    check_codes(SCOPE, RAND)
    row, start, chunk_id, index, g_ptr, p_ptr, m_ptr, end = decode_chunk(
        tensor_table, chunk_table, grad_ptrs, tl.program_id(0), DTYPE)
    flat_offset = tl.load(row + T_FLAT_OFFSET)
    index_inner, index_extra = tl.load(row + T_INDEX_INNER), tl.load(row + T_INDEX_EXTRA)
    ready = False
    if HAS_MOM:  # the flags exist only with momentum
        ready = tl.load(ready_ptr + tl.load(row + T_COLUMN)) != 0
    ok = step_ok(iscratch, found_inf_ptr, NORMS, HAS_FOUND_INF)
    key = (tl.load(step_ptr) << 32) | tl.load(seed_ptr)
    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float32)
        ok = ok & lr_ok(lr_ptr)  # a tensor lr gone bad skips the step, whatever the non-finite policy
    inv_scale = inverse_scale(scale_ptr, HAS_SCALE)
    s_pre, s = 1.0, 1.0
    if SCOPE == SCOPE_GLOBAL:
        s_pre, s = scale_factors(tl.load(scales))
    if SCOPE == SCOPE_LAYER:
        s_pre, s = scale_factors(tl.load(scales + index))
    unit_scales, unit_div = scales, 1  # read at unit scope only
    if SCOPE == SCOPE_UNIT:  # the chunk's first unit; chunks hold whole units or lie within one
        unit_numel = tl.load(row + T_UNIT_NUMEL)
        unit_scales = scales + tl.load(row + T_UNIT_BASE) + start // unit_numel
        unit_div = tl.minimum(unit_numel, CHUNK + 1).to(tl.int32)  # local // unit_div: the unit within the chunk
    if RULE == RULE_ADAMW:
        col = tl.load(row + T_COLUMN)
        v_ptr = tl.load(row + T_V_PTR).to(tl.pointer_type(DTYPE))
        vmax_ptr = tl.load(row + T_VMAX_PTR).to(tl.pointer_type(DTYPE))
        decay, step_size, bc2_sqrt = adamw_scalars(adam_steps, col, adam_consts, lr, weight_decay, HAS_WD)
    n_clipped = tl.zeros([BLOCK], dtype=tl.int64)
    for i in range(0, (end - start).to(tl.int32), BLOCK):  # a chunk holds at most CHUNK elements
        local = i + tl.arange(0, BLOCK)
        offs = start + local
        mask = offs < end
        elements = element_index(flat_offset, offs, index_inner, index_extra)
        g = load_grad(g_ptr, offs, mask, sign, inv_scale)
        if RULE == RULE_CLIP_ONLY:  # the functional API: g' = s g written back to the gradient
            g, n_clipped = scale_block(g, s_pre, s, local, mask, unit_scales, unit_div, level, key, elements,
                                       log2_beta, n_clipped, SCOPE, RAND)
            tl.store(g_ptr + offs, g.to(DTYPE), mask=mask)
        elif RULE == RULE_ADAMW:
            g, n_clipped = scale_block(g, s_pre, s, local, mask, unit_scales, unit_div, level, key, elements,
                                       log2_beta, n_clipped, SCOPE, RAND)
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            vmax = v
            if AMSGRAD:
                vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            p, m, v, vmax = adamw_update(p, g, m, v, vmax, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                                         step_size, bc2_sqrt, HAS_WD, AMSGRAD)
            write = mask
            if SKIP or LR_IS_TENSOR or HAS_FOUND_INF:
                write = tl.where(ok != 0, mask, False)
            tl.store(p_ptr + offs, p.to(DTYPE), mask=write)
            tl.store(m_ptr + offs, m.to(DTYPE), mask=write)
            tl.store(v_ptr + offs, v.to(DTYPE), mask=write)
            if AMSGRAD:
                tl.store(vmax_ptr + offs, vmax.to(DTYPE), mask=write)
        else:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            m = tl.zeros([BLOCK], dtype=tl.float32)
            if HAS_MOM:
                m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if CLIP_UPDATE:
                d, m_new = sgd_direction(with_decay(g, p, weight_decay, HAS_WD), m, ready, momentum, dampening,
                                         HAS_MOM, NESTEROV)
                d, n_clipped = scale_block(d, s_pre, s, local, mask, unit_scales, unit_div, level, key, elements,
                                           log2_beta, n_clipped, SCOPE, RAND)
            else:
                g, n_clipped = scale_block(g, s_pre, s, local, mask, unit_scales, unit_div, level, key, elements,
                                           log2_beta, n_clipped, SCOPE, RAND)
                d, m_new = sgd_direction(with_decay(g, p, weight_decay, HAS_WD), m, ready, momentum, dampening,
                                         HAS_MOM, NESTEROV)
            write = mask
            if SKIP or LR_IS_TENSOR or HAS_FOUND_INF:  # GradScaler's found_inf skips whatever the policy
                write = tl.where(ok != 0, mask, False)
            if STOCH_ROUND:  # docs/spec.md section 3.1: Philox words 0 (p) and 1 (m) at SR_INDEX + the index
                w_p, w_m, _, _ = tl.randint4x(key, elements + SR_INDEX)
                tl.store(p_ptr + offs, stochastic_round(p - lr * d, w_p, DTYPE), mask=write)
                if HAS_MOM:
                    tl.store(m_ptr + offs, stochastic_round(m_new, w_m, DTYPE), mask=write)
            else:
                tl.store(p_ptr + offs, (p - lr * d).to(DTYPE), mask=write)
                if HAS_MOM:
                    tl.store(m_ptr + offs, m_new.to(DTYPE), mask=write)
    tl.store(clip_counts + chunk_id, tl.sum(n_clipped, axis=0))
    if tl.atomic_add(done, 1) == n_chunks - 1:  # the step's last chunk
        tl.store(done, 0)
        finish(ok, fscratch, clip_counts, n_chunks, numel, columns, n_tensors, ready_ptr, stats, skipped,
               step_ptr, level, adam_steps, SCOPE, NORMS, HAS_MOM, RULE == RULE_ADAMW, RBLOCK)


@triton.jit
def finish(ok, fscratch, clip_counts, n_chunks, numel, columns, n_tensors, ready_ptr, stats, skipped,
           step_ptr, level, adam_steps, SCOPE: tl.constexpr, NORMS: tl.constexpr, HAS_MOM: tl.constexpr,
           ADAM: tl.constexpr, RBLOCK: tl.constexpr):
    """Statistics, skip and step counters, momentum-initialised flags, AdamW's step counts (a
    skipped step clips nothing, initialises nothing and counts no AdamW step).  Every program read
    its tensor's AdamW step count before it counted itself done, so none reads the new one."""
    norm = float("nan") + 0.0 * ok
    if NORMS:
        norm = tl.load(fscratch, volatile=True)
    eta = level + 0.0 * ok
    fraction = 0.0 * ok
    if SCOPE == SCOPE_NONE:
        eta = float("inf") + 0.0 * ok
    if SCOPE == SCOPE_GLOBAL or SCOPE == SCOPE_LAYER or SCOPE == SCOPE_UNIT:
        eta = tl.load(fscratch + 1, volatile=True)
        fraction = tl.load(fscratch + 2, volatile=True)
    if SCOPE == SCOPE_COORDINATE:
        total = tl.zeros([RBLOCK], dtype=tl.int64)
        for i in range(0, n_chunks, RBLOCK):
            offs = i + tl.arange(0, RBLOCK)
            total += tl.load(clip_counts + offs, mask=offs < n_chunks, other=0, volatile=True)
        fraction = tl.sum(total, axis=0).to(tl.float32) / tl.maximum(numel, 1).to(tl.float32)
    tl.store(stats, norm)
    tl.store(stats + 1, eta)
    tl.store(stats + 2, fraction * ok.to(tl.float32))
    tl.store(stats + 3, (1 - ok).to(tl.float32))
    tl.store(skipped, tl.load(skipped) + 1 - ok)
    tl.store(step_ptr, tl.load(step_ptr) + 1)
    if HAS_MOM:
        for i in range(0, n_tensors, RBLOCK):
            offs = i + tl.arange(0, RBLOCK)
            cols = tl.load(columns + offs, mask=offs < n_tensors, other=0)
            old = tl.load(ready_ptr + cols, mask=offs < n_tensors, other=0)
            tl.store(ready_ptr + cols, old | ok.to(old.dtype), mask=offs < n_tensors)
    if ADAM:
        for i in range(0, n_tensors, RBLOCK):
            offs = i + tl.arange(0, RBLOCK)
            cols = tl.load(columns + offs, mask=offs < n_tensors, other=0)
            old = tl.load(adam_steps + cols, mask=offs < n_tensors, other=0.0, volatile=True)
            tl.store(adam_steps + cols, old + ok.to(tl.float32), mask=offs < n_tensors)
