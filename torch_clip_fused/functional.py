"""Clipping for users of any optimizer: the same stages as the clipped optimizers, on every backend.

torch splits gradient clipping in two halves, ``get_total_norm`` and ``clip_grads_with_norm_``, so
that the norms can be combined (across ranks, pipeline stages...) before clipping.  So do we:

* :func:`get_grad_norms` runs the ``norms`` stage: (||g||, [||g_i||]) as device tensors;
* :func:`clip_grads_with_norms_` runs ``scales`` and ``apply`` with given norms:
  g_i <- s_i g_i in place, with the method's thresholds, AutoClip history and random draws;
* :func:`clip_gradients_` runs the three in one go (two passes over the gradients on the fused
  backends, as ``clip_grad_norm_``).

Example (AdamW with global AutoClip)::

    clip_state = {}
    for batch in loader:
        loss(model(batch)).backward()
        clip_gradients_(model.parameters(), "auto_clip", state=clip_state)
        adamw.step(); adamw.zero_grad()

``state`` keeps the step count, seed and AutoClip history between calls (randomness as explicit
state): pass the same dict every step.  It holds tensors, ints and bools only, so
``torch.save(state)`` is a small checkpoint that ``torch.load(weights_only=True)`` reads back, and a
run resumed from it is bit-identical; the cached layout of the tensors is kept beside the dict
(functional_state.py).  Nothing here reads a value back to the host (except the first call with a
loaded state, which checks it once).  Non-finite gradients are clipped as they are (as
``clip_grad_norm_`` with ``error_if_nonfinite=False``): check the returned norm if you need to skip.

Arithmetic (docs/spec.md section 1): when every gradient is float64, the norms (returned and given),
thresholds and scales are float64, as torch's ``get_total_norm`` returns for float64 gradients;
otherwise float32 (given norms are cast to that dtype, except float64 norms, which every backend takes
as they are: past float32's range they stay finite).  The Triton backend hands float64 lists to the
reference's stages.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple, Union

import torch

from .backends import select_backend, validate_backend
from .backends.capabilities import reference_backend
from .backends.stages import norm_stage_config
from .backends.group_layout import CHANGED, GroupLayout
from .config import ClipConfig, ClipOnly, GroupConfig, GroupTensors, NonFinite
from .methods import ClipMethod, Scope
from .norm_type import from_parts, reduce_op, to_parts
from .distributed import draw_seed
from .distributed.norm_group import resolve_norm_group
from .distributed.dtensor import (ShardedLayout, check_element_indices, clipped_fraction, is_dtensor, is_sharded_group,
                                  localize, reduce_norms)
from .functional_state import adopt, cache_layout, cached_layout
from .state import init_group_state, threshold_state_for_step
from .skips import SKIP_SETTINGS, SkipConfig, count_spike, decide_and_record
from .thresholds import SETTINGS

Norms = Tuple[torch.Tensor, torch.Tensor]


def _parameters(parameters) -> list:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def _layout(params: list, state: dict, seed: Optional[int]) -> Optional[GroupLayout]:
    """The cached layout of the parameters' gradients (refreshed, or gathered anew), None without any.
    A state dict seen for the first time is checked (loaded or copied) or initialised (new) here."""
    layout = cached_layout(state)
    status = layout.refresh(params) if layout is not None else 0
    if status >= 0:
        for i, p in enumerate(params):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"clip_gradients_ does not support sparse gradients (parameter {i})")
        # DTensor parameters (FSDP2 / HSDP): the local shards, norms reduced across ranks (distributed/dtensor.py)
        layout = ShardedLayout.gather(params) if is_sharded_group(params) else GroupLayout.gather(params)
        devices = {p.grad.device for p in layout.params}
        if len(devices) > 1:
            raise ValueError(f"clip_gradients_ needs all gradients on one device, got {sorted(map(str, devices))}")
        if not layout.params:
            return None
        if cached_layout(state) is None:
            adopt(state, len(params), layout.device)
        if "clip_step" not in state:
            if seed is None:
                seed = draw_seed()  # rank 0's draw on every rank of an initialised process group
            init_group_state(state, [], {}, seed, layout.device)
        cache_layout(state, layout)
        status = CHANGED
    layout.grad_ptrs_changed = status == CHANGED
    return layout


def _run(params: list, cfg: GroupConfig, state: dict, seed: Optional[int], backend: str, stage: str,
         norms: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    validate_backend(backend)
    if state.setdefault("clip_n_params", len(params)) != len(params):
        raise ValueError(f"clip_gradients_: this state was used with {state['clip_n_params']} parameters, now "
                         f"{len(params)}; use one state dict per parameter list")
    layout = _layout(params, state, seed)
    if layout is None:
        return None
    device = layout.device
    threshold_state = (threshold_state_for_step(state, cfg, len(params), device, layout.norm_dtype)
                       if stage != "norms" else None)
    t = GroupTensors(
        params=layout.params, grads=None, grad_owners=layout.params, first_moments=None, columns=layout.columns,
        offsets=layout.offsets, seed=state["clip_seed"], step=state["clip_step"],
        threshold_state=threshold_state, momentum_ready=state["clip_momentum_ready"], stats=state["clip_stats"],
        skipped=state["clip_skipped"], grad_ptrs=layout.grad_ptrs, grad_ptrs_changed=layout.grad_ptrs_changed,
        backend_cache=layout.backend_cache, unit_offsets=layout.unit_offsets,
    )
    clips = None
    chosen = select_backend(backend, device)
    if isinstance(layout, ShardedLayout):
        check_element_indices(layout, cfg)
        localize(t, layout)
        if stage != "clip":  # the local norm stage and one all-reduce; then "clip" with the reduced norms
            norms, clips = reduce_norms(t, cfg, layout, mark_nonfinite=False, backend=chosen)
            if stage == "norms":
                return norms
            stage = "clip"
    if norms is None:
        norms = torch.empty(len(layout.params) + 1, dtype=layout.norm_dtype, device=device)
    elif norms.shape != (len(layout.params) + 1,):
        raise ValueError(f"clip_grads_with_norms_: got norms for {norms.numel() - 1} tensors, but "
                         f"{len(layout.params)} parameters have gradients")
    else:
        # given norms are taken in the gradients' arithmetic, or in float64 when given so (every backend
        # takes float64 norms: past float32's range they stay finite)
        norms = norms if norms.dtype == torch.float64 else norms.to(layout.norm_dtype)
    (chosen.clip or reference_backend().clip)(t, cfg, norms, stage)  # the backend's stages
    if isinstance(layout, ShardedLayout):  # the group's clipped fraction (coordinate, unit scope)
        clipped_fraction(t.stats, clips, layout)
    if stage != "norms":
        state["clip_steps"] += 1
    return norms


#: the threshold policies' settings beyond the original's (thresholds/), keyword-only in the functions below
#: (ClippedSGD's names and defaults: ZClip's zclip_*, AdaGC's adagc_*, AGC's agc_eps)
METHOD_SETTINGS = {name: s.default for name, s in SETTINGS.items() if name not in ("p_autoclip", "autoclip_history")}


def _config(clipping_type, clipping_level, beta, p_autoclip, autoclip_history, settings=None,
            norm_type=2.0) -> GroupConfig:
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(METHOD_SETTINGS))
    if unknown:
        raise TypeError(f"Invalid keyword argument {unknown[0]!r}; the method settings are {', '.join(METHOD_SETTINGS)}")
    clip = ClipConfig.from_group(dict(clipping_type=clipping_type, clipping_level=clipping_level, beta=beta,
                                      p_autoclip=p_autoclip, autoclip_history=autoclip_history, clip_point="grad",
                                      norm_type=norm_type, **{**METHOD_SETTINGS, **settings}))
    return GroupConfig(clip=clip, update=ClipOnly(), nonfinite=NonFinite.APPLY)


def _split(norms: Optional[torch.Tensor], device=None) -> Norms:
    if norms is None:
        return torch.zeros((), device=device), torch.zeros(0, device=device)
    return norms[-1], norms[:-1]


def _over_pipeline(params: list, cfg: GroupConfig, state: dict, seed: Optional[int], backend: str, stage: str,
                   group, where: str) -> Optional[torch.Tensor]:
    """``_run`` of stage "norms" or "both" with the global norm summed over the ranks of ``group`` (a
    ``norm_group``, distributed/norm_group.py): this rank's norms stage, one all-reduce of the squared
    global norm (zero where this rank has no gradient: every rank takes part; ``norm_type`` p: of its p-th
    power, or a MAX all-reduce of the inf-norm), then the "clip" stage with the pipeline's global norm.
    Returns the norms [T + 1] with that global norm."""
    group = resolve_norm_group(group, where)
    if group is None:
        return _run(params, cfg, state, seed, backend, stage)
    norms = _run(params, cfg, state, seed, backend, "norms")
    local_sq = torch.zeros(1, dtype=torch.float64, device=group.device(None if norms is None else norms.device))
    p = cfg.clip.norm_type
    if norms is not None:
        local_sq = to_parts(norms[-1:].to(torch.float64), p)
    total_sq, _ = group.all_reduce(local_sq, torch.zeros_like(local_sq), op=reduce_op(p))
    if norms is None:
        return None
    given = torch.cat([norms[:-1].to(torch.float64), from_parts(total_sq, p)])
    if stage == "both":
        _run(params, cfg, state, seed, backend, "clip", given)
    return given.to(norms.dtype)


@torch.no_grad()
def get_grad_norms(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], backend: str = "auto",
                   state: Optional[dict] = None, norm_group=None, norm_type: float = 2.0) -> Norms:
    """The ``norms`` stage: (global norm sqrt(sum_i ||g_i||^2), per-tensor norms ||g_i||) of the
    gradients of ``parameters`` (those without a gradient are left out), device tensors: float64
    when every gradient is float64, else float32.  ``norm_type`` p as ``clip_grad_norm_``'s (2, inf or any
    p >= 1): ((sum_i ||g_i||_p^p)^(1/p), [||g_i||_p]), inf: (max |g|, [max |g_i|]).

    Combine them as you need (e.g. ``torch.distributed.all_reduce`` of their squares) and pass them
    to :func:`clip_grads_with_norms_`.  ``state`` (optional) caches the tensors' layout.  ``norm_group``
    as :func:`clip_gradients_`: the global norm is then the pipeline's."""
    params = _parameters(parameters)
    cfg = _config("no_clip", None, 0.85, 0.75, None, norm_type=norm_type)
    return _split(_over_pipeline(params, cfg, {} if state is None else state, None, backend, "norms", norm_group,
                                 "get_grad_norms"))


