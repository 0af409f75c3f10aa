"""Scale stage, on the device, run by the norm pass's last program: the global norm and ok flag,
thresholds (the policies of torch_clip_fused/thresholds/: constant, AutoClip, ZClip, AdaGC, AGC), Philox
draws, and the global or per-tensor scales.

With eta the threshold, ||g|| the scope's norm and alpha = eta / ||g|| (taken where ||g|| > eta):
no randomization s = min(1, alpha); randomized s = alpha if ||g|| > eta and u < P(clip), else 1,
with P(clip) = beta**alpha (linear) or beta**(alpha**2) (quadratic) and u = tl.rand(key, index),
key = step << 32 | seed, index = 0 (global), the tensor's position in its group (layer), or
unit_offsets[i] + u for unit u of tensor i (unit scope: one scale per output unit, into a [U] buffer).

A float32 norm past float32's range (+inf; its float64 sum of squares finite) takes alpha from the
float64 norm (an exploding gradient is clipped to eta, never zeroed: docs/spec.md section 1).  A
scale is stored as a float32 s, or, below float32's normal range (where a subnormal would keep few
of its bits), as -(s * 2**64): the apply pass multiplies by 2**-64, then by |stored| (stored_scale,
kernels/clip_apply.py scale_factors).

The relative threshold (AGC) is eta = level * max(||w||, agc_eps) (tparams[0]), ||w|| the parameters' norm over
the same scope (unit, tensor, or all), summed by the norm pass in the gradients' read.

AutoClip: with n the norms recorded in a column, the threshold is the ceil(p n)-th smallest,
read from the column's sorted row after the new norm is inserted (autoclip_history.py): O(n)
bytes moved per record, one read per quantile.
"""

import triton
import triton.language as tl

from .autoclip_history import autoclip_record_and_threshold
from .sgd_math import (RAND_NONE, lr_ok, SCOPE_GLOBAL, SCOPE_LAYER, SCOPE_UNIT, SPLIT_POST, THRESHOLD_AUTO,
                       THRESHOLD_CONSTANT, THRESHOLD_EMA_RELATIVE, THRESHOLD_RELATIVE, THRESHOLD_ZSCORE, TINY,
                       clip_probability)
from .norm_parts import NORM_TWO, add_part, as_sq, reduce_parts
from .zscore_threshold import zscore_record_and_threshold
from .adagc_threshold import adagc_record_and_threshold


