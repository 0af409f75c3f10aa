"""ClippedAdamW: torch.optim.AdamW whose gradients are clipped first, in one fused pass."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..backends import resolve_backend
from ..config import GroupConfig
from ..skips import SKIP_SETTINGS
from ..thresholds import setting_defaults
from .compile_guard import eager_step
from .base import ClippedOptimizer
from .update_rules import ADAMW_RULE


class ClippedAdamW(ClippedOptimizer):
    r"""AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019) with the
    arguments, semantics and state keys of ``torch.optim.AdamW`` (``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``, ``step``: a ``torch.optim.AdamW`` checkpoint loads), whose gradients are
    clipped first with any method of :class:`ClippedSGD` (docs/spec.md section 1).  Per parameter,
    with g the clipped gradient (negated if maximize) and t the parameter's step count:

    .. math::
       \begin{aligned}
          \theta &\leftarrow \theta (1 - \gamma \lambda) \\
          m &\leftarrow \beta_1 m + (1 - \beta_1) g, \quad v \leftarrow \beta_2 v + (1 - \beta_2) g^2,
             \quad \hat v = \max(\hat v, v) \text{ (amsgrad) or } v \\
          \theta &\leftarrow \theta - \frac{\gamma}{1 - \beta_1^t} \,
             \frac{m}{\sqrt{\hat v} / \sqrt{1 - \beta_2^t} + \epsilon}
       \end{aligned}

    The fused backends read g, theta, m and v once and write theta, m and v once (the norm pass
    reads g once more): 32 bytes per float32 parameter, against 3 passes for ``clip_grad_norm_`` +
    ``AdamW(fused=True)``.  A step whose gradients hold inf or NaN (``nonfinite="skip"``) leaves the
    parameters, moments and step counts as they were and counts the skip.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``
            (``lr`` may be a one-element tensor).
        clipping_type, clipping_level, beta, p_autoclip, autoclip_history, **threshold_settings
        (zclip_*, adagc_*, agc_eps; the skip rules' skip_if_norm_above, skip_if_zscore_above,
        skip_zscore_alpha, skip_zscore_warmup), nonfinite, seed, backend, norm_type, per_group_norm, norm_group: as
            :class:`ClippedSGD` (the gradient is clipped; there is no ``clip_point="update"``).
        foreach, fused, capturable, differentiable: torch.optim.AdamW's implementation switches,
            accepted for drop-in use as in :class:`ClippedSGD` (every step is capturable: nothing in
            it syncs with the host).

    Example (no clipping: exactly torch.optim.AdamW)::

        >>> import torch
        >>> from torch_clip_fused import ClippedAdamW
        >>> p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> opt = ClippedAdamW([p], lr=0.1, weight_decay=0.0, clipping_type="no_clip", backend="reference")
        >>> p.grad = torch.tensor([0.5, -2.0])
        >>> opt.step()
        >>> p.detach()  # the first AdamW step moves each coordinate by lr against its gradient's sign
        tensor([ 0.9000, -0.9000])
        >>> sorted(opt.state[p])  # torch.optim.AdamW's keys; the group's own state is in opt.param_groups[0]["clip_state"]
        ['exp_avg', 'exp_avg_sq', 'step']
    """

    _update_rule = ADAMW_RULE
    _param_state_keys = ADAMW_RULE.all_keys
    _takes_dtensors = True

    def __init__(
        self,
        params,
        lr=1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        clipping_type="norm",
        clipping_level: Optional[float] = None,
        beta: float = 0.85,
        p_autoclip: float = 0.75,
        autoclip_history: Optional[int] = None,
        clip_point: str = "grad",
        nonfinite: str = "skip",
        seed: Optional[int] = None,
        backend: str = "auto",
        norm_type: float = 2.0,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        per_group_norm: bool = False,
        norm_group=None,
        **threshold_settings,
    ):
        backend = resolve_backend(backend, foreach=foreach, fused=fused, differentiable=differentiable)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            clipping_type=clipping_type, clipping_level=clipping_level, beta=beta, clip_point=clip_point,
            nonfinite=nonfinite, norm_type=norm_type,
            **setting_defaults(dict(threshold_settings, p_autoclip=p_autoclip, autoclip_history=autoclip_history),
                               "ClippedAdamW.__init__()", SKIP_SETTINGS),
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults, seed, backend, per_group_norm, norm_group)

    def _group_config(self, group: dict) -> GroupConfig:
        return GroupConfig.from_adamw_group(group)

    @eager_step  # one clean graph break under torch.compile; fullgraph=True says what works
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every param group (clipped gradients); returns the closure's loss, if any."""
        loss = self._evaluate(closure)
        self._rule_step()
        return loss


__all__ = ["ClippedAdamW"]
