"""``skip_if_zscore_above``: skip the step when the whole model's pre-clip gradient norm is a spike against
its own recent history (OLMo-core's skip on a z-score, kept as ZClip keeps its statistics, Kumar et al.,
2025).  With n = ||g||, W = max(skip_zscore_warmup, 1), a = skip_zscore_alpha and eps = 1e-6:

* warm-up (fewer than W norms recorded): never skip; record n.  The W-th record starts the EMAs:
  mu = sum(x) / W, var = sum((x - mu)^2) / W;
* after: z = (n - mu) / (sqrt(var) + eps); skip  <=>  z > skip_if_zscore_above.  A step that is taken
  updates mu = a mu + (1 - a) n, then var = a var + (1 - a) (n - mu)^2 with the new mu.

A skipped step (by this rule, another one, a non-finite gradient or a GradScaler's inf) records nothing.
The state is ZClip's layout (thresholds/zclip.py) with one column, in float64: [2 + W, 1] (mean, variance,
warm-up records) and the records count [1]; the same arithmetic (``zscore_record_and_threshold``: a step
that is taken has z <= the threshold, where ZClip's adaptive value is the norm itself).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from ..checks import bounded, count as count_setting
from ..thresholds.policy import Setting, StateLayout
from ..thresholds.zclip import ZCLIP_EPS, _prepare as _zclip_prepare, zscore_record_and_threshold
from .norm_above import optional_level
from .rule import SkipInputs, SkipRule


def _rows(settings) -> int:
    return 2 + max(settings.skip_zscore_warmup, 1)


def zscore_above(x: SkipInputs) -> torch.Tensor:
    """bool []: the warm-up is over and (n - mu) / (sigma + eps) > skip_if_zscore_above."""
    values, counts = x.state.values, x.state.counts
    mean, var = values[0, 0], values[1, 0]
    z = (x.norm - mean) / (var.sqrt() + ZCLIP_EPS)
    return (counts[0] >= values.shape[0] - 2) & (z > x.settings.skip_if_zscore_above)


def record_zscore(x: SkipInputs, keep: torch.Tensor) -> None:
    """The warm-up record or the EMA update of a step that is taken (in place, device ops)."""
    zero = torch.zeros(1, dtype=torch.long, device=x.norm.device)
    zscore_record_and_threshold(x.state.values, x.state.counts, zero, x.norm.reshape(1), keep.reshape(1),
                                x.settings.skip_zscore_alpha, x.settings.skip_if_zscore_above, math.inf)


def _prepare(ts, settings, steps, state, key):
    """A new warm-up length (``skip_zscore_warmup`` changed): ZClip's re-layout (thresholds/zclip.py)."""
    return _zclip_prepare(ts, SimpleNamespace(zclip_warmup=settings.skip_zscore_warmup), steps, state, key)


ZSCORE_ABOVE = SkipRule(
    settings=(
        Setting("skip_if_zscore_above", None, optional_level("skip_if_zscore_above"),
                "skip the step when the norm's z-score against its EMAs exceeds this (None: never)"),
        Setting("skip_zscore_alpha", 0.97,
                lambda v: bounded(v, "skip_zscore_alpha", lambda a: 0.0 < a < 1.0, "0 < skip_zscore_alpha < 1"),
                "EMA factor of the norm's mean and variance, 0 < alpha < 1"),
        Setting("skip_zscore_warmup", 25, lambda v: count_setting(v, "skip_zscore_warmup", 0),
                "norms recorded before the z-score is taken, int >= 0"),
    ),
    decide=zscore_above,
    state=StateLayout("clip_skip_zscore", "clip_skip_zscore_count", rows=_rows, min_rows=3, prepare=_prepare),
    record=record_zscore,
    doc=__doc__,
)

__all__ = ["ZSCORE_ABOVE", "record_zscore", "zscore_above"]
