"""The C++ backend's step functions: the fused CPU step and the functional API's stages, calling
the extension that build.py builds (and that every backend's cached layout uses for its per-step
gradient-pointer refresh).

The kernel's ``norms`` argument (norms returned by the functional API's norm stage, or given: the
functional API's second half, a sharded group's norms reduced across ranks) is float32 or float64,
read or written as given: a float64 group's norms are float64 (docs/spec.md section 1), and float64
norms given to a float32 group stay finite past float32's range.  Every stage, float64 groups
included, runs in the kernel (the Triton backend hands float64 groups to the reference).

The kernel sees the threshold policy only through its code, its ``kernel_params`` (``ClipOptions.params``)
and its state (thresholds/policy.py's ThresholdState, as ``threshold_state`` / ``threshold_count`` /
``threshold_sorted``); the update rule's first moments (SGD's momentum buffers, AdamW's exp_avg) come as
``first_moments``.  ``tensor_stats`` (GroupTensors.tensor_stats, torch_clip_fused/tensor_stats.py) is written by
the kernel between its passes and after pass 2 (per tensor: its norm, and its scale or fraction clipped).
"""

from __future__ import annotations

import torch

from ...config import AdamWUpdate, ClipPoint, GroupConfig, GroupTensors, NonFinite
from ...norm_type import POWER
from .build import load_extension, loaded_extension  # noqa: F401  (re-exported)


def _options(ext, cfg: GroupConfig, stage: str = "step"):
    """The C++ ClipOptions / UpdateOptions of a config for a stage ("step"; "given": the step with
    norms reduced across ranks; or the functional API's "norms", "clip", "both"), built once per
    config and stage.  ClipOptions.params holds the threshold policy's kernel_params."""
    cached = _option_cache.get((id(cfg), stage))
    if cached is not None and cached[0] is cfg:
        return cached[1], cached[2]
    clip, update = cfg.clip, cfg.update
    clip_options = ext.ClipOptions(
        scope=clip.scope_code, threshold=clip.threshold_code, randomization=clip.randomization_code, level=clip.level,
        beta=clip.beta, clip_update=clip.clip_point is ClipPoint.UPDATE,
        check_finite=cfg.nonfinite is not NonFinite.APPLY,
        norms_needed=cfg.needs_norms or clip.clip_point is ClipPoint.UPDATE or stage in ("norms", "both"),
        norms_given=stage in ("clip", "given"), apply=stage != "norms", params=list(clip.kernel_params),
        norm_kind=clip.norm_kind, norm_p=clip.norm_type if clip.norm_kind == POWER else 2.0)
    lr = float(update.lr) if not isinstance(update.lr, torch.Tensor) else 0.0
    if isinstance(update, AdamWUpdate):
        update_options = ext.UpdateOptions(rule=update.code, lr=lr, weight_decay=update.weight_decay,
                                           maximize=update.maximize, beta1=update.beta1, beta2=update.beta2,
                                           eps=update.eps, amsgrad=update.amsgrad)
    else:
        update_options = ext.UpdateOptions(rule=update.code, lr=lr, momentum=update.momentum,
                                           dampening=update.dampening, weight_decay=update.weight_decay,
                                           nesterov=update.nesterov, maximize=update.maximize,
                                           stochastic_rounding=update.stochastic_rounding)
    if len(_option_cache) > 64:
        _option_cache.clear()
    _option_cache[(id(cfg), stage)] = (cfg, clip_options, update_options)
    return clip_options, update_options


_option_cache = {}


def _raise_if(error: str) -> None:
    """The extension returns its error message instead of throwing through pybind11 (a C++
    exception leaving the module killed the process on torch 2.11)."""
    if error:
        raise RuntimeError(error)


