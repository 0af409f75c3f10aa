"""One norm over every param group: what ``clip_grad_norm_(model.parameters(), max_norm)`` clips with.

The param groups whose method has global scope (``norm``, the randomized norms, ``auto_clip`` and its
randomized forms, ``zclip``, any ``ClipMethod("global", ...)`` but the relative threshold) share one
norm, by default:

    ||g|| = sqrt(sum over the shared groups k, tensors i of ||g_ki||^2)

and one decision: the first shared group with gradients in the step (the *lead*) takes the threshold
eta from the one threshold state (AutoClip history, ZClip EMAs: one per optimizer, kept in the
``clip_state`` of the first shared param group, gradients or not), decides (with its own Philox key,
for the randomized methods) and scales by s = eta / ||g|| where clipped.  Every other shared group
(a *follower*) applies the same s: it is stepped as the constant threshold 1 with the given global norm
||g|| / eta where the lead clipped, 0 where it did not (so s = 1 / (||g|| / eta) = eta / ||g||, or 1),
NaN where the step is skipped.  Groups may differ in every update setting (lr, weight decay, momentum,
betas); layer, unit and coordinate scopes and ``no_clip`` take no part.  ``per_group_norm=True`` gives
each group its own norm and threshold state (torch-clip 0.0.6's behaviour).

One optimizer step: the norm stage of every shared and every sharded (DTensor) group (float64 sums of
squares on the device), ONE reduction (a single SUM all-reduce per process group for the sharded
groups, then the shared groups' sums added up), then every group's step with its given norms.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Sequence

import torch

from ..backends.stages import derived_config
from ..config import ClipPoint, GroupConfig, NonFinite
from ..distributed.dtensor import ShardedLayout, _counts_coordinates, norm_vector, norms_from_parts, reduce_vectors
from ..methods import ClipMethod, Randomization, Scope
from ..norm_type import combine, from_parts, reduce_op

#: the per-param-group non-finite counts a ``norm_group``'s collective carries (groups from this index on share
#: the last slot: a non-finite gradient in any of them skips all of them on every stage)
PIPELINE_GROUP_SLOTS = 16

#: a follower's given global norm is capped here: s = 1 / cap rounds to 0 in float32, as eta / ||g|| does
#: where the lead's eta is 0 (clipping_level=0), without an infinite norm (which the backends read as a
#: norm past float32's range)
FOLLOWER_NORM_CAP = 1e300


def shares_norm(cfg: GroupConfig) -> bool:
    """Whether a group's method takes part in the norm shared over the optimizer's groups: global scope,
    except with the relative threshold (AGC's eta = level * ||w|| takes the group's own weights)."""
    method = cfg.clip.method
    return method.scope is Scope.GLOBAL and not cfg.clip.policy.needs_weights


def _shared_settings(cfg: GroupConfig) -> Dict[str, object]:
    """The settings of a shared group that the shared norm and decision use, by param-group key."""
    clip, method = cfg.clip, cfg.clip.method
    settings = {"clipping_type": method.name, "clipping_level": clip.level, "clip_point": clip.clip_point.value,
                "nonfinite": cfg.nonfinite.value, "norm_type": clip.norm_type}
    if method.randomization is not Randomization.NONE:
        settings["beta"] = clip.beta
    settings.update((name, getattr(clip, name)) for name in clip.policy.shared_settings)
    return settings


def check_agreement(configs: Sequence[tuple]) -> None:
    """Raise ValueError naming both groups where two shared groups of ``configs`` ((index, GroupConfig),
    in group order) differ in a setting of the shared norm."""
    shared = [(i, cfg) for i, cfg in configs if shares_norm(cfg)]
    if len(shared) < 2:
        return
    first, reference = shared[0][0], _shared_settings(shared[0][1])
    for index, cfg in shared[1:]:
        settings = _shared_settings(cfg)
        for key in sorted(set(reference) | set(settings)):
            if reference.get(key) != settings.get(key):
                raise ValueError(
                    f"Invalid param group: param groups {first} and {index} both clip with the one norm over "
                    f"every param group (global scope, as clip_grad_norm_(model.parameters())) but differ in "
                    f"{key}: {reference.get(key)!r} and {settings.get(key)!r}; give them the same {key}, or pass "
                    "per_group_norm=True to clip each param group with its own norm (torch-clip 0.0.6's behaviour)")


def follower_config(cfg: GroupConfig) -> GroupConfig:
    """A follower's config: the constant threshold 1 without randomization (the lead decides)."""
    return derived_config(cfg, "follower", lambda: dataclasses.replace(
        cfg, clip=dataclasses.replace(cfg.clip, method=ClipMethod(Scope.GLOBAL), level=1.0)))