@torch.no_grad()
def clip_grads_with_norms_(
    parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
    norms: Norms,
    clipping_type: Union[str, ClipMethod] = "norm",
    clipping_level: Optional[float] = None,
    beta: float = 0.85,
    p_autoclip: float = 0.75,
    autoclip_history: Optional[int] = None,
    seed: Optional[int] = None,
    state: Optional[dict] = None,
    backend: str = "auto",
    norm_type: float = 2.0,
    **settings,
) -> None:
    """The ``scales`` and ``apply`` stages with given ``norms`` = (global norm, per-tensor norms),
    as returned by :func:`get_grad_norms`: the gradients are clipped in place with the method
    (docs/spec.md section 1); the norms are taken in the gradients' arithmetic (float64 when every
    gradient is float64, else float32), float64 norms as they are.  ``state``, ``seed``, ``backend``
    and the method settings as :func:`clip_gradients_`; ``norm_type`` that of the norms given (as
    :func:`get_grad_norms`'s, which the thresholds consume); unit scope and the relative threshold (AGC)
    need norms of units and weights, which these norms are not: use :func:`clip_gradients_` for them."""
    params = _parameters(parameters)
    cfg = _config(clipping_type, clipping_level, beta, p_autoclip, autoclip_history, settings, norm_type)
    if cfg.clip.method.scope is Scope.UNIT or cfg.clip.policy.needs_weights:
        raise ValueError(f"clip_grads_with_norms_: clipping method {cfg.clip.method.name!r} needs the norms of output "
                         "units or of the weights, not the per-tensor gradient norms given; use clip_gradients_")
    total, per_tensor = norms
    given = torch.cat([per_tensor.reshape(-1), total.reshape(1)])
    _run(params, cfg, {} if state is None else state, seed, backend, "clip", given)


