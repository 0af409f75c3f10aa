"""ZClip's threshold (Kumar et al., 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"),
as the ``zclip==1.0.0`` package computes it, in every mode and option (docs/spec.md section 1).

Per scope column (one at global scope, one per tensor at layer scope), with n the column's norm,
W = max(zclip_warmup, 1), a = zclip_alpha, z_t = zclip_z, f = zclip_clip_factor, L = clipping_level
(inf: no cap) and eps = 1e-6:

* warm-up (fewer than W norms recorded at the start of the step): record n; eta = min(n, L).  The
  step that records the W-th norm starts the EMAs from the records: mu = sum(x) / W,
  var = sum((x - mu)^2) / W (biased, ZClip's ``_initialize_ema``); it clips only at L.
* after: sigma = sqrt(var) and the clip value c of a spike (ZClip's ``_compute_clip_val``):

  - ``zclip_mode="zscore"``: z = (n - mu) / (sigma + eps); a spike is z > z_t;
    ``zclip_clip_option="adaptive_scaling"``: c = (mu + (z_t sigma) / (z / z_t)) f;
    ``"mean"``: c = mu (f unused);
  - ``zclip_mode="percentile"``: a spike is n > mu + z_t sigma, c = mu + z_t sigma (the clip option
    and f unused);

  without a spike c = n.  eta = min(c, L); then mu = a mu + (1 - a) c, var = a var + (1 - a) (c - mu)^2
  with the new mu (the EMAs take c, the clip value before the cap, as ZClip's ``_update_ema``), except
  on a spike with ``zclip_skip_update_on_spike=True``: the EMAs are left as they are (the step is
  still clipped).

Nothing is recorded (state untouched) when the step is skipped or the norm is not finite.  The
arithmetic is the state's dtype (float32, or float64 for float64 groups).  The same operations, in
the same order, run in the C++ kernel (csrc/zscore_threshold.h) and the Triton scale stage
(kernels/zscore_threshold.py).  Vectorised over the columns, no host synchronisation.
"""

from __future__ import annotations

import math

import torch

from ..checks import bounded, count as count_setting, flag, one_of
from ..methods import Threshold
from .policy import Setting, StateLayout, ThresholdInputs, ThresholdPolicy, ThresholdState

#: ZClip's eps in the z-score (the zclip package's eps=1e-6): z = (||g|| - mu) / (sigma + ZCLIP_EPS)
ZCLIP_EPS = 1e-6

#: ZClip's clip values as the kernels read them (kernel_params[3]): zscore mode with clip_option
#: "adaptive_scaling" or "mean", percentile mode (its clip option unused)
ZCLIP_ADAPTIVE_SCALING, ZCLIP_MEAN, ZCLIP_PERCENTILE = 0, 1, 2
ZCLIP_MODES = ("zscore", "percentile")
ZCLIP_CLIP_OPTIONS = ("adaptive_scaling", "mean")


def zclip_variant(clip) -> int:
    """The clip-value code of a ClipConfig's ZClip settings (ZCLIP_ADAPTIVE_SCALING, ZCLIP_MEAN, ZCLIP_PERCENTILE)."""
    if clip.zclip_mode == "percentile":
        return ZCLIP_PERCENTILE
    return ZCLIP_MEAN if clip.zclip_clip_option == "mean" else ZCLIP_ADAPTIVE_SCALING


def zscore_record_and_threshold(state: torch.Tensor, count: torch.Tensor, columns: torch.Tensor, norms: torch.Tensor,
                                record: torch.Tensor, alpha: float, z_thresh: float, level: float,
                                variant: int = ZCLIP_ADAPTIVE_SCALING, clip_factor: float = 1.0,
                                skip_on_spike: bool = False) -> torch.Tensor:
    """eta for each column in ``columns`` (norms: one per column), updating ``state``
    ([2 + W, n_cols]: mean, variance, warm-up records) and ``count`` ([n_cols]) where ``record`` (the
    EMAs not on a spike with ``skip_on_spike``); ``variant`` the clip value's code (zclip_variant)."""
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
    # after the warm-up: ZClip's clip value on a spike, then its EMA update with the uncapped value
    std = var.sqrt()
    if variant == ZCLIP_PERCENTILE:
        bound = mean + z_thresh * std
        spike = ~warm & (norms > bound)
        clip_value = bound
    else:
        z = (norms - mean) / (std + ZCLIP_EPS)
        spike = ~warm & (z > z_thresh)
        clip_value = mean if variant == ZCLIP_MEAN else (mean + (z_thresh * std) / (z / z_thresh)) * clip_factor
    adaptive = torch.where(spike, clip_value, norms)
    eta = adaptive.clamp(max=level)
    ema = record & ~warm & ~spike if skip_on_spike else record & ~warm
    next_mean = alpha * mean + (1 - alpha) * adaptive
    next_var = alpha * var + (1 - alpha) * (adaptive - next_mean).square()
    mean = torch.where(starts, first_mean, torch.where(ema, next_mean, mean))
    var = torch.where(starts, first_var, torch.where(ema, next_var, var))
    state[:, columns] = torch.cat([mean.unsqueeze(0), var.unsqueeze(0), records])
    count[columns] = new_cnt
    return eta


