"""ClippedAdamW: torch.optim.AdamW whose gradients are clipped first, in one fused pass."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..backends import resolve_backend
from ..config import ADAGC_DEFAULTS, AGC_DEFAULTS, ZCLIP_DEFAULTS, GroupConfig
from .compile_guard import eager_step
from .base import ClippedOptimizer
from .param_state import fitted_state, where


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
        clipping_type, clipping_level, beta, p_autoclip, autoclip_history, zclip_*, adagc_*,
        agc_eps, nonfinite, seed, backend, per_group_norm: as :class:`ClippedSGD` (the gradient is clipped; there
            is no ``clip_point="update"``).
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

    _param_state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

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
        zclip_alpha: float = ZCLIP_DEFAULTS["zclip_alpha"],
        zclip_z: float = ZCLIP_DEFAULTS["zclip_z"],
        zclip_warmup: int = ZCLIP_DEFAULTS["zclip_warmup"],
        adagc_lambda: float = ADAGC_DEFAULTS["adagc_lambda"],
        adagc_beta: float = ADAGC_DEFAULTS["adagc_beta"],
        adagc_warmup: int = ADAGC_DEFAULTS["adagc_warmup"],
        agc_eps: float = AGC_DEFAULTS["agc_eps"],
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        per_group_norm: bool = False,
    ):
        backend = resolve_backend(backend, foreach=foreach, fused=fused, differentiable=differentiable)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            clipping_type=clipping_type, clipping_level=clipping_level, beta=beta, p_autoclip=p_autoclip,
            autoclip_history=autoclip_history, clip_point=clip_point, nonfinite=nonfinite,
            zclip_alpha=zclip_alpha, zclip_z=zclip_z, zclip_warmup=zclip_warmup, adagc_lambda=adagc_lambda,
            adagc_beta=adagc_beta, adagc_warmup=adagc_warmup, agc_eps=agc_eps,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults, seed, backend, per_group_norm)

    def _group_config(self, group: dict) -> GroupConfig:
        return GroupConfig.from_adamw_group(group)

    @eager_step  # one clean graph break under torch.compile; fullgraph=True says what works
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every param group (clipped gradients); returns the closure's loss, if any."""
        loss = self._evaluate(closure)
        work = []
        for i, (group, (cfg, layout)) in enumerate(zip(self.param_groups, self._prepare())):
            if layout.params:  # every group's moments are checked before any group moves
                self._group_state(i, group, layout.device)
                work.append((i, group, cfg, layout, self._moments(i, layout, group, cfg.update.amsgrad)))
        self._step_groups([(i, group, cfg, layout, exp_avgs,
                            dict(exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs, adam_steps=steps))
                           for i, group, cfg, layout, (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps) in work])
        return loss

    def _moments(self, index: int, layout, group: dict, amsgrad: bool):
        """The layout's exp_avg, exp_avg_sq (and max_exp_avg_sq) lists, created as zeros where missing,
        and the group's float32 [G] step counts on the device, of which every parameter's ``step`` state
        is a 0-d view.  Collected again (the step counts stacked from the current ``step`` values)
        after ``self.state`` is edited or a checkpoint loads; the same lists otherwise."""
        cached = layout.buffers
        if cached is not None and layout.buffers_version == self.state.version and (cached[2] is not None) == amsgrad:
            return cached
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        lists = {key: [] for key in keys}
        for column, p in zip(layout.columns, layout.params):
            st = self.state[p]
            for key in keys:
                buf = st.get(key)
                # missing, or loaded / cast with another dtype or layout: the fused kernels walk p's memory order
                buf = (torch.zeros_like(p, memory_format=torch.preserve_format) if buf is None
                       else fitted_state(p, buf, key, where(index, group, column)))
                lists[key].append(buf)
        for j, p in enumerate(layout.params):  # stored once every moment is known to fit
            st = self.state[p]
            for key in keys:
                if st.get(key) is not lists[key][j]:
                    st[key] = lists[key][j]
        params = group["params"]
        steps = torch.zeros(len(params), dtype=torch.float32, device=layout.device)
        for j, p in enumerate(params):
            value = self.state[p].get("step") if p in self.state else None
            if value is not None:
                steps[j] = torch.as_tensor(value, dtype=torch.float32).to(layout.device)  # at rebuilds only
        for j, p in enumerate(params):
            if p in self.state and ("exp_avg" in self.state[p] or "step" in self.state[p]):
                dict.__setitem__(self.state[p], "step", steps[j])  # a view: not an edit of the state
        if cached is not None and any(a is not b for a, b in zip(lists["exp_avg"], cached[0])):
            layout.backend_cache.clear()  # a backend's cache (the Triton plan) holds the old buffers
        layout.buffers = (lists["exp_avg"], lists["exp_avg_sq"], lists.get("max_exp_avg_sq"), steps)
        layout.buffers_version = self.state.version
        layout.backend_cache.clear()  # the step counts are a new tensor
        return layout.buffers


__all__ = ["ClippedAdamW"]
