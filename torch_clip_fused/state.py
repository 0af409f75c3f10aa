"""The state a param group keeps between steps, stored with torch.optim's per-parameter state.

torch.optim keeps state per parameter; a group's own state (step count, seed,
AutoClip histories, momentum-initialised flags, statistics) lives in the state
of the group's first parameter under keys starting with ``clip_``, so that
``state_dict()`` / ``load_state_dict()`` carry it without any extra mechanism.

Keys (all tensors on the parameters' device):

* ``clip_seed``           int, the group's Philox seed (32 bits)
* ``clip_step``           int64 [], step() calls so far (the Philox step)
* ``clip_steps``          int, host mirror of ``clip_step`` (sizes histories without a sync)
* ``clip_history_global`` float32 [capacity, 1]; ``clip_history_layer`` [capacity, n_params]
* ``clip_count_global`` / ``clip_count_layer``  int64 [columns]: norms recorded per column
* ``clip_momentum_ready`` bool [n_params]: the momentum buffer holds a first step
* ``clip_stats``          float32 [4]: norm, threshold, clipped fraction, skipped (last step)
* ``clip_skipped``        int64 []: steps skipped for non-finite gradients so far
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

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
        [("momentum_buffer" in param_states[p]) for p in params], dtype=torch.bool, device=device
    )
    state["clip_stats"] = torch.full((len(STAT_NAMES),), float("nan"), dtype=torch.float32, device=device)
    state["clip_skipped"] = torch.zeros((), dtype=torch.int64, device=device)


def history_for_step(
    state: dict, cfg: GroupConfig, n_params: int, device: torch.device
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The AutoClip history and counts this step writes to, grown or re-laid on the host side
    so that one more row always fits.  None for methods without an auto threshold."""
    if THRESHOLD_STATE[cfg.clip.method.threshold] != "history":
        return None, None
    scope = "global" if cfg.clip.method.scope is Scope.GLOBAL else "layer"
    hkey, ckey = f"clip_history_{scope}", f"clip_count_{scope}"
    columns = 1 if scope == "global" else n_params
    if hkey not in state:
        rows = cfg.clip.autoclip_history or INITIAL_HISTORY_ROWS
        state[hkey] = torch.zeros((rows, columns), dtype=torch.float32, device=device)
        state[ckey] = torch.zeros((columns,), dtype=torch.int64, device=device)
        state[hkey + "_capped"] = cfg.clip.autoclip_history is not None
    history, count = state[hkey], state[ckey]
    capped = state[hkey + "_capped"]
    if capped != (cfg.clip.autoclip_history is not None) or (capped and history.shape[0] != cfg.clip.autoclip_history):
        history, count = _relayout(history, count, cfg.clip.autoclip_history or INITIAL_HISTORY_ROWS)
    rows_needed = state["clip_steps"] + 1  # an upper bound on the count after this step
    if cfg.clip.autoclip_history is None and rows_needed > history.shape[0]:
        grown = torch.zeros((max(2 * history.shape[0], rows_needed), columns), dtype=torch.float32, device=device)
        grown[: history.shape[0]] = history
        history = grown
    state[hkey], state[ckey] = history, count
    state[hkey + "_capped"] = cfg.clip.autoclip_history is not None
    return history, count


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
