"""The functional API's ``state`` dict is a checkpoint; the caches derived from the tensors are kept beside it.

``clip_gradients_(..., state=state)`` keeps in ``state`` only what the next call depends on: the
``clip_*`` entries of state.py (step count, seed, AutoClip history, ZClip / AdaGC state, statistics,
skip count) and the number of parameters, as tensors, ints and bools.  So ``torch.save(state)`` is
a small checkpoint, like an optimizer's ``state_dict()``, that ``torch.load(weights_only=True)``
reads back, and a run resumed from it is bit-identical to an uninterrupted one.

What is only derived from the tensors (the layout of the gradients, which holds the parameters, and
a backend's per-layout cache) lives in a private table keyed by the state's step counter
``state["clip_step"]``, a tensor that only this dict holds: the entry goes when the counter is
freed (with its dict), and a loaded or copied dict, whose counter is a new tensor, gathers its
layout anew.  Such a dict is checked once when first used (:func:`adopt`), as an optimizer checks a
loaded ``state_dict``.
"""

from __future__ import annotations

import weakref
from typing import Dict, Tuple

import torch

from .state import rebuild_sorted_histories, validate_group_state

#: id(state["clip_step"]) -> (weak reference to that counter, the layout)
_LAYOUTS: Dict[int, Tuple[weakref.ref, object]] = {}

#: the key under which versions before issue 18 kept the layout in the dict itself
_OLD_LAYOUT_KEY = "clip_layout"


def cached_layout(state: dict):
    """The layout cached for this state dict, or None (a new, loaded or copied dict)."""
    step = state.get("clip_step")
    entry = _LAYOUTS.get(id(step)) if step is not None else None
    return entry[1] if entry is not None and entry[0]() is step else None


def cache_layout(state: dict, layout) -> None:
    """Keep ``layout`` for this state dict (which has its step counter) until the counter is freed."""
    step = state["clip_step"]
    key = id(step)
    entry = _LAYOUTS.get(key)
    if entry is None or entry[0]() is not step:
        weakref.finalize(step, _LAYOUTS.pop, key, None)
    _LAYOUTS[key] = (weakref.ref(step), layout)


def adopt(state: dict, n_params: int, device: torch.device) -> None:
    """Make a state dict that has no cached layout yet but holds state (``torch.load``-ed, copied, or
    written by an earlier version) usable: drop an old in-dict layout, check every entry (dtypes,
    shapes, counts >= 0: ValueError naming the key), derive the AutoClip sorted rows from the history
    (a checkpoint's copy is not trusted) and move the tensors to the gradients' device.  Reads the
    counts once (a host sync, at load time only)."""
    state.pop(_OLD_LAYOUT_KEY, None)
    if "clip_step" not in state:
        return
    # the functional API keeps no momentum: its ready flags are empty, where a param group has one per parameter
    checked = dict(state, clip_momentum_ready=torch.zeros(n_params, dtype=torch.bool))
    try:
        validate_group_state(checked, 0, n_params)
    except ValueError as err:
        raise ValueError("clip_gradients_: invalid state dict: " +
                         str(err).replace("Invalid checkpoint: param group 0: ", "")) from None
    state["clip_momentum_ready"] = torch.zeros(0, dtype=torch.bool, device=device)
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.device != device:
            state[key] = value.to(device)
    rebuild_sorted_histories(state)


__all__ = ["adopt", "cache_layout", "cached_layout"]
