"""Checks of single setting values, shared by the param-group settings (config.py) and the threshold
policies' own settings (thresholds/): each returns the value taken, or raises ValueError / TypeError
naming the setting, the value and what was expected."""

from __future__ import annotations

import math
from typing import Optional

import torch


def choice(enum_cls, value, name: str):
    """``enum_cls(value)``, or ValueError listing the valid choices."""
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(repr(e.value) for e in enum_cls)
        raise ValueError(f"Invalid {name} value: {value!r}; valid choices are {valid}") from None


def one_of(value, name: str, choices, lower: bool = False) -> str:
    """One of the strings ``choices`` (with ``lower``, in any letter case: the lowercase one taken), or
    ValueError listing the valid choices."""
    taken = value.lower() if lower and isinstance(value, str) else value
    if not isinstance(taken, str) or taken not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Invalid {name} value: {value!r}; valid choices are {valid}")
    return taken


def flag(value, name: str) -> bool:
    """True or False (torch.optim would take any truthy value), or TypeError."""
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name} value: {value!r}; expected True or False")
    return value


def tensor_value(value: torch.Tensor, name: str, what: str) -> float:
    """The value of a one-element floating-point tensor setting (``what``: "lr", "beta"), read once
    when the setting is made (construction, add_param_group, load_state_dict, a new value set)."""
    if value.numel() != 1:
        raise ValueError(f"Invalid {name}: Tensor {what} must be 1-element (a tensor {what} must hold one element), "
                         f"got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"Invalid {name}: a tensor {what} must be floating point, got dtype {value.dtype}")
    return float(value)


def number(value, name: str, allow_tensor: bool = False) -> float:
    """A finite int or float (not a bool); with ``allow_tensor``, a one-element tensor lr is kept as is."""
    if allow_tensor and isinstance(value, torch.Tensor):
        held = tensor_value(value, name, "lr")
        if not math.isfinite(held) or held < 0:
            raise ValueError(f"Invalid {name}: the tensor lr holds {held}; expected a finite value >= 0 (during "
                             "step(), such a value makes the step skip, as a non-finite gradient does)")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name} value: {value!r}; expected a number")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name} value: {value!r}; expected a finite number")
    return float(value)


def bounded(value, name: str, holds, expected: str) -> float:
    """A finite number for which ``holds(x)`` is true; ``expected`` says which (``"0 < beta < 1"``)."""
    x = number(value, name)
    if not holds(x):
        raise ValueError(f"Invalid {name} value: {x}; expected {expected}")
    return x


def count(value, name: str, minimum: int = 0, allow_none: bool = False) -> Optional[int]:
    """An int >= ``minimum`` (not a bool), or None where ``allow_none``."""
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"an int >= {minimum}" if not allow_none else f"None or an int >= {minimum}"
        raise ValueError(f"Invalid {name} value: {value!r}; expected {expected}")
    return value


__all__ = ["bounded", "choice", "count", "flag", "number", "one_of", "tensor_value"]
