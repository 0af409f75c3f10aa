"""Unit scope and the relative threshold (AGC) on DTensor parameters: the norms of output units and of the
weights, summed over the ranks that split them (docs/spec.md section 2; issue 20).

A unit of a parameter of global shape (R, ...) is its row x[r] (a tensor of one dimension or none is one
unit: timm's ``unitwise_norm``).  Placements of dim 0 (``Shard(0)``, FSDP2's strided shards over tensor
parallelism) give a rank some rows; placements of other dims (``Shard(1)``: row-parallel layers) cut every
row into pieces.  Either way local row l of a shard is a part of one global row ``rows[l]`` (:func:`unit_rows`),
so with tensor i's U_i units at ``[base_i, base_i + U_i)`` of a vector of all the group's units,

    S_g[base_i + r] = sum over ranks, local rows l with rows_i[l] = r, of ||g_i,local[l]||^2
                      (each replicated copy counted once: ``ShardedLayout.counted``)
    ||g_u|| = sqrt(S_g[u]),   ||w_u|| = sqrt(S_w[u])   (S_w: the same sums of the parameters)

are the unit norms of the unsharded tensors.  The step appends the local terms of S_g (and S_w with the
relative threshold) to its norm vector (:func:`unit_tail`), so that the one SUM all-reduce of the step
(``dtensor.reduce_vectors``) sums them too, and gives each backend the sums of its local units,
``GroupTensors.given_sums`` = [S_g[base_i + rows_i[l]] for each local unit] then the same of S_w, laid end
to end in the step's tensor order (the units' order in every backend).  The backends take the thresholds
eta_u = clipping_level * max(||w_u||, agc_eps) (AGC) or clipping_level, and the scales
s_u = min(1, eta_u / ||g_u||), from them instead of their own unit-norm pass; every rank holding a piece of
unit u computes the same s_u.  At global or layer scope the relative threshold takes the weights'
per-tensor sums of squares instead, [T] (their sum for global scope).

The Philox index of unit u (randomized unit scope) is its place among the group's unsharded units,
``unit_offsets[i] + l`` for local row l: offered where each shard's rows are one range of its parameter's
(every placement but a strided shard of dim 0).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

#: the tail's kinds: none, the units' sums (unit scope: S_g, then S_w with the relative threshold), the
#: weights' per-tensor sums (the relative threshold at global or layer scope)
NO_TAIL, UNIT_TAIL, WEIGHT_TAIL = 0, 1, 2


def tail_kind(cfg) -> int:
    """What a sharded group's norm vector carries beyond the per-tensor sums for ``cfg``'s method."""
    from ..methods import Scope

    method = cfg.clip.method
    if method.scope is Scope.UNIT:
        return UNIT_TAIL
    if method.clips and cfg.clip.policy.needs_weights:
        return WEIGHT_TAIL
    return NO_TAIL


def _row_placements(p):
    """``p``'s placements with every placement of a dim other than 0 replaced by Replicate(): those that pick
    its rows."""
    from torch.distributed.tensor import Replicate

    return [q if getattr(q, "dim", None) == 0 else Replicate() for q in p.placements]


def unit_rows(p, local_shape) -> torch.Tensor:
    """int64 [units of the local shard] (CPU): the global unit of each local unit of DTensor ``p``: the global
    row of each local row (a tensor of two or more dims), or [0] (one unit).  Computed from the placements of
    dim 0 alone, on a vector of the row indices split as ``p``'s rows are: replicated on every rank, then
    redistributed to those placements (each rank keeps its part of its own copy: no communication; strided
    shards too, which ``distribute_tensor`` does not take after another shard of dim 0)."""
    from torch.distributed.tensor import DTensor, Replicate

    if len(local_shape) < 2:
        return torch.zeros(1, dtype=torch.int64)
    mesh = p.device_mesh
    index = torch.arange(p.shape[0], dtype=torch.int64, device=mesh.device_type)
    replicated = DTensor.from_local(index, mesh, [Replicate()] * mesh.ndim, run_check=False)
    rows = replicated.redistribute(mesh, _row_placements(p)).to_local().cpu()
    if rows.numel() != local_shape[0]:
        raise RuntimeError(f"torch_clip_fused: the local shard of a parameter of shape {tuple(p.shape)} (placements "
                           f"{tuple(p.placements)}) has {local_shape[0]} rows, its placements of dim 0 give "
                           f"{rows.numel()}: the shard does not hold whole pieces of rows")
    return rows


@torch.no_grad()
def unit_map(params, local_params, columns, unit_starts, device):
    """(index, total, unit_offsets, draws) of a sharded group's step: ``index`` int64 [local units] on
    ``device``, each local unit's place in the vector of the group's unsharded units (the step's tensors' units
    laid end to end); ``total`` the length of that vector; ``unit_offsets`` per step tensor the Philox index base
    of its local units among all the group's units (every parameter counted, as GroupLayout's), or None where
    some shard's rows are not one range (a strided shard); ``draws`` int64 [total] on ``device``, the Philox
    index of each unsharded unit.  ``unit_starts``: per parameter of the group, the place
    of its first unit among all the group's units."""
    from ..backends.reference.units import units_of
    from .dtensor import is_dtensor

    starts = unit_starts
    pieces: List[torch.Tensor] = []
    draws: List[torch.Tensor] = []
    offsets: Optional[List[int]] = []
    base = 0
    for column, p, lp in zip(columns, params, local_params):
        rows = unit_rows(p, tuple(lp.shape)) if is_dtensor(p) else torch.arange(units_of(tuple(lp.shape)))
        pieces.append(rows + base)
        draws.append(torch.arange(units_of(tuple(p.shape)), dtype=torch.int64) + starts[column])
        base += units_of(tuple(p.shape))
        if offsets is not None:
            contiguous = rows.numel() == 0 or torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + rows.numel()))
            offsets = offsets + [starts[column] + (int(rows[0]) if rows.numel() else 0)] if contiguous else None
    def joined(parts):
        return torch.cat(parts).to(device) if parts else torch.zeros(0, dtype=torch.int64, device=device)

    return joined(pieces), base, offsets, joined(draws)


