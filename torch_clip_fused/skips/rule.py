"""What a skip rule is: the second plug-in kind beside the threshold policies (thresholds/policy.py).

A threshold policy decides how far a step is clipped; a skip rule decides whether the whole step is
taken at all, from the whole model's pre-clip gradient norm ||g|| (every param group, every rank of a
sharded group, every pipeline stage of a ``norm_group``), as Megatron-LM's ``grad_norm_skip_threshold``,
OLMo-core's step skipping and optax's ``skip_large_updates`` do.  A skipped step leaves everything as it
was: parameters, momentum and moments, every threshold's state (the backends see the decision as an
external skip flag, like a GradScaler's ``found_inf``), and counts in ``spike_skipped_steps``.

A rule owns:

* its settings (``Setting``, thresholds/policy.py); the first one is its switch: ``None`` turns it off;
* ``decide(SkipInputs) -> bool []``: whether it skips this step (on the device, no host sync); it reads
  its state and does not change it;
* optionally its state (``StateLayout``: one column, float64, in the first param group with parameters)
  and ``record(SkipInputs, keep)``, which updates the state where ``keep`` (a step that is taken, with a
  finite norm): a skipped step records nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from ..thresholds.policy import Setting, StateLayout, ThresholdState


@dataclass
class SkipInputs:
    """What a rule sees: the model's norm (float64 [], NaN or inf where a gradient is not finite), its state
    (None for a stateless rule) and the optimizer's skip settings (``SkipConfig``)."""

    norm: torch.Tensor
    state: Optional[ThresholdState]
    settings: Any


@dataclass(frozen=True)
class SkipRule:
    """One skip rule (see the module docstring)."""

    settings: Tuple[Setting, ...]
    decide: Callable[[SkipInputs], torch.Tensor]
    state: Optional[StateLayout] = None
    record: Optional[Callable[[SkipInputs, torch.Tensor], None]] = None
    doc: str = ""

    @property
    def switch(self) -> str:
        """The setting that turns the rule on (a value) or off (None)."""
        return self.settings[0].name


__all__ = ["SkipInputs", "SkipRule"]
