"""Pure-PyTorch reference of one ClippedSGD or ClippedAdamW step (docs/spec.md section 3): the fallback on
any device and the test oracle.

One step, with g the gradient (negated if maximize, divided by the GradScaler's scale), wd the
weight decay, mu the momentum, tau the dampening and s(x) the method's scales taken from x:

    clip_point="grad":    g' = s(g) * g;  d = g' + wd p;  m = mu m + (1 - tau) d
                          (m = d on the first step);  d = d + mu m (nesterov) or m
    clip_point="update":  d from the raw g as above (m stored unclipped);  d = s(d) * d
    p = p - lr d

and a step whose gradients hold inf or NaN leaves p and m as they were (``nonfinite="skip"``;
``"raise"`` is checked by the optimizer before any backend runs, and is a skip here).  ClippedAdamW
(update code 2, clip_point="grad" only) applies AdamW (Loshchilov & Hutter, 2019; adamw.py) to
g' = s(g) * g instead, with its moments m (exp_avg), v and amsgrad's vmax and per-tensor step counts,
all left as they were by a skipped step.

The step runs in three stages, named as in every backend (docs/spec.md section 6):

``norms``   per-tensor norms ||x_i||, the global norm sqrt(sum_i ||x_i||^2) (``norm_type`` p:
            ||x_i||_p and (sum_i ||x_i||_p^p)^(1/p), inf: max |x|; norm_type.py), and ``ok``: every
            gradient element is finite (and the GradScaler found no inf); at unit scope the norms
            of the output units ||x_u|| (units.py), and with the relative threshold (AGC, Brock et
            al., 2021) the parameters' norms at the method's scope.
``scales``  thresholds eta (constant, the AutoClip quantile of the recorded norms, ZClip's,
            AdaGC's, or AGC's clipping_level * max(||w||, agc_eps)), the
            random draws u, the scales of the method's scope, and the step's statistics.
``apply``   the scales applied, the SGD (or AdamW) update, and the skip: p and m are replaced by
            ``where(ok, new, old)``, then written back (rounded once to their dtype).

Arithmetic: element-wise in float32 (float64 for a tensor whose parameter, gradient or momentum
buffer is float64), norms and thresholds in float32.  Squares are summed in float64, so that norms are
right at both ends of the float32 range; a norm past float32's range is +inf in float32, and its
scale is taken from the float64 norm (``norm_scales``) and applied as two float32 factors
(``split_scales``).

How the cost stays independent of the number of tensors: the gradients (and parameters and
momentum buffers) of a group are copied with one ``torch._foreach_copy_`` into a flat
workspace, one per arithmetic dtype, through views cached per tensor layout.  A dense tensor's
view has the tensor's own strides, so a coordinate's place in the workspace is its place in
memory and its Philox index is ``offsets[i]`` plus its memory position (the order the fused
kernels walk memory); a non-dense tensor is laid out in logical order.  All element-wise math
then runs on flat tensors, per-tensor values (layer scales, momentum ``ready`` flags) are
expanded with ``repeat_interleave(..., output_size=N)``, and results go back with one more
``torch._foreach_copy_``.  Nothing is read back to the host and no host data is copied to the
device inside a step: index tensors are built once per layout and cached.

The price is memory: the workspace keeps flat copies of the group's gradients, parameters and
momentum buffers (3 x 4 bytes per float32-computed element; AdamW adds v and vmax) between steps,
as long as the group's layout lives.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ...config import SR_INDEX, ClipPoint, GroupConfig, GroupTensors, NonFinite
from ...methods import TINY, UPDATE_CODES, Randomization, Scope, Threshold
from ...norm_type import tensor_norms, total_norm
from .adamw import adamw_update, bias_corrections, decay_factor
from ...thresholds import ThresholdInputs, policy
from .units import UnitLayout
from ...tensor_stats import skipped_scales, write_columns
from .philox import MASK32, philox_key, philox_uniform, philox_words

Tensors = List[torch.Tensor]

#: layouts remembered per param group (keyed by the group's first parameter)
LAYOUTS_PER_GROUP = 2


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def opmath_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of tensors of ``dtypes``: float64 if one is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def round_to_float32(x: float) -> float:
    """The float32 nearest to x, as a Python float (what a kernel's float32 argument holds)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def exact_norms(tensors: Tensors, norm_type: float = 2.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor Euclidean norms ([n]) and the global norm sqrt(sum_i ||g_i||^2) in float64, on the
    tensors' device.  The squares are float64: right at both ends of the float32 range (float32
    squares underflow below |g| ~ 1e-19 and overflow above 1.8e19), and a finite float32 gradient
    always has a finite norm (which may be past float32's range).  ``norm_type`` p (norm_type.py):
    ||g_i||_p and (sum_i ||g_i||_p^p)^(1/p) (inf: max |g| and the max over tensors), in float64."""
    if not tensors:
        raise ValueError("grad_norms needs at least one tensor")
    if norm_type != 2.0:
        per_tensor = tensor_norms(tensors, norm_type)
        return per_tensor, total_norm(per_tensor, norm_type)
    per_tensor = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))
    return per_tensor, per_tensor.square().sum().sqrt()


def grad_norms(tensors: Tensors, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """``exact_norms`` in ``dtype`` (float32, or float64 for float64 groups): a norm past float32's
    range is +inf in float32."""
    per_tensor, total = exact_norms(tensors)
    return per_tensor.to(dtype), total.to(dtype)


def all_finite(tensors: Tensors) -> torch.Tensor:
    """Whether every element of every tensor is finite (bool [], on the tensors' device).

    max_i |x_i| (the infinity norm, which propagates NaN) is finite exactly when every element
    is; one foreach reduction whatever the number of tensors."""
    if not tensors:
        raise ValueError("all_finite needs at least one tensor")
    nonempty = [x for x in tensors if x.numel() > 0]  # the infinity norm of nothing is undefined
    if not nonempty:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device)
    return torch.isfinite(torch.stack(torch._foreach_norm(nonempty, math.inf))).all()


def clip_probability(alpha: torch.Tensor, randomization: Randomization, beta: float) -> torch.Tensor:
    """P(clip) = beta**alpha (linear) or beta**(alpha**2) (quadratic), computed as
    exp2(e * log2(beta)) with log2(beta) rounded to float32, as every backend does."""
    exponent = alpha if randomization is Randomization.LINEAR else alpha * alpha
    return torch.exp2(exponent * round_to_float32(math.log2(beta)))


def norm_scales(
    norms: torch.Tensor, eta: torch.Tensor, randomization: Randomization, beta: float, key: torch.Tensor,
    index: torch.Tensor, exact: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scales s for norm-type scopes (global: one norm, index 0; layer: one per tensor,
    index = tensor's position in its group; unit: one per output unit) and the clip decisions (bool):
    alpha = eta / ||g||, taken where ||g|| > eta (so a zero norm never divides); s = alpha where
    ||g|| > eta (and u < P(clip) if randomized), else 1.

    ``exact``: the same norms in float64.  Where a float32 norm is past float32's range (+inf) and
    its float64 one is finite, alpha = eta / that norm, in float64 (an exploding gradient is clipped
    to eta, never zeroed: docs/spec.md section 1), and where the float32 quotient is below float32's
    normal range, alpha = eta / ||g|| in float64; the scales of float32 norms are float64."""
    above = norms > eta
    alpha = eta / torch.where(above, norms, torch.ones_like(norms))
    if randomization is Randomization.NONE:
        clip = above
    else:
        u = philox_uniform(key, index)
        clip = above & (u < clip_probability(alpha, randomization, beta))
    if alpha.dtype != torch.float64:
        # a quotient below float32's normal range (a float32 subnormal keeps few bits) is taken again in float64
        small = (alpha < TINY) & (alpha > 0)
        alpha = torch.where(small, eta.double() / norms.double(), alpha.double())
        if exact is not None:
            past = torch.isinf(norms) & torch.isfinite(exact)
            alpha = torch.where(past, eta.double() / exact, alpha)
    return torch.where(clip, alpha, torch.ones_like(alpha)), clip


#: A scale below float32's normal range is applied as two float32 factors: SPLIT_PRE, then s / SPLIT_PRE.
SPLIT_PRE = 2.0**-64


def split_scales(scales: torch.Tensor, dtype: torch.dtype) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """A group's scales s as (pre, post) with s = pre * post, for norm dtype ``dtype``.  float32
    groups: pre = 1 and post = s where s is a normal float32; below (an exploding gradient clipped
    to a small level, whose scale a float32 subnormal keeps few bits of) pre = 2**-64 and post =
    s * 2**64, both float32.  x * pre is exact unless x * s is itself below the normal range, so
    x * pre * post is x * s rounded once, as the C++ and Triton kernels compute it.  float64
    groups: (None, s)."""
    if dtype == torch.float64:
        return None, scales
    small = (scales < TINY) & (scales > 0)
    pre = torch.ones_like(scales, dtype=torch.float32).masked_fill_(small, SPLIT_PRE)
    return pre, (scales.double() / pre.double()).to(torch.float32)


def coordinate_decisions(
    x: torch.Tensor, eta: float, randomization: Randomization, beta: float, key: torch.Tensor,
    index: Optional[torch.Tensor],
) -> torch.Tensor:
    """Which elements of the flat ``x`` are clipped (bool, same shape): |x_i| > eta, and with
    randomization also u_i < P(clip) with alpha_i = eta / |x_i| and u_i drawn at ``index``."""
    magnitude = x.abs()
    above = magnitude > eta
    if randomization is Randomization.NONE:
        return above
    alpha = eta / magnitude.clamp(min=TINY)
    return above & (philox_uniform(key, index) < clip_probability(alpha, randomization, beta))


def sgd_direction(
    g: torch.Tensor, p: torch.Tensor, m: Optional[torch.Tensor], ready: Optional[torch.Tensor], cfg: GroupConfig
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """d = g + wd p; with momentum m' = mu m + (1 - tau) d (m' = d where not ``ready``) and
    d = d + mu m' (nesterov) or m'.  Flat tensors of one arithmetic dtype; returns (d, m').

    Every product is rounded before it is added, as in the C++ and Triton kernels (``torch.add``
    with ``alpha`` fuses a multiply-add on CPU): the backends' float32 values agree bit for bit,
    which stochastic rounding (docs/spec.md section 3.1) needs."""
    d = g + p * cfg.update.weight_decay if cfg.update.weight_decay != 0 else g
    if cfg.update.momentum == 0:
        return d, None
    running = m * cfg.update.momentum + d * (1 - cfg.update.dampening)
    new_m = torch.where(ready, running, d)
    if cfg.update.nesterov:
        return d + new_m * cfg.update.momentum, new_m
    return new_m, new_m


def _float32_bits(x: torch.Tensor) -> torch.Tensor:
    """The IEEE bits of float32 ``x`` as int64 in [0, 2**32)."""
    return x.view(torch.int32).to(torch.int64) & MASK32


def stochastic_round_bf16(x: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to bfloat16 stochastically (docs/spec.md section 3.1), as float32:
    the upper 16 bits of the Philox ``word`` are added to the low 16 bits of x's bits and the low
    16 bits are dropped, so |x| goes up to the next bfloat16 with probability distance / ulp.
    Non-finite values are left as they are (the store rounds them to nearest)."""
    bits = (_float32_bits(x) + (word >> 16)) & 0xFFFF0000
    rounded = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


def stochastic_round_fp16(x: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to float16 stochastically (docs/spec.md section 3.1), as float32:
    lo = |x| rounded toward zero to float16, hi the next float16 away from zero (65536 above the
    largest, i.e. inf); hi is taken when u < (|x| - lo) / (hi - lo), with u = (word >> 8) / 2**24.
    Every operation is exact in float32.  Non-finite values are left as they are."""
    a = x.abs()
    nearest = a.to(torch.float16)
    lo_bits = nearest.view(torch.int16).to(torch.int64) - (nearest.to(torch.float32) > a).to(torch.int64)
    lo = lo_bits.to(torch.int16).view(torch.float16).to(torch.float32)
    # 1 / ulp of float16 at lo: 2**(25 - max(e, 1)) for lo's exponent field e, built from its bits
    inv_ulp = ((152 - (lo_bits >> 10).clamp(min=1)) << 23).to(torch.int32).view(torch.float32)
    u = (word >> 8).to(torch.float32) * 2.0**-24
    out = lo_bits + (u < (a - lo) * inv_ulp).to(torch.int64)
    out = torch.where(torch.signbit(x), out | 0x8000, out)
    rounded = torch.where(out >= 2**15, out - 2**16, out).to(torch.int16).view(torch.float16).to(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


#: the storage dtypes rounded stochastically, and how
STOCHASTIC_ROUNDING = {torch.bfloat16: stochastic_round_bf16, torch.float16: stochastic_round_fp16}


def round_stochastically(seg: "Segments", x: torch.Tensor, dtypes: List[torch.dtype], word: torch.Tensor,
                         name: str) -> torch.Tensor:
    """The flat float32 ``x`` of segment ``seg`` with each element of a bfloat16 / float16 tensor
    (``dtypes``: the storage dtypes of the segment's members) rounded stochastically to its dtype
    with its Philox ``word``; elements of other tensors unchanged.  The result is exact in the
    storage dtypes, so the store's rounding leaves it as it is."""
    reduced = [d for d in dict.fromkeys(dtypes) if d in STOCHASTIC_ROUNDING]
    if seg.dtype != torch.float32 or not reduced:
        return x
    for dtype in reduced:
        rounded = STOCHASTIC_ROUNDING[dtype](x, word)
        x = rounded if len(reduced) == 1 and all(d == dtype for d in dtypes) else torch.where(
            seg.dtype_mask(name, dtype, dtypes), rounded, x)
    return x


# --------------------------------------------------------------------------------------------
# The flat workspace
# --------------------------------------------------------------------------------------------


class Segments:
    """The tensors of one arithmetic dtype laid end to end in flat buffers.

    ``members`` are the tensors' positions in the group's list; tensor ``members[j]`` occupies
    ``[starts[j], starts[j] + numel)`` of each buffer, with ``strides[j]`` (its own strides if
    it is dense, else contiguous ones)."""

    def __init__(self, dtype, device, members, shapes, strides, numels, offsets, n_tensors, index_rows=None):
        self.dtype, self.device = dtype, device
        self.members = members
        self.shapes, self.strides = shapes, strides
        self.starts, start = [], 0
        for n in numels:
            self.starts.append(start)
            start += n
        self.numel = start
        # built once per layout: no host-to-device copy at step time
        self.lengths = torch.tensor(numels, dtype=torch.int64, device=device)
        self.index_shift = torch.tensor([offsets[j] - s for j, s in zip(members, self.starts)], dtype=torch.int64,
                                        device=device)
        every = len(members) == n_tensors
        self.select = None if every else torch.tensor(members, dtype=torch.int64, device=device)
        # shards that are not one row-major range (GroupTensors.index_rows): (inner, extra) per member
        rows = None if index_rows is None else [index_rows[j] for j in members]
        self.index_rows = None if rows is None or all(e == 0 for _, e in rows) else (
            torch.tensor(self.starts, dtype=torch.int64, device=device),
            torch.tensor([i for i, _ in rows], dtype=torch.int64, device=device),
            torch.tensor([e for _, e in rows], dtype=torch.int64, device=device))
        self._buffers = {}

    def buffer(self, name: str) -> Tuple[torch.Tensor, Tensors]:
        """The flat buffer ``name`` and its per-tensor views (allocated on first use, then kept)."""
        cached = self._buffers.get(name)
        if cached is None:
            flat = torch.empty(self.numel, dtype=self.dtype, device=self.device)
            views = [flat.as_strided(shape, stride, start) for shape, stride, start in
                     zip(self.shapes, self.strides, self.starts)]
            cached = self._buffers[name] = (flat, views)
        return cached

    def expand(self, per_tensor: torch.Tensor) -> torch.Tensor:
        """A per-tensor value (indexed by position in the group's list) repeated over each
        tensor's elements: flat [numel]."""
        if self.select is not None:
            per_tensor = per_tensor.index_select(0, self.select)
        return torch.repeat_interleave(per_tensor, self.lengths, output_size=self.numel)

    def coordinate_index(self) -> torch.Tensor:
        """Each element's Philox index: its tensor's offset in the whole group plus its memory
        position l in the tensor, plus (l // inner) * extra for a shard that is not one row-major range of its
        parameter (GroupTensors.index_rows) (int64 flat [numel])."""
        position = torch.arange(self.numel, dtype=torch.int64, device=self.device)
        index = position + torch.repeat_interleave(self.index_shift, self.lengths, output_size=self.numel)
        if self.index_rows is not None:
            starts, inner, extra = (torch.repeat_interleave(x, self.lengths, output_size=self.numel)
                                    for x in self.index_rows)
            index = index + torch.div(position - starts, inner, rounding_mode="floor") * extra
        return index

    def tensor_index(self) -> torch.Tensor:
        """Flat int64 [numel]: each element's tensor, by position in the group's list (built once per layout)."""
        index = self._buffers.get("tensor_index")
        if index is None:
            members = torch.tensor(self.members, dtype=torch.int64, device=self.device)
            index = self._buffers["tensor_index"] = torch.repeat_interleave(members, self.lengths,
                                                                            output_size=self.numel)
        return index

    def dtype_mask(self, name: str, dtype: torch.dtype, dtypes: List[torch.dtype]) -> torch.Tensor:
        """Flat bool [numel]: the elements of members whose storage dtype (``dtypes``, one per member, of
        buffer ``name``) is ``dtype``; built once per layout (stochastic rounding of mixed segments)."""
        key = ("dtype_mask", name, dtype)
        mask = self._buffers.get(key)
        if mask is None:
            flags = torch.tensor([d == dtype for d in dtypes], dtype=torch.bool, device=self.device)
            mask = self._buffers[key] = torch.repeat_interleave(flags, self.lengths, output_size=self.numel)
        return mask


class Workspace:
    """Everything a step needs that depends only on the group's layout: the segments of each
    arithmetic dtype, and cached index tensors and constants."""

    def __init__(self, t: GroupTensors):
        device = t.device
        n = len(t.grads)
        states = [b for b in (t.first_moments, t.exp_avg_sqs, t.max_exp_avg_sqs) if b is not None]
        dtypes = [opmath_dtype(g.dtype, p.dtype, *(b[i].dtype for b in states))
                  for i, (g, p) in enumerate(zip(t.grads, t.params))]
        self.device = device
        self.n_tensors = n
        self.segments: List[Segments] = []
        for dtype in (torch.float32, torch.float64):
            members = [i for i in range(n) if dtypes[i] == dtype]
            if not members:
                continue
            grads = [t.grads[i] for i in members]
            strides = [torch.empty_like(g, dtype=dtype, device="meta").stride() for g in grads]  # dense: kept
            self.segments.append(Segments(dtype, device, members, [tuple(g.shape) for g in grads], strides,
                                          [g.numel() for g in grads], t.offsets, n, t.index_rows))
        self.numel = sum(s.numel for s in self.segments)
        #: norms, thresholds and scales: float64 for a float64 group, else float32 (a group mixing
        #: float64 with other dtypes keeps float32 norms, so each tensor's layer-scope step is the
        #: one it would take alone)
        self.norm_dtype = (torch.float64 if self.segments and all(s.dtype == torch.float64 for s in self.segments)
                           else torch.float32)
        order = [i for s in self.segments for i in s.members]
        self._order = None if order == list(range(n)) else sorted(range(n), key=order.__getitem__)
        self.columns = torch.tensor(t.columns, dtype=torch.int64, device=device)
        self.zero_index = torch.zeros(1, dtype=torch.int64, device=device)
        self.nan = torch.full((), float("nan"), dtype=torch.float32, device=device)
        self.inf = torch.full((), float("inf"), dtype=torch.float32, device=device)
        self.zero = torch.zeros((), dtype=torch.float32, device=device)
        self.true = torch.ones((), dtype=torch.bool, device=device)
        self._views = {}
        self._shapes = [tuple(g.shape) for g in t.grads]
        self._unit_offsets = None if t.unit_offsets is None else list(t.unit_offsets)
        self._units: Optional[UnitLayout] = None
        self._numels: Optional[torch.Tensor] = None

    def tensor_numels(self) -> torch.Tensor:
        """float64 [n]: max(numel, 1) of each tensor, by position in the group's list (built once per layout)."""
        if self._numels is None:
            self._numels = torch.tensor([max(math.prod(shape), 1) for shape in self._shapes], dtype=torch.float64,
                                        device=self.device)
        return self._numels

    def units(self) -> UnitLayout:
        """The element -> output unit map of unit scope (built on first use, then kept)."""
        if self._units is None:
            self._units = UnitLayout(self.segments, self._shapes, self._unit_offsets, self.device)
        return self._units

    def views(self, name: str) -> Tensors:
        """The views of buffer ``name`` of every segment, in the group's tensor order."""
        views = self._views.get(name)
        if views is None:
            views = [v for s in self.segments for v in s.buffer(name)[1]]
            views = self._views[name] = views if self._order is None else [views[j] for j in self._order]
        return views

    def flats(self, name: str) -> Tensors:
        return [s.buffer(name)[0] for s in self.segments]

    def load(self, name: str, tensors: Tensors) -> Tensors:
        """Copy ``tensors`` (the group's list) into buffer ``name``; returns its flats."""
        for s in self.segments:
            flat, views = s.buffer(name)
            torch._foreach_copy_(views, tensors if s.select is None else [tensors[i] for i in s.members])
        return self.flats(name)

    def store(self, name: str, tensors: Tensors) -> None:
        """Copy buffer ``name`` back into ``tensors``, rounding once to their dtypes."""
        for s in self.segments:
            torch._foreach_copy_(tensors if s.select is None else [tensors[i] for i in s.members], s.buffer(name)[1])


_workspaces = WeakIdKeyDictionary()
_SLOT = "reference_workspace"


def _layout_key(t: GroupTensors) -> tuple:
    """Everything a workspace depends on: O(1) Python work per tensor, no torch operation."""
    return (
        t.device, tuple(t.columns), tuple(t.offsets),
        tuple((g.dtype, p.dtype, g.shape, g.stride()) for g, p in zip(t.grads, t.params)),
        *(None if b is None else tuple(x.dtype for x in b)
          for b in (t.first_moments, t.exp_avg_sqs, t.max_exp_avg_sqs)),
        None if t.unit_offsets is None else tuple(t.unit_offsets),
        None if t.index_rows is None else tuple(t.index_rows),
    )


def workspace(t: GroupTensors) -> Workspace:
    """The cached workspace of the group's current layout; new gradient tensors of the same shapes,
    strides and dtypes reuse it.

    Under the optimizer, ``t.backend_cache`` is the group's slot, kept while the optimizer's
    per-step layout check (same parameters with gradients, gradients with their parameters'
    dtypes, sizes and strides) holds: the workspace found there is used as it is.  Otherwise
    (``clip_gradients_``, a new slot) it is looked up by its full layout key among the few kept
    for the group's first parameter, as long as that parameter lives."""
    slot = t.backend_cache
    quick = (t.device, t.first_moments is None, t.exp_avg_sqs is None, t.max_exp_avg_sqs is None)
    if slot is not None:
        cached = slot.get(_SLOT)
        if cached is not None and cached[0] == quick:
            return cached[1]
    per_group = _workspaces.get(t.params[0])
    if per_group is None:
        per_group = _workspaces[t.params[0]] = OrderedDict()
    key = _layout_key(t)
    ws = per_group.get(key)
    if ws is None:
        ws = per_group[key] = Workspace(t)
        while len(per_group) > LAYOUTS_PER_GROUP:
            per_group.popitem(last=False)
    else:
        per_group.move_to_end(key)
    if slot is not None:
        slot[_SLOT] = (quick, ws)
    return ws


def load_gradients(ws: Workspace, t: GroupTensors, maximize: bool = False) -> Tensors:
    """The gradients in the workspace's "g" buffer: g = grad (negated if maximize), divided by
    the GradScaler's scale.  Returns the flats of each segment."""
    flats = ws.load("g", t.grads)
    if maximize:
        for g in flats:
            g.neg_()
    if t.grad_scale is not None:
        inv = t.grad_scale.to(device=ws.device, dtype=torch.float32).reciprocal()
        for g in flats:
            g.mul_(inv)
    return flats


# --------------------------------------------------------------------------------------------
# Stage 1: norms
# --------------------------------------------------------------------------------------------


@dataclass
class Norms:
    """Output of the ``norms`` stage."""

    per_tensor: Optional[torch.Tensor]  # float32 [n]: ||x_i||; None when not computed
    total: torch.Tensor  # float32 []: sqrt(sum_i ||x_i||^2); NaN when not computed
    ok: torch.Tensor  # bool []: every gradient element finite and no inf found by the GradScaler
    units: Optional[torch.Tensor] = None  # unit scope: [U], ||x_u|| of each output unit (units.py)
    weights: Optional[torch.Tensor] = None  # relative threshold: ||w|| at the method's scope ([U], [n] or [1])
    # the same norms in float64 (finite for a finite gradient, where float32 ones may be +inf)
    per_tensor64: Optional[torch.Tensor] = None
    total64: Optional[torch.Tensor] = None
    units64: Optional[torch.Tensor] = None


def finite_flag(ws: Workspace, flats: Tensors, check: bool, found_inf: Optional[torch.Tensor]) -> torch.Tensor:
    """ok = all_i isfinite(g_i) (when ``check``) and found_inf == 0 (under a GradScaler)."""
    ok = ws.true
    if check:
        for g in flats:
            ok = ok & torch.isfinite(g).all()
    if found_inf is not None:
        ok = ok & (found_inf.to(ws.device) == 0)
    return ok


def norms(ws: Workspace, buffer: str, with_norms: bool, ok: torch.Tensor, norm_type: float = 2.0) -> Norms:
    """Stage 1: ||x_i|| of each tensor of workspace buffer ``buffer`` (one foreach reduction
    over the cached views) and the global norm sqrt(sum_i ||x_i||^2), float32 (float64 for float64 groups);
    p-norms for ``norm_type`` p (``exact_norms``)."""
    if not with_norms:
        return Norms(None, ws.nan, ok)
    per_tensor, total = exact_norms(ws.views(buffer), norm_type)
    return Norms(per_tensor.to(ws.norm_dtype), total.to(ws.norm_dtype), ok, per_tensor64=per_tensor, total64=total)


def given_norms(ws: Workspace, given: torch.Tensor, ok: torch.Tensor, norm_type: float = 2.0) -> Norms:
    """Stage 1's norms given (float32 or float64 [n + 1]: per-tensor, then global; e.g. reduced
    across ranks), in the group's norm dtype and in float64.  A global norm given as +inf (past
    float32's range) takes, in float64, the per-tensor norms' sqrt(sum_i ||x_i||^2) when that is finite
    ((sum_i ||x_i||_p^p)^(1/p), or their max, for ``norm_type`` p)."""
    per_tensor, total = given[:-1].to(torch.float64), given[-1].to(torch.float64)
    summed = total_norm(per_tensor, norm_type)
    total64 = torch.where(torch.isinf(total) & torch.isfinite(summed), summed, total)
    return Norms(given[:-1].to(ws.norm_dtype), given[-1].to(ws.norm_dtype), ok, per_tensor64=per_tensor,
                 total64=total64)


def write_norms(n: Norms, out: torch.Tensor) -> None:
    """The per-tensor norms then the global norm into ``out`` (float32 or float64 [n + 1])."""
    if out.dtype == torch.float64:
        torch.cat([n.per_tensor64, n.total64.reshape(1)], out=out)
    else:
        torch.cat([n.per_tensor, n.total.reshape(1)], out=out)


def agc_norms(ws: Workspace, x: Tensors, p: Optional[Tensors], n: Norms, cfg: GroupConfig) -> Norms:
    """Stage 1's norms of unit scope and of the relative threshold (adaptive gradient clipping, Brock et
    al., 2021), added to ``n``: at unit scope ||x_u|| of each output unit of the flats ``x``; with the
    relative threshold ||w|| of the parameters (flats ``p``, workspace buffer "p") over the method's scope:
    each unit, each tensor, or all of them (sqrt(sum_i ||w_i||^2)).  ``n`` itself when the method needs
    neither."""
    method = cfg.clip.method
    unit, relative = method.scope is Scope.UNIT, cfg.clip.policy.needs_weights
    if not (unit or relative):
        return n
    units64 = ws.units().exact_norms(x) if unit else None
    weights = None
    if relative:
        if p is None:
            raise ValueError("reference backend: the relative threshold needs the parameters")
        if unit:
            weights = ws.units().norms(p, ws.norm_dtype)
        else:
            per_tensor, total = grad_norms(ws.views("p"), ws.norm_dtype)
            weights = per_tensor if method.scope is Scope.LAYER else total.reshape(1)
    return replace(n, units=None if units64 is None else units64.to(ws.norm_dtype), units64=units64, weights=weights)


def given_agc_norms(ws: Workspace, sums: torch.Tensor, n: Norms, cfg: GroupConfig) -> Norms:
    """``agc_norms`` from given float64 sums of squares (GroupTensors.given_sums, reduced across ranks): at unit
    scope ||x_u|| = sqrt(sums[u]) for the U units, then with the relative threshold ||w_u|| = sqrt(sums[U + u]);
    with the relative threshold at layer / global scope ||w_i|| = sqrt(sums[i]) / sqrt(sum_i sums[i])."""
    method = cfg.clip.method
    unit, relative = method.scope is Scope.UNIT, cfg.clip.policy.needs_weights
    if not (unit or relative):
        return n
    sums = sums.to(device=ws.device, dtype=torch.float64)
    count = ws.units().count if unit else len(ws.columns)
    expected = count * (2 if unit and relative else 1)
    if sums.numel() != expected:
        raise ValueError(f"reference backend: given_sums has {sums.numel()} elements, expected {expected} "
                         f"({'units' if unit else 'tensors'}: {count}, method {method.name!r})")
    units64 = sums[:count].sqrt() if unit else None
    weights = None
    if relative:
        if unit:
            weights = sums[count:].sqrt().to(ws.norm_dtype)
        elif method.scope is Scope.LAYER:
            weights = sums.sqrt().to(ws.norm_dtype)
        else:
            weights = sums.sum().sqrt().to(ws.norm_dtype).reshape(1)
    return replace(n, units=None if units64 is None else units64.to(ws.norm_dtype), units64=units64, weights=weights)


# --------------------------------------------------------------------------------------------
# Stage 2: scales
# --------------------------------------------------------------------------------------------


@dataclass
class Scales:
    """Output of the ``scales`` stage: what ``apply`` multiplies by, and the step's statistics."""

    scope: Optional[Scope]  # None: no clipping
    tensor_scales: Optional[torch.Tensor]  # float32 [1] (global), [n] (layer) or [U] (unit: per output unit)
    # (float32 groups) the scales are tensor_pre * tensor_scales, the two float32 factors of split_scales
    coordinate_clip: Optional[Tensors]  # coordinate scope: bool flat per segment, clipped elements
    level: float  # eta of coordinate scope
    threshold: torch.Tensor  # float32 []: eta (mean over tensors / units at layer / unit scope; inf without clipping)
    clipped_fraction: torch.Tensor  # float32 []: share of scopes (tensors, units, elements) clipped
    tensor_pre: Optional[torch.Tensor] = None
    # the scales as taken (float64 for float32 norms): [1], [n] or [U] as tensor_scales, before split_scales
    scale_values: Optional[torch.Tensor] = None


def scales(ws: Workspace, x: Tensors, n: Norms, cfg: GroupConfig, t: GroupTensors, key: torch.Tensor) -> Scales:
    """Stage 2, with ||x|| the norm at the method's scope (global norm, tensor norm, output unit's
    norm ||x_u|| or |x_i|):

    * eta = clipping_level, or (auto) the nearest-rank p-quantile of the norms recorded so far
      at that scope, the current one included (recorded only if ``ok`` and finite), or the
      policy's (zscore, ema_relative), or (relative, AGC) clipping_level * max(||w||, agc_eps);
    * alpha = eta / ||x||; without randomization s = min(1, alpha); randomized, with u drawn from
      Philox at (seed, step, index) (index 0, the tensor's column, the unit's position
      ``unit_offsets[i] + u`` among the group's units, or the element's offset):
      s = alpha if ||x|| > eta and u < beta**alpha (linear) or beta**(alpha**2) (quadratic);
    * coordinate scope: the clipped elements become sign(x_i) eta.
    """
    method = cfg.clip.method
    if not method.clips:
        return Scales(None, None, None, cfg.clip.level, ws.inf, ws.zero)
    if method.scope is Scope.COORDINATE:
        masks, clipped = [], None
        for s, xs in zip(ws.segments, x):
            index = s.coordinate_index() if method.randomized else None
            mask = coordinate_decisions(xs, cfg.clip.level, method.randomization, cfg.clip.beta, key, index)
            masks.append(mask)
            count = mask.sum()
            clipped = count if clipped is None else clipped + count
        fraction = clipped.to(torch.float32) / max(ws.numel, 1)
        threshold = torch.full((), cfg.clip.level, dtype=torch.float32, device=ws.device)
        return Scales(method.scope, None, masks, cfg.clip.level, threshold, fraction)
    if method.scope is Scope.GLOBAL:
        scope_norms, columns, index = n.total.reshape(1), ws.zero_index, ws.zero_index
        exact = None if n.total64 is None else n.total64.reshape(1)
    elif method.scope is Scope.LAYER:
        scope_norms, columns, index, exact = n.per_tensor, ws.columns, ws.columns, n.per_tensor64
    elif method.scope is Scope.UNIT:
        if method.threshold not in (Threshold.CONSTANT, Threshold.RELATIVE):
            raise ValueError(f"reference backend: threshold {method.threshold!r} is not offered at unit scope")
        units = ws.units()
        if method.randomized and units.index is None:
            raise ValueError("reference backend: randomized unit-scope clipping needs GroupTensors.unit_offsets")
        scope_norms, columns, index, exact = n.units, None, units.index, n.units64
        if units.count == 0:  # no unit at all (every tensor has shape[0] == 0): nothing to clip
            return Scales(method.scope, scope_norms, None, cfg.clip.level, ws.inf, ws.zero)
    else:
        raise ValueError(f"reference backend: no clipping scope {method.scope!r}")
    exact_total = None if exact is None or n.total64 is None else (exact, n.total64)
    eta = policy(method.threshold).reference(ThresholdInputs(scope_norms, columns, n.ok, cfg.clip, t.threshold_state,
                                                             n.total, exact_total, n.weights))
    tensor_scales, clip = norm_scales(scope_norms, eta, method.randomization, cfg.clip.beta, key, index, exact)
    pre, post = split_scales(tensor_scales, ws.norm_dtype)
    return Scales(method.scope, post, None, cfg.clip.level, eta.mean(), clip.to(torch.float32).mean(), pre,
                  tensor_scales)


def clip_flats(ws: Workspace, x: Tensors, s: Scales) -> Tensors:
    """x' = s * x for each segment's flat x (s = pre * post: x * pre * post, split_scales), or
    sign(x_i) eta at the clipped coordinates."""
    if s.scope is None:
        return list(x)
    out = []
    for j, (seg, xs) in enumerate(zip(ws.segments, x)):
        if s.scope is Scope.COORDINATE:
            out.append(torch.where(s.coordinate_clip[j], torch.copysign(torch.full_like(xs, s.level), xs), xs))
            continue
        if s.scope is Scope.GLOBAL:
            expand = lambda per_scope: per_scope[0]  # noqa: E731
        elif s.scope is Scope.UNIT:
            expand = lambda per_scope: ws.units().expand(j, per_scope)  # noqa: E731
        else:
            expand = seg.expand
        pre = xs if s.tensor_pre is None else xs * expand(s.tensor_pre)
        out.append(pre * expand(s.tensor_scales))
    return out


# --------------------------------------------------------------------------------------------
# Stage 3: apply
# --------------------------------------------------------------------------------------------


def apply(
    ws: Workspace, x: Tensors, s: Scales, n: Norms, cfg: GroupConfig, t: GroupTensors,
    p: Tensors, m: Optional[Tensors], ready: Optional[Tensors], new_m: Optional[Tensors] = None,
    v: Optional[Tensors] = None, vmax: Optional[Tensors] = None,
) -> None:
    """Stage 3: x' = s * x, then the update rule (``sgd_apply``, or ``adamw_apply`` with the second
    moments ``v`` and amsgrad's maxima ``vmax``), which moves nothing on a skipped step; then the
    statistics, skip count and step count updated."""
    ok = n.ok
    skip = cfg.nonfinite is not NonFinite.APPLY or t.found_inf is not None  # else ok is constant true
    lr = cfg.update.lr.reshape(()) if isinstance(cfg.update.lr, torch.Tensor) else cfg.update.lr
    clipped = clip_flats(ws, x, s)
    if cfg.update.code == UPDATE_CODES["adamw"]:
        adamw_apply(ws, clipped, ok, skip, lr, cfg, t, p, m, v, vmax)
    else:
        sgd_apply(ws, clipped, ok, skip, lr, cfg, t, p, m, ready, new_m)
    skipped = ~ok
    # a skipped step clips nothing
    stats = torch.stack([n.total, s.threshold, s.clipped_fraction * ok, skipped.to(torch.float32)])
    t.stats.copy_(stats)
    if t.tensor_stats is not None:
        write_tensor_stats(ws, n, s, ok, t.tensor_stats)
    t.skipped.add_(skipped.to(t.skipped.dtype))
    t.step.add_(1)


def write_tensor_stats(ws: Workspace, n: Norms, s: Scales, ok: torch.Tensor, out: torch.Tensor) -> None:
    """The step's per-tensor telemetry (torch_clip_fused/tensor_stats.py) into ``out`` (float32 [2, G]) at
    the tensors' columns: ||x_i|| (NaN without a norm stage) and the scale each tensor took (global: the
    one scale; layer: its own; unit: the fraction of its units with a scale below 1; coordinate: the
    fraction of its elements clipped; no clipping: 1); a skipped step's scales 1 (fractions 0)."""
    count = ws.n_tensors
    norms = n.per_tensor if n.per_tensor is not None else ws.nan.expand(count)
    fraction = s.scope in (Scope.UNIT, Scope.COORDINATE)
    if s.scope is None:
        scales = torch.ones(count, dtype=torch.float32, device=ws.device)
    elif s.scope is Scope.GLOBAL:
        scales = s.scale_values.expand(count)
    elif s.scope is Scope.LAYER:
        scales = s.scale_values
    elif s.scope is Scope.UNIT:
        if s.scale_values is None:  # no unit at all
            scales = torch.zeros(count, dtype=torch.float64, device=ws.device)
        else:
            scales = ws.units().per_tensor_fraction(s.scale_values < 1)
    else:
        scales = torch.zeros(count, dtype=torch.float64, device=ws.device)
        for seg, mask in zip(ws.segments, s.coordinate_clip):
            scales.index_add_(0, seg.tensor_index(), mask.to(torch.float64))
        scales = scales / ws.tensor_numels()
    write_columns(out, ws.columns, norms, skipped_scales(scales, ok, fraction))


def sgd_apply(
    ws: Workspace, clipped: Tensors, ok: torch.Tensor, skip: bool, lr, cfg: GroupConfig, t: GroupTensors,
    p: Tensors, m: Optional[Tensors], ready: Optional[Tensors], new_m: Optional[Tensors],
) -> None:
    """The SGD rule on the clipped flats: with clip_point="grad" they are the gradient and the SGD
    direction d and momentum m' are computed from them; with "update" they are d itself and m' is
    ``new_m``.  Then p' = p - lr d, and p = where(ok, p', p), m = where(ok, m', m) on the flat buffers
    (a skipped step moves nothing), written back to the parameters and buffers (rounded once: to
    nearest, or with ``stochastic_rounding`` stochastically for bfloat16 / float16 tensors,
    docs/spec.md section 3.1); momentum marked ready."""
    stochastic = cfg.update.stochastic_rounding
    key = philox_key(t.seed, t.step) if stochastic else None
    for j in range(len(ws.segments)):
        mj = None if m is None else m[j]
        if cfg.clip.clip_point is ClipPoint.GRAD:
            d, new_mj = sgd_direction(clipped[j], p[j], mj, None if ready is None else ready[j], cfg)
        else:
            d, new_mj = clipped[j], None if new_m is None else new_m[j]
        new_p = p[j] - d * lr
        if stochastic:  # docs/spec.md section 3.1: p and m rounded to bfloat16 / float16 stochastically
            seg = ws.segments[j]
            p_dtypes = [t.params[i].dtype for i in seg.members]
            m_dtypes = [] if new_mj is None else [t.first_moments[i].dtype for i in seg.members]
            if seg.dtype == torch.float32 and any(d in STOCHASTIC_ROUNDING for d in p_dtypes + m_dtypes):
                words = philox_words(key, seg.coordinate_index() + SR_INDEX)  # word 0: p, word 1: m
                new_p = round_stochastically(seg, new_p, p_dtypes, words[0], "p")
                if new_mj is not None:
                    new_mj = round_stochastically(seg, new_mj, m_dtypes, words[1], "m")
        if skip:
            torch.where(ok, new_p, p[j], out=p[j])
        else:
            p[j].copy_(new_p)
        if new_mj is not None:
            if skip:
                torch.where(ok, new_mj, mj, out=mj)
            else:
                mj.copy_(new_mj)
    ws.store("p", t.params)
    if m is not None:
        ws.store("m", t.first_moments)
        t.momentum_ready[ws.columns] = t.momentum_ready[ws.columns] | ok


def adamw_apply(
    ws: Workspace, clipped: Tensors, ok: torch.Tensor, skip: bool, lr, cfg: GroupConfig, t: GroupTensors,
    p: Tensors, m: Tensors, v: Tensors, vmax: Optional[Tensors],
) -> None:
    """The AdamW rule (adamw.py) on the clipped gradient flats: per tensor t = adam_steps + 1 and the
    bias corrections, expanded over its elements; then p, m (exp_avg), v (exp_avg_sq) and vmax
    (amsgrad) = where(ok, new, old) on the flat buffers and written back (rounded once to their
    dtypes), and adam_steps = t at the tensors' columns where ok (a skipped step moves nothing)."""
    update = cfg.update
    if update.amsgrad and vmax is None:
        raise ValueError("reference backend: AdamW with amsgrad needs GroupTensors.max_exp_avg_sqs")
    steps, step_size, bc2_sqrt = bias_corrections(t.adam_steps, ws.columns, lr, update.beta1, update.beta2)
    decay = decay_factor(lr, update.weight_decay)
    for j, seg in enumerate(ws.segments):
        vmax_j = None if vmax is None else vmax[j]
        new = adamw_update(clipped[j], p[j], m[j], v[j], vmax_j, seg.expand(step_size.to(seg.dtype)),
                           seg.expand(bc2_sqrt.to(seg.dtype)), decay, update)
        for old, value in zip((p[j], m[j], v[j], vmax_j), new):
            if value is None:
                continue
            if skip:
                torch.where(ok, value, old, out=old)
            else:
                old.copy_(value)
    ws.store("p", t.params)
    ws.store("m", t.first_moments)
    ws.store("v", t.exp_avg_sqs)
    if vmax is not None:
        ws.store("vmax", t.max_exp_avg_sqs)
    if skip:
        steps = torch.where(ok, steps, t.adam_steps.index_select(0, ws.columns))
    t.adam_steps.index_copy_(0, ws.columns, steps)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_step(t: GroupTensors, cfg: GroupConfig) -> None:
    """One ClippedSGD or ClippedAdamW step of one param group, in place (params, momentum or AdamW's
    moments, and group state)."""
    code = cfg.update.code
    if code not in (UPDATE_CODES["sgd"], UPDATE_CODES["adamw"]):
        raise ValueError(f"reference backend: no update rule with code {code!r} in a step")
    adamw = code == UPDATE_CODES["adamw"]
    method = cfg.clip.method
    if cfg.clip.clip_point is not ClipPoint.GRAD and (adamw or method.scope is Scope.UNIT
                                                      or cfg.clip.policy.needs_weights):
        raise ValueError(f"reference backend: clip_point={cfg.clip.clip_point.value!r} is not offered with "
                         f"{'AdamW' if adamw else repr(method.name)}")
    ws = workspace(t)
    key = philox_key(t.seed, t.step)
    g = load_gradients(ws, t, cfg.update.maximize)
    # nonfinite="raise" was checked by the optimizer before any group moved: here it skips
    ok = finite_flag(ws, g, cfg.nonfinite is not NonFinite.APPLY, t.found_inf)
    if isinstance(cfg.update.lr, torch.Tensor):  # a tensor lr gone bad during training skips the step
        lr = cfg.update.lr.reshape(()).to(ws.device)
        ok = ok & torch.isfinite(lr) & (lr >= 0)
    p = ws.load("p", t.params)
    m = ready = v = vmax = None
    if adamw:  # exp_avg, exp_avg_sq and amsgrad's max_exp_avg_sq
        m, v = ws.load("m", t.first_moments), ws.load("v", t.exp_avg_sqs)
        vmax = ws.load("vmax", t.max_exp_avg_sqs) if cfg.update.amsgrad else None
    elif cfg.update.momentum != 0:
        m = ws.load("m", t.first_moments)
        flags = t.momentum_ready[ws.columns]
        ready = [seg.expand(flags) for seg in ws.segments]
    given = t.given_norms  # reduced across ranks (a sharded group): the norm stage is not run here
    if given is not None and cfg.nonfinite is not NonFinite.APPLY:
        ok = ok & ~torch.isnan(given[-1])  # a NaN global norm: a non-finite gradient on some rank
    if cfg.clip.clip_point is ClipPoint.GRAD:
        p_norm = cfg.clip.norm_type
        n = norms(ws, "g", cfg.needs_norms, ok, p_norm) if given is None else given_norms(ws, given, ok, p_norm)
        n = agc_norms(ws, g, p, n, cfg) if t.given_sums is None else given_agc_norms(ws, t.given_sums, n, cfg)
        apply(ws, g, scales(ws, g, n, cfg, t, key), n, cfg, t, p, m, ready, v=v, vmax=vmax)
        return
    new_m = None if m is None else []
    for j in range(len(ws.segments)):
        d, mj = sgd_direction(g[j], p[j], None if m is None else m[j], None if ready is None else ready[j], cfg)
        if d is not g[j]:
            g[j].copy_(d)  # the "g" buffer now holds d: its norms are taken through the cached views
        if new_m is not None:
            new_m.append(mj)
    p_norm = cfg.clip.norm_type
    n = norms(ws, "g", True, ok, p_norm) if given is None else given_norms(ws, given, ok, p_norm)
    apply(ws, g, scales(ws, g, n, cfg, t, key), n, cfg, t, p, m, ready, new_m)


# --------------------------------------------------------------------------------------------
# Gradient clipping alone (clip_gradients_ and older callers)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_clip(t: GroupTensors, cfg: GroupConfig, norms_out: torch.Tensor, stage: str) -> None:
    """The functional API's stages on ``t.grads`` (``cfg.update`` is the clip-only rule):

    * ``"norms"``: stage ``norms``; ``norms_out`` (float32 [T + 1]) gets ||g_i|| then ||g||;
    * ``"clip"``:  stages ``scales`` and ``apply`` (g = s(g) * g written back) with the norms given
      in ``norms_out`` (e.g. reduced across ranks); advances ``t.step``;
    * ``"both"``:  the two in a row.

    At unit scope the units' norms, and with the relative threshold the parameters' (``t.params``),
    are taken from the tensors themselves before stage ``scales`` (they are not in ``norms_out``), or at
    stage ``"clip"`` from ``t.given_sums`` where given (a sharded list's, reduced across ranks).
    """
    ws = workspace(t)
    g = load_gradients(ws, t)
    ok = finite_flag(ws, g, cfg.nonfinite is not NonFinite.APPLY, None)
    if stage == "clip":
        n = given_norms(ws, norms_out, ok, cfg.clip.norm_type)
    else:
        n = norms(ws, "g", True, finite_flag(ws, g, True, None), cfg.clip.norm_type)
        write_norms(n, norms_out)
        if stage == "norms":
            return
    relative = cfg.clip.policy.needs_weights
    if stage == "clip" and t.given_sums is not None:  # reduced across ranks (a sharded list)
        n = given_agc_norms(ws, t.given_sums, n, cfg)
    else:
        n = agc_norms(ws, g, ws.load("p", t.params) if relative else None, n, cfg)
    s = scales(ws, g, n, cfg, t, philox_key(t.seed, t.step))
    for flat, clipped in zip(g, clip_flats(ws, g, s)):
        if clipped is not flat:
            flat.copy_(clipped)
    ws.store("g", t.grads)
    t.stats.copy_(torch.stack([n.total, s.threshold, s.clipped_fraction, ws.zero]))
    t.step.add_(1)


def clip_list(src: Tensors, cfg: GroupConfig, t: GroupTensors, norms_, total, key, record_ok, stats) -> Tensors:
    """Apply the group's clipping method to the list ``src`` (tensors of ``t.params``' shapes),
    given their norms; fills stats[0:3] and returns new tensors.  Kept for older callers: the
    step itself works on the flat workspace."""
    ws = workspace(replace(t, grads=list(src), first_moments=None, backend_cache=None))
    x = ws.load("clip_list", list(src))
    relative = cfg.clip.policy.needs_weights
    n = agc_norms(ws, x, ws.load("p", t.params) if relative else None, Norms(norms_, total, record_ok), cfg)
    s = scales(ws, x, n, cfg, t, key)
    out = [c.clone() if c is xs else c for c, xs in zip(clip_flats(ws, x, s), x)]  # never the workspace itself
    flat_of = {i: flat for seg, flat in zip(ws.segments, out) for i in seg.members}
    stats[:3].copy_(torch.stack([total, s.threshold, s.clipped_fraction]))
    return [flat_of[i].as_strided(v.shape, v.stride(), v.storage_offset()) for i, v in enumerate(ws.views("clip_list"))]
