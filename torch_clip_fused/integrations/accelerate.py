"""A warning when accelerate's ``Accelerator.clip_grad_norm_`` clips the gradients that a clipped
optimizer (ClippedSGD, ClippedAdamW, ClippedSSTM) then clips again.

The usual accelerate loop calls ``accelerator.clip_grad_norm_(model.parameters(), max_norm)`` before
``optimizer.step()``.  With a clipped optimizer that is silent double clipping: the optimizer's own
clipping sees gradients whose norm is already at most max_norm, so it never binds when its threshold
is above max_norm (AutoClip's history and ZClip's statistics are fed pre-clipped norms), and
``statistics()`` reports the clipped norm, not the true one.

:func:`install_accelerate_guard` wraps ``accelerate.Accelerator.clip_grad_norm_`` once, when
accelerate is already imported (it imports nothing; the optimizers call it when they are made and at
each step, so the cost without accelerate is one dictionary lookup).  The wrapped method does what it
did and returns what it returned; first, it looks at the accelerator's prepared optimizers
(``accelerator._optimizers``, each an ``AcceleratedOptimizer`` whose ``.optimizer`` is the real
one) and warns once per clipped optimizer whose clipping groups hold some of the parameters being
clipped (:class:`DoubleClippingWarning`, a RuntimeWarning, attributed to the caller's line).  No
tensor is read: the check is on Python objects only (no host sync).
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
import weakref

import torch

from . import describe, find_clipped_optimizer
from .._warnings import user_stacklevel
from ..methods import parse_method

#: Marks the wrapped ``clip_grad_norm_`` (the guard is installed once, whoever asks).
GUARD_ATTRIBUTE = "_torch_clip_fused_guard"
#: Packages whose frames a warning skips, to point at the line that called ``clip_grad_norm_``.
_INTERNAL_PACKAGES = ("torch_clip_fused", "accelerate")

_installed = False
_warned: "weakref.WeakSet" = weakref.WeakSet()


class DoubleClippingWarning(RuntimeWarning):
    """``accelerator.clip_grad_norm_`` clipped the gradients before a clipped optimizer's step.  (Not an
    ``OuterClippingWarning``: that one is the Lightning and HF callbacks' warning about their framework's
    setting, given at the start of training.)"""


def install_accelerate_guard() -> bool:
    """Wrap ``accelerate.Accelerator.clip_grad_norm_`` with the double-clipping check if accelerate is
    imported; returns whether the guard is in place.  Idempotent and cheap: once installed, a flag;
    before, a ``sys.modules`` lookup (accelerate is never imported here)."""
    global _installed
    if _installed:
        return True
    module = sys.modules.get("accelerate")
    accelerator = getattr(module, "Accelerator", None) if module is not None else None
    original = getattr(accelerator, "clip_grad_norm_", None) if accelerator is not None else None
    if original is None:  # not imported (or still importing): asked again at the next step
        return False
    if not getattr(original, GUARD_ATTRIBUTE, False):
        accelerator.clip_grad_norm_ = _guarded(original)
    _installed = True
    return True


def mark_warned(optimizer) -> None:
    """Record that the user was already warned about ``optimizer`` (the HF callback's warning about
    ``max_grad_norm``, which reaches accelerate's ``clip_grad_norm_``): the guard stays quiet for it."""
    _warned.add(optimizer)


def _guarded(original):
    @functools.wraps(original)
    def clip_grad_norm_(self, parameters, *args, **kwargs):
        max_norm = args[0] if args else kwargs.get("max_norm")
        clipped = _unwarned_clipped_optimizers(self) if _clips(max_norm) else []
        if clipped:
            if not isinstance(parameters, (torch.Tensor, list, tuple)):
                parameters = list(parameters)  # a generator is read once: keep it for the original
            _warn_overlapping(clipped, parameters, max_norm)
        return original(self, parameters, *args, **kwargs)

    setattr(clip_grad_norm_, GUARD_ATTRIBUTE, True)
    return clip_grad_norm_


def _clips(max_norm) -> bool:
    """Whether ``clip_grad_norm_`` with this max_norm clips: max_norm=inf only measures the norm (the HF
    Trainer's grad_norm with max_grad_norm=0).  A max_norm on an accelerator is not read (no host sync)."""
    if isinstance(max_norm, torch.Tensor):
        if max_norm.device.type != "cpu" or max_norm.numel() != 1:
            return True
        max_norm = float(max_norm)
    return not (isinstance(max_norm, (int, float)) and math.isinf(max_norm))


def _unwarned_clipped_optimizers(accelerator) -> list:
    """The accelerator's prepared clipped optimizers that clip and have not been warned about."""
    if getattr(accelerator, "distributed_type", None) == "DEEPSPEED":
        return []  # there clip_grad_norm_ only reads the norm: DeepSpeed clips in its own step
    found = []
    for prepared in getattr(accelerator, "_optimizers", None) or ():
        optimizer = find_clipped_optimizer(prepared)
        if optimizer is not None and optimizer not in _warned and _clipping_groups(optimizer):
            found.append(optimizer)
    return found


def _clipping_groups(optimizer) -> list:
    groups = []
    for group in optimizer.param_groups:
        try:
            clips = parse_method(group.get("clipping_type", "norm")).clips
        except ValueError:  # a bad setting: the optimizer's own validation says so at its step
            clips = False
        if clips:
            groups.append(group)
    return groups


def _warn_overlapping(optimizers, parameters, max_norm) -> None:
    being_clipped = {id(p) for p in ([parameters] if isinstance(parameters, torch.Tensor) else parameters)}
    for optimizer in optimizers:
        groups = _clipping_groups(optimizer)
        if any(id(p) in being_clipped for group in groups for p in group["params"]):
            _warned.add(optimizer)
            name = type(optimizer).__name__
            level = f" (to max_norm={max_norm!r})" if max_norm is not None else ""
            warnings.warn(
                f"torch_clip_fused: accelerator.clip_grad_norm_() clipped the gradients{level} before "
                f"{describe(optimizer)}.step(), which clips them again: {name}'s clipping sees gradients that "
                f"are already clipped (it is inert whenever its threshold is above max_norm) and statistics() "
                f"reports the clipped norm, not the true one. Drop accelerator.clip_grad_norm_() and let {name} "
                f"clip (clipping_type='norm' with clipping_level=max_norm is the same global-norm clipping), "
                f"or keep it and pass clipping_type='no_clip' to {name}.",
                DoubleClippingWarning,
                stacklevel=user_stacklevel(_INTERNAL_PACKAGES),  # the line that called clip_grad_norm_
            )


__all__ = ["DoubleClippingWarning", "install_accelerate_guard", "mark_warned"]