def _needs_norms(cfg: GroupConfig) -> bool:
    return cfg.needs_norms or cfg.clip.clip_point is ClipPoint.UPDATE


def step_norms(items: Sequence[tuple], shared: Sequence[int], norm_group=None, whole_model: bool = False,
               slots=None):
    """The given norms of the groups that need them: ``items`` are (GroupConfig, layout, GroupTensors,
    Backend) (sharded tensors already localized), ``shared`` the positions of
    the groups that share one norm.
    Returns {position: (norms or None: the backend's own norm pass, coordinate clips or None)}; a shared
    group's norms are float64 [T + 1] (per-tensor, then the shared global norm, NaN where a shared gradient
    is not finite and non-finite gradients skip).  ``norm_group`` (distributed/norm_group.py): the shared sum
    of squares and non-finite count are then summed over its ranks too (one more collective, made even
    where this rank has no shared group).  ``whole_model`` (a skip rule, skips/): the norm stage of every
    group, and the model's norm sqrt(sum over every group of the reduced sums of squares, and over the
    ``norm_group``'s ranks in the same collective), NaN where any of them is not finite.
    ``slots`` (with ``norm_group``: (each item's param group index, number of param groups), or None): the
    non-finite counts of the groups that do not share the norm are summed over its ranks by param group in
    that collective, so a non-finite gradient in group i of one stage skips group i on every stage.
    Returns (that dict, the model's norm: float64 [1], or None without ``whole_model``)."""
    shared = set(shared)
    vectors: Dict[int, torch.Tensor] = {}
    out: Dict[int, tuple] = {}
    for k, (cfg, layout, t, backend) in enumerate(items):
        sharded = isinstance(layout, ShardedLayout)
        skips_across_stages = slots is not None and cfg.nonfinite is not NonFinite.APPLY
        if k not in shared and not sharded and not whole_model and not skips_across_stages:
            continue
        if not _needs_norms(cfg) and not _counts_coordinates(cfg):
            out[k] = (torch.full((len(t.grads) + 1,), float("nan"), dtype=layout.norm_dtype, device=t.device), None)
            if not whole_model:
                continue
        vectors[k] = norm_vector(backend, t, cfg, layout, _needs_norms(cfg) or whole_model)  # the backend's norms stage
    on_meshes = [k for k in vectors if isinstance(items[k][1], ShardedLayout)]
    # one collective per distinct reduction domain (one for FSDP2 and HSDP), for every group together
    for k, reduced in zip(on_meshes, reduce_vectors([(vectors[k], items[k][1], items[k][0].clip.norm_type)
                                                     for k in on_meshes])):
        vectors[k] = reduced
    # the norm type of the shared norm and of the model's (the groups agree on it: check_agreement and
    # skips.check_skip_agreement); the parts combine by sum, or by max for inf (norm_type.py)
    p = _common_norm_type(items, shared)
    total_sq = bad = None
    if shared:
        parts = [(vectors[k], len(items[k][2].grads)) for k in sorted(shared)]  # (vector, T)
        total_sq = _combined(parts, p)
        bad = torch.stack([v[n] for v, n in parts]).sum().reshape(1)
    model = None
    if whole_model:  # every group's sums of squares and non-finite counts
        parts = [(vectors[k], len(items[k][2].grads)) for k in sorted(vectors)]
        model = torch.cat([_combined(parts, p), torch.stack([v[n] for v, n in parts]).sum().reshape(1)])
    if norm_group is not None:  # the pipeline's stages: one more sum (a max for inf), over their ranks
        # ONE collective of a fixed layout, whatever this stage's groups and settings, so that stages which differ
        # in them never wait on a collective of another size: [shared sum of parts, shared non-finite count,
        # the model's sum of parts and non-finite count (skip rules), PIPELINE_GROUP_SLOTS per-group counts]
        # (a MAX for norm_type inf: the counts are then flags)
        device = norm_group.device(items[0][2].device if items else None)
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        if total_sq is None:
            total_sq = bad = zeros(1)
        per_group = zeros(PIPELINE_GROUP_SLOTS)
        if slots is not None:  # the non-finite counts of the groups that do not share the norm, by param group
            for k in vectors:
                if k not in shared:
                    slot = min(slots[0][k], PIPELINE_GROUP_SLOTS - 1)
                    per_group[slot] = per_group[slot] + vectors[k][len(items[k][2].grads)]
        total_sq, bad, summed, per_group = norm_group.all_reduce(total_sq, bad, zeros(2) if model is None else model,
                                                                 per_group, op=reduce_op(p))
        model = summed if whole_model else None
    model_norm = None
    if model is not None:
        model_norm = torch.where(model[1:] > 0, torch.full_like(model[:1], float("nan")), from_parts(model[:1], p))
    for k, vector in vectors.items():
        cfg, layout, t, _ = items[k]
        if k in out:  # a group that needs no norm (whole_model: its vector counted in the model's norm only)
            continue
        mark = cfg.nonfinite is not NonFinite.APPLY
        if k in shared:
            out[k] = norms_from_parts(vector, len(t.grads), torch.float64, mark, total_sq, bad, cfg.clip.norm_type)
        else:
            stages_bad = None if slots is None else per_group[min(slots[0][k], PIPELINE_GROUP_SLOTS - 1)].reshape(1)
            norms, clips = norms_from_parts(vector, len(t.grads), layout.norm_dtype, mark, bad=stages_bad,
                                            norm_type=cfg.clip.norm_type)
            if not _needs_norms(cfg):
                norms = torch.full_like(norms, float("nan"))
            out[k] = (norms, clips)
    return out, model_norm


