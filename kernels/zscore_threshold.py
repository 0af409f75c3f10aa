"""ZClip's threshold (every mode and option of zclip==1.0.0) in the Triton scale stage (one program,
one scope column at a time; the math and its order are in torch_clip_fused/thresholds/zclip.py).
The column's state is a column of ``state`` [2 + W, n_cols]: row 0 the EMA mean, row 1 the EMA
variance, rows 2.. the W warm-up norms; ``counts`` [n_cols] the warm-up norms recorded (at most W).
"""

import triton
import triton.language as tl

ZCLIP_EPS = tl.constexpr(1e-6)  # ZClip's eps in the z-score (torch_clip_fused.thresholds.zclip.ZCLIP_EPS)
# ZClip's clip value on a spike (torch_clip_fused.thresholds.zclip.zclip_variant): zscore mode with
# clip_option "adaptive_scaling" or "mean", percentile mode
ZCLIP_MEAN = tl.constexpr(1)
ZCLIP_PERCENTILE = tl.constexpr(2)


@triton.jit
def zscore_record_and_threshold(
    norm,  # float32 []: the scope column's norm this step
    record,  # bool []: whether the state takes the norm (the step is ok and the norm finite)
    col,  # int []: the scope column
    state, counts,  # float32 [rows, n_cols], int64 [n_cols]
    rows, n_cols,  # the state's shape (rows = 2 + W)
    alpha, one_minus_alpha, z_thresh,  # float32: zclip_alpha, 1 - zclip_alpha, zclip_z
    level,  # float32: the cap (clipping_level; inf without one)
    variant,  # int []: the clip value's code (0 adaptive_scaling, ZCLIP_MEAN, ZCLIP_PERCENTILE)
    clip_factor,  # float32: zclip_clip_factor
    skip_on_spike,  # bool []: zclip_skip_update_on_spike
):
    """eta for column ``col``: during the warm-up min(norm, level), recording the norm (the W-th
    record starts the EMAs from the records' mean and biased variance); after it min(c, level) with
    c ZClip's clip value on a spike, else c = norm, and the EMAs take c (not on a spike with
    skip_on_spike).  zscore mode: a spike is z = (norm - mu) / (sigma + eps) > z_t, c = (mu + z_t sigma
    / (z / z_t)) clip_factor (adaptive_scaling) or mu (mean); percentile: norm > c = mu + z_t sigma."""
    w = rows - 2
    cnt = tl.load(counts + col)
    mean = tl.load(state + col)
    var = tl.load(state + n_cols + col)
    std = tl.sqrt(var)
    z = (norm - mean) / (std + ZCLIP_EPS)
    bound = mean + z_thresh * std
    percentile = variant == ZCLIP_PERCENTILE
    spike = (cnt >= w) & tl.where(percentile, norm > bound, z > z_thresh)
    scaled = (mean + (z_thresh * std) / (z / z_thresh)) * clip_factor
    adaptive = tl.where(spike, tl.where(percentile, bound, tl.where(variant == ZCLIP_MEAN, mean, scaled)), norm)
    eta = tl.where(level < adaptive, level, adaptive)
    if record:
        if cnt < w:
            tl.store(state + (2 + cnt) * n_cols + col, norm)
            tl.store(counts + col, cnt + 1)
            if cnt + 1 == w:  # the records (the new norm taken from the register, not read back)
                total = norm * 0.0
                for i in range(0, w):
                    total += tl.where(i == cnt, norm, tl.load(state + (2 + i) * n_cols + col))
                first_mean = total / w.to(tl.float32)
                sq = norm * 0.0
                for i in range(0, w):
                    d = tl.where(i == cnt, norm, tl.load(state + (2 + i) * n_cols + col)) - first_mean
                    sq += d * d
                tl.store(state + col, first_mean)
                tl.store(state + n_cols + col, sq / w.to(tl.float32))
        else:
            next_mean = alpha * mean + one_minus_alpha * adaptive
            d = adaptive - next_mean
            keep = skip_on_spike & spike  # skip_update_on_spike: the EMAs stay
            tl.store(state + col, tl.where(keep, mean, next_mean))
            tl.store(state + n_cols + col, tl.where(keep, var, alpha * var + one_minus_alpha * (d * d)))
    return eta