@torch.no_grad()
def clip_gradients_(
    parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
    clipping_type: Union[str, ClipMethod] = "norm",
    clipping_level: Optional[float] = None,
    beta: float = 0.85,
    p_autoclip: float = 0.75,
    autoclip_history: Optional[int] = None,
    seed: Optional[int] = None,
    state: Optional[dict] = None,
    backend: str = "auto",
    norm_group=None,
    norm_type: float = 2.0,
    **settings,
) -> Norms:
    """Clip the gradients of ``parameters`` in place with any method; return (global norm,
    per-tensor norms) before clipping, as device tensors (float64 when every gradient is float64,
    else float32).  Parameters without a gradient are left out of the norms.

    ``seed`` (used when ``state`` is new) defaults to a draw from torch's default generator;
    ``backend`` is chosen as for the optimizers (``"auto"``: C++ on CPU, Triton on CUDA).  The
    settings of the thresholds beyond the original's are keyword arguments with ClippedSGD's names
    and defaults: ``zclip_alpha``, ``zclip_z``, ``zclip_warmup``, ``zclip_mode``, ``zclip_clip_option``,
    ``zclip_clip_factor``, ``zclip_skip_update_on_spike`` (``"zclip"``), ``adagc_lambda``,
    ``adagc_beta``, ``adagc_warmup`` (``"adagc"``) and ``agc_eps`` (``"agc"``, e.g.
    ``clip_gradients_(model.parameters(), "agc", clipping_level=0.01)`` is timm's
    ``adaptive_clip_grad``).

    ``norm_type`` p (global and layer scope): the p-norms of ``clip_grad_norm_(norm_type=p)``, 2 (default),
    ``float('inf')`` / ``"inf"`` (max |g|) or any p >= 1, returned and clipped with (the thresholds, AutoClip's
    history and ZClip's EMAs, take them); ``clip_gradients_(params, "norm", L, norm_type=p)`` equals
    ``clip_grad_norm_(params, L, norm_type=p)`` up to its eps.

    ``norm_group`` (pipeline parallelism: ``parameters`` are this rank's stage's): a ProcessGroup or 1-D
    DeviceMesh over whose ranks the global norm is summed (one all-reduce; every rank must call), so
    every stage clips with the whole model's norm and keeps the same threshold state; the per-tensor
    norms stay the stage's own.  The norms and the clip are then two passes over the gradients.

    Skip rules (skips/: ``skip_if_norm_above``, ``skip_if_zscore_above`` with ``skip_zscore_alpha`` and
    ``skip_zscore_warmup``, keyword arguments as the optimizers'): a call whose global norm is a spike clips
    nothing, records nothing in the threshold's state and multiplies every gradient by 0 (zero gradients:
    ``optimizer.step()`` then moves only by momentum and weight decay); ``state["clip_spike"]`` (float32 [],
    on the device) is 1.0 after such a call, ``state["clip_spike_skipped"]`` counts them.  A z-score rule
    needs ``state``."""
    params = _parameters(parameters)
    skip = SkipConfig.from_group({k: settings.pop(k) for k in list(settings) if k in SKIP_SETTINGS})
    cfg = _config(clipping_type, clipping_level, beta, p_autoclip, autoclip_history, settings, norm_type)
    if skip.rules:
        return _split(_clip_or_skip(params, cfg, skip, state, seed, backend, norm_group))
    return _split(_over_pipeline(params, cfg, {} if state is None else state, seed, backend, "both", norm_group,
                                 "clip_gradients_"))