@triton.jit
def threshold(norm, total, norm_sq, total_sq, ok, col, level, tstate, tsorted, tcounts, trows, tcols, tparams, pnorm,
              THRESHOLD: tl.constexpr, ABLOCK: tl.constexpr):
    """The threshold policies (torch_clip_fused/thresholds/, by methods.THRESHOLD_CODES): eta for the
    scope column ``col``.  A stateless policy takes vectors of norms; a policy with per-column state
    (the caller sets STATEFUL) takes one column at a time.  ``total`` is the global norm;
    ``norm_sq`` / ``total_sq`` the float64 sums of squares of norm and total (AdaGC's warm-up, for a
    norm past float32's range).  The policy's state is the generic container (thresholds/policy.py
    ThresholdState): ``tstate`` [trows, tcols] values, ``tsorted`` [tcols, trows] sorted values
    (AutoClip), ``tcounts`` int64 [tcols]; ``tparams`` float64 [8] (thresholds.KERNEL_PARAMS) its
    kernel_params.  ``pnorm`` is the parameters' norm over the same scope (the relative threshold,
    AGC; unused otherwise)."""
    if THRESHOLD == THRESHOLD_CONSTANT:
        eta = tl.zeros_like(norm) + level  # (not level + 0 * norm: an inf norm would make it NaN)
    elif THRESHOLD == THRESHOLD_AUTO:  # AutoClip (autoclip_history.py): p_autoclip
        record = ok & (norm == norm) & (tl.abs(norm) != float("inf"))
        eta = autoclip_record_and_threshold(norm, record, col, tstate, tsorted, tcounts, trows, tcols, tl.load(tparams),
                                            ABLOCK)
    elif THRESHOLD == THRESHOLD_ZSCORE:  # ZClip (zscore_threshold.py): alpha, 1 - alpha, z, variant, factor, skip
        record = ok & (norm == norm) & (tl.abs(norm) != float("inf"))
        eta = zscore_record_and_threshold(norm, record, col, tstate, tcounts, trows, tcols,
                                          tl.load(tparams).to(tl.float32), tl.load(tparams + 1).to(tl.float32),
                                          tl.load(tparams + 2).to(tl.float32), level,
                                          tl.load(tparams + 3).to(tl.int32), tl.load(tparams + 4).to(tl.float32),
                                          tl.load(tparams + 5) != 0)
    elif THRESHOLD == THRESHOLD_EMA_RELATIVE:  # AdaGC (adagc_threshold.py): lambda, 1 - beta, warm-up
        record = ok & (norm == norm) & (tl.abs(norm) != float("inf")) & (total == total) & (tl.abs(total) != float("inf"))
        eta = adagc_record_and_threshold(norm, total, norm_sq, total_sq, record, col, tstate, tcounts,
                                         tl.load(tparams + 2).to(tl.int64), tl.load(tparams).to(tl.float32),
                                         tl.load(tparams + 1).to(tl.float32), level)
    elif THRESHOLD == THRESHOLD_RELATIVE:  # AGC: agc_eps
        eps = tl.load(tparams).to(tl.float32)
        eta = level * tl.maximum(pnorm, tl.zeros_like(pnorm) + eps, propagate_nan=tl.PropagateNan.ALL)
    else:
        tl.static_assert(False, "unknown THRESHOLD code")
    return eta


@triton.jit
def norm_scale(norm, sq, eta, key, index, log2_beta, RAND: tl.constexpr):
    """(stored scale, clipped) for a norm-type scope; ``norm`` (float32), ``sq`` (its float64 sum of
    squares), ``eta`` and ``index`` of one shape.  alpha = eta / norm where norm > eta (a zero norm
    never divides); a norm past float32's range with a finite sum takes eta / sqrt(sq) in float64, and a
    quotient below float32's normal range is taken again in float64."""
    clip = norm > eta
    alpha = eta / tl.where(clip, norm, 1.0)
    if RAND != RAND_NONE:
        clip = clip & (tl.rand(key, index) < clip_probability(alpha, log2_beta, RAND))
    past = (norm == float("inf")) & (sq < float("inf"))
    small = (alpha < TINY) & (alpha > 0)  # below float32's normal range: the quotient again in float64
    alpha64 = tl.where(small, eta.to(tl.float64) / tl.where(small, norm, 1.0).to(tl.float64), alpha.to(tl.float64))
    alpha64 = tl.where(past, eta.to(tl.float64) / tl.sqrt(tl.where(past, sq, 1.0)), alpha64)
    return tl.where(clip, stored_scale(alpha64), 1.0), clip


@triton.jit
def stored_scale(s):
    """A scale s (float64, >= 0) as stored in the float32 scales: s, or -(s * 2**64) below float32's
    normal range."""
    small = (s < TINY) & (s > 0)
    return tl.where(small, -(s * SPLIT_POST), s).to(tl.float32)


