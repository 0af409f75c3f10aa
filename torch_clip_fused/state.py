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
* ``clip_history_global`` float32 [capacity, 1]; ``clip_history_layer`` [capacity, n_params]
* ``clip_count_global`` / ``clip_count_layer``  int64 [columns]: norms recorded per column
* ``clip_sorted_global`` / ``clip_sorted_layer`` float32 [columns, capacity]: the same norms,
  ascending per column, +inf padded (backends/reference/history.py); derived from the history,
  rebuilt from it when a checkpoint is loaded
* ``clip_zclip_global`` / ``clip_zclip_layer`` float32 [2 + W, columns] (float64 for float64 groups):
  the zscore threshold (ZClip) per column: row 0 the EMA mean, row 1 the EMA variance, rows 2.. the
  W = max(zclip_warmup, 1) warm-up norms (config.ClipConfig.zclip_rows)
* ``clip_zclip_count_global`` / ``clip_zclip_count_layer`` int64 [columns]: warm-up norms recorded
  (at most W; the EMAs were started from them once it is W)
* ``clip_adagc_global`` / ``clip_adagc_layer`` float32 [1, columns] (float64 for float64 groups): the
  ema_relative threshold (AdaGC) per column: gamma, the EMA of the clipped norms (+inf: nothing
  recorded yet)
* ``clip_adagc_count_global`` / ``clip_adagc_count_layer`` int64 [columns]: steps recorded (AdaGC's
  step count; the warm-up is over once count >= 1 and count + 1 >= adagc_warmup)
* ``clip_momentum_ready`` bool [n_params]: the momentum buffer holds a first step
* ``clip_stats``          float32 [4]: norm, threshold, clipped fraction, skipped (last step)
* ``clip_skipped``        int64 []: steps skipped for non-finite gradients so far
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .backends.reference.history import grow_sorted, sorted_from_ring
from .config import STAT_NAMES, GroupConfig
from .methods import THRESHOLD_STATE, Scope

INITIAL_HISTORY_ROWS = 64


def init_group_state(state: dict, params, param_states, seed: int, device: torch.device) -> None:
    """Create a group's state on first use; momentum buffers loaded from a torch.optim.SGD
    checkpoint count as initialised."""
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


