"""Pure-PyTorch reference of one ClippedSGD step (SPEC section 3): CPU fallback and test oracle.

Written for clarity, one function per stage, so that the C++ and Triton backends
can be checked stage by stage.  Element-wise arithmetic is float32 (float64 for float64
tensors), norms and thresholds float32; results are rounded once when written back.
Nothing here reads a value back to the host (``nonfinite="raise"`` is checked by the optimizer
before any backend runs; backends treat it as "skip").

One step, with g the gradient (negated if maximize, divided by the GradScaler's
scale), wd the weight decay, mu the momentum and tau the dampening:

    clip_point="grad":    g' = s(g) * g;  d = g' + wd p;  m = mu m + (1 - tau) d
                          (m = d on the first step);  d = d + mu m (nesterov) or m
    clip_point="update":  d from the raw g as above (m stored unclipped);  d = s(d) * d
    p = p - lr d
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch

from .config import GroupConfig, GroupTensors, NonFinite, ClipPoint
from .methods import Randomization, Scope
from .philox import philox_key, philox_uniform

Tensors = List[torch.Tensor]


@functools.lru_cache(maxsize=256)
def _cached_index(columns: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(columns, dtype=torch.int64, device=device)


def index_tensor(columns, device: torch.device) -> torch.Tensor:
    """An int64 tensor of ``columns`` on ``device``, made once per distinct list (a tensor built
    from a Python list is a host-to-device copy, which synchronises on CUDA)."""
    return _cached_index(tuple(columns), torch.device(device))


def opmath(x: torch.Tensor) -> torch.Tensor:
    """x in its arithmetic dtype: float64 stays, everything else becomes float32."""
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def grad_norms(tensors: Tensors) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor Euclidean norms (float32 [n]) and the global norm sqrt(sum_i ||g_i||^2), on
    the tensors' device."""
    if not tensors:
        raise ValueError("grad_norms needs at least one tensor")
    per_tensor = torch.stack([n.to(torch.float32) for n in torch._foreach_norm(tensors, 2)])
    return per_tensor, per_tensor.square().sum().sqrt()


def all_finite(tensors: Tensors) -> torch.Tensor:
    """Whether every element of every tensor is finite (bool [], on the tensors' device)."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def nearest_rank(history: torch.Tensor, count: torch.Tensor, p: float) -> torch.Tensor:
    """Column-wise p-quantile, nearest rank: the ceil(p n)-th smallest of the n = min(count,
    capacity) recorded values of each column of ``history`` [capacity, columns]."""
    capacity = history.shape[0]
    n = count.clamp(max=capacity)
    rows = torch.arange(capacity, device=history.device).unsqueeze(1)
    valid = rows < n.unsqueeze(0)
    ordered = torch.where(valid, history, torch.full_like(history, float("inf"))).sort(dim=0).values
    rank = torch.ceil(p * n.to(torch.float64)).to(torch.int64).clamp(min=1)
    rank = torch.minimum(rank, n.clamp(min=1))
    return ordered.gather(0, (rank - 1).unsqueeze(0)).squeeze(0)


def record_and_threshold(
    history: torch.Tensor, count: torch.Tensor, columns: torch.Tensor, norms: torch.Tensor, record: torch.Tensor, p: float
) -> torch.Tensor:
    """Append ``norms`` (one per column in ``columns``) where ``record`` is true, then return
    each column's nearest-rank p-quantile, the current norm included.  A column with no
    recorded norm yet uses the current norm (no clipping).  Updates history and count."""
    capacity = history.shape[0]
    row = count[columns] % capacity
    old = history[row, columns]
    history[row, columns] = torch.where(record, norms, old)
    count[columns] += record.to(count.dtype)
    eta = nearest_rank(history[:, columns], count[columns], p)
    return torch.where(count[columns] > 0, eta, norms)


def clip_probability(alpha: torch.Tensor, randomization: Randomization, beta: float) -> torch.Tensor:
    """P(clip) = beta**alpha (linear) or beta**(alpha**2) (quadratic), float32, computed as
    exp2(e * log2(beta)) with log2(beta) rounded to float32, as every backend does."""
    exponent = alpha if randomization is Randomization.LINEAR else alpha * alpha
    log2_beta = float(torch.tensor(math.log2(beta), dtype=torch.float32))  # rounded as the kernels' argument
    return torch.exp2(exponent * log2_beta)


def norm_scales(
    norms: torch.Tensor, eta: torch.Tensor, randomization: Randomization, beta: float, key: torch.Tensor, index: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scales s for norm-type scopes (global: one norm, index 0; layer: one per tensor,
    index = tensor's position in its group) and the clip decisions (bool)."""
    alpha = eta / norms.clamp(min=torch.finfo(torch.float32).tiny)
    above = norms > eta
    if randomization is Randomization.NONE:
        clip = above
    else:
        u = philox_uniform(key, index)
        clip = above & (u < clip_probability(alpha, randomization, beta))
    return torch.where(clip, alpha, torch.ones_like(alpha)), clip


def memory_order_index(g: torch.Tensor, offset: int) -> torch.Tensor:
    """Each element's flat index: ``offset`` plus its position in memory (the order the fused
    kernels walk a dense tensor; the logical order for a contiguous one)."""
    positions = torch.arange(offset, offset + g.numel(), device=g.device, dtype=torch.int64)
    if g.is_contiguous():
        return positions.view(g.shape)
    index = torch.empty_like(g, dtype=torch.int64)  # same strides as g (dense)
    index.as_strided((g.numel(),), (1,)).copy_(positions)
    return index