@triton.jit
def scale_stage(
    tensor_sq, tensor_bad, n_tensors,  # float64 / int32 [T]: per-tensor sums of squares and flags
    columns,  # int64 [T]: each tensor's position in its group
    found_inf_ptr,  # float32 [1]: GradScaler's found_inf (HAS_FOUND_INF)
    step_ptr, seed_ptr,  # int64 [1]: step() calls so far, Philox seed
    tstate, tsorted, tcounts, trows, tcols,  # the threshold policy's state (see threshold()): values [trows, tcols],
    # sorted values [tcols, trows] (AutoClip), counts int64 [tcols]
    tparams,  # float64 [8] (thresholds.KERNEL_PARAMS): the policy's kernel_params
    scales,  # float32 (written): per-tensor scales ([T]; [0] for global scope, [U] per unit at unit scope), stored_scale
    fscratch,  # float32 [4] (written): global norm, mean threshold, fraction of scopes clipped
    iscratch,  # int64 [1] (written): ok flag (0: the step is skipped)
    level, log2_beta,  # constant threshold; log2(beta) of the randomized probability
    lr_ptr,  # the learning-rate tensor (LR_IS_TENSOR): a non-finite or negative value skips the step
    tensor_psq,  # float64 [T]: the parameters' per-tensor sums of squares (relative threshold)
    unit_sq, unit_psq,  # float64 [U]: per-unit sums of squares of the gradients / parameters (unit scope)
    unit_rand,  # int64 [U]: each unit's Philox index (unit scope, randomized)
    n_units,  # units in the step (unit scope)
    CHECK: tl.constexpr, HAS_FOUND_INF: tl.constexpr, SCOPE: tl.constexpr, THRESHOLD: tl.constexpr,
    STATEFUL: tl.constexpr,  # the threshold keeps state per scope column: columns one at a time
    RAND: tl.constexpr, RBLOCK: tl.constexpr, ABLOCK: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr = False,
    GIVEN_TOTAL: tl.constexpr = False,  # the global norm is given in fscratch[3] (functional API)
    norm_p=2.0,  # the norm type p (NORM): tensor_sq then holds parts (norm_parts.py), read as squared norms
    NORM: tl.constexpr = 0,
):
    tl.static_assert((SCOPE != SCOPE_UNIT) or (THRESHOLD == THRESHOLD_CONSTANT) or (THRESHOLD == THRESHOLD_RELATIVE),
                     "unit scope: constant or relative threshold")
    tl.static_assert((NORM == NORM_TWO) or ((SCOPE != SCOPE_UNIT) and (THRESHOLD != THRESHOLD_RELATIVE)),
                     "norm types other than 2: not at unit scope or with the relative threshold")
    WNORM: tl.constexpr = THRESHOLD == THRESHOLD_RELATIVE
    acc = tl.zeros([RBLOCK], dtype=tl.float64)
    pacc = tl.zeros([RBLOCK], dtype=tl.float64)
    bad = tl.zeros([RBLOCK], dtype=tl.int32)
    for i in range(0, n_tensors, RBLOCK):
        offs = i + tl.arange(0, RBLOCK)
        acc = add_part(acc, tl.load(tensor_sq + offs, mask=offs < n_tensors, other=0.0, volatile=True), NORM)
        bad = tl.maximum(bad, tl.load(tensor_bad + offs, mask=offs < n_tensors, other=0, volatile=True))
        if WNORM:
            pacc += tl.load(tensor_psq + offs, mask=offs < n_tensors, other=0.0, volatile=True)
    # (given norms: of the per-tensor ones, for a global norm given as +inf)
    total_sq = as_sq(reduce_parts(acc, NORM), norm_p, NORM)
    norm = tl.sqrt(total_sq).to(tl.float32)
    pnorm = norm  # the parameters' global norm (relative threshold)
    if WNORM:
        pnorm = tl.sqrt(tl.sum(pacc, axis=0)).to(tl.float32)
    if GIVEN_TOTAL:
        norm = tl.load(fscratch + 3)
    ok = tl.full([], 1, tl.int64)
    if CHECK:
        ok = (tl.max(bad, axis=0) == 0).to(tl.int64)
    if HAS_FOUND_INF:
        ok = ok & (tl.load(found_inf_ptr).to(tl.float32) == 0).to(tl.int64)
    if LR_IS_TENSOR:
        ok = ok & lr_ok(lr_ptr)
    tl.store(iscratch, ok)
    tl.store(fscratch, norm)
    key = (tl.load(step_ptr) << 32) | tl.load(seed_ptr)
    if SCOPE == SCOPE_GLOBAL:
        eta = threshold(norm, norm, total_sq, total_sq, ok != 0, 0, level, tstate, tsorted, tcounts, trows, tcols,
                        tparams, pnorm, THRESHOLD, ABLOCK)
        zero = tl.zeros([1], tl.int64)
        s, c = norm_scale(norm + 0.0 * zero, total_sq + 0.0 * zero, eta + 0.0 * zero, key, zero, log2_beta, RAND)
        tl.store(scales + zero, s)
        tl.store(fscratch + 1, eta)
        tl.store(fscratch + 2, tl.sum(c.to(tl.float32), axis=0))
    if SCOPE == SCOPE_LAYER:
        eta_sum = tl.zeros([RBLOCK], dtype=tl.float32)
        clip_sum = tl.zeros([RBLOCK], dtype=tl.float32)
        if STATEFUL:  # one column after another: each updates its own state
            for t in range(0, n_tensors):
                one = t + tl.zeros([1], tl.int64)
                tsq = as_sq(tl.load(tensor_sq + one, volatile=True), norm_p, NORM)
                tnorm = tl.sqrt(tsq).to(tl.float32)
                col = tl.load(columns + t)
                eta = threshold(tl.sum(tnorm, axis=0), norm, tl.sum(tsq, axis=0), total_sq, ok != 0, col, level, tstate,
                                tsorted, tcounts, trows, tcols, tparams, tl.sum(tnorm, axis=0), THRESHOLD, ABLOCK)
                s, c = norm_scale(tnorm, tsq, tl.zeros_like(tnorm) + eta, key, col + 0 * one, log2_beta, RAND)
                tl.store(scales + one, s)
                slot = (one % RBLOCK) == tl.arange(0, RBLOCK)
                eta_sum += tl.where(slot, eta, 0.0)
                clip_sum += tl.where(slot, tl.sum(c.to(tl.float32), axis=0), 0.0)
        else:
            for i in range(0, n_tensors, RBLOCK):
                offs = i + tl.arange(0, RBLOCK)
                mask = offs < n_tensors
                tsq = as_sq(tl.load(tensor_sq + offs, mask=mask, other=0.0, volatile=True), norm_p, NORM)
                tnorm = tl.sqrt(tsq).to(tl.float32)
                tpnorm = tnorm
                if WNORM:
                    tpnorm = tl.sqrt(tl.load(tensor_psq + offs, mask=mask, other=0.0, volatile=True)).to(tl.float32)
                col = tl.load(columns + offs, mask=mask, other=0)
                eta = threshold(tnorm, norm, tsq, total_sq, ok != 0, col, level, tstate, tsorted, tcounts, trows, tcols,
                                tparams, tpnorm, THRESHOLD, ABLOCK)
                s, c = norm_scale(tnorm, tsq, eta, key, col, log2_beta, RAND)
                tl.store(scales + offs, s, mask=mask)
                eta_sum += tl.where(mask, eta, 0.0)
                clip_sum += tl.where(mask, c.to(tl.float32), 0.0)
        tl.store(fscratch + 1, tl.sum(eta_sum, axis=0) / n_tensors)
        tl.store(fscratch + 2, tl.sum(clip_sum, axis=0) / n_tensors)
    if SCOPE == SCOPE_UNIT:  # one scale per output unit; statistics over the units
        eta_sum64 = tl.zeros([RBLOCK], dtype=tl.float64)
        clip_sum64 = tl.zeros([RBLOCK], dtype=tl.float64)
        for i in range(0, n_units, RBLOCK):
            offs = i + tl.arange(0, RBLOCK)
            mask = offs < n_units
            usq = tl.load(unit_sq + offs, mask=mask, other=0.0, volatile=True)
            unorm = tl.sqrt(usq).to(tl.float32)
            upnorm = unorm
            if WNORM:
                upnorm = tl.sqrt(tl.load(unit_psq + offs, mask=mask, other=0.0, volatile=True)).to(tl.float32)
            eta = threshold(unorm, norm, usq, total_sq, ok != 0, offs, level, tstate, tsorted, tcounts, trows, tcols,
                            tparams, upnorm, THRESHOLD, ABLOCK)
            index = offs.to(tl.int64)
            if RAND != RAND_NONE:
                index = tl.load(unit_rand + offs, mask=mask, other=0)
            s, c = norm_scale(unorm, usq, eta, key, index, log2_beta, RAND)
            tl.store(scales + offs, s, mask=mask)
            eta_sum64 += tl.where(mask, eta.to(tl.float64), 0.0)
            clip_sum64 += tl.where(mask, c.to(tl.float64), 0.0)
        count = tl.maximum(tl.zeros([], dtype=tl.float64) + n_units, 1.0)
        tl.store(fscratch + 1, (tl.sum(eta_sum64, axis=0) / count).to(tl.float32))
        tl.store(fscratch + 2, (tl.sum(clip_sum64, axis=0) / count).to(tl.float32))


