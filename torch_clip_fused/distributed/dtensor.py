"""FSDP2 / HSDP support: param groups of DTensor parameters (``torch.distributed.fsdp.fully_shard``,
``distribute_tensor``), stepped on each rank's local shard (docs/spec.md section 2; issue 11).

Supported placements: ``Shard(d)`` of any dim (FSDP2's ``Shard(0)``, tensor parallelism's column- and
row-parallel ``Shard(0)`` / ``Shard(1)``, strided shards of FSDP2 over TP) and ``Replicate()``, on device
meshes of any dimension (FSDP2 ``[Shard(0)]``, HSDP ``[Replicate(), Shard(0)]``, HSDP x TP; a mesh of
some ranks only, a pipeline stage's, reduced over each of its dimensions in turn).  Norms, thresholds and scales take any of them; coordinate-scope draws and stochastic
rounding index each element by its place in the unsharded parameter: ``offset + l + (l // inner) *
extra`` for the local element l (``index_rows``), known for shards cut on dim 0 and at most one more
dim (``Shard(1)`` of a matrix, ``[Shard(0), Shard(1)]``), a NotImplementedError for those methods on a
strided shard or a shard cut on two dims after dim 0.  A group may mix DTensors of several
meshes and plain tensors (``ShardedLayout.domains``: each mesh's tensors reduced over its ranks, one
collective per distinct set of ranks, plain tensors each rank's own).  Unit scope and the relative
threshold (AGC) take the norms of whole units and weights, summed in the same collective (distributed/units.py).
``Partial`` (a pending sum), and coordinate scope, unit scope or the relative threshold in a mixed group raise
``NotImplementedError`` naming the placement and the parameter, at construction (``add_param_group``) or at
the first step, before anything moves.

One optimizer step with sharded groups, on every rank (``optim/base.py`` ``_step_groups``, with
``optim/shared_norm.py``):

1. the norm stage on the local shards: the per-tensor sums of squares (float64) of the local
   clipping source (the gradient, divided by the GradScaler's scale; or the final update direction
   with ``clip_point="update"``) and a non-finite flag;
2. ONE collective per step for all the optimizer's sharded groups: a SUM ``all_reduce`` of their float64
   vectors ``[sum_sq_0, ..., sum_sq_{T-1}, n_bad, (unit / weight sums: units.py)]`` laid end to end
   (``local_norm_parts``) over every
   rank of the mesh, where a rank contributes a tensor's sum of squares only if its coordinate is 0
   on every mesh dimension on which the tensor is replicated (each replica counted once, each shard once).  No ``.item()``, no host sync: the
   collective is ordered on the current stream;
3. the step itself on the local shards, through the chosen backend with ``given_norms`` =
   [||g_i||, ||g||] (float64 for a group of float64 tensors only, else float32, as a group of plain
   tensors), so every threshold (constant, AutoClip history, randomization) is computed from the
   same reduced norms on every rank; a non-finite gradient on any rank makes the global norm NaN,
   which skips the step on every rank.  Groups that share one norm (global scope) sum their reduced
   vectors into that norm.  The functional API reduces its one list the same way (``reduce_norms``).

Coordinate-scope and stochastic-rounding draws are indexed by each element's position in the
unsharded group: a shard's offset is its tensor's offset in the unsharded layout plus the shard's
first element in the unsharded (contiguous) tensor, and for a shard cut after dim 0 each row of the cut
dim skips the elements other ranks hold (``index_rows``), so the masks equal a single-process run's.
Momentum buffers and AdamW's moments are DTensors with their parameter's placements (``zeros_like``);
the backends work on their local tensors.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from .units import take_tail
from ..norm_type import combine, from_parts, tensor_norms, to_parts

UNCHANGED, CHANGED = -1, -2  # as backends.group_layout


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch without torch.distributed
        return None
    return DTensor, Replicate, Shard


def is_dtensor(x) -> bool:
    types = _dtensor_types()
    return types is not None and isinstance(x, types[0])


def is_sharded_group(params) -> bool:
    """Whether a param group holds DTensor parameters (any: a group may mix them with plain tensors)."""
    return any(is_dtensor(p) for p in params)


def local(x: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (the same object every call: the backends' caches key on it)."""
    inner = getattr(x, "_local_tensor", None)
    if inner is not None:
        return inner
    return x.to_local() if is_dtensor(x) else x  # a plain tensor beside DTensors is its own local tensor


