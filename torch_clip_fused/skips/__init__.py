"""Skip rules as plug-ins (skips/rule.py says what a rule is): one file per rule, registered here.

The optimizers take the rules' settings as keyword arguments (param-group settings every group with
parameters must agree on: the step is skipped as a whole).  One step with a rule on (optim/base.py): the
norm stage of every group, one reduction (across ranks, pipeline stages), ``spike = decide(...)`` on the
device, every rule's state recorded where the step is taken, then every group's step with ``spike`` as an
external skip flag (``GroupTensors.found_inf``), and the counts.  The functional API (functional.py) zeroes
the gradients of a skipped call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..thresholds.policy import Setting, SettingsByName, ThresholdState
from .norm_above import NORM_ABOVE
from .rule import SkipInputs, SkipRule
from .zscore_above import ZSCORE_ABOVE

#: every skip rule, in the order they are asked
RULES: Tuple[SkipRule, ...] = (NORM_ABOVE, ZSCORE_ABOVE)

#: every rule's settings by param-group key
SKIP_SETTINGS: Dict[str, Setting] = {s.name: s for r in RULES for s in r.settings}


@dataclass(frozen=True)
class SkipConfig(SettingsByName):
    """The skip rules' settings of a param group, validated (read as attributes: ``skip.skip_if_norm_above``)."""

    settings: Tuple[Tuple[str, object], ...] = ()

    @classmethod
    def from_group(cls, group: dict) -> "SkipConfig":
        """Validate a param group's skip settings (a missing one takes its default: an older checkpoint)."""
        return cls(tuple((name, s.parse(group.get(name, s.default))) for name, s in SKIP_SETTINGS.items()))

    @property
    def rules(self) -> Tuple[SkipRule, ...]:
        """The rules switched on."""
        return tuple(r for r in RULES if self._by_name.get(r.switch) is not None)


#: no rule on (the functional API's and ClippedSSTM's configs)
NO_SKIP = SkipConfig.from_group({})


def check_skip_agreement(configs: Sequence[tuple]) -> None:
    """Raise ValueError naming both groups where two groups of ``configs`` ((index, GroupConfig)) differ in a
    skip setting: a skip rule skips the whole step, so it has one setting per optimizer."""
    if len(configs) < 2:
        return
    first, reference = configs[0][0], configs[0][1].skip.settings
    for index, cfg in configs[1:]:
        for (name, a), (_, b) in zip(reference, cfg.skip.settings):
            if a != b:
                raise ValueError(f"Invalid param group: param groups {first} and {index} differ in {name}: {a!r} and "
                                 f"{b!r}; a skip rule skips the whole step, so every param group takes the same "
                                 f"{name}")
        a, b = configs[0][1].clip.norm_type, cfg.clip.norm_type
        if configs[0][1].skip.rules and a != b:  # the model's norm is one p-norm (norm_type.py)
            raise ValueError(f"Invalid param group: param groups {first} and {index} differ in norm_type: {a!r} and "
                             f"{b!r}; a skip rule takes the whole model's norm, so with a skip rule every param "
                             "group takes the same norm_type")


def rule_state(state: dict, rule: SkipRule, skip: SkipConfig, device: torch.device) -> Optional[ThresholdState]:
    """A rule's state in ``state`` (a param group's ``clip_state``): created on first use (float64, one
    column, zero counts), re-laid by the rule's ``prepare`` when a setting changed."""
    layout = rule.state
    if layout is None:
        return None
    if layout.key not in state:
        state[layout.key] = torch.full((layout.rows(skip), 1), layout.fill, dtype=torch.float64, device=device)
        state[layout.count_key] = torch.zeros((1,), dtype=torch.int64, device=device)
    ts = ThresholdState(state[layout.key], state[layout.count_key])
    if layout.prepare is not None:
        ts = layout.prepare(ts, skip, state.get("clip_steps", 0), state, layout.key)
        state[layout.key], state[layout.count_key] = ts.values, ts.counts
    return ts


def decide_and_record(skip: SkipConfig, norm: torch.Tensor, state: dict,
                      found_inf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool []: whether the step is a spike to skip, from the model's pre-clip norm ``norm`` (float64 [] or
    [1]) and the rules' state in ``state``; then every rule's state recorded where the step is taken.  A
    non-finite norm and a GradScaler's inf (``found_inf`` != 0) are not spikes (the non-finite policy's skip),
    and record nothing either.  Device ops only."""
    norm = norm.reshape(()).to(torch.float64)
    taken = torch.isfinite(norm)
    if found_inf is not None:
        taken = taken & (found_inf.to(norm.device).reshape(()) == 0)
    inputs = [SkipInputs(norm, rule_state(state, rule, skip, norm.device), skip) for rule in skip.rules]
    spike = torch.zeros((), dtype=torch.bool, device=norm.device)
    for rule, x in zip(skip.rules, inputs):
        spike = spike | rule.decide(x)
    spike = spike & taken
    for rule, x in zip(skip.rules, inputs):
        if rule.record is not None:
            rule.record(x, taken & ~spike)
    return spike


def skip_flag(found_inf: Optional[torch.Tensor], spike: torch.Tensor) -> torch.Tensor:
    """The external skip flag a backend reads (float32 [], nonzero: skip): a GradScaler's ``found_inf`` or a
    spike."""
    flag = spike.to(torch.float32)
    if found_inf is not None:
        flag = torch.maximum(flag, (found_inf.to(flag.device).reshape(()) != 0).to(torch.float32))
    return flag


def count_spike(state: dict, spike: torch.Tensor, counted_as_skip: bool = True) -> None:
    """A group's counts after a step with a spike decision: ``clip_spike`` (float32 [], 1.0 when this step was
    skipped as a spike), ``clip_spike_skipped`` += spike, and, ``counted_as_skip`` (an optimizer step: the
    backends count every skipped step in ``clip_skipped``, which counts the non-finite ones), the spike taken
    back out of ``clip_skipped``."""
    spike_state(state, spike.device)
    state["clip_spike"].copy_(spike.to(torch.float32))
    state["clip_spike_skipped"].add_(spike.to(torch.int64))
    if counted_as_skip:
        state["clip_skipped"].sub_(spike.to(torch.int64))


def spike_state(state: dict, device: torch.device) -> None:
    """The spike counts of a group's state, created where missing (a new group, an older checkpoint)."""
    if "clip_spike" not in state:
        state["clip_spike"] = torch.zeros((), dtype=torch.float32, device=device)
    if "clip_spike_skipped" not in state:
        state["clip_spike_skipped"] = torch.zeros((), dtype=torch.int64, device=device)


#: the rules' state layouts (checkpoint checks, state.py)
STATE_LAYOUTS = tuple(r.state for r in RULES if r.state is not None)

__all__ = ["NO_SKIP", "RULES", "SKIP_SETTINGS", "STATE_LAYOUTS", "SkipConfig", "SkipInputs", "SkipRule",
           "check_skip_agreement", "count_spike", "decide_and_record", "rule_state", "skip_flag", "spike_state"]
