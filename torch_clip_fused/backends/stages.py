"""The stages as the backend contract (docs/spec.md section 6): every backend's ``norms`` and
``apply``, what an optimizer step calls when something sits between them (a norm shared by several
param groups, a reduction across ranks).

* ``norms(t, cfg)``: the float64 vector [||g_0||^2, ..., ||g_{T-1}||^2, n_bad] on the gradients'
  device: the per-tensor sums of squares of the (unscaled) gradients and the number of tensors whose
  sum is not finite.  One fused pass of the backend's own norm stage; no host sync.  Vectors of
  several groups or ranks are summed (``torch.cat`` then one all-reduce) before any scale is decided.
  With ``norm_type`` p the parts are ||g_i||_p^p (p = inf: max |g_i|, combined by max; norm_type.py).
* ``apply(t, cfg, norms)``: thresholds, scales, randomization, the update rule and the statistics with
  the reduced ``norms`` [T + 1] (per-tensor, then the global norm; a NaN global norm skips the step
  where non-finite gradients skip); with ``norms=None`` the backend's fused step, its own norm stage
  between (the fast path: one group, nothing between the stages).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

import torch

from ..config import ClipOnly, GroupConfig, GroupTensors
from ..methods import ClipMethod
from ..norm_type import part_scale, to_parts

_DERIVED: Dict[tuple, tuple] = {}


def derived_config(cfg: GroupConfig, kind: str, make: Callable[[], GroupConfig]) -> GroupConfig:
    """A config derived from ``cfg`` (a group's validated settings, cached by the optimizer), made once."""
    cached = _DERIVED.get((id(cfg), kind))
    if cached is not None and cached[0] is cfg:
        return cached[1]
    if len(_DERIVED) > 128:
        _DERIVED.clear()
    derived = make()
    _DERIVED[(id(cfg), kind)] = (cfg, derived)
    return derived


def norm_stage_config(cfg: GroupConfig) -> GroupConfig:
    """The config of the norm stage alone: no clipping method (no threshold state is read or written) and
    the clip-only rule (no momentum buffer or moment is read), as the functional API's."""
    return derived_config(cfg, "norm stage", lambda: dataclasses.replace(
        cfg, clip=dataclasses.replace(cfg.clip, method=ClipMethod(None)), update=ClipOnly()))


def norm_parts(clip_fn: Callable, t: GroupTensors, cfg: GroupConfig) -> torch.Tensor:
    """The ``norms`` stage (module docstring) from a backend's functional stage function ``clip_fn``;
    under a GradScaler the sums of squares are those of the unscaled gradients (divided in float64)."""
    norms = torch.empty(len(t.grads) + 1, dtype=torch.float64, device=t.device)
    # the stage sees the scaled gradients (the backends' functional stages differ in reading grad_scale)
    clip_fn(dataclasses.replace(t, grad_scale=None) if t.grad_scale is not None else t, norm_stage_config(cfg),
            norms, "norms")
    p = cfg.clip.norm_type
    sq = to_parts(norms[:-1], p)
    if t.grad_scale is not None:
        sq = sq / part_scale(t.grad_scale.to(device=sq.device, dtype=torch.float64), p)
    return torch.cat([sq, (~torch.isfinite(sq)).sum().to(torch.float64).reshape(1)])


def apply_with_norms(step: Callable, t: GroupTensors, cfg: GroupConfig, norms: Optional[torch.Tensor]) -> None:
    """The ``apply`` stage (module docstring) of a backend whose fused ``step`` takes given norms."""
    t.given_norms = norms
    step(t, cfg)


__all__ = ["apply_with_norms", "derived_config", "norm_parts", "norm_stage_config"]