def _where(index: int, group: Optional[int], p) -> str:
    where = f"parameter {index}" + ("" if group is None else f" of param group {group}")
    return f"{where} (shape {tuple(p.shape)})"


def _is_strided(placement) -> bool:
    return type(placement).__name__ == "_StridedShard"  # torch's private class (FSDP2 over tensor parallelism)


def _check_placements(x, what: str, owner: str) -> None:
    """Replicate() and Shard(d) of any dim d (strided shards too) are taken; a Partial tensor (a sum still
    pending across ranks) or another placement is a clear error."""
    DTensor, Replicate, Shard = _dtensor_types()
    for dim, placement in enumerate(x.placements):
        if isinstance(placement, (Replicate, Shard)) or _is_strided(placement):
            continue
        subject = owner if what == "parameter" else f"the {what} of {owner}"
        why = ("a Partial tensor holds one term of a sum still pending across ranks, so its norm is not known; "
               "reduce it first (redistribute it to the parameter's Shard / Replicate placements, as FSDP2 and "
               "tensor-parallel layers do before the optimizer step)" if "Partial" in type(placement).__name__
               else "only Shard(d), strided shards and Replicate() are taken")
        raise NotImplementedError(f"torch_clip_fused: {subject} has placement {placement!r} on mesh dimension {dim} "
                                  f"(placements {tuple(x.placements)!r}): {why}")


def _index_row(p) -> Optional[Tuple[int, int]]:
    """(inner, extra) of a shard whose elements' places in the unsharded parameter are
    ``offset + l + (l // inner) * extra`` (l: the local row-major index): a shard cut on dim 0 and on at most one
    dim d more (Shard(1) of a matrix, HSDP x TP's [Shard(0), Shard(1)]), inner = the shard's elements from dim
    d on, extra = the parameter's minus inner; (1, 0) for a row-major range; None for other shards (strided,
    or cut on two dims after dim 0)."""
    if any(_is_strided(q) for q in p.placements):
        return None
    if _row_major_range(p):
        return (1, 0)
    local_shape, global_shape = tuple(local(p).shape), tuple(p.shape)
    cut = [k for k, (a, b) in enumerate(zip(local_shape, global_shape)) if a != b and k > 0]
    if len(cut) != 1:
        return None
    d = cut[0]
    inner_local, inner_global = math.prod(local_shape[d:]), math.prod(global_shape[d:])
    return (max(inner_local, 1), inner_global - inner_local)


def _row_major_range(p) -> bool:
    """Whether the local shard is one contiguous range of the unsharded tensor in row-major order (then an
    element's index there is the shard's offset plus its local index): Shard(0) and Replicate, or any shard
    whose cut dims are preceded only by dims of size 1 and followed by whole dims.  Shard(1) of a matrix
    (tensor parallelism) or a strided shard is not."""
    DTensor, Replicate, Shard = _dtensor_types()
    if any(_is_strided(q) or (isinstance(q, Shard) and type(q) is not Shard) for q in p.placements):
        return False
    local_shape, global_shape = tuple(local(p).shape), tuple(p.shape)
    cut = [k for k, (a, b) in enumerate(zip(local_shape, global_shape)) if a != b]
    if not cut or local(p).numel() == 0:
        return True
    first = cut[0]
    whole_after = all(a == b for a, b in zip(local_shape[first + 1:], global_shape[first + 1:]))
    return whole_after and all(global_shape[k] == 1 for k in range(first))


def check_group(params, group: Optional[int] = None) -> bool:
    """Whether ``params`` hold DTensors (with plain tensors, or DTensors of several meshes: each its own
    reduction domain) with supported placements; raises NotImplementedError naming the parameter and
    placement otherwise.  False for plain tensors only."""
    params = list(params)
    if not any(is_dtensor(p) for p in params):
        return False
    for i, p in enumerate(params):
        if is_dtensor(p):
            _check_placements(p, "parameter", _where(i, group, p))
    return True


def _ranks(mesh) -> tuple:
    return tuple(sorted(mesh.mesh.flatten().tolist()))


