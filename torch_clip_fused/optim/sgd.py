"""ClippedSGD: torch.optim.SGD with gradient clipping (every method of torch-clip 0.0.6 and more)."""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import resolve_backend
from .base import ClippedOptimizer
from ..config import GroupConfig


class ClippedSGD(ClippedOptimizer):
    r"""SGD (momentum, dampening, weight decay, nesterov, maximize as ``torch.optim.SGD``) whose
    gradients are clipped first.

    Args:
        params: parameters or param groups; every argument below is a param-group setting.
        lr: learning rate (a float, or a one-element tensor for CUDA-graph capture).
        clipping_type: a name of the original library (``"norm"``, ``"linear_rand_norm"``,
            ``"quadratic_rand_norm"``, ``"layer_wise"``, ``"coordinate_wise"``, ``"auto_clip"``,
            ``"linear_rand_autoclip"``, ``"quadratic_rand_autoclip"``, ``"no_clip"``, aliases
            ``*_stoch_*``) or any :class:`ClipMethod` triple.
        clipping_level: eta for constant thresholds; None takes 1.0 (global and layer scope)
            or 0.1 (coordinate scope).
        beta: base of the randomized clip probability, 0 < beta < 1.
        p_autoclip: the AutoClip quantile, 0 < p <= 1 (nearest rank).
        autoclip_history: None keeps every norm (as the original); N keeps the last N.
        clip_point: ``"grad"`` clips the gradient (SPEC 3); ``"update"`` clips the final step.
        nonfinite: ``"skip"`` (default) leaves a group with inf/NaN gradients untouched and counts
            the skip; ``"raise"`` raises FloatingPointError before anything is modified (this
            costs a host sync); ``"apply"`` applies the update as torch would.
        seed: 32-bit seed of the Philox draws; None draws one from torch's default generator.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``.
        foreach, fused, differentiable: torch.optim.SGD's implementation switches, accepted so that
            ClippedSGD is a drop-in replacement.  Every backend steps all tensors of a group
            together, so ``None`` and ``True`` are always fine; ``fused=False`` picks the
            foreach-based reference backend (with ``backend="auto"``), ``fused=True`` a fused one
            (C++ or Triton); ``foreach=False`` (a per-tensor loop) and ``differentiable=True``
            (autograd through the step) do not exist here and are errors, as are contradictions
            (``fused=True`` with ``foreach=True`` or with ``backend="reference"``).

    Statistics of the last step are device tensors (:meth:`statistics`); reading one with
    ``.item()`` is the only host sync, so read them when you log, not every step.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
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
        *,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
    ):
        backend = resolve_backend(backend, foreach=foreach, fused=fused, differentiable=differentiable)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            clipping_type=clipping_type,
            clipping_level=clipping_level,
            beta=beta,
            p_autoclip=p_autoclip,
            autoclip_history=autoclip_history,
            clip_point=clip_point,
            nonfinite=nonfinite,
            foreach=foreach,
            fused=fused,
            differentiable=differentiable,
        )
        super().__init__(params, defaults, seed, backend)

    def _group_config(self, group: dict) -> GroupConfig:
        return GroupConfig.from_group(group)

    @torch._disable_dynamo  # torch.compiler.disable, imported lazily (as torch.optim does)
    @torch.no_grad()
    def step(self, closure=None):
        """One step for every param group; returns the closure's loss, if any.

        Under ``torch.compile`` this is one clean graph break: the step runs eagerly (fused kernels,
        no host sync) and nothing in it is traced, so a compiled training step does not recompile
        from one step to the next."""
        loss = self._evaluate(closure)
        for i, (group, (cfg, layout)) in enumerate(zip(self.param_groups, self._prepare())):
            if layout.params:
                self._group_state(i, group, layout.device)
                buffers = self._momentum_buffers(layout) if cfg.update.momentum != 0 else None
                self._clipped_step(i, group, cfg, layout, layout.params, buffers)
        return loss

    def _momentum_buffers(self, layout):
        """The momentum buffers of the layout's parameters, created (zeros, not yet initialised)
        where missing; kept with the layout."""
        if layout.buffers is None:
            buffers = []
            for p in layout.params:
                st = self.state[p]
                if st.get("momentum_buffer") is None:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(st["momentum_buffer"])
            layout.buffers = buffers
        return layout.buffers


__all__ = ["ClippedSGD"]