def _clip_or_skip(params: list, cfg: GroupConfig, skip: SkipConfig, state: Optional[dict], seed, backend,
                  norm_group) -> Optional[torch.Tensor]:
    """clip_gradients_ with a skip rule (skips/): the norms stage (over the ``norm_group`` too), the rules'
    decision on the device, then the clip stage with the norms, or, on a spike, with NaN norms (every backend
    then scales by 1 and records nothing in the threshold's state) and the gradients multiplied by 0: a
    skipped call leaves zero gradients, its threshold state as it was, ``state["clip_spike"]`` = 1.0 and
    ``state["clip_spike_skipped"]`` + 1.  The returned norms are the gradients' before the call.  The
    multiplication (by 1 when the call is taken) is a third pass over the gradients: deciding on the device
    leaves no host branch to skip it."""
    if state is None and any(rule.state is not None for rule in skip.rules):
        raise ValueError("clip_gradients_: skip_if_zscore_above keeps EMAs of the norm between calls: pass the same "
                         "state dict every call (state={})")
    state = {} if state is None else state
    norms = _over_pipeline(params, norm_stage_config(cfg), state, seed, backend, "norms", norm_group,
                           "clip_gradients_")
    if norms is None:
        return None
    spike = decide_and_record(skip, norms[-1], state)
    nan = torch.full_like(norms, float("nan"))
    _run(params, cfg, state, seed, backend, "clip", torch.where(spike, nan, norms))
    keep = (~spike).to(norms.dtype)
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if is_dtensor(g) else g for g in grads]  # a DTensor's shard, in place
    for dtype in {g.dtype for g in local}:  # one foreach call per dtype (a spike's gradients are finite)
        torch._foreach_mul_([g for g in local if g.dtype == dtype], keep.to(dtype))
    stats = state["clip_stats"]
    stats[:1].copy_(norms[-1:].to(stats.dtype))
    stats[3:4].copy_(spike.reshape(1).to(stats.dtype))
    count_spike(state, spike, counted_as_skip=False)
    return norms


__all__ = ["clip_gradients_", "clip_grads_with_norms_", "get_grad_norms"]