def zscore_threshold(x: ThresholdInputs) -> torch.Tensor:
    """ZClip (Kumar et al., 2025): eta from EMAs of the column's norm mean and variance when the norm is
    a spike (its z-score above zclip_z, or in percentile mode above mu + zclip_z sigma), else the norm
    itself, capped at clipping_level; the state is updated only if the step is ok and the norm finite."""
    record = x.ok & torch.isfinite(x.norms)
    clip = x.clip
    return zscore_record_and_threshold(x.state.values, x.state.counts, x.columns, x.norms, record, clip.zclip_alpha,
                                       clip.zclip_z, clip.level, zclip_variant(clip), clip.zclip_clip_factor,
                                       clip.zclip_skip_update_on_spike)


def zclip_rows(clip) -> int:
    """Rows of a zscore state column: the EMA mean, the EMA variance, then the warm-up records (at
    least one: ZClip with warmup_steps=0 still records one norm before its EMAs start)."""
    return 2 + max(clip.zclip_warmup, 1)


def _prepare(ts: ThresholdState, clip, steps: int, state: dict, key: str) -> ThresholdState:
    """A zscore state with a new warm-up length W' = rows - 2 (``zclip_warmup`` changed): started EMAs
    stay started; a warm-up in progress goes on to W' records, and one that already has W' records
    starts its EMAs now from them (ZClip's biased mean and variance).  Device ops only."""
    zstate, count, rows = ts.values, ts.counts, zclip_rows(clip)
    if zstate.shape[0] == rows:
        return ts
    old_w, new_w = zstate.shape[0] - 2, rows - 2
    new = torch.zeros((rows, zstate.shape[1]), dtype=zstate.dtype, device=zstate.device)
    kept = min(old_w, new_w)
    new[: 2 + kept] = zstate[: 2 + kept]
    started = count >= old_w
    cut = ~started & (count >= new_w)  # a warm-up that has its W' records: start the EMAs from them
    if old_w >= new_w:
        records = zstate[2: 2 + new_w]
        mean = records.sum(0) / new_w
        var = (records - mean).square().sum(0) / new_w
        new[0] = torch.where(cut, mean, new[0])
        new[1] = torch.where(cut, var, new[1])
    new_count = torch.where(started, torch.full_like(count, new_w), count.clamp(max=new_w))
    return ThresholdState(new, new_count)


ZSCORE = ThresholdPolicy(
    Threshold.ZSCORE, zscore_threshold,
    settings=(
        Setting("zclip_alpha", 0.97, lambda v: bounded(v, "zclip_alpha", lambda a: 0.0 < a < 1.0, "0 < zclip_alpha < 1"),
                "ZClip's EMA factor (the zclip package's alpha), 0 < alpha < 1"),
        Setting("zclip_z", 2.5, lambda v: bounded(v, "zclip_z", lambda z: z > 0.0, "zclip_z > 0"),
                "ZClip's z threshold (z_thresh), > 0"),
        Setting("zclip_warmup", 25, lambda v: count_setting(v, "zclip_warmup", 0),
                "ZClip's warm-up steps (warmup_steps), int >= 0"),
        Setting("zclip_mode", "zscore", lambda v: one_of(v, "zclip_mode", ZCLIP_MODES, lower=True),
                "ZClip's mode: 'zscore' or 'percentile' (clip to mu + zclip_z sigma)"),
        Setting("zclip_clip_option", "adaptive_scaling",
                lambda v: one_of(v, "zclip_clip_option", ZCLIP_CLIP_OPTIONS),
                "ZClip's zscore-mode clip value: 'adaptive_scaling' or 'mean' (the EMA mean)"),
        Setting("zclip_clip_factor", 1.0,
                lambda v: bounded(v, "zclip_clip_factor", lambda f: f > 0.0, "zclip_clip_factor > 0"),
                "ZClip's factor on the adaptive_scaling threshold (clip_factor), > 0"),
        Setting("zclip_skip_update_on_spike", False, lambda v: flag(v, "zclip_skip_update_on_spike"),
                "ZClip's skip_update_on_spike: True leaves the EMAs as they are on a spike"),
    ),
    state=StateLayout("clip_zclip", "clip_zclip_count", rows=zclip_rows, min_rows=3, prepare=_prepare),
    kernel_params=lambda clip: (clip.zclip_alpha, 1.0 - clip.zclip_alpha, clip.zclip_z, float(zclip_variant(clip)),
                                clip.zclip_clip_factor, float(clip.zclip_skip_update_on_spike)),
    shared_settings=("zclip_alpha", "zclip_z", "zclip_warmup", "zclip_mode", "zclip_clip_option", "zclip_clip_factor",
                     "zclip_skip_update_on_spike"),
    default_level=math.inf,  # no cap (ZClip's max_grad_norm=None)
)

__all__ = ["ZCLIP_ADAPTIVE_SCALING", "ZCLIP_CLIP_OPTIONS", "ZCLIP_EPS", "ZCLIP_MEAN", "ZCLIP_MODES", "ZCLIP_PERCENTILE",
           "ZSCORE", "zclip_rows", "zclip_variant", "zscore_record_and_threshold", "zscore_threshold"]
