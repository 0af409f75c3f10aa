"""Threshold policies as plug-ins: one file per policy (settings, state, reference, the numbers its
kernels read), registered here by ``methods.Threshold``.  thresholds/policy.py says what a policy is."""

from __future__ import annotations

from typing import Dict

from ..methods import Threshold
from .adagc import EMA_RELATIVE
from .agc import AGC
from .autoclip import AUTO
from .constant import CONSTANT
from .policy import KERNEL_PARAMS, Setting, StateLayout, ThresholdInputs, ThresholdPolicy, ThresholdState
from .zclip import ZSCORE

#: the policy of each threshold
POLICIES: Dict[Threshold, ThresholdPolicy] = {p.threshold: p for p in (CONSTANT, AUTO, ZSCORE, EMA_RELATIVE, AGC)}

#: every policy's settings by param-group key, in policy order
SETTINGS: Dict[str, Setting] = {s.name: s for p in POLICIES.values() for s in p.settings}


def policy(threshold: Threshold) -> ThresholdPolicy:
    """The policy of ``threshold``; an unknown one is an error, never a fallback."""
    if threshold not in POLICIES:
        raise ValueError(f"no threshold policy for {threshold!r}")
    return POLICIES[threshold]


def setting_defaults(given: dict, where: str, extra: Dict[str, Setting] = None) -> dict:
    """Every policy setting's value for a constructor's defaults (and ``extra``'s: the skip rules'): the
    given ones, the defaults for the rest; a name none of them has is a TypeError naming ``where`` and the
    names there are."""
    known = {**SETTINGS, **(extra or {})}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(f"{where} got an unexpected keyword argument {unknown[0]!r}; the threshold and skip settings "
                        f"are {', '.join(known)}")
    return {name: given.get(name, s.default) for name, s in known.items()}


__all__ = ["KERNEL_PARAMS", "POLICIES", "SETTINGS", "Setting", "StateLayout", "ThresholdInputs", "ThresholdPolicy",
           "ThresholdState", "policy", "setting_defaults"]
