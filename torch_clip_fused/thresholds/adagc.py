"""AdaGC's relative threshold (Wang et al., 2025, "AdaGC: Improving Training Stability for Large
Language Model Pretraining"), as pytorch-optimizer 4.1.0's ``AdaGC`` clips the gradients before
its Adam moments (docs/spec.md section 1).

Per scope column (one per tensor at layer scope, one at global scope), with n the column's norm,
G the group's global norm, gamma the column's EMA of clipped norms (+inf before its first record),
k the steps recorded so far, W = adagc_warmup, lam = adagc_lambda, b = adagc_beta,
L = clipping_level (AdaGC's lambda_abs) and eps = 1e-8 (AdaGC's default eps):

* warm-up, when k == 0 or k + 1 < W (AdaGC's ``gamma is None or step < warmup_steps``, its step
  being k + 1): global clipping, s = min(L / (G + eps), 1); eta = n s, the clipped norm c = n s;
  gamma = min(gamma, c) (the first record seeds it);
* after: eta = lam * max(gamma, eps); c = min(n, eta) (AdaGC's clip factor
  min(lam max(gamma, eps) / max(n, eps), 1) is eta / n when n > eta, else 1);
  gamma = lerp(gamma, c, 1 - b) (torch.lerp's formula).

AdaGC takes c as the norm of the clipped gradient it computes; here c is n times the scale (the
same value up to rounding: no extra pass over the gradients).  Nothing is recorded (state
untouched, k unchanged) when the step is skipped or a norm is not finite; k is not capped
(AdaGC's step count: a later, longer adagc_warmup warms up again exactly when AdaGC's would).  The arithmetic is the state's dtype (float32, or float64 for float64 groups).  The same
operations, in the same order, run in the C++ kernel (csrc/adagc_threshold.h) and the Triton
scale stage (kernels/adagc_threshold.py).  Vectorised over the columns, no host synchronisation.
"""

from __future__ import annotations

import math

import torch

from ..checks import bounded, count as count_setting
from ..methods import Threshold
from .policy import Setting, StateLayout, ThresholdInputs, ThresholdPolicy

#: AdaGC's eps (its default eps=1e-8, which also floors the norms and the EMA): the relative phase's
#: threshold is adagc_lambda * max(gamma, ADAGC_EPS), the warm-up clips at level / (||g|| + ADAGC_EPS)
ADAGC_EPS = 1e-8


def lerp(start: torch.Tensor, end: torch.Tensor, weight: float) -> torch.Tensor:
    """torch.lerp's formula (start + w (end - start) for w < 0.5, else end - (end - start) (1 - w))."""
    return torch.lerp(start, end, weight)


def adagc_record_and_threshold(gamma: torch.Tensor, count: torch.Tensor, columns: torch.Tensor, norms: torch.Tensor,
                               total: torch.Tensor, record: torch.Tensor, lam: float, beta: float, warmup: int,
                               level: float, exact=None) -> torch.Tensor:
    """eta for each column in ``columns`` (norms: one per column; total: the global norm), updating
    ``gamma`` ([1, n_cols]) and ``count`` ([n_cols]) where ``record``.  ``exact``: (norms, total) in
    float64 or None; where a float32 norm is past float32's range (+inf, so n s would be inf * 0) and
    the float64 ones are finite, the warm-up's eta n s is taken in float64 (an exploding gradient is
    clipped, docs/spec.md section 1; nothing is recorded, the norm not being finite)."""
    dtype = gamma.dtype
    g = gamma[0, columns]
    cnt = count[columns]
    norms = norms.to(dtype)
    total = total.to(dtype)
    warm = (cnt == 0) | (cnt + 1 < warmup)
    # warm-up: AdaGC's global clip, min(lambda_abs / (||g|| + eps), 1)
    s = torch.clamp(level / (total + ADAGC_EPS), max=1.0)
    warm_eta = norms * s
    if exact is not None and dtype != torch.float64:
        norms64, total64 = exact
        past = (torch.isinf(norms) | torch.isinf(total)) & torch.isfinite(norms64) & torch.isfinite(total64)
        warm64 = norms64 * torch.clamp(level / (total64 + ADAGC_EPS), max=1.0)
        warm_eta = torch.where(past, warm64.to(dtype), warm_eta)
    # after: lambda_rel * max(gamma, eps); the clipped norm min(n, eta)
    rel_eta = lam * g.clamp(min=ADAGC_EPS)
    eta = torch.where(warm, warm_eta, rel_eta)
    clipped = torch.where(warm, warm_eta, torch.minimum(norms, rel_eta))
    next_gamma = torch.where(warm, torch.minimum(g, clipped), lerp(g, clipped, 1.0 - beta))
    gamma[0, columns] = torch.where(record, next_gamma, g)
    count[columns] = torch.where(record, cnt + 1, cnt)
    return eta


def ema_relative_threshold(x: ThresholdInputs) -> torch.Tensor:
    """AdaGC (Wang et al., 2025): global clipping at clipping_level during the warm-up, then eta =
    adagc_lambda times the column's EMA of clipped norms; the state is updated only if the step is ok
    and the norms finite.  ``x.exact``: (scope norms, global norm) in float64, for the warm-up's eta of
    a norm past float32's range."""
    total = x.norms.reshape(-1)[:1] if x.total is None else x.total
    record = x.ok & torch.isfinite(x.norms) & torch.isfinite(total)
    clip = x.clip
    return adagc_record_and_threshold(x.state.values, x.state.counts, x.columns, x.norms, total, record,
                                      clip.adagc_lambda, clip.adagc_beta, clip.adagc_warmup, clip.level, x.exact)


def _check(clip) -> None:
    if not clip.level > 0.0:
        raise ValueError(f"Invalid clipping_level value: {clip.level}; the ema_relative threshold (AdaGC) clips at "
                         "clipping_level during its warm-up (AdaGC's lambda_abs) and needs clipping_level > 0")


EMA_RELATIVE = ThresholdPolicy(
    Threshold.EMA_RELATIVE, ema_relative_threshold,
    settings=(
        Setting("adagc_lambda", 1.05, lambda v: bounded(v, "adagc_lambda", lambda x: 0.0 < x < math.inf,
                                                        "a finite adagc_lambda > 0"),
                "AdaGC's relative factor (lambda_rel), > 0"),
        Setting("adagc_beta", 0.98, lambda v: bounded(v, "adagc_beta", lambda b: 0.0 <= b < 1.0, "0 <= adagc_beta < 1"),
                "AdaGC's EMA factor (beta), 0 <= beta < 1"),
        Setting("adagc_warmup", 100, lambda v: count_setting(v, "adagc_warmup", 0),
                "AdaGC's warm-up steps (warmup_steps), int >= 0; the first step always warms up"),
    ),
    state=StateLayout("clip_adagc", "clip_adagc_count", rows=lambda clip: 1, fill=math.inf, fixed_rows=1),
    kernel_params=lambda clip: (clip.adagc_lambda, 1.0 - clip.adagc_beta, float(clip.adagc_warmup)),
    shared_settings=("adagc_lambda", "adagc_beta", "adagc_warmup"),
    check=_check,
)

__all__ = ["ADAGC_EPS", "EMA_RELATIVE", "adagc_record_and_threshold", "ema_relative_threshold"]
