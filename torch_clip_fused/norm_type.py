"""The norm a clipping method measures the gradient with: ``norm_type`` p, as ``torch.nn.utils.clip_grad_norm_``
(docs/spec.md section 1).

For p in [1, inf) a tensor's norm and the global norm over tensors i are

    ||g_i||_p = (sum_j |g_ij|^p)^(1/p),     ||g||_p = (sum_i ||g_i||_p^p)^(1/p) = (sum_ij |g_ij|^p)^(1/p)

and for p = inf: ||g_i||_inf = max_j |g_ij|, ||g||_inf = max_i ||g_i||_inf.  So what combines across
tensors, param groups and ranks is a tensor's *part* ||g_i||_p^p (p = 2: its sum of squares), added up, and
for p = inf its max |g|, combined by max; the norm is the combined part's 1/p-th power (p = 2: its square
root, computed as ``sqrt`` so that the 2-norm path stays what it was).

The fused kernels get the kind as a code (``kind``): 0 the 2-norm (their unchanged path), 1 inf, 2 any
other p (read as a runtime float).
"""

from __future__ import annotations

import math
from typing import Union

import torch

#: the kernels' norm kinds
TWO, INF, POWER = 0, 1, 2


def parse_norm_type(value) -> float:
    """``norm_type`` checked: an int or float p >= 1, ``float('inf')`` or the string ``"inf"`` (as torch's
    ``clip_grad_norm_`` takes); returns it as a float.  ValueError / TypeError naming the value otherwise."""
    if isinstance(value, str):
        if value.strip().lower() in ("inf", "+inf", "infinity"):
            return math.inf
        raise ValueError(f"Invalid norm_type value: {value!r}; expected a number p >= 1, float('inf') or 'inf'")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid norm_type value: {value!r}; expected a number p >= 1, float('inf') or 'inf'")
    p = float(value)
    if math.isnan(p) or p < 1.0:
        raise ValueError(f"Invalid norm_type value: {value!r}; expected p >= 1 (1, 2, 3, ... or float('inf')): the "
                         "p-norm is a norm only for p >= 1")
    return p


def kind(p: float) -> int:
    """The kernels' code of norm type ``p``: TWO, INF or POWER."""
    return TWO if p == 2.0 else INF if math.isinf(p) else POWER


def tensor_norms(tensors, p: float) -> torch.Tensor:
    """float64 [n]: ||x_i||_p of each tensor (one foreach reduction; float64 arithmetic), 0 for an empty tensor
    (whose inf-norm torch leaves undefined)."""
    if not math.isinf(p) or all(x.numel() > 0 for x in tensors):
        return torch.stack(torch._foreach_norm(tensors, p, dtype=torch.float64))
    nonempty = [i for i, x in enumerate(tensors) if x.numel() > 0]
    out = torch.zeros(len(tensors), dtype=torch.float64, device=tensors[0].device)
    if nonempty:
        values = torch.stack(torch._foreach_norm([tensors[i] for i in nonempty], p, dtype=torch.float64))
        out[nonempty] = values
    return out


def to_parts(norms: torch.Tensor, p: float) -> torch.Tensor:
    """Norms ||x||_p -> their parts ||x||_p^p (p = 2: the squares; inf: the norms themselves)."""
    if p == 2.0:
        return norms.square()
    if math.isinf(p):
        return norms
    return norms.pow(p)


def from_parts(parts: torch.Tensor, p: float) -> torch.Tensor:
    """Parts -> norms: parts^(1/p) (p = 2: sqrt; inf: the parts themselves)."""
    if p == 2.0:
        return parts.sqrt()
    if math.isinf(p):
        return parts
    return parts.pow(1.0 / p)


def combine(parts: torch.Tensor, p: float) -> torch.Tensor:
    """The combined part of several ([..., n] along the last dim): their sum, or for inf their max (0 for none)."""
    if math.isinf(p):
        return parts.amax(dim=-1) if parts.numel() else parts.sum(dim=-1)
    return parts.sum(dim=-1)


def total_norm(norms: torch.Tensor, p: float) -> torch.Tensor:
    """The norm over tensors from their norms [n]: (sum_i ||x_i||_p^p)^(1/p), inf: their max (p = 2:
    sqrt(sum_i ||x_i||^2), the same operations as before norm_type existed)."""
    return from_parts(combine(to_parts(norms, p), p), p)


def part_scale(scale: Union[torch.Tensor, float], p: float):
    """What a part is divided by when the norms are divided by ``scale`` (a GradScaler's): scale^p (inf: scale)."""
    if math.isinf(p):
        return scale
    return scale * scale if p == 2.0 else scale ** p


def reduce_op(p: float):
    """The ``torch.distributed.ReduceOp`` that combines parts across ranks: SUM, or MAX for inf (the non-finite
    count in the same vector is then a flag, > 0 on any rank)."""
    import torch.distributed as dist

    return dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM


def describe(p: float) -> str:
    """``p`` as a user wrote it: 'inf', 2, 1.5."""
    return "inf" if math.isinf(p) else repr(int(p)) if p == int(p) else repr(p)


__all__ = ["INF", "POWER", "TWO", "combine", "describe", "from_parts", "kind", "parse_norm_type", "part_scale",
           "reduce_op", "tensor_norms", "to_parts", "total_norm"]
