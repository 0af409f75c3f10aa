"""The state a param group keeps between steps, stored with torch.optim's per-parameter state.

torch.optim keeps state per parameter; a group's own state (step count, seed,
AutoClip histories, momentum-initialised flags, statistics) lives in the param group
itself, in a dict under ``param_group["clip_state"]`` (optim/base.py), so that
``state_dict()`` / ``load_state_dict()`` carry it with the param groups and the
per-parameter state holds only what torch.optim keeps there.  (Checkpoints written
before kept these keys in the state of the group's first parameter; they still load.)
The functional API keeps the same keys in the state dict it is given.

Keys (all tensors on the parameters' device):

* ``clip_seed``           int, the group's Philox seed (32 bits)
* ``clip_step``           int64 [], step() calls so far (the Philox step)
* ``clip_steps``          int, host mirror of ``clip_step`` (sizes histories without a sync)
* the threshold policy's state (thresholds/policy.py, ``StateLayout``), per scope ("global": one
  column; "layer": one per parameter), under the policy's keys:

  - auto (AutoClip, thresholds/autoclip.py): ``clip_history_<scope>`` float32 [capacity, columns],
    the norms in the order recorded; ``clip_count_<scope>`` int64 [columns]; ``clip_sorted_<scope>``
    float32 [columns, capacity], the same norms ascending per column, +inf padded (derived from the
    history, rebuilt from it when a checkpoint is loaded); ``clip_history_<scope>_capped`` bool
  - zscore (ZClip, thresholds/zclip.py): ``clip_zclip_<scope>`` float32 [2 + W, columns]: row 0 the
    EMA mean, row 1 the EMA variance, rows 2.. the W = max(zclip_warmup, 1) warm-up norms;
    ``clip_zclip_count_<scope>`` int64 [columns]: warm-up norms recorded (at most W)
  - ema_relative (AdaGC, thresholds/adagc.py): ``clip_adagc_<scope>`` float32 [1, columns]: gamma,
    the EMA of the clipped norms (+inf: nothing recorded yet); ``clip_adagc_count_<scope>`` int64
    [columns]: steps recorded

  (float64 instead of float32 for float64 groups)
* ``clip_momentum_ready`` bool [n_params]: the momentum buffer holds a first step
* ``clip_stats``          float32 [4]: norm, threshold, clipped fraction, skipped (last step)
* ``clip_skipped``        int64 []: steps skipped for non-finite gradients so far
* ``clip_tensor_stats``   float32 [2, n_params]: per parameter (by position in the group), the last step's
  norm (row 0) and applied scale (row 1; unit / coordinate scope: the fraction clipped): tensor_stats.py
  (the optimizers' groups only, not the functional API's state)
* ``clip_spike``          float32 []: 1.0 when the last step was skipped by a skip rule (skips/)
* ``clip_spike_skipped``  int64 []: steps skipped by a skip rule so far
* a skip rule's state (skips/, in the first param group with parameters): ``skip_if_zscore_above``'s
  ``clip_skip_zscore`` float64 [2 + W, 1] (EMA mean, variance, warm-up norms) and
  ``clip_skip_zscore_count`` int64 [1]
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import STAT_NAMES, GroupConfig
from .methods import Scope
from .skips import STATE_LAYOUTS as SKIP_STATE_LAYOUTS, spike_state
from .tensor_stats import KEY as TENSOR_STATS_KEY, check_tensor_stats
from .thresholds import POLICIES, ThresholdState
from .thresholds.autoclip import sorted_from_ring


def init_group_state(state: dict, params, param_states, seed: int, device: torch.device) -> None:
    """Create a group's state on first use; momentum buffers loaded from a torch.optim.SGD
    checkpoint count as initialised."""
    spike_state(state, device)  # (a group saved before the skip rules: its spike counts start now)
    if "clip_step" in state:
        return
    state["clip_seed"] = seed
    state["clip_step"] = torch.zeros((), dtype=torch.int64, device=device)
    state["clip_steps"] = 0
    state["clip_momentum_ready"] = torch.tensor(
        [p in param_states and "momentum_buffer" in param_states[p] for p in params], dtype=torch.bool,
        device=device
    )
    state["clip_stats"] = torch.full((len(STAT_NAMES),), float("nan"), dtype=torch.float32, device=device)
    state["clip_skipped"] = torch.zeros((), dtype=torch.int64, device=device)


def threshold_state_for_step(state: dict, cfg: GroupConfig, n_params: int, device: torch.device,
                             dtype: torch.dtype = torch.float32) -> Optional[ThresholdState]:
    """The threshold policy's state for this step (thresholds/policy.py), kept in ``state`` under the
    policy's keys: created on first use (``rows(clip)`` rows of ``fill``, zero counts), cast when the
    group's dtype changed (float64 <-> lower precision: rare), its sorted values derived from the values
    where missing (a state written before they existed), then re-laid by the policy's ``prepare`` (a
    setting changed, a growing history).  None for a stateless threshold.  ``dtype``: the group's norm
    arithmetic (float64 for float64 groups)."""
    layout = cfg.clip.policy.state
    if layout is None:
        return None
    scope = "global" if cfg.clip.method.scope is Scope.GLOBAL else "layer"
    vkey, ckey = f"{layout.key}_{scope}", f"{layout.count_key}_{scope}"
    skey = None if layout.sorted_key is None else f"{layout.sorted_key}_{scope}"
    columns = 1 if scope == "global" else n_params
    if vkey not in state:
        rows = layout.rows(cfg.clip)
        state[vkey] = torch.full((rows, columns), layout.fill, dtype=dtype, device=device)
        state[ckey] = torch.zeros((columns,), dtype=torch.int64, device=device)
        if skey is not None:
            state[skey] = torch.full((columns, rows), float("inf"), dtype=dtype, device=device)
    values = state[vkey]
    if values.dtype != dtype:
        values = state[vkey] = values.to(dtype)
        if skey is not None:
            state.pop(skey, None)
    if skey is not None and skey not in state:
        state[skey] = sorted_from_ring(values, state[ckey])
    ts = ThresholdState(values, state[ckey], None if skey is None else state[skey])
    if layout.prepare is not None:
        ts = layout.prepare(ts, cfg.clip, state["clip_steps"], state, vkey)
        state[vkey], state[ckey] = ts.values, ts.counts
        if skey is not None:
            state[skey] = ts.sorted_values
    return ts


def rebuild_sorted_histories(state: dict) -> None:
    """Derive the sorted rows of a loaded history from the history itself (a checkpoint's own
    copy is not trusted: a row out of order or holding other norms would give wrong thresholds)."""
    for layout in _STATE_LAYOUTS:
        if layout.sorted_key is None:
            continue
        for scope in ("global", "layer"):
            values = state.get(f"{layout.key}_{scope}")
            if values is not None:
                state[f"{layout.sorted_key}_{scope}"] = sorted_from_ring(values, state[f"{layout.count_key}_{scope}"])


def group_statistics(state: dict) -> dict:
    """The last step's statistics as 0-d device tensors (reading one with .item() syncs)."""
    if "clip_stats" not in state:
        return {}
    out = {name: state["clip_stats"][i] for i, name in enumerate(STAT_NAMES)}
    out["skipped_steps"] = state["clip_skipped"]
    if "clip_spike" in state:
        out["spike_skipped"] = state["clip_spike"]
        out["spike_skipped_steps"] = state["clip_spike_skipped"]
    out["step"] = state["clip_step"]
    return out