def _threshold_state(t: GroupTensors) -> dict:
    """The threshold policy's state (None for a stateless policy) as the kernel's threshold_state (values),
    threshold_count (counts) and threshold_sorted (sorted values, AutoClip's only) arguments."""
    ts = t.threshold_state
    if ts is None:
        return dict(threshold_state=None, threshold_count=None, threshold_sorted=None)
    return dict(threshold_state=ts.values, threshold_count=ts.counts, threshold_sorted=ts.sorted_values)


def _extra_state(t: GroupTensors) -> dict:
    """AdamW's second moments, amsgrad's maxima and step counts (``first_moments`` hold exp_avg),
    and the unit offsets (unit scope's Philox index base), where the group has them."""
    return dict(exp_avg_sqs=t.exp_avg_sqs or [], max_exp_avg_sqs=t.max_exp_avg_sqs or [], adam_steps=t.adam_steps,
                unit_offsets=t.unit_offsets or [], **_index_rows(t))


def _index_rows(t: GroupTensors) -> dict:
    """The Philox index rows of shards that are not one row-major range (GroupTensors.index_rows)."""
    if t.index_rows is None:
        return {}
    return dict(index_inner=[inner for inner, _ in t.index_rows], index_extra=[extra for _, extra in t.index_rows])


def _given_sums(t: GroupTensors) -> dict:
    """The units' and weights' sums of squares reduced across ranks (GroupTensors.given_sums), where given."""
    if t.given_sums is None:
        return {}
    return dict(given_sums=t.given_sums.to(device="cpu", dtype=torch.float64).contiguous())


def _norms_arg(norms: torch.Tensor) -> torch.Tensor:
    """Given norms as the kernel takes them: float64 kept (exact for float64 groups, finite past float32's
    range), any other dtype as float32."""
    return (norms if norms.dtype == torch.float64 else norms.to(torch.float32)).contiguous()


def cpp_step(t: GroupTensors, cfg: GroupConfig) -> None:
    """One step of one param group with the fused C++ kernel."""
    given = t.given_norms  # per-tensor and global norms reduced across ranks (a sharded group)
    ext = load_extension()
    clip_options, update_options = _options(ext, cfg, "step" if given is None else "given")
    if isinstance(cfg.update.lr, torch.Tensor):
        update_options.lr = float(cfg.update.lr)  # a CPU tensor lr costs nothing to read
    _raise_if(ext.clipped_sgd_step(
        params=t.params, grads=t.grads, first_moments=t.first_moments or [], columns=t.columns, offsets=t.offsets,
        seed=t.seed, step=t.step, ready=t.momentum_ready, stats=t.stats, skipped=t.skipped,
        grad_scale=None if t.grad_scale is None else t.grad_scale.float().cpu(),
        found_inf=None if t.found_inf is None else t.found_inf.float().cpu(),
        norms=None if given is None else _norms_arg(given), clip=clip_options,
        update=update_options, **_threshold_state(t), **_extra_state(t), **_given_sums(t),
        tensor_stats=t.tensor_stats,
    ))


def cpp_clip(t: GroupTensors, cfg: GroupConfig, norms: torch.Tensor, stage: str) -> None:
    """The functional API's stages with the fused C++ kernel (``cfg.update`` is the clip-only rule):
    "norms" writes the per-tensor norms then the global norm into ``norms`` ([T + 1]); "clip" clips the
    gradients in place with the norms given in ``norms``; "both" does both.  ``norms`` may be float32 or
    float64 (a float64 list's, or norms past float32's range), written or read as given."""
    ext = load_extension()
    clip_options, update_options = _options(ext, cfg, stage)
    _raise_if(ext.clipped_sgd_step(
        params=t.params, grads=t.grads, first_moments=[], columns=t.columns, offsets=t.offsets, seed=t.seed,
        step=t.step, ready=t.momentum_ready, stats=t.stats, skipped=t.skipped, grad_scale=None, found_inf=None,
        norms=norms, clip=clip_options, update=update_options, **_threshold_state(t), unit_offsets=t.unit_offsets or [],
        **_index_rows(t), **(_given_sums(t) if stage == "clip" else {}),
    ))
