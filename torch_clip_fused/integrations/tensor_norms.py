"""Per-tensor norms for a logger (issue 21 item 4): the k largest pre-clip norms of the last step (and all of
them on request), with each tensor's applied scale, read back in the same single device-to-host transfer as
the group statistics (torch_clip_fused/tensor_stats.py has what the values mean).

:func:`tensor_norm_request` builds, on the device, one float64 vector of what is asked for and the function
that turns the transferred numbers into logger keys:

* ``all_norms``: every tensor's norm and scale, ``{prefix}tensor_norm/{name}`` and ``{prefix}tensor_scale/{name}``;
* ``top_k`` = k > 0: the same keys for the k tensors of largest norm over every group of every optimizer
  (``torch.topk`` on the device, NaN norms ranked last and left out), plus their positions in the vector, so
  that the names are found after the transfer.

``name`` is the parameter's name (``named_parameters()``), or ``group{g}/{position}``-style labels: with
several param groups each name is prefixed by ``group{g}/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


@dataclass
class TensorNormRequest:
    """What to read back (``vector``, float64 [m] on one device) and how to name it (``decode``)."""

    vector: torch.Tensor
    decode: Callable[[List[float]], Dict[str, float]]


def check_options(top_k, all_norms) -> None:
    """The callbacks' options: ``top_k`` an int >= 0, ``all_norms`` True or False (ValueError / TypeError)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k_tensor_norms must be an int >= 0 (0: none), got {top_k!r}")
    if not isinstance(all_norms, bool):
        raise TypeError(f"all_tensor_norms must be True or False, got {all_norms!r}")


def _labels(per_optimizer: Sequence[Tuple[str, list]]):
    """(key prefixes, label of every tensor, norm rows, scale rows) over every group of every optimizer."""
    prefixes, labels, norms, scales = [], [], [], []
    for prefix, groups in per_optimizer:
        stepped = [(g, s) for g, s in enumerate(groups) if s]
        for g, stats in stepped:
            group = f"group{g}/" if len(groups) > 1 else ""
            for name in stats["names"]:
                prefixes.append(prefix)
                labels.append(group + name)
            norms.append(stats["norm"])
            scales.append(stats["scale"])
    return prefixes, labels, norms, scales


def tensor_norm_request(per_optimizer: Sequence[Tuple[str, list]], top_k: int = 0,
                        all_norms: bool = False) -> Optional[TensorNormRequest]:
    """The request for ``per_optimizer`` ((key prefix, ``optimizer.tensor_statistics()``) per optimizer);
    None when nothing is asked for or no group has stepped.  Builds device tensors only (no host sync);
    groups on other devices than the first group's are copied to it."""
    check_options(top_k, all_norms)
    if not top_k and not all_norms:
        return None
    prefixes, labels, norm_rows, scale_rows = _labels(per_optimizer)
    if not labels:
        return None
    device = norm_rows[0].device
    norms = torch.cat([r.to(device=device, dtype=torch.float64) for r in norm_rows])
    scales = torch.cat([r.to(device=device, dtype=torch.float64) for r in scale_rows])
    count = norms.numel()

    def keys(i: int, norm: float, scale: float) -> Dict[str, float]:
        return {f"{prefixes[i]}tensor_norm/{labels[i]}": norm, f"{prefixes[i]}tensor_scale/{labels[i]}": scale}

    if all_norms:
        def decode_all(values: List[float]) -> Dict[str, float]:
            out: Dict[str, float] = {}
            for i in range(count):
                out.update(keys(i, values[i], values[count + i]))
            return out

        return TensorNormRequest(torch.cat([norms, scales]), decode_all)
    k = min(top_k, count)
    ranked = torch.where(torch.isnan(norms), torch.full_like(norms, -float("inf")), norms)
    index = torch.topk(ranked, k).indices

    def decode_top(values: List[float]) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for j in range(k):
            norm = values[j]
            if norm != norm:  # fewer than k tensors with a norm
                continue
            out.update(keys(int(values[2 * k + j]), norm, values[k + j]))
        return out

    return TensorNormRequest(torch.cat([norms[index], scales[index], index.to(torch.float64)]), decode_top)


__all__ = ["TensorNormRequest", "check_options", "tensor_norm_request"]