def _common_norm_type(items: Sequence[tuple], shared) -> float:
    """The norm type of the shared norm (its groups agree) or, without shared groups, of the first group (the
    skip rules' model norm: every group agrees); 2.0 without any group."""
    for k in sorted(shared) or range(len(items)):
        return items[k][0].clip.norm_type
    return 2.0


def _combined(parts, p: float) -> torch.Tensor:
    """float64 [1]: the combined part of the groups' vectors ``parts`` ((vector, T) pairs): the sum of their
    per-tensor parts, or their max for p = inf."""
    if p == 2.0:
        return torch.stack([v[:n].sum() for v, n in parts]).sum().reshape(1)
    return combine(torch.cat([v[:n] for v, n in parts]), p).reshape(1)


def follower_norms(lead_norms: torch.Tensor, lead_stats: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """A follower's given norms (float64 [T + 1]): the global norm ||g|| / eta where the lead clipped
    (capped at FOLLOWER_NORM_CAP), 0 where it did not, NaN where the shared norm is NaN (the step is
    skipped); per tensor that same norm, then zeros.  At global scope the per-tensor norms serve only
    where the global norm is past float32's range: their float64 sum of squares must then give the same
    norm back (every backend takes the scale from it there), and does (+inf past about 1e154, where
    s < 1e-154 is 0 in float32 either way)."""
    total = lead_norms[-1:]
    eta = lead_stats[1:2].to(torch.float64)
    clipped = lead_stats[2:3] > 0
    scaled = torch.where(clipped, torch.clamp(total / eta, max=FOLLOWER_NORM_CAP), torch.zeros_like(total))
    given = torch.where(torch.isnan(total), total, scaled)
    return torch.cat([given, torch.zeros(norms.numel() - 2, dtype=given.dtype, device=given.device), given])


__all__ = ["FOLLOWER_NORM_CAP", "check_agreement", "follower_config", "follower_norms", "shares_norm", "step_norms"]