def _domains(params, device):
    """(domains, plain positions) of a group's tensors for ShardedLayout, or (None, None) when every tensor is
    a DTensor whose mesh spans the same ranks (one domain, the common case)."""
    meshes = [p.device_mesh if is_dtensor(p) else None for p in params]
    keys = [None if m is None else _ranks(m) for m in meshes]
    if all(k is not None for k in keys) and len(set(keys)) <= 1:
        return None, None
    domains = []
    for key in dict.fromkeys(k for k in keys if k is not None):
        positions = [i for i, k in enumerate(keys) if k == key]
        domains.append((key, _reduce_group(meshes[positions[0]]),
                        torch.tensor(positions, dtype=torch.int64, device=device)))
    plain = torch.tensor([i for i, k in enumerate(keys) if k is None], dtype=torch.int64, device=device)
    return domains, plain


def reduce_vectors(entries) -> list:
    """SUM across ranks of several groups' norm vectors (``local_norm_parts`` layout: [T sums of squares,
    non-finite count, (coordinate clips | the unit and weight sums of units.py, taken off the returned vector
    into the step's ``given_sums``: ``take_tail``)]), ``entries`` = (vector, layout) pairs, or (vector, layout,
    norm_type): one collective per distinct reduction domain (the ranks of a mesh) and reduction (a MAX for
    ``norm_type`` inf, whose parts are max |g| and whose count is then a flag), for all the groups together.
    A group of several domains (``layout.domains``) sends each domain its tensors' sums and their non-finite
    count; its plain tensors are not reduced.  Returns the reduced vectors, in order."""
    from ..norm_type import reduce_op

    pieces = {}  # (a domain's ranks, op) -> (process group, op, [(entry index, positions or None, part)])
    for j, (vector, layout, *rest) in enumerate(entries):
        op = reduce_op(rest[0] if rest else 2.0)
        if layout.domains is None:
            pieces.setdefault((layout.ranks, op), (layout.process_group, op, []))[2].append((j, None, vector))
            continue
        n = len(layout.local_grads)
        for ranks, group, positions in layout.domains:
            sq = vector[:n][positions]
            part = torch.cat([sq, (~torch.isfinite(sq)).sum().to(sq.dtype).reshape(1)])
            pieces.setdefault((ranks, op), (group, op, []))[2].append((j, positions, part))
    out = [entry[0] for entry in entries]
    split = {j: [] for j, entry in enumerate(entries) if entry[1].domains is not None}
    for group, op, parts in pieces.values():
        flat = torch.cat([part for _, _, part in parts])
        all_reduce_over(flat, group, op)
        for (j, positions, _), reduced in zip(parts, torch.split(flat, [part.numel() for _, _, part in parts])):
            if positions is None:
                out[j] = reduced
            else:
                split[j].append((positions, reduced))
    out = [take_tail(vector, entry[1]) for vector, entry in zip(out, entries)]
    for j, domains in split.items():
        vector, layout = entries[j][:2]
        n = len(layout.local_grads)
        sq = vector[:n].clone()
        plain = sq[layout.plain_positions]
        bad = (~torch.isfinite(plain)).sum().to(sq.dtype).reshape(1)
        for positions, reduced in domains:
            sq[positions] = reduced[:-1]
            bad = bad + reduced[-1:]
        out[j] = torch.cat([sq, bad, vector[n + 1:]])
    return out


def _reduce_group(mesh):
    """Where a mesh's sums are reduced: its own group (1-D), the world (an N-D mesh that spans every rank),
    or the tuple of its dimensions' groups, one after another (an N-D mesh of some ranks only: a pipeline
    stage's HSDP x TP mesh; a sum over each dimension in turn is the sum over the mesh)."""
    import torch.distributed as dist

    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return None
    return tuple(mesh.get_group(d) for d in range(mesh.ndim))


def all_reduce_over(tensor: torch.Tensor, group, op=None) -> None:
    """``dist.all_reduce`` of ``tensor`` in place over a :func:`_reduce_group` (SUM by default)."""
    import torch.distributed as dist

    op = dist.ReduceOp.SUM if op is None else op
    for g in (group if isinstance(group, tuple) else (group,)):
        dist.all_reduce(tensor, op=op, group=g)  # ordered on the current stream