def ensure_unit_map(layout) -> None:
    """Set ``layout.unit_index``, ``unit_total`` and ``unit_offsets`` (:func:`unit_map`) once per layout."""
    if layout.unit_index is None:
        layout.unit_index, layout.unit_total, layout.unit_offsets, layout.unit_draws = unit_map(
            layout.params, layout.local_params, layout.columns, layout.unit_starts, layout.device)


def _row_sums(tensors) -> torch.Tensor:
    """float64 [units]: each unit's sum of squares of each tensor, laid end to end (float64 squares)."""
    sums = []
    for x in tensors:
        if x.dim() >= 2:
            sums.append(x.flatten(1).to(torch.float64).square().sum(dim=1))
        else:
            sums.append(x.to(torch.float64).square().sum().reshape(1))
    return torch.cat(sums)


def _counted_units(layout, units: torch.Tensor) -> torch.Tensor:
    """``units`` (float64 per local unit) zeroed on the copies not counted (replicated shards).  Which units
    are kept is worked out once per layout (no host-to-device copy in a step)."""
    if layout.unit_kept is None or layout.unit_kept.numel() != units.numel():
        counts = torch.tensor([int(x.shape[0]) if x.dim() >= 2 else 1 for x in layout.local_params],
                              dtype=torch.int64, device=units.device)
        layout.unit_kept = torch.repeat_interleave(layout.counted, counts, output_size=units.numel())
    return torch.where(layout.unit_kept, units, torch.zeros_like(units))


def unit_tail(t, cfg, layout, sources) -> Optional[torch.Tensor]:
    """The local terms this rank adds to the step's norm vector (module docstring), float64: [S_g (U), S_w (U,
    relative threshold)] over the group's unsharded units at unit scope (the local units' sums of squares of
    ``sources``, the local clipping sources, added at their units' places), the weights' per-tensor sums [T]
    with the relative threshold at global or layer scope, None for other methods.  Records on ``layout`` what
    :func:`take_tail` needs after the reduction."""
    kind = tail_kind(cfg)
    if kind == NO_TAIL or not getattr(layout, "sharded", False):
        return None
    relative = cfg.clip.policy.needs_weights
    if kind == WEIGHT_TAIL:
        sq = torch.stack(torch._foreach_norm(list(t.params), 2, dtype=torch.float64)).square()
        tail = torch.where(layout.counted, sq, torch.zeros_like(sq))
    else:
        ensure_unit_map(layout)
        parts = []
        for tensors in ([sources, t.params] if relative else [sources]):
            local = _counted_units(layout, _row_sums(tensors))
            parts.append(torch.zeros(layout.unit_total, dtype=torch.float64, device=local.device).index_add_(
                0, layout.unit_index, local))
        tail = torch.cat(parts)
    layout.pending_tail = (kind, relative, tail.numel(), t, cfg)
    return tail


