"""``clip_gradients_``: clip ``.grad`` in place with any method, for users of other optimizers.

Example (AdamW with layer-wise AutoClip)::

    clip_state = {}
    for batch in loader:
        loss(model(batch)).backward()
        clip_gradients_(model.parameters(), "auto_clip", state=clip_state)
        adamw.step(); adamw.zero_grad()

``state`` keeps the step count, seed and AutoClip history between calls
(randomness as explicit state); pass the same dict every step.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple, Union

import torch

from .config import GroupConfig, GroupTensors
from .state import history_for_step, init_group_state
from .methods import ClipMethod
from .backends.reference import clip_gradients_step


@torch.no_grad()
def clip_gradients_(
    parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
    clipping_type: Union[str, ClipMethod] = "norm",
    clipping_level: Optional[float] = None,
    beta: float = 0.85,
    p_autoclip: float = 0.75,
    autoclip_history: Optional[int] = None,
    seed: Optional[int] = None,
    state: Optional[dict] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients of ``parameters`` in place; return (global norm, per-tensor norms)
    before clipping, as device tensors.  Parameters without a gradient are left out of the norms.

    ``seed`` (used when ``state`` is new) defaults to a draw from torch's default generator.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = list(parameters)
    cfg = GroupConfig.from_group(
        dict(lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
             clipping_type=clipping_type, clipping_level=clipping_level, beta=beta, p_autoclip=p_autoclip,
             autoclip_history=autoclip_history, clip_point="grad", nonfinite="apply")
    )
    with_grad = [(i, p) for i, p in enumerate(params) if p.grad is not None]
    if not with_grad:
        return torch.zeros(()), torch.zeros(0)
    devices = {p.grad.device for _, p in with_grad}
    if len(devices) > 1:
        raise ValueError(f"clip_gradients_ needs all gradients on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    state = {} if state is None else state
    if seed is None and "clip_seed" not in state:
        seed = int(torch.randint(0, 2**32, (), dtype=torch.int64))
    init_group_state(state, [], {}, seed if seed is not None else state.get("clip_seed", 0), device)
    history, count = history_for_step(state, cfg, len(params), device)
    grads = [p.grad for _, p in with_grad]
    offsets, total_numel = [], 0
    for p in params:
        offsets.append(total_numel)
        total_numel += p.numel()
    t = GroupTensors(
        params=[p for _, p in with_grad], grads=grads, momentum_buffers=None,
        columns=[i for i, _ in with_grad], offsets=[offsets[i] for i, _ in with_grad],
        seed=state["clip_seed"], step=state["clip_step"], history=history, history_count=count,
        momentum_ready=state["clip_momentum_ready"], stats=state["clip_stats"], skipped=state["clip_skipped"],
    )
    total, norms = clip_gradients_step(t, cfg)  # stages norms and scales, then the scales applied
    state["clip_step"].add_(1)
    state["clip_steps"] += 1
    return total, norms