def _shard_offset(p) -> int:
    """The position, in the unsharded (contiguous) tensor, of the local shard's first element (its elements
    follow it in row-major order where :func:`_row_major_range`)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    strides = list(itertools.accumulate(reversed(tuple(p.shape[1:]) + (1,)), lambda a, b: a * b))[::-1]
    return sum(o * s for o, s in zip(offset, strides))


def _counted(p) -> bool:
    """Whether this rank's copy of ``p``'s shard is the one counted in the reduce: coordinate 0 on
    every mesh dimension on which ``p`` is replicated."""
    _, Replicate, _ = _dtensor_types()
    coordinate = p.device_mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh
        return False
    return all(c == 0 for c, placement in zip(coordinate, p.placements) if type(placement) is Replicate)


@dataclass
class ShardedLayout:
    """The layout of a sharded param group (the counterpart of backends.group_layout.GroupLayout,
    with the same attributes and ``refresh`` contract): the DTensor parameters that have gradients,
    their local shards and local gradients, the shards' offsets in the unsharded group, and what the
    collective needs."""

    params: List[torch.Tensor]  # the group's DTensor parameters that have gradients, in group order
    columns: List[int]
    offsets: List[int]  # the local shard's first element in the unsharded group laid end to end
    device: torch.device
    local_params: List[torch.Tensor]
    local_grads: List[torch.Tensor]  # refreshed every step
    counted: torch.Tensor  # bool [T] on the device: this rank's sums of squares enter the reduce
    process_group: object  # the one reduction domain's group (None: the world), where ``domains`` is None
    grad_ptrs: torch.Tensor  # int64 [T] (CPU): the local gradients' data pointers
    grad_ptrs_changed: bool = True
    buffers: Optional[List[torch.Tensor]] = None  # momentum buffers (DTensors)
    buffers_version: int = -1
    backend_cache: dict = field(default_factory=dict)
    has_grad_list: List[bool] = field(default_factory=list)
    local_ids: List[int] = field(default_factory=list)
    grad_ptr_list: List[int] = field(default_factory=list)
    grad_facts: list = field(default_factory=list)
    #: the arithmetic of norms, thresholds and scales: float64 for a group of float64 tensors only, else
    #: float32 (as GroupLayout's; docs/spec.md section 1: a group mixing float64 with other dtypes takes float32)
    norm_dtype: torch.dtype = torch.float32
    numel: int = 0  # elements of the unsharded parameters that have gradients
    #: unit scope / the relative threshold (distributed/units.py, set on first use): per step tensor the Philox
    #: index base of its local units (None where a shard's rows are not one range), each local unit's place in
    #: the vector of the group's unsharded units (int64 on the device) and that vector's length; per parameter
    #: of the group its first unit's place among all the group's units; the tail of the step's norm vector
    unit_offsets: Optional[List[int]] = None
    unit_index: Optional[torch.Tensor] = None
    unit_total: int = 0
    unit_starts: List[int] = field(default_factory=list)
    pending_tail: Optional[tuple] = None
    unit_draws: Optional[torch.Tensor] = None  # int64 [unit_total]: each unsharded unit's Philox index
    unit_kept: Optional[torch.Tensor] = None  # bool [local units]: the units of the counted copies (set on first use)
    unit_stats: Optional[torch.Tensor] = None  # float32 [2]: the step's threshold and clipped fraction over them
    #: per tensor, the placements of a shard whose elements' places in the unsharded parameter the kernels
    #: cannot index (strided shards, two cuts after dim 0; None elsewhere): coordinate-scope draws and
    #: stochastic rounding are not offered there
    scattered: List[Optional[tuple]] = field(default_factory=list)
    #: GroupTensors.index_rows of the step: (inner, extra) per tensor where a shard is not a row-major range
    index_rows: Optional[List[Tuple[int, int]]] = None
    #: a group of several reduction domains (DTensors of several meshes: dense layers on the FSDP mesh, experts on
    #: an expert-parallel mesh; plain tensors, each rank's own): (ranks, process group, positions of its tensors as
    #: an int64 device tensor) per mesh, and the positions of the plain tensors; None for one domain (every tensor
    #: a DTensor of one mesh's ranks)
    domains: Optional[list] = None
    plain_positions: Optional[torch.Tensor] = None
    ranks: tuple = ()  # the ranks of the one domain (``domains`` None): groups over the same ranks reduce together
    sharded = True

    @classmethod
    def gather(cls, group_params, group: Optional[int] = None) -> "ShardedLayout":
        from ..backends.reference.units import units_of

        check_group(group_params, group)
        columns = [i for i, p in enumerate(group_params) if p.grad is not None]
        starts = list(itertools.accumulate((p.numel() for p in group_params), initial=0))
        params = [group_params[i] for i in columns]
        offsets, local_params, local_grads, counted = [], [], [], []
        for i, p in zip(columns, params):
            owner = _where(i, group, p)
            g = p.grad
            if not is_dtensor(p):  # a plain tensor beside DTensors: this rank's own, counted here, not reduced
                if is_dtensor(g):
                    raise NotImplementedError(f"torch_clip_fused: the gradient of plain {owner} is a DTensor")
                offsets.append(starts[i])
                local_params.append(p)
                local_grads.append(g)
                counted.append(True)
                continue
            if not is_dtensor(g):
                raise NotImplementedError(f"torch_clip_fused: the gradient of DTensor {owner} is a plain tensor; "
                                          "expected a DTensor with the parameter's placements (as FSDP2 makes)")
            _check_placements(g, "gradient", owner)
            if tuple(g.placements) != tuple(p.placements) or g.device_mesh != p.device_mesh:
                raise NotImplementedError(
                    f"torch_clip_fused: the gradient of {owner} has placements {tuple(g.placements)}, the parameter "
                    f"{tuple(p.placements)}; redistribute the gradient to the parameter's placements")
            lp, lg = local(p), local(g)
            if not lp.is_contiguous():
                raise NotImplementedError(
                    f"torch_clip_fused: the local shard of {owner} is not contiguous (strides {lp.stride()}); "
                    "sharded parameters must be contiguous so that each element's index in the unsharded "
                    "parameter is known")
            offsets.append(starts[i] + _shard_offset(p))
            local_params.append(lp)
            local_grads.append(lg)
            counted.append(_counted(p))
        device = local_params[0].device if local_params else torch.device("cpu")
        domains, plain = _domains(params, device)
        mesh = next(p.device_mesh for p in group_params if is_dtensor(p))
        layout = cls(
            params=params, columns=columns, offsets=offsets, device=device, local_params=local_params,
            local_grads=local_grads, counted=torch.tensor(counted, dtype=torch.bool, device=device),
            process_group=_reduce_group(mesh),
            norm_dtype=torch.float64 if params and all(p.dtype == torch.float64 for p in params) else torch.float32,
            numel=sum(p.numel() for p in params),
            grad_ptrs=torch.tensor([g.data_ptr() for g in local_grads], dtype=torch.int64),
        )
        rows = [(1, 0) if not is_dtensor(p) else _index_row(p) for p in params]
        layout.scattered = [None if row is not None else tuple(p.placements) for p, row in zip(params, rows)]
        layout.index_rows = None if all(row == (1, 0) for row in rows) or None in rows else rows
        layout.domains, layout.plain_positions = domains, plain
        layout.ranks = _ranks(mesh)
        layout.unit_starts = list(itertools.accumulate((units_of(tuple(p.shape)) for p in group_params), initial=0))
        layout.has_grad_list = [p.grad is not None for p in group_params]
        layout.local_ids = [id(x) for x in local_params]
        layout.grad_ptr_list = [g.data_ptr() for g in local_grads]
        layout.grad_facts = [(g.dtype, g.shape, g.stride()) for g in local_grads]
        return layout

    def refresh(self, group_params) -> int:
        """Re-read the local gradients: UNCHANGED or CHANGED while the layout holds, else 0 (gather
        again)."""
        if [p.grad is not None for p in group_params] != self.has_grad_list:
            return 0
        if not all(is_dtensor(p) == is_dtensor(p.grad) for p in self.params):
            return 0
        local_params = [local(p) for p in self.params]
        if [id(x) for x in local_params] != self.local_ids:
            return 0
        grads = [local(p.grad) for p in self.params]
        if [(g.dtype, g.shape, g.stride()) for g in grads] != self.grad_facts:
            return 0
        self.local_grads = grads
        pointers = [g.data_ptr() for g in grads]
        if pointers == self.grad_ptr_list:
            return UNCHANGED
        self.grad_ptr_list = pointers
        self.grad_ptrs.copy_(torch.tensor(pointers, dtype=torch.int64))
        return CHANGED

    def local_pairs(self):
        """(local parameter, local gradient) of each tensor, for the fused backends' layout checks."""
        return list(zip(self.local_params, self.local_grads))


