"""ZClip's z-score threshold (Kumar et al., 2025, "ZClip: Adaptive Spike Mitigation for LLM
Pre-Training"), as the ``zclip==1.0.0`` package computes it with ``mode="zscore"``,
``clip_option="adaptive_scaling"`` (docs/spec.md section 1).

Per scope column (one at global scope, one per tensor at layer scope), with n the column's norm,
W = max(zclip_warmup, 1), a = zclip_alpha, z_t = zclip_z, L = clipping_level (inf: no cap) and
eps = 1e-6:

* warm-up (fewer than W norms recorded at the start of the step): record n; eta = min(n, L).  The
  step that records the W-th norm starts the EMAs from the records: mu = sum(x) / W,
  var = sum((x - mu)^2) / W (biased, ZClip's ``_initialize_ema``); it clips only at L.
* after: sigma = sqrt(var), z = (n - mu) / (sigma + eps); a spike (z > z_t) gets
  c = mu + (z_t sigma) / (z / z_t), otherwise c = n; eta = min(c, L); then
  mu = a mu + (1 - a) c, var = a var + (1 - a) (c - mu)^2 with the new mu (the EMAs take c, the
  adaptive threshold before the cap, as ZClip's ``_update_ema``).

Nothing is recorded (state untouched) when the step is skipped or the norm is not finite.  The
arithmetic is the state's dtype (float32, or float64 for float64 groups).  The same operations, in
the same order, run in the C++ kernel (csrc/zscore_threshold.h) and the Triton scale stage
(kernels/zscore_threshold.py).  Vectorised over the columns, no host synchronisation.
"""

from __future__ import annotations

import torch

from ...config import ZCLIP_EPS


def zscore_record_and_threshold(state: torch.Tensor, count: torch.Tensor, columns: torch.Tensor, norms: torch.Tensor,
                                record: torch.Tensor, alpha: float, z_thresh: float, level: float) -> torch.Tensor:
    """eta for each column in ``columns`` (norms: one per column), updating ``state``
    ([2 + W, n_cols]: mean, variance, warm-up records) and ``count`` ([n_cols]) where ``record``."""
    w = state.shape[0] - 2
    cols = state[:, columns]
    mean, var, records = cols[0], cols[1], cols[2:]
    cnt = count[columns]
    warm = cnt < w
    # warm-up: the norm goes to record slot cnt; the W-th record starts the EMAs
    take = record & warm
    slot = torch.arange(w, device=state.device).unsqueeze(1) == cnt.clamp(max=w - 1).unsqueeze(0)
    records = torch.where(slot & take.unsqueeze(0), norms.unsqueeze(0), records)
    new_cnt = cnt + take.to(cnt.dtype)
    starts = take & (new_cnt == w)
    first_mean = records.sum(0) / w
    first_var = (records - first_mean).square().sum(0) / w
    # after the warm-up: ZClip's adaptive scaling, then its EMA update with the uncapped threshold
    std = var.sqrt()
    z = (norms - mean) / (std + ZCLIP_EPS)
    spike = ~warm & (z > z_thresh)
    adaptive = torch.where(spike, mean + (z_thresh * std) / (z / z_thresh), norms)
    eta = adaptive.clamp(max=level)
    ema = record & ~warm
    next_mean = alpha * mean + (1 - alpha) * adaptive
    next_var = alpha * var + (1 - alpha) * (adaptive - next_mean).square()
    mean = torch.where(starts, first_mean, torch.where(ema, next_mean, mean))
    var = torch.where(starts, first_var, torch.where(ema, next_var, var))
    state[:, columns] = torch.cat([mean.unsqueeze(0), var.unsqueeze(0), records])
    count[columns] = new_cnt
    return eta


__all__ = ["zscore_record_and_threshold"]
