"""Per-parameter state and gradients checked against their parameters, before anything moves.

torch.optim keeps one state dict per parameter (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``, ``step``).  A checkpoint saved for another parameter order, a model cast or
reshaped mid-run, or a gradient left over from before ``p.data = ...`` would otherwise be broadcast
into the parameter or fail half-way through a step, after earlier param groups moved.  Every check
here names the param group, the parameter's index in it (and its name when the optimizer was given
``named_parameters()``), the state key and both shapes or dtypes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Sequence

import torch

#: Keys of a param group's own state that checkpoints before the ``clip_state`` param-group entry
#: kept in the per-parameter state of the group's first parameter.
LEGACY_GROUP_KEYS = ("sstm_k", "sstm_A")


def is_group_key(key) -> bool:
    """Whether a per-parameter state key of a former checkpoint is really the group's own state."""
    return isinstance(key, str) and (key.startswith("clip_") or key in LEGACY_GROUP_KEYS)


def where(group_index: int, group: Mapping, position: int) -> str:
    """'param group 1, parameter 0 ('fc.bias')': a parameter's place, with its name if known."""
    names: Optional[Sequence[str]] = group.get("param_names")
    name = f" ({names[position]!r})" if names is not None and position < len(names) else ""
    return f"param group {group_index}, parameter {position}{name}"


def check_saved_param_state(saved: Mapping, p: torch.Tensor, shaped_keys: Sequence[str], place: str) -> None:
    """A checkpoint's state of parameter ``p``: every key in ``shaped_keys`` holds None or a dense
    floating tensor of ``p``'s shape (torch casts it to ``p``'s dtype and device when it loads); raises
    ValueError otherwise.  ``step`` (AdamW) must hold one number."""
    for key in shaped_keys:
        value = saved.get(key)
        if value is None:
            continue
        problem = None
        if not isinstance(value, torch.Tensor):
            problem = f"is a {type(value).__name__}, expected a tensor"
        elif value.layout is not torch.strided:
            problem = f"has layout {value.layout}, expected a dense (torch.strided) tensor"
        elif not (value.is_floating_point() or value.is_complex()) and p.is_floating_point():
            problem = f"has dtype {value.dtype}, expected a floating-point tensor (the parameter's is {p.dtype})"
        elif tuple(value.shape) != tuple(p.shape):
            problem = f"has shape {tuple(value.shape)}, but the parameter has shape {tuple(p.shape)}"
        if problem is not None:
            raise ValueError(f"Invalid checkpoint: {place}: state key {key!r} {problem}")
    step = saved.get("step")
    if step is not None:
        count = step.numel() if isinstance(step, torch.Tensor) else 1 if isinstance(step, (int, float)) else 0
        if count != 1 or isinstance(step, bool):
            raise ValueError(f"Invalid checkpoint: {place}: state key 'step' is {step!r}, expected a number or a "
                             "one-element tensor")


def check_grad(p: torch.Tensor, place: str) -> None:
    """A gradient the step can use: the parameter's shape, dtype and device (raises RuntimeError)."""
    g = p.grad
    if g is None:
        return
    for what, have, want in (("shape", tuple(g.shape), tuple(p.shape)), ("dtype", g.dtype, p.dtype),
                             ("device", g.device, p.device)):
        if have != want:
            raise RuntimeError(f"{place}: the gradient has {what} {have}, but the parameter has {what} {want} "
                               "(was the parameter replaced with p.data = ... after backward()?); nothing was "
                               "modified")


def fitted_state(p: torch.Tensor, buf: torch.Tensor, key: str, place: str) -> torch.Tensor:
    """``buf`` (a state tensor of ``p``) if it has ``p``'s dtype, device and memory layout; a copy cast
    and laid out as ``p`` (the fused kernels walk both with the same offsets) if only those differ, as
    after ``model.to(torch.float64)`` mid-run; RuntimeError if its shape differs."""
    if tuple(buf.shape) != tuple(p.shape):
        raise RuntimeError(f"{place}: state key {key!r} has shape {tuple(buf.shape)}, but the parameter has shape "
                           f"{tuple(p.shape)}; nothing was modified (was the parameter reshaped, or the state "
                           "loaded for another model?)")
    from ..backends.layout import same_layout

    if buf.dtype == p.dtype and buf.device == p.device and same_layout(p, buf):
        return buf
    fresh = torch.zeros_like(p, memory_format=torch.preserve_format)
    fresh.copy_(buf)
    return fresh