def check_domains(layout: ShardedLayout, cfg, group: Optional[int] = None) -> None:
    """NotImplementedError for coordinate scope on a group of several reduction domains (its clip counts are
    summed per group, not per domain)."""
    if layout.domains is not None and _counts_coordinates(cfg):
        where = "" if group is None else f"param group {group}: "
        raise NotImplementedError(f"torch_clip_fused: {where}coordinate-scope clipping of a group that mixes DTensors "
                                  "of several meshes (or DTensors and plain tensors) is not offered: put each mesh's "
                                  "parameters in a param group of their own")


def check_element_indices(layout: ShardedLayout, cfg, group: Optional[int] = None) -> None:
    """:func:`check_domains`, and NotImplementedError naming the parameter and its placements where the step
    would index elements (the coordinate scope's random draws, stochastic rounding) of a shard that is not
    one row-major range of its parameter (``layout.scattered``)."""
    from ..config import SGDUpdate
    from ..methods import Randomization, Scope

    from .units import check_units

    check_domains(layout, cfg, group)
    check_units(layout, cfg, group)
    method = cfg.clip.method
    random_coordinates = method.scope is Scope.COORDINATE and method.randomization is not Randomization.NONE
    rounding = isinstance(cfg.update, SGDUpdate) and cfg.update.stochastic_rounding
    if not (random_coordinates or rounding):
        return
    for column, p, placements in zip(layout.columns, layout.params, layout.scattered):
        if placements is not None:
            what = (f"clipping method {method.name!r} (random draws per element)" if random_coordinates
                    else "stochastic_rounding=True")
            raise NotImplementedError(
                f"torch_clip_fused: {_where(column, group, p)} has placements {placements!r}: {what} indexes each "
                "element by its place in the unsharded parameter, which the kernels know for shards cut on dim 0 and "
                "at most one more dim, not for this one (a strided shard, or cuts on two dims after dim 0); use "
                "Shard(d) placements for this parameter, or a method without per-element draws")


