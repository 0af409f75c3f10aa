"""Helpers for training frameworks: find the clipped optimizer behind a framework's wrapper, read
its statistics, warn when the framework's own clipping would run first.

Importing this package imports neither Lightning nor transformers; the framework callbacks live in
``torch_clip_fused.integrations.lightning`` and ``torch_clip_fused.integrations.huggingface``, which
import their framework when they are imported.

* :func:`unwrap_optimizer` follows wrappers (accelerate's ``AcceleratedOptimizer`` keeps the
  optimizer in ``.optimizer``, Lightning's ``LightningOptimizer`` in ``._optimizer`` / ``.optimizer``)
  down to the optimizer that does the work.
* :func:`clip_statistics` is ``statistics()`` of that optimizer: per param group, a dict of 0-d
  tensors on the parameters' device; nothing is read back to the host.
* :func:`statistics_to_floats` / :func:`flat_statistics` turn every group's statistics into
  Python floats with one device-to-host transfer (every value stacked into one tensor, then one
  ``.tolist()``).
* :func:`flat_statistics` (and both callbacks) can add the k largest per-tensor norms of the last step,
  or all of them, in the same transfer (``optimizer.tensor_statistics()``, tensor_norms.py).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from ..optim.base import ClippedOptimizer

#: The optimizers these helpers look for, as their messages name them (every ClippedOptimizer).
CLIPPED_OPTIMIZERS = "ClippedSGD, ClippedAdamW or ClippedSSTM"

#: Attributes under which known wrappers keep the optimizer they wrap, tried in this order.
WRAPPED_ATTRIBUTES = ("optimizer", "_optimizer")
_MAX_DEPTH = 16


class OuterClippingWarning(UserWarning):
    """A training framework clips the gradients before a clipped optimizer's step sees them."""


def unwrap_optimizer(optimizer):
    """The optimizer behind any chain of wrappers: the first clipped optimizer (:class:`ClippedSGD`,
    :class:`ClippedAdamW`, :class:`ClippedSSTM`) found, otherwise the innermost object reached through ``.optimizer`` /
    ``._optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``,
    an LR scheduler...).  An object without such an attribute is returned as it is."""
    current, seen = optimizer, set()
    for _ in range(_MAX_DEPTH):
        if isinstance(current, ClippedOptimizer) or id(current) in seen:
            return current
        seen.add(id(current))
        inner = None
        for name in WRAPPED_ATTRIBUTES:
            try:
                candidate = getattr(current, name, None)
            except Exception:  # a wrapper's property may fail; treat it as absent
                candidate = None
            if candidate is not None and candidate is not current:
                inner = candidate
                break
        if inner is None:
            return current
        current = inner
    return current


def find_clipped_optimizer(optimizer) -> Optional[ClippedOptimizer]:
    """The clipped optimizer (ClippedSGD, ClippedAdamW, ClippedSSTM) behind ``optimizer`` and its
    wrappers, or None."""
    inner = unwrap_optimizer(optimizer)
    return inner if isinstance(inner, ClippedOptimizer) else None


def clip_statistics(optimizer) -> List[Dict[str, torch.Tensor]]:
    """``statistics()`` of the clipped optimizer behind ``optimizer`` (wrappers allowed): per param
    group a dict of 0-d tensors on the parameters' device (empty before the group's first step).
    Nothing is read back to the host."""
    inner = find_clipped_optimizer(optimizer)
    if inner is None:
        raise TypeError(
            f"clip_statistics: no clipped optimizer ({CLIPPED_OPTIMIZERS}) behind {type(optimizer).__name__} "
            f"(unwrapped to {type(unwrap_optimizer(optimizer)).__name__})"
        )
    return inner.statistics()


def statistics_to_floats(stats: Sequence[Dict[str, torch.Tensor]]) -> List[Dict[str, float]]:
    """Every group's statistics (``optimizer.statistics()`` or :func:`clip_statistics`) as Python
    floats, read back with one device-to-host transfer: all values are stacked into one float64
    tensor (exact for the int64 counts below 2**53) and read with one ``.tolist()``.  Groups on
    several devices take one transfer per device."""
    return statistics_and_vector_to_floats(stats, None)[0]


