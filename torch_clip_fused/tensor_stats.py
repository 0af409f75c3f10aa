"""Per-tensor telemetry (issue 21 item 4): each parameter's pre-clip norm and applied scale of the last
step, kept on the device in the param group's state and written by the backends during the passes they
run anyway (no extra pass over the gradients, no host sync).

``clip_state["clip_tensor_stats"]`` is float32 [2, G] for a group of G parameters, column c the
parameter at position c of the group (``GroupTensors.columns``):

* row 0 (``NORM_ROW``), the norm the clipping decision took, ||x_c|| = sqrt(sum_k x_ck^2) with x the
  clipping source (the gradient, unscaled by a GradScaler; the update direction d under
  ``clip_point="update"``): the group's norm pass's per-tensor norm, or, where norms are given (a norm
  shared by several groups, a DTensor group, ``norm_group``), the given one (reduced across ranks: the
  whole parameter's norm).  NaN where the step takes no norm (coordinate scope or no clipping with
  ``nonfinite="apply"``, as the group's ``norm`` statistic).
* row 1 (``SCALE_ROW``), by scope, with s the scale the step applied:

  - global: s = eta / ||g|| where clipped, else 1 (the same value in every column);
  - layer: s_c = eta_c / ||g_c|| where clipped, else 1;
  - unit (AGC): the fraction of the parameter's output units whose scale is below 1 (the units that were
    scaled down);
  - coordinate: the fraction of the parameter's elements clipped (|x_i| > eta, and drawn if randomized);
  - no clipping: 1.

  A skipped step (non-finite gradient, GradScaler's found_inf, a skip rule, a bad tensor lr) applies
  nothing: its norms are written as computed (inf or NaN where a gradient is not finite) and its scales
  are 1 (the fractions 0), as its ``clipped_fraction`` statistic is 0.

A column whose parameter had no gradient in the step is NaN in both rows.  A follower of a shared norm
(optim/shared_norm.py: stepped with a derived constant threshold and the norm ||g|| / eta) reports its
own per-tensor norms and the lead's scale (:func:`follow_lead`).  At coordinate scope a DTensor group's
fractions are those of this rank's shards.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

#: the rows of ``clip_tensor_stats``
NORM_ROW, SCALE_ROW = 0, 1
ROWS = 2
#: the group-state key
KEY = "clip_tensor_stats"


def init_tensor_stats(state: dict, n_params: int, device: torch.device) -> None:
    """The group's per-tensor statistics, created where missing (a new group, an older checkpoint): NaN
    until a step writes them."""
    if KEY not in state:
        state[KEY] = torch.full((ROWS, n_params), float("nan"), dtype=torch.float32, device=device)


def check_tensor_stats(value, group_index: int, n_params: int) -> None:
    """A loaded ``clip_tensor_stats`` (absent from checkpoints saved before it): float32 [2, n_params];
    ValueError naming the group and what was expected otherwise."""
    if not isinstance(value, torch.Tensor):
        problem = f"is a {type(value).__name__}, expected a tensor"
    elif value.dtype != torch.float32:
        problem = f"has dtype {value.dtype}, expected torch.float32"
    elif tuple(value.shape) != (ROWS, n_params):
        problem = f"has shape {tuple(value.shape)}, expected {(ROWS, n_params)}"
    else:
        return
    raise ValueError(f"Invalid checkpoint: param group {group_index}: state key {KEY!r} {problem}")


def prepare_for_step(stats: torch.Tensor, stepped: int) -> None:
    """Before a step that steps ``stepped`` of the group's parameters: where some have no gradient, every
    column to NaN (the backends then write the stepped ones); one fill, no host sync."""
    if stepped < stats.shape[1]:
        stats.fill_(math.nan)


def write_columns(stats: torch.Tensor, columns: torch.Tensor, norms: torch.Tensor, scales: torch.Tensor) -> None:
    """Rows (norms, scales) ([T] each, any floating dtype, in the step's tensor order) into the columns
    ``columns`` (int64 [T], on the stats' device) of ``stats``: one ``index_copy_``."""
    values = torch.stack([norms.to(torch.float32), scales.to(torch.float32)])
    stats.index_copy_(1, columns, values)


def skipped_scales(scales: torch.Tensor, ok: torch.Tensor, fraction: bool) -> torch.Tensor:
    """A skipped step applies nothing: scales 1, fractions (unit, coordinate scope) 0, where ``ok`` is False."""
    return torch.where(ok, scales, torch.zeros_like(scales) if fraction else torch.ones_like(scales))


def follow_lead(stats: torch.Tensor, columns: torch.Tensor, own_norms: torch.Tensor, lead_stats: torch.Tensor,
                lead_column: int) -> None:
    """A shared-norm follower's row values after its step (optim/shared_norm.py): its own per-tensor norms
    ``own_norms`` ([T + 1]: per tensor, then the shared norm) and the lead's scale, the lead's
    ``SCALE_ROW`` at ``lead_column`` (the same in all of the lead's columns: global scope)."""
    scale = lead_stats[SCALE_ROW, lead_column].expand(columns.shape[0])
    write_columns(stats, columns, own_norms[:-1], scale)


def names_of(group: dict) -> List[str]:
    """The group's parameter names: ``param_names`` (the optimizer was given ``named_parameters()``), else
    each parameter's position in the group as a string."""
    names: Optional[Sequence[str]] = group.get("param_names")
    n = len(group["params"])
    if names is not None and len(names) == n:
        return [str(name) for name in names]
    return [str(i) for i in range(n)]


def group_tensor_statistics(group: dict, state: dict) -> dict:
    """``{"names", "norm", "scale"}`` of one group (module docstring): the rows as views of the device
    tensor (overwritten by the next step; ``.clone()`` to keep), {} before the group's first step."""
    stats = state.get(KEY)
    if stats is None or "clip_step" not in state:
        return {}
    return {"names": names_of(group), "norm": stats[NORM_ROW], "scale": stats[SCALE_ROW]}


__all__ = ["KEY", "NORM_ROW", "ROWS", "SCALE_ROW", "check_tensor_stats", "follow_lead", "group_tensor_statistics",
           "init_tensor_stats", "names_of", "prepare_for_step", "skipped_scales", "write_columns"]