def localize(t, layout: ShardedLayout) -> None:
    """Point a GroupTensors of a sharded group at the local shards (in place)."""
    t.params = [local(x) if is_dtensor(x) else x for x in t.params]
    for name in ("first_moments", "exp_avg_sqs", "max_exp_avg_sqs"):  # the update rule's moments (DTensors)
        moments = getattr(t, name)
        if moments is not None:
            setattr(t, name, [local(x) if is_dtensor(x) else x for x in moments])
    t.grad_owners = None
    t.grads = layout.local_grads
    t.offsets = layout.offsets
    t.grad_ptrs = layout.grad_ptrs
    t.grad_ptrs_changed = layout.grad_ptrs_changed
    t.index_rows = layout.index_rows


def _local_sources(t, cfg) -> list:
    """The local clipping source of each tensor: the gradient (divided by the GradScaler's scale),
    or with ``clip_point="update"`` the final update direction (the reference's arithmetic)."""
    from ..config import ClipPoint

    grads = list(t.grads)
    if cfg.clip.clip_point is not ClipPoint.UPDATE:
        if t.grad_scale is None:
            return grads
        inv = t.grad_scale.to(device=t.device, dtype=torch.float32).reciprocal()
        return [g.float() * inv if g.dtype != torch.float64 else g * inv.double() for g in grads]
    from ..backends.reference.step import opmath_dtype, sgd_direction

    sources = []
    for i, (g, p) in enumerate(zip(grads, t.params)):
        m = None if t.first_moments is None else t.first_moments[i]
        dtype = opmath_dtype(g.dtype, p.dtype, *(() if m is None else (m.dtype,)))
        x = g.to(dtype)
        if cfg.update.maximize:
            x = -x
        if t.grad_scale is not None:
            x = x * t.grad_scale.to(device=x.device, dtype=torch.float32).reciprocal()
        ready = None if m is None else t.momentum_ready[t.columns[i]]
        d, _ = sgd_direction(x, p.to(dtype), None if m is None else m.to(dtype), ready, cfg)
        sources.append(d)
    return sources


def _coordinate_clips(t, cfg, sources) -> torch.Tensor:
    """float64 [T]: how many local elements of each tensor the coordinate-scope step clips (the decisions of
    docs/spec.md section 1, with the elements' unsharded indices), for the global clipped fraction."""
    from ..backends.reference.philox import philox_key
    from ..backends.reference.step import coordinate_decisions
    from ..methods import Randomization

    method = cfg.clip.method
    counts = []
    key = philox_key(t.seed, t.step) if method.randomization is not Randomization.NONE else None
    for x, offset in zip(sources, t.offsets):
        flat = x.reshape(-1)
        index = None if key is None else torch.arange(flat.numel(), dtype=torch.int64, device=flat.device) + offset
        counts.append(coordinate_decisions(flat.float() if flat.dtype != torch.float64 else flat, cfg.clip.level,
                                           method.randomization, cfg.clip.beta, key, index).sum())
    return torch.stack(counts).to(torch.float64)


