"""The auto threshold (AutoClip): its settings, its history of norms kept sorted (O(n) bytes moved per
record, O(1) quantile lookup) and the policy record.

AutoClip (Seetharaman et al., 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation
Networks") clips at eta = the nearest-rank p-quantile of every norm recorded so far:

    eta = v_(k),  k = clamp(ceil(p n), 1, n),  v_(1) <= ... <= v_(n) the n recorded norms.

Two tensors hold a param group's history, per scope column c (one column at global scope, one
per parameter at layer scope):

* ``ring``   float32 [capacity, columns]: the norms in the order recorded (slot = count mod
  capacity), so that a capped history (``autoclip_history=N``) knows which norm leaves;
* ``sorted`` float32 [columns, capacity]: row c holds column c's n = min(count, capacity) norms
  ascending, then +inf padding (so every row is sorted as a whole).

Recording x in a column: when the ring is full the norm `old` in x's slot leaves the sorted row
at a = #{v < old} (its first copy), otherwise the padding at a = n leaves; x enters at
b = #{v < x} - [full and old < x] of the row without position a.  Only positions between a and
b move, by one:

    out[j] = x                        j = b
    out[j] = s[j + 1]                 a <= j < b   (a <= b: a left shift)
    out[j] = s[j - 1]                 b < j <= a   (a > b: a right shift)
    out[j] = s[j]                     otherwise

The quantile is then one read, ``sorted[c, k - 1]``.  A step's cost no longer grows with the
run's length beyond the O(n) bytes of the shift (a full sort per step before).  The same
arithmetic runs in the C++ kernel (csrc/autoclip_history.h) and the Triton scale stage
(kernels/autoclip_history.py); all three give the same thresholds bit for bit.

This is the reference: vectorised over the columns, every position of a row computed (torch has
no partial shift), no host synchronisation.

Settings: ``p_autoclip`` (0 < p <= 1) and ``autoclip_history`` (None keeps every norm, as the
original; N the last N).  State (thresholds/policy.py): ``values`` = the ring, ``sorted_values`` =
the sorted rows, ``counts``; an uncapped history starts with 64 rows and doubles before it fills.
"""

from __future__ import annotations

import torch

from ..checks import bounded, count as count_setting
from ..methods import Threshold
from .policy import Setting, StateLayout, ThresholdInputs, ThresholdPolicy, ThresholdState

#: rows of a new uncapped history
INITIAL_HISTORY_ROWS = 64