def _problem(value, dtype, shape=None, minimum=None):
    """What is wrong with a loaded state tensor, or None (reads its values once: load time only)."""
    if not isinstance(value, torch.Tensor):
        return f"is a {type(value).__name__}, expected a tensor"
    if value.dtype != dtype:
        return f"has dtype {value.dtype}, expected {dtype}"
    if shape is not None and tuple(value.shape) != tuple(shape):
        return f"has shape {tuple(value.shape)}, expected {tuple(shape)}"
    if minimum is not None and value.numel() and bool((value < minimum).any()):
        return f"holds a negative value ({int(value.min())}), expected counts >= {minimum}"
    return None


#: the state layouts of the stateful threshold policies
_STATE_LAYOUTS = tuple(p.state for p in POLICIES.values() if p.state is not None)


def _threshold_state_checks(state: dict, group_index: int, key: str, count_key: str, columns: int,
                            min_rows: int, fixed_rows) -> dict:
    """The expected (dtype, shape, minimum) of a threshold's state tensor and its counts, if saved."""
    value = state.get(key)
    if value is None:
        if count_key in state:
            raise ValueError(f"Invalid checkpoint: param group {group_index}: state key {count_key!r} "
                             f"comes without its {key!r}")
        return {}
    rows = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() == 2 else -1
    rows = fixed_rows if fixed_rows is not None else max(rows, min_rows)
    dtype = value.dtype if getattr(value, "dtype", None) == torch.float64 else torch.float32
    return {key: (dtype, (rows, columns), None), count_key: (torch.int64, (columns,), 0)}


def validate_group_state(state: dict, group_index: int, n_params: int) -> None:
    """Check a group's loaded ``clip_*`` state (dtypes, shapes, value ranges) before it replaces
    anything; raises ValueError naming the group, the key and what was expected.  A corrupt count
    or a history with too few columns would otherwise make a kernel read or write outside its
    buffers."""
    if "clip_step" not in state:
        return
    checks = {
        "clip_step": (torch.int64, (), 0),
        "clip_skipped": (torch.int64, (), 0),
        "clip_stats": (torch.float32, (len(STAT_NAMES),), None),
        "clip_momentum_ready": (torch.bool, (n_params,), None),
    }
    for key, check in (("clip_spike", (torch.float32, (), None)), ("clip_spike_skipped", (torch.int64, (), 0))):
        if key in state:  # (absent from a checkpoint saved before the skip rules)
            checks[key] = check
    for layout in SKIP_STATE_LAYOUTS:  # a skip rule's state: one float64 column
        checks.update(_threshold_state_checks(state, group_index, layout.key, layout.count_key, 1, layout.min_rows,
                                              layout.fixed_rows))
        if layout.key in state:
            checks[layout.key] = (torch.float64,) + checks[layout.key][1:]
    for scope, columns in (("global", 1), ("layer", n_params)):
        for layout in _STATE_LAYOUTS:
            checks.update(_threshold_state_checks(state, group_index, f"{layout.key}_{scope}",
                                                  f"{layout.count_key}_{scope}", columns, layout.min_rows,
                                                  layout.fixed_rows))
    for key, (dtype, shape, minimum) in checks.items():
        if key not in state:
            raise ValueError(f"Invalid checkpoint: param group {group_index}: state key {key!r} is missing")
        problem = _problem(state[key], dtype, shape, minimum)
        if problem is not None:
            raise ValueError(f"Invalid checkpoint: param group {group_index}: state key {key!r} {problem}")
    if TENSOR_STATS_KEY in state:  # (absent from a checkpoint saved before per-tensor statistics)
        check_tensor_stats(state[TENSOR_STATS_KEY], group_index, n_params)
    seed = state.get("clip_seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"Invalid checkpoint: param group {group_index}: state key 'clip_seed' is {seed!r}, "
                         "expected an int in [0, 2**32)")
    steps = state.get("clip_steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"Invalid checkpoint: param group {group_index}: state key 'clip_steps' is {steps!r}, "
                         "expected an int >= 0")