def _counts_coordinates(cfg) -> bool:
    from ..methods import Scope

    return cfg.clip.method.clips and cfg.clip.method.scope is Scope.COORDINATE


def local_norm_parts(t, cfg, layout, with_norms: bool = True):
    """The norm stage of one group on this rank: the float64 vector [sums of squares of the local
    clipping sources (zero for a copy not counted), non-finite count, coordinate clips (coordinate
    scope only)] whose SUM across ranks (and, for a norm shared by several groups, across groups)
    :func:`norms_from_parts` reads.  ``layout`` may be a plain GroupLayout (every copy counted)."""
    n = len(t.grads)
    coordinate = _counts_coordinates(cfg)
    sources = _local_sources(t, cfg) if with_norms or coordinate else []
    if sources and with_norms:
        if cfg.clip.norm_type == 2.0:
            sq = torch.stack(torch._foreach_norm(sources, 2, dtype=torch.float64)).square()
        else:  # the parts ||x_i||_p^p (inf: max |x_i|), norm_type.py
            sq = to_parts(tensor_norms(sources, cfg.clip.norm_type), cfg.clip.norm_type)
    else:
        sq = torch.zeros(n, dtype=torch.float64, device=t.device)
    bad = (~torch.isfinite(sq)).sum().to(torch.float64).reshape(1)
    counted = getattr(layout, "counted", None)
    parts = [sq if counted is None else torch.where(counted, sq, torch.zeros_like(sq)), bad]
    if coordinate and n:  # replicated copies make the same decisions: counted once
        clips = _coordinate_clips(t, cfg, sources)
        parts.append((clips if counted is None else torch.where(counted, clips, torch.zeros_like(clips))).sum().reshape(1))
    elif coordinate:
        parts.append(torch.zeros(1, dtype=torch.float64, device=t.device))
    return _with_tail(torch.cat(parts), t, cfg, layout, sources)


def _with_tail(vector: torch.Tensor, t, cfg, layout, sources=None) -> torch.Tensor:
    """``vector`` with the local terms of the unit and weight norms of unit scope and the relative threshold
    appended (distributed/units.py ``unit_tail``; none for other methods or unsharded groups)."""
    from .units import NO_TAIL, tail_kind, unit_tail

    if tail_kind(cfg) == NO_TAIL or not isinstance(layout, ShardedLayout):
        return vector
    tail = unit_tail(t, cfg, layout, sources if sources else _local_sources(t, cfg))
    return vector if tail is None else torch.cat([vector, tail])


def norm_vector(backend, t, cfg, layout, with_norms: bool = True) -> torch.Tensor:
    """A group's :func:`local_norm_parts` vector on this rank, from ``backend``'s own norms stage (one
    fused pass: ``Backend.norms``, backends/stages.py) where the clipping source is the gradient and no
    coordinate decision is counted, with the copies not counted (replicated shards) zeroed; else from
    torch foreach reductions (the update direction of ``clip_point="update"``, coordinate scope's clip
    counts)."""
    from ..config import ClipPoint

    if cfg.clip.clip_point is not ClipPoint.GRAD or _counts_coordinates(cfg) or not t.grads:
        return local_norm_parts(t, cfg, layout, with_norms)
    vector = backend.norms(t, cfg)
    counted = getattr(layout, "counted", None)
    if counted is None:
        return vector
    sq = vector[:-1]
    return _with_tail(torch.cat([torch.where(counted, sq, torch.zeros_like(sq)), vector[-1:]]), t, cfg, layout)


def norms_from_parts(vector: torch.Tensor, n: int, dtype, mark_nonfinite: bool, total_sq=None, bad=None,
                     norm_type: float = 2.0):
    """(norms [n + 1] of ``dtype``: per-tensor, then global; clips or None) from a group's reduced
    :func:`local_norm_parts` vector.  ``total_sq`` / ``bad`` (float64 [1]) replace the group's own sum of
    squares and non-finite count in the global norm: a norm shared with other groups.  ``norm_type`` p: the
    vector holds the parts ||g_i||_p^p (inf: max |g_i|), and the norms are their 1/p-th powers (norm_type.py)."""
    clips = vector[n + 1:] if vector.numel() > n + 1 else None
    reduced = vector[:n]
    if norm_type != 2.0:
        total_part = combine(reduced, norm_type).reshape(1) if total_sq is None else total_sq
        total = from_parts(total_part, norm_type).to(dtype)
        if mark_nonfinite:
            bad = vector[n:n + 1] if bad is None else bad
            total = torch.where(bad > 0, torch.full_like(total, float("nan")), total)
        return torch.cat([from_parts(reduced, norm_type).to(dtype), total]), clips
    total_sq = reduced.sum().reshape(1) if total_sq is None else total_sq
    bad = vector[n:n + 1] if bad is None else bad
    total = total_sq.sqrt().to(dtype)
    if mark_nonfinite:
        total = torch.where(bad > 0, torch.full_like(total, float("nan")), total)
    return torch.cat([reduced.sqrt().to(dtype), total]), clips