def sorted_from_ring(ring: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The sorted rows [columns, capacity] of a ring [capacity, columns] with ``count`` records per
    column (only the newest min(count, capacity) are in the ring).  Used when a history is created,
    grown, re-laid or loaded from a checkpoint, never inside a step's hot path."""
    capacity = ring.shape[0]
    n = count.clamp(max=capacity)
    valid = torch.arange(capacity, device=ring.device).unsqueeze(1) < n.unsqueeze(0)
    return torch.where(valid, ring, torch.full_like(ring, float("inf"))).t().sort(dim=1).values.contiguous()


def grow_sorted(sorted_rows: torch.Tensor, capacity: int) -> torch.Tensor:
    """The sorted rows padded with +inf to ``capacity`` columns (an uncapped history that grew)."""
    out = torch.full((sorted_rows.shape[0], capacity), float("inf"), dtype=sorted_rows.dtype,
                     device=sorted_rows.device)
    out[:, : sorted_rows.shape[1]] = sorted_rows
    return out


def record_and_threshold(ring: torch.Tensor, sorted_rows: torch.Tensor, count: torch.Tensor, columns: torch.Tensor,
                         norms: torch.Tensor, record: torch.Tensor, p: float) -> torch.Tensor:
    """Record ``norms`` (one per column in ``columns``) where ``record`` is true, then return each
    column's nearest-rank p-quantile, the current norm included; a column with nothing recorded
    uses the current norm (no clipping).  Updates ``ring``, ``sorted_rows`` and ``count``."""
    capacity = ring.shape[0]
    cnt = count[columns]
    slot = cnt % capacity
    full = cnt >= capacity
    old = ring[slot, columns]
    rows = sorted_rows[columns]
    n = cnt.clamp(max=capacity)
    less_old = torch.searchsorted(rows, old.unsqueeze(1)).squeeze(1)  # #{v < old}: rows are sorted
    less_new = torch.searchsorted(rows, norms.unsqueeze(1)).squeeze(1)
    a = torch.where(full, less_old, n).clamp(max=capacity - 1)
    b = (less_new - (full & (old < norms)).to(less_new.dtype)).clamp(0, capacity - 1)
    j = torch.arange(capacity, device=ring.device).unsqueeze(0)
    a, b = a.unsqueeze(1), b.unsqueeze(1)
    pad = torch.full_like(rows[:, :1], float("inf"))
    ahead, behind = torch.cat([rows[:, 1:], pad], dim=1), torch.cat([pad, rows[:, :-1]], dim=1)
    shifted = torch.where((j >= a) & (j < b), ahead, torch.where((j > b) & (j <= a), behind, rows))
    shifted = torch.where(j == b, norms.unsqueeze(1), shifted)
    rows = torch.where(record.unsqueeze(1), shifted, rows)
    sorted_rows[columns] = rows
    ring[slot, columns] = torch.where(record, norms, old)
    cnt = cnt + record.to(cnt.dtype)
    count[columns] = cnt
    n = cnt.clamp(max=capacity)
    rank = torch.ceil(p * n.to(torch.float64)).to(torch.int64).clamp(min=1)
    rank = torch.minimum(rank, n.clamp(min=1))
    eta = rows.gather(1, (rank - 1).unsqueeze(1)).squeeze(1)
    return torch.where(cnt > 0, eta, norms)


def auto_threshold(x: ThresholdInputs) -> torch.Tensor:
    """AutoClip (Seetharaman et al., 2020): eta = the nearest-rank p-quantile of the norms recorded at
    the column so far, the current one included (recorded only if the step is ok and the norm finite)."""
    record = x.ok & torch.isfinite(x.norms)
    s = x.state
    return record_and_threshold(s.values, s.sorted_values, s.counts, x.columns, x.norms, record, x.clip.p_autoclip)


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


def _prepare(ts: ThresholdState, clip, steps: int, state: dict, key: str) -> ThresholdState:
    """The history for this step: re-laid when ``autoclip_history`` changed (the flag under ``key +
    "_capped"`` says whether the rows are a cap), grown on the host side so that one more record always
    fits (``steps``: step() calls so far, an upper bound on the count)."""
    history, count, ordered = ts.values, ts.counts, ts.sorted_values
    cap = clip.autoclip_history
    capped = state.get(key + "_capped", cap is not None)
    if capped != (cap is not None) or (capped and history.shape[0] != cap):
        history, count = _relayout(history, count, cap or INITIAL_HISTORY_ROWS)
        ordered = sorted_from_ring(history, count)
    if cap is None and steps + 1 > history.shape[0]:
        grown = torch.zeros((max(2 * history.shape[0], steps + 1), history.shape[1]), dtype=history.dtype,
                            device=history.device)
        grown[: history.shape[0]] = history
        history = grown
        ordered = grow_sorted(ordered, history.shape[0])
    state[key + "_capped"] = cap is not None
    return ThresholdState(history, count, ordered)


AUTO = ThresholdPolicy(
    Threshold.AUTO, auto_threshold,
    settings=(
        Setting("p_autoclip", 0.75, lambda v: bounded(v, "p_autoclip", lambda p: 0.0 < p <= 1.0, "0 < p_autoclip <= 1"),
                "AutoClip's quantile p, 0 < p <= 1"),
        Setting("autoclip_history", None, lambda v: count_setting(v, "autoclip_history", 1, allow_none=True),
                "None keeps every norm (as the original); N keeps the last N"),
    ),
    state=StateLayout("clip_history", "clip_count", rows=lambda clip: clip.autoclip_history or INITIAL_HISTORY_ROWS,
                      sorted_key="clip_sorted", prepare=_prepare),
    kernel_params=lambda clip: (clip.p_autoclip,),
    shared_settings=("p_autoclip", "autoclip_history"),
)

__all__ = ["AUTO", "INITIAL_HISTORY_ROWS", "auto_threshold", "grow_sorted", "record_and_threshold", "sorted_from_ring"]