def take_tail(vector: torch.Tensor, layout) -> torch.Tensor:
    """A reduced norm vector without the tail :func:`unit_tail` appended (returned), the tail's sums of the
    step's local units set as the step's ``given_sums`` (module docstring)."""
    pending = getattr(layout, "pending_tail", None)
    if pending is None:
        return vector
    layout.pending_tail = None
    kind, relative, size, t, cfg = pending
    tail = vector[vector.numel() - size:]
    if kind == UNIT_TAIL:
        parts = [tail[:layout.unit_total]] + ([tail[layout.unit_total:]] if relative else [])
        t.given_sums = torch.cat([part.index_select(0, layout.unit_index) for part in parts])
        layout.unit_stats = unit_statistics(parts, t, cfg, layout)
    else:
        t.given_sums = tail
    return vector[:vector.numel() - size]


def unit_statistics(parts, t, cfg, layout) -> torch.Tensor:
    """float32 [2]: the mean threshold and the share of units clipped over the group's unsharded units (the
    step's statistics ``threshold`` and ``clipped_fraction``, which a backend takes over its local units only),
    from the reduced sums ``parts`` ([S_g], or [S_g, S_w]): the reference's thresholds and decisions
    (eta_u, ||g_u|| > eta_u, and the Philox draw at the unit's index where randomized)."""
    from ..backends.reference.philox import philox_key
    from ..backends.reference.step import norm_scales
    from ..thresholds import ThresholdInputs, policy

    method, dtype = cfg.clip.method, layout.norm_dtype
    if layout.unit_total == 0:
        return torch.tensor([math.inf, 0.0], dtype=torch.float32, device=parts[0].device)
    exact = parts[0].sqrt()
    norms = exact.to(dtype)
    weights = parts[1].sqrt().to(dtype) if len(parts) > 1 else None
    ok = torch.ones((), dtype=torch.bool, device=norms.device)
    eta = policy(method.threshold).reference(ThresholdInputs(norms, None, ok, cfg.clip, None, norms.new_zeros(()),
                                                             None, weights))
    key = philox_key(t.seed, t.step) if method.randomized else None
    _, clip = norm_scales(norms, eta.expand_as(norms), method.randomization, cfg.clip.beta, key, layout.unit_draws,
                          exact)
    return torch.stack([eta.expand_as(norms).mean().float(), clip.float().mean()])


def check_units(layout, cfg, group: Optional[int] = None) -> None:
    """NotImplementedError, before anything moves, where unit scope or the relative threshold cannot be taken
    on a sharded group: a group of several reduction domains (DTensors of several meshes, or with plain
    tensors), and randomized unit scope on a shard whose rows are not one range (a strided shard of dim 0)."""
    from ..methods import Scope
    from .dtensor import _where

    kind = tail_kind(cfg)
    if kind == NO_TAIL:
        return
    ensure_unit_map(layout)
    method = cfg.clip.method
    where = "" if group is None else f"param group {group}: "
    if layout.domains is not None:
        raise NotImplementedError(
            f"torch_clip_fused: {where}clipping method {method.name!r} (unit scope / relative threshold) on a group "
            "that mixes DTensors of several meshes, or DTensors and plain tensors, is not offered: its unit and weight "
            "norms are summed over one mesh; put each mesh's parameters in a param group of their own")
    if method.scope is Scope.UNIT and method.randomized and layout.unit_offsets is None:
        shards = [f"{_where(c, group, p)} has placements {tuple(p.placements)!r}"
                  for c, p in zip(layout.columns, layout.params) if any(
                      type(q).__name__ == "_StridedShard" and getattr(q, "dim", None) == 0 for q in p.placements)]
        raise NotImplementedError(
            f"torch_clip_fused: {'; '.join(shards) or where + 'a shard'}: randomized unit-scope clipping "
            f"({method.name!r}) draws by each unit's place among the unsharded units, which needs each shard's "
            "rows to be one range of its parameter's (not a strided shard of dim 0); use a method without draws")


__all__ = ["NO_TAIL", "UNIT_TAIL", "WEIGHT_TAIL", "check_units", "ensure_unit_map", "tail_kind", "take_tail", "unit_map", "unit_rows",
           "unit_tail"]