def history_for_step(
    state: dict, cfg: GroupConfig, n_params: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The AutoClip history (ring), its sorted rows and the counts this step writes to, grown or
    re-laid on the host side so that one more record always fits.  None for methods without an
    auto threshold.  ``dtype``: the group's norm arithmetic (float64 for float64 groups)."""
    if THRESHOLD_STATE[cfg.clip.method.threshold] != "history":
        return None, None, None
    scope = "global" if cfg.clip.method.scope is Scope.GLOBAL else "layer"
    hkey, ckey, skey = f"clip_history_{scope}", f"clip_count_{scope}", f"clip_sorted_{scope}"
    columns = 1 if scope == "global" else n_params
    if hkey not in state:
        rows = cfg.clip.autoclip_history or INITIAL_HISTORY_ROWS
        state[hkey] = torch.zeros((rows, columns), dtype=dtype, device=device)
        state[ckey] = torch.zeros((columns,), dtype=torch.int64, device=device)
        state[skey] = torch.full((columns, rows), float("inf"), dtype=dtype, device=device)
        state[hkey + "_capped"] = cfg.clip.autoclip_history is not None
    history, count = state[hkey], state[ckey]
    if history.dtype != dtype:  # the group's dtype changed (float64 <-> lower precision): rare
        history = state[hkey] = history.to(dtype)
        state.pop(skey, None)
    if skey not in state:  # a state written before the sorted rows existed
        state[skey] = sorted_from_ring(history, count)
    ordered = state[skey]
    capped = state[hkey + "_capped"]
    if capped != (cfg.clip.autoclip_history is not None) or (capped and history.shape[0] != cfg.clip.autoclip_history):
        history, count = _relayout(history, count, cfg.clip.autoclip_history or INITIAL_HISTORY_ROWS)
        ordered = sorted_from_ring(history, count)
    rows_needed = state["clip_steps"] + 1  # an upper bound on the count after this step
    if cfg.clip.autoclip_history is None and rows_needed > history.shape[0]:
        grown = torch.zeros((max(2 * history.shape[0], rows_needed), columns), dtype=dtype, device=device)
        grown[: history.shape[0]] = history
        history = grown
        ordered = grow_sorted(ordered, history.shape[0])
    state[hkey], state[ckey], state[skey] = history, count, ordered
    state[hkey + "_capped"] = cfg.clip.autoclip_history is not None
    return history, ordered, count


def zclip_state_for_step(
    state: dict, cfg: GroupConfig, n_params: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The zscore threshold's state (ZClip: EMA mean and variance and the warm-up records per
    column) and its warm-up counts, created on first use and re-laid (no host sync) when
    ``zclip_warmup`` or the group's dtype changed.  (None, None) for other thresholds."""
    if THRESHOLD_STATE[cfg.clip.method.threshold] != "zscore":
        return None, None
    scope = "global" if cfg.clip.method.scope is Scope.GLOBAL else "layer"
    skey, ckey = f"clip_zclip_{scope}", f"clip_zclip_count_{scope}"
    columns = 1 if scope == "global" else n_params
    rows = cfg.clip.zclip_rows
    if skey not in state:
        state[skey] = torch.zeros((rows, columns), dtype=dtype, device=device)
        state[ckey] = torch.zeros((columns,), dtype=torch.int64, device=device)
    zstate, count = state[skey], state[ckey]
    if zstate.dtype != dtype:  # the group's dtype changed (float64 <-> lower precision): rare
        zstate = state[skey] = zstate.to(dtype)
    if zstate.shape[0] != rows:  # zclip_warmup changed: keep the EMAs and the first records
        zstate, count = _zclip_relayout(zstate, count, rows)
        state[skey], state[ckey] = zstate, count
    return zstate, count


def adagc_state_for_step(
    state: dict, cfg: GroupConfig, n_params: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The ema_relative threshold's state (AdaGC: gamma, the EMA of the clipped norms, per column,
    +inf before the first record) and its step counts, created on first use (no host sync); cast
    when the group's dtype changed.  (None, None) for other thresholds."""
    if THRESHOLD_STATE[cfg.clip.method.threshold] != "adagc":
        return None, None
    scope = "global" if cfg.clip.method.scope is Scope.GLOBAL else "layer"
    skey, ckey = f"clip_adagc_{scope}", f"clip_adagc_count_{scope}"
    columns = 1 if scope == "global" else n_params
    if skey not in state:
        state[skey] = torch.full((1, columns), math.inf, dtype=dtype, device=device)
        state[ckey] = torch.zeros((columns,), dtype=torch.int64, device=device)
    gamma = state[skey]
    if gamma.dtype != dtype:  # the group's dtype changed (float64 <-> lower precision): rare
        gamma = state[skey] = gamma.to(dtype)
    return gamma, state[ckey]


def _zclip_relayout(zstate: torch.Tensor, count: torch.Tensor, rows: int):
    """A zscore state with a new warm-up length W' = rows - 2: started EMAs stay started; a warm-up
    in progress goes on to W' records, and one that already has W' records starts its EMAs now
    from them (ZClip's biased mean and variance).  Device ops only."""
    old_w, new_w = zstate.shape[0] - 2, rows - 2
    new = torch.zeros((rows, zstate.shape[1]), dtype=zstate.dtype, device=zstate.device)
    kept = min(old_w, new_w)
    new[: 2 + kept] = zstate[: 2 + kept]
    started = count >= old_w
    cut = ~started & (count >= new_w)  # a warm-up that has its W' records: start the EMAs from them
    records = zstate[2: 2 + new_w] if old_w >= new_w else None
    if records is not None:
        mean = records.sum(0) / new_w
        var = (records - mean).square().sum(0) / new_w
        new[0] = torch.where(cut, mean, new[0])
        new[1] = torch.where(cut, var, new[1])
    new_count = torch.where(started, torch.full_like(count, new_w), count.clamp(max=new_w))
    return new, new_count


def rebuild_sorted_histories(state: dict) -> None:
    """Derive the sorted rows of a loaded history from the history itself (a checkpoint's own
    copy is not trusted: a row out of order or holding other norms would give wrong thresholds)."""
    for scope in ("global", "layer"):
        history = state.get(f"clip_history_{scope}")
        if history is not None:
            state[f"clip_sorted_{scope}"] = sorted_from_ring(history, state[f"clip_count_{scope}"])


def _relayout(history: torch.Tensor, count: torch.Tensor, rows: int):
    """Copy the newest min(n, rows) records of a ring buffer into a fresh one of ``rows`` rows,
    oldest first.  Runs only when the user changes ``autoclip_history`` (it syncs once)."""
    capacity, columns = history.shape
    new = torch.zeros((rows, columns), dtype=history.dtype, device=history.device)
    new_count = torch.zeros_like(count)
    for c in range(columns):
        n = int(count[c])
        kept = min(n, capacity, rows)
        order = [(n - kept + j) % capacity for j in range(kept)]
        new[:kept, c] = history[order, c]
        new_count[c] = kept
    return new, new_count


def group_statistics(state: dict) -> dict:
    """The last step's statistics as 0-d device tensors (reading one with .item() syncs)."""
    if "clip_stats" not in state:
        return {}
    out = {name: state["clip_stats"][i] for i, name in enumerate(STAT_NAMES)}
    out["skipped_steps"] = state["clip_skipped"]
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


#: A threshold policy's state: (value key, count key, fewest rows, fixed rows or None), before
#: the scope suffix: AutoClip's history [rows, columns], ZClip's EMAs and warm-up norms
#: [rows >= 3, columns], AdaGC's EMA [1, columns]; each with an int64 count per column.
THRESHOLD_STATE_KEYS = (("clip_history", "clip_count", 1, None), ("clip_zclip", "clip_zclip_count", 3, None),
                        ("clip_adagc", "clip_adagc_count", 1, 1))


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
    for scope, columns in (("global", 1), ("layer", n_params)):
        for value_key, count_key, min_rows, fixed_rows in THRESHOLD_STATE_KEYS:
            checks.update(_threshold_state_checks(state, group_index, f"{value_key}_{scope}",
                                                  f"{count_key}_{scope}", columns, min_rows, fixed_rows))
    for key, (dtype, shape, minimum) in checks.items():
        if key not in state:
            raise ValueError(f"Invalid checkpoint: param group {group_index}: state key {key!r} is missing")
        problem = _problem(state[key], dtype, shape, minimum)
        if problem is not None:
            raise ValueError(f"Invalid checkpoint: param group {group_index}: state key {key!r} {problem}")
    seed = state.get("clip_seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"Invalid checkpoint: param group {group_index}: state key 'clip_seed' is {seed!r}, "
                         "expected an int in [0, 2**32)")
    steps = state.get("clip_steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"Invalid checkpoint: param group {group_index}: state key 'clip_steps' is {steps!r}, "
                         "expected an int >= 0")