@triton.jit
def clip_scale_kernel(
    tensor_sq, tensor_bad, n_tensors, columns, found_inf_ptr, step_ptr, seed_ptr, tstate, tsorted, tcounts, trows,
    tcols, tparams, scales, fscratch, iscratch, level, log2_beta,  # as scale_stage's
    norm_p,  # float64: the norm type p (NORM)
    CHECK: tl.constexpr, HAS_FOUND_INF: tl.constexpr, SCOPE: tl.constexpr, THRESHOLD: tl.constexpr,
    STATEFUL: tl.constexpr, RAND: tl.constexpr, RBLOCK: tl.constexpr, ABLOCK: tl.constexpr,
    NORM: tl.constexpr = 0,
):
    """The scale stage alone (one program), from norms given in ``tensor_sq`` (squared per-tensor
    norms; another norm type: their parts, norm_parts.py) and fscratch[3] (the global norm): the second
    half of the functional API.  Unit scope and
    the relative threshold need norms of units and weights, which only the norm pass takes."""
    tl.static_assert((SCOPE != SCOPE_UNIT) and (THRESHOLD != THRESHOLD_RELATIVE),
                     "unit scope / relative threshold: the norm pass's scale stage only")
    scale_stage(tensor_sq, tensor_bad, n_tensors, columns, found_inf_ptr, step_ptr, seed_ptr, tstate, tsorted, tcounts,
                trows, tcols, tparams, scales, fscratch, iscratch, level, log2_beta, fscratch,
                tensor_sq, tensor_sq, tensor_sq, columns, 0, CHECK,
                HAS_FOUND_INF, SCOPE, THRESHOLD, STATEFUL, RAND, RBLOCK, ABLOCK, False, True, norm_p, NORM)



