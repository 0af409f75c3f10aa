"""What a threshold policy is: the record every policy file of this package fills in, and the one
generic container of a policy's state between steps.

A threshold policy computes eta, the norm a scope column is clipped to (docs/spec.md section 1),
from the column's norm and whatever it keeps per column.  It owns:

* its settings (``Setting``: the param-group key, default, check and message);
* its state (``StateLayout``): ``values`` [rows, columns] in the group's norm arithmetic (float32,
  float64 for float64 groups), ``counts`` int64 [columns], and where the policy keeps them,
  ``sorted_values`` [columns, rows] (each column's values ascending, +inf padded); one column at
  global scope, one per parameter at layer scope; how it is created, re-laid when a setting changes
  and checked when a checkpoint is loaded;
* its reference implementation (``reference``, the oracle and the fallback: torch ops, no host sync);
* the numbers its fused kernels read (``kernel_params``: at most ``KERNEL_PARAMS`` floats, passed to
  the C++ kernel as ``ClipOptions.params`` and to the Triton scale stage as a float64 device tensor);
  the kernels' own functions are ``csrc/<policy>.h`` and ``kernels/<policy>.py``, chosen by the
  policy's code (``methods.THRESHOLD_CODES``).

The backends see only ``ThresholdState`` and ``kernel_params``: a new policy adds no field,
argument or state key anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Tuple

import torch

from ..methods import Threshold

#: the most floats a policy passes to the fused kernels
KERNEL_PARAMS = 8


@dataclass(frozen=True)
class Setting:
    """One param-group setting of a policy: ``parse(value)`` returns the value taken or raises
    ValueError / TypeError naming the setting and the value (checks.py)."""

    name: str
    default: Any
    parse: Callable[[Any], Any]
    doc: str


class SettingsByName:
    """A frozen dataclass's ``settings`` ((name, value) pairs: the plug-ins' settings, validated) read as
    attributes (``clip.zclip_alpha``, ``skip.skip_if_norm_above``)."""

    def __post_init__(self):
        object.__setattr__(self, "_by_name", dict(self.settings))

    def __getattr__(self, name: str):
        by_name = self.__dict__.get("_by_name")
        if by_name is not None and name in by_name:
            return by_name[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


@dataclass
class ThresholdState:
    """A policy's state for one step (the generic container every backend takes)."""

    values: torch.Tensor  # [rows, columns], the group's norm arithmetic
    counts: torch.Tensor  # int64 [columns]: records per column (the policy says what a record is)
    sorted_values: Optional[torch.Tensor] = None  # [columns, rows]: each column's values ascending, +inf padded


@dataclass(frozen=True)
class StateLayout:
    """Where and how a policy keeps its state in a group's ``clip_state`` (state.py): under
    ``f"{key}_{scope}"`` (values), ``f"{count_key}_{scope}"`` and, with ``sorted_key``,
    ``f"{sorted_key}_{scope}"``; scope "global" (1 column) or "layer" (one per parameter).

    ``rows(clip)``: the rows of a new state; ``fill``: its values' first value; ``min_rows`` /
    ``fixed_rows``: what a loaded state must have; ``prepare(values, counts, sorted_values, clip,
    steps)``: the state re-laid for this step (a setting changed, a growing history), returning the
    three tensors (device ops; it may sync only where a user changed a setting)."""

    key: str
    count_key: str
    rows: Callable[[Any], int]
    fill: float = 0.0
    min_rows: int = 1
    fixed_rows: Optional[int] = None
    sorted_key: Optional[str] = None
    prepare: Optional[Callable] = None


@dataclass
class ThresholdInputs:
    """What the reference scale stage hands a policy for the columns of one scope."""

    norms: torch.Tensor  # the scope's norms, one per column ([1] at global scope, [U] at unit scope)
    columns: Optional[torch.Tensor]  # their state columns (None at unit scope)
    ok: torch.Tensor  # bool []: the step is not skipped (a policy records nothing otherwise)
    clip: Any  # config.ClipConfig
    state: Optional[ThresholdState]
    total: torch.Tensor  # the group's (or shared) global norm
    exact: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (norms, total) in float64, where taken
    weights: Optional[torch.Tensor] = None  # the parameters' norms at the same scope (needs_weights)


@dataclass(frozen=True)
class ThresholdPolicy:
    """One threshold policy (see the module docstring)."""

    threshold: Threshold
    reference: Callable[[ThresholdInputs], torch.Tensor]
    settings: Tuple[Setting, ...] = ()
    state: Optional[StateLayout] = None
    kernel_params: Callable[[Any], Tuple[float, ...]] = lambda clip: ()
    # settings the groups sharing one norm must agree on (optim/shared_norm.py), besides the method and level
    shared_settings: Tuple[str, ...] = ()
    needs_weights: bool = False  # eta reads the parameters' norms (AGC)
    default_level: Optional[float] = None  # the level taken for clipping_level=None (None: methods.default_level)
    check: Optional[Callable[[Any], None]] = None  # checks across settings, given the whole ClipConfig
    doc: str = field(default="")

    @property
    def stateful(self) -> bool:
        return self.state is not None


__all__ = ["KERNEL_PARAMS", "Setting", "SettingsByName", "StateLayout", "ThresholdInputs", "ThresholdPolicy", "ThresholdState"]