def coordinate_clip(
    g: torch.Tensor, eta: float, randomization: Randomization, beta: float, key: torch.Tensor, offset: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-element clipping of one float32 tensor whose first element has flat index
    ``offset``: clipped elements become sign(g) * eta.  Returns (clipped g, number clipped)."""
    magnitude = g.abs()
    above = magnitude > eta
    if randomization is Randomization.NONE:
        clip = above
    else:
        index = memory_order_index(g, offset)
        alpha = eta / magnitude.clamp(min=torch.finfo(torch.float32).tiny)
        clip = above & (philox_uniform(key, index) < clip_probability(alpha, randomization, beta))
    return torch.where(clip, torch.copysign(torch.full_like(g, eta), g), g), clip.sum()


def sgd_direction(
    g: Tensors, p: Tensors, m: Optional[Tensors], ready: Optional[torch.Tensor], cfg: GroupConfig
) -> Tuple[Tensors, Optional[Tensors]]:
    """d = g + wd p; with momentum m' = mu m + (1 - tau) d (m' = d where not ``ready``) and
    d = d + mu m' (nesterov) or m'.  float32 lists; returns (d, m')."""
    d = torch._foreach_add(g, p, alpha=cfg.weight_decay) if cfg.weight_decay != 0 else list(g)
    if cfg.momentum == 0:
        return d, None
    new_m = []
    for i, (di, mi) in enumerate(zip(d, m)):
        running = mi * cfg.momentum + di * (1 - cfg.dampening)
        new_m.append(torch.where(ready[i], running, di))
    if cfg.nesterov:
        return torch._foreach_add(d, new_m, alpha=cfg.momentum), new_m
    return new_m, new_m


def clip_list(src: Tensors, cfg: GroupConfig, t: GroupTensors, norms, total, key, record_ok, stats):
    """Apply the group's clipping method to the float32 list ``src``; fills stats[0:3]."""
    method = cfg.method
    device = t.device
    stats[0] = total
    if not method.clips:
        stats[1] = float("inf")
        stats[2] = 0.0
        return src
    if method.scope is Scope.COORDINATE:
        out, clipped = [], torch.zeros((), dtype=torch.int64, device=device)
        for i, x in enumerate(src):
            xi, ci = coordinate_clip(x, cfg.level, method.randomization, cfg.beta, key, t.offsets[i])
            out.append(xi)
            clipped = clipped + ci
        numel = sum(x.numel() for x in src)
        stats[1] = cfg.level
        stats[2] = clipped.to(torch.float32) / max(numel, 1)
        return out
    if method.scope is Scope.GLOBAL:
        scope_norms, columns, index = total.reshape(1), [0], torch.zeros(1, dtype=torch.int64, device=device)
    else:
        scope_norms, columns = norms, t.columns
        index = index_tensor(columns, device)
    if method.auto:
        record = record_ok & torch.isfinite(scope_norms)
        cols = index_tensor(columns, device)
        eta = record_and_threshold(t.history, t.history_count, cols, scope_norms, record, cfg.p_autoclip)
    else:
        eta = torch.full_like(scope_norms, cfg.level)
    scales, clip = norm_scales(scope_norms, eta, method.randomization, cfg.beta, key, index)
    stats[1] = eta.mean()
    stats[2] = clip.to(torch.float32).mean()
    if method.scope is Scope.GLOBAL:
        return torch._foreach_mul(src, scales[0])
    return torch._foreach_mul(src, list(scales.unbind(0)))


def reference_step(t: GroupTensors, cfg: GroupConfig) -> None:
    """One ClippedSGD step of one param group, in place (params, momentum and group state)."""
    device = t.device
    key = philox_key(t.seed, t.step)
    g = [opmath(x) for x in t.grads]
    if cfg.maximize:
        g = torch._foreach_neg(g)
    if t.grad_scale is not None:
        inv = t.grad_scale.to(device=device, dtype=torch.float32).reciprocal()
        g = torch._foreach_mul(g, inv)

    # nonfinite="raise" was checked by the optimizer before any group moved: here it skips
    ok = all_finite(g) if cfg.nonfinite is not NonFinite.APPLY else torch.ones((), dtype=torch.bool, device=device)
    if t.found_inf is not None:
        ok = ok & (t.found_inf.to(device) == 0)
    norms, total = None, torch.full((), float("nan"), device=device)
    if cfg.clip_point is ClipPoint.GRAD and cfg.needs_norms:
        norms, total = grad_norms(g)

    p32 = [opmath(x) for x in t.params]
    m32 = [opmath(x) for x in t.momentum_buffers] if cfg.momentum != 0 else None
    ready = t.momentum_ready[index_tensor(t.columns, device)] if cfg.momentum != 0 else None
    stats = torch.zeros(4, dtype=torch.float32, device=device)
    if cfg.clip_point is ClipPoint.GRAD:
        clipped = clip_list(g, cfg, t, norms, total, key, ok, stats)
        d, new_m = sgd_direction(clipped, p32, m32, ready, cfg)
    else:
        d, new_m = sgd_direction(g, p32, m32, ready, cfg)
        d_norms, d_total = grad_norms(d)
        d = clip_list(d, cfg, t, d_norms, d_total, key, ok, stats)
    new_p = torch._foreach_sub(p32, torch._foreach_mul(d, cfg.lr))

    for i, p in enumerate(t.params):
        p.copy_(torch.where(ok, new_p[i], p32[i]))
        if new_m is not None:
            t.momentum_buffers[i].copy_(torch.where(ok, new_m[i], m32[i]))
    if new_m is not None:
        cols = index_tensor(t.columns, device)
        t.momentum_ready[cols] = t.momentum_ready[cols] | ok
    stats[2] = stats[2] * ok  # a skipped step clips nothing
    stats[3] = (~ok).to(torch.float32)
    t.stats.copy_(stats)
    t.skipped.add_((~ok).to(t.skipped.dtype))
    t.step.add_(1)
