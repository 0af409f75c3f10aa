"""AdaGC's relative threshold in the Triton scale stage (one program, one scope column at a time;
the math and its order are in torch_clip_fused/thresholds/adagc.py).  The column's state is
``gamma[col]`` (the EMA of its clipped norms, +inf before the first record) and ``counts[col]`` (the
steps recorded, AdaGC's step count).
"""

import triton
import triton.language as tl

ADAGC_EPS = tl.constexpr(1e-8)  # AdaGC's eps (torch_clip_fused.thresholds.adagc.ADAGC_EPS)


@triton.jit
def adagc_record_and_threshold(
    norm,  # float32 []: the scope column's norm this step
    total,  # float32 []: the group's global norm (the warm-up's global clip)
    norm_sq, total_sq,  # float64 []: their sums of squares (a norm past float32's range: +inf as float32)
    record,  # bool []: whether the state takes the step (the step is ok and the norms finite)
    col,  # int []: the scope column
    gamma, counts,  # float32 [1, n_cols] (float64 for float64 groups), int64 [n_cols]
    warmup,  # int: adagc_warmup
    lam, one_minus_beta,  # float32: adagc_lambda, 1 - adagc_beta
    level,  # float32: clipping_level (AdaGC's lambda_abs)
):
    """eta for column ``col``: during the warm-up (k == 0 or k + 1 < W) norm * min(level / (total +
    eps), 1), gamma = min(gamma, that clipped norm); after it lam * max(gamma, eps), gamma =
    lerp(gamma, min(norm, eta), 1 - beta).  Where a float32 norm is past float32's range (norm * s would
    be inf * 0) and the sums are finite, the warm-up's eta is taken in float64 from the sums (an exploding
    gradient is clipped, docs/spec.md section 1; nothing is recorded, the norm not being finite)."""
    cnt = tl.load(counts + col)
    g = tl.load(gamma + col)
    warm = (cnt == 0) | (cnt + 1 < warmup)
    q = level / (total + ADAGC_EPS)
    s = tl.where(q > 1.0, 1.0, q)
    warm_eta = norm * s
    past = ((norm == float("inf")) | (total == float("inf"))) & (norm_sq < float("inf")) & (total_sq < float("inf"))
    warm64 = tl.sqrt(norm_sq) * tl.minimum(level / (tl.sqrt(total_sq) + ADAGC_EPS), 1.0)
    warm_eta = tl.where(past, warm64.to(tl.float32), warm_eta)
    rel_eta = lam * tl.maximum(g, ADAGC_EPS)
    eta = tl.where(warm, warm_eta, rel_eta)
    if record:
        if warm:
            tl.store(gamma + col, tl.where(warm_eta < g, warm_eta, g))
        else:
            c = tl.where(norm < rel_eta, norm, rel_eta)
            if tl.abs(one_minus_beta) < 0.5:  # torch.lerp's formula
                nxt = g + one_minus_beta * (c - g)
            else:
                nxt = c - (c - g) * (1.0 - one_minus_beta)
            tl.store(gamma + col, nxt)
        tl.store(counts + col, cnt + 1)
    return eta