def reduce_norms(t, cfg, layout: ShardedLayout, mark_nonfinite: bool, dtype=None, with_norms: bool = True,
                 backend=None):
    """The group's norms across ranks, [T + 1] of ``dtype`` (default: the layout's norm dtype; the
    per-tensor norms, then the global norm), from ONE SUM all-reduce of the float64 vector
    [local sums of squares (counted copies only), non-finite count, coordinate clips]; with
    ``mark_nonfinite`` the global norm is NaN when a gradient on any rank is not finite.  Without
    ``with_norms`` (a step that needs no norm, as the backends' own) the norms are NaN, and nothing is
    reduced unless coordinates are counted.  ``backend``: its norms stage takes the local sums of squares
    (:func:`norm_vector`; None: torch foreach reductions).  Returns (norms, clipped elements across ranks: float64
    [1], or None outside coordinate scope)."""

    dtype = layout.norm_dtype if dtype is None else dtype
    n = len(t.grads)
    if not with_norms and not _counts_coordinates(cfg):
        return torch.full((n + 1,), float("nan"), dtype=dtype, device=t.device), None
    vector = local_norm_parts(t, cfg, layout, with_norms) if backend is None else \
        norm_vector(backend, t, cfg, layout, with_norms)
    vector = reduce_vectors([(vector, layout, cfg.clip.norm_type)])[0]
    norms, clips = norms_from_parts(vector, n, dtype, mark_nonfinite, norm_type=cfg.clip.norm_type)
    if not with_norms:
        norms = torch.full((n + 1,), float("nan"), dtype=dtype, device=t.device)
    return norms, clips


def clipped_fraction(stats: torch.Tensor, clips: Optional[torch.Tensor], layout: ShardedLayout) -> None:
    """At coordinate scope the backend's clipped fraction is the local shard's: replace it by the
    group's, from the reduced count (0 for a skipped step).  At unit scope its threshold and clipped
    fraction are over the local units: replace them by the group's (``layout.unit_stats``, distributed/units.py)."""
    unit_stats = getattr(layout, "unit_stats", None)
    if unit_stats is not None:
        layout.unit_stats = None
        stats[1].copy_(unit_stats[0])
        stats[2].copy_(torch.where(stats[3] > 0, torch.zeros_like(unit_stats[1]), unit_stats[1]))
    if clips is None:
        return
    fraction = (clips / max(layout.numel, 1)).to(stats.dtype).reshape(())
    stats[2].copy_(torch.where(stats[3] > 0, torch.zeros_like(fraction), fraction))


def any_rank_nonfinite(layout: ShardedLayout, found_inf: Optional[torch.Tensor]) -> torch.Tensor:
    """bool []: a gradient on any rank of the group's mesh holds inf or NaN, or found_inf is set
    (nonfinite="raise": one all-reduce; the caller reads it, the one host sync of that policy)."""
    import torch.distributed as dist

    from ..backends.reference import all_finite

    bad = (~all_finite(layout.local_grads)).to(torch.float32).reshape(1) if layout.local_grads else \
        torch.zeros(1, device=layout.device)
    if found_inf is not None:
        bad = torch.maximum(bad, (found_inf.to(bad.device).reshape(1) != 0).to(torch.float32))
    groups = [layout.process_group] if layout.domains is None else [group for _, group, _ in layout.domains]
    for group in groups:  # every domain's ranks (a group of several meshes: one after another)
        all_reduce_over(bad, group, dist.ReduceOp.MAX)
    return bad[0] > 0


__all__ = ["ShardedLayout", "any_rank_nonfinite", "check_domains", "check_element_indices", "check_group",
           "clipped_fraction", "is_dtensor", "is_sharded_group", "local", "local_norm_parts", "localize", "norm_vector",
           "norms_from_parts", "reduce_norms", "reduce_vectors"]