def statistics_and_vector_to_floats(stats: Sequence[Dict[str, torch.Tensor]], vector: Optional[torch.Tensor]):
    """:func:`statistics_to_floats` and a float64 vector (e.g. a tensor_norms.TensorNormRequest's) in the same
    transfer as the statistics of its device: (per-group floats, the vector's floats or None)."""
    by_device: Dict[torch.device, list] = {}
    if vector is not None:
        by_device[vector.device] = []
    for g, group in enumerate(stats):
        for name, value in group.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"statistics_to_floats: group {g} statistic {name!r} is a {type(value).__name__}, not a tensor")
            by_device.setdefault(value.device, []).append((g, name, value))
    out: List[Dict[str, float]] = [{} for _ in stats]
    extra = None
    for device, entries in by_device.items():
        parts = [torch.stack([v.detach().reshape(()).to(torch.float64) for _, _, v in entries])] if entries else []
        with_vector = vector is not None and device == vector.device
        if with_vector:
            parts.append(vector.detach().to(torch.float64).reshape(-1))
        numbers = torch.cat(parts).tolist()  # the one transfer
        for (g, name, _), number in zip(entries, numbers):
            out[g][name] = number
        if with_vector:
            extra = numbers[len(entries):]
    # keep each group's own key order
    return [{name: out[g][name] for name in group} for g, group in enumerate(stats)], extra


def flat_statistics(optimizer, prefix: str = "clip/", top_k_tensor_norms: int = 0,
                    all_tensor_norms: bool = False) -> Dict[str, float]:
    """The statistics of the clipped optimizer behind ``optimizer`` as one flat dict of Python
    floats for a logger, with one device-to-host transfer: ``{prefix}norm``, ``{prefix}threshold``,
    ... for a single param group, ``{prefix}group{i}/norm``... for several.  Groups that have not
    stepped yet are left out.  ``top_k_tensor_norms`` = k > 0 adds the k largest per-tensor norms
    (``{prefix}tensor_norm/{name}``, with ``{prefix}tensor_scale/{name}``), ``all_tensor_norms`` every
    tensor's (tensor_norms.py), in the same transfer."""
    from .tensor_norms import tensor_norm_request

    stats = clip_statistics(optimizer)  # (raises TypeError without a clipped optimizer behind ``optimizer``)
    inner = find_clipped_optimizer(optimizer)
    request = tensor_norm_request([(prefix, inner.tensor_statistics())], top_k_tensor_norms, all_tensor_norms)
    per_group, extra = statistics_and_vector_to_floats(stats, None if request is None else request.vector)
    record = flatten_statistics(per_group, prefix)
    if request is not None:
        record.update(request.decode(extra))
    return record


def flatten_statistics(per_group: Sequence[Dict[str, float]], prefix: str = "clip/") -> Dict[str, float]:
    """``[{name: value}, ...]`` per group into ``{prefix + name: value}`` (one group) or
    ``{prefix + "group{i}/" + name: value}`` (several groups)."""
    if len(per_group) == 1:
        return {f"{prefix}{name}": value for name, value in per_group[0].items()}
    return {f"{prefix}group{g}/{name}": value for g, group in enumerate(per_group) for name, value in group.items()}


def describe(optimizer: ClippedOptimizer) -> str:
    """``ClippedSGD(clipping_type='norm', clipping_level=5.0)`` for messages (first param group)."""
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    settings = ", ".join(f"{k}={group[k]!r}" for k in ("clipping_type", "clipping_level") if k in group)
    return f"{type(optimizer).__name__}({settings})"


def warn_outer_clipping(framework_setting: str, optimizer: ClippedOptimizer, fix: str, stacklevel: int = 2) -> None:
    """The warning both framework callbacks give when the framework clips first (the accelerate guard,
    integrations/accelerate.py, then stays quiet for this optimizer: one warning, not two)."""
    from .accelerate import mark_warned

    mark_warned(optimizer)
    warnings.warn(
        f"{framework_setting} clips the gradients before {describe(optimizer)}.step() sees them: "
        f"{type(optimizer).__name__}'s own clipping then acts on already-clipped gradients (it is inert "
        f"whenever its threshold is above the framework's) and statistics() reports the clipped norm, "
        f"not the true one. {fix}",
        OuterClippingWarning,
        stacklevel=stacklevel + 1,
    )


def require(package: str, install: str):
    """Import ``package`` or raise an ImportError that says what to install."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(
            f"this part of torch_clip_fused.integrations needs {package!r}, which is not installed: "
            f"pip install {install}"
        ) from exc


__all__ = [
    "CLIPPED_OPTIMIZERS",
    "OuterClippingWarning",
    "WRAPPED_ATTRIBUTES",
    "clip_statistics",
    "find_clipped_optimizer",
    "flat_statistics",
    "flatten_statistics",
    "statistics_and_vector_to_floats",
    "statistics_to_floats",
    "unwrap_optimizer",
]