@triton.jit
def clip_given_scale_kernel(
    tensor_sq, tensor_bad, n_tensors, columns, found_inf_ptr, step_ptr, seed_ptr, tstate, tsorted, tcounts, trows,
    tcols, tparams, scales, fscratch, iscratch, level, log2_beta,  # as scale_stage's
    tensor_psq, unit_sq, unit_psq, unit_rand, n_units,  # as scale_stage's, given (reduced across ranks)
    CHECK: tl.constexpr, HAS_FOUND_INF: tl.constexpr, SCOPE: tl.constexpr, THRESHOLD: tl.constexpr,
    STATEFUL: tl.constexpr, RAND: tl.constexpr, RBLOCK: tl.constexpr, ABLOCK: tl.constexpr,
):
    """The scale stage alone (one program) of unit scope and the relative threshold, from given norms
    (``tensor_sq``, fscratch[3]) and given sums of squares of the units (``unit_sq``, ``unit_psq``) or of the
    weights per tensor (``tensor_psq``): a sharded group's, reduced across the ranks that split them
    (torch_clip_fused/distributed/units.py)."""
    scale_stage(tensor_sq, tensor_bad, n_tensors, columns, found_inf_ptr, step_ptr, seed_ptr, tstate, tsorted, tcounts,
                trows, tcols, tparams, scales, fscratch, iscratch, level, log2_beta, fscratch,
                tensor_psq, unit_sq, unit_psq, unit_rand, n_units, CHECK,
                HAS_FOUND_INF, SCOPE, THRESHOLD, STATEFUL, RAND, RBLOCK, ABLOCK, False, True)
