"""ClippedSGD: torch.optim.SGD with gradient clipping (every method of torch-clip 0.0.6 and more)."""

from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch.optim import Optimizer

from .backends import select_step, validate_backend
from .config import GroupConfig, GroupTensors, NonFinite
from .group_state import group_statistics, history_for_step, init_group_state
from .methods import ClipMethod

SEED_LIMIT = 2**32


def _draw_seed() -> int:
    return int(torch.randint(0, SEED_LIMIT, (), dtype=torch.int64))


def _group_seed(seed: int, index: int) -> int:
    """Distinct Philox seeds for the groups of one optimizer (golden-ratio stride)."""
    return (seed + index * 0x9E3779B9) % SEED_LIMIT


class ClippedSGD(Optimizer):
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

    Statistics of the last step are device tensors (:meth:`statistics`); reading one with
    ``.item()`` is the only host sync, so read them when you log, not every step.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr,
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
    ):
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
        )
        GroupConfig.from_group(defaults)
        self.backend = validate_backend(backend)
        if seed is None:
            seed = _draw_seed()
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"Invalid seed value: {seed!r}; expected None or an int in [0, 2**32)")
        self.seed = seed
        self._reset_caches()
        super().__init__(params, defaults)

    def _reset_caches(self) -> None:
        """Per-group caches of validated settings, flat offsets and momentum buffers."""
        self._configs, self._offsets, self._buffers = {}, {}, {}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            GroupConfig.from_group(group)
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(f"ClippedSGD does not support complex parameters, got one of dtype {p.dtype}")
            devices = {p.device for p in group["params"]}
            if len(devices) > 1:
                raise ValueError(
                    f"Invalid param group: its parameters are on several devices ({sorted(map(str, devices))}); "
                    "put each device's parameters in a param group of their own"
                )
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    def __setstate__(self, state):
        super().__setstate__(state)
        self._reset_caches()
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _config(self, index: int, group: dict) -> GroupConfig:
        """The group's validated settings, re-validated whenever one of them changes."""
        key = tuple((k, id(v) if isinstance(v, torch.Tensor) else v) for k, v in group.items() if k != "params")
        cached = self._configs.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        cfg = GroupConfig.from_group(group)
        self._configs[index] = (key, cfg)
        return cfg

    def _gather(self, index: int, group: dict):
        """Validate a group and collect the tensors of its step; modifies nothing."""
        cfg = self._config(index, group)
        group_params = group["params"]
        all_grads = [p.grad for p in group_params]
        columns = [i for i, g in enumerate(all_grads) if g is not None]
        params = [group_params[i] for i in columns]
        grads = [all_grads[i] for i in columns]
        for i, g in zip(columns, grads):
            if g.is_sparse:
                raise RuntimeError(f"ClippedSGD does not support sparse gradients (parameter {i} of group {index})")
        starts = self._offsets.get(index)
        if starts is None or len(starts) != len(group_params) + 1:
            starts = list(itertools.accumulate((p.numel() for p in group_params), initial=0))
            self._offsets[index] = starts
        offsets = [starts[i] for i in columns]
        device = grads[0].device if grads else None
        return cfg, params, grads, columns, offsets, device

    def _momentum_buffers(self, index: int, params, columns):
        """The momentum buffers of ``params``, created (zeros, not yet initialised) where missing.
        Cached per group while the set of parameters with gradients stays the same."""
        cached = self._buffers.get(index)
        if cached is not None and cached[0] == columns:
            return cached[1]
        buffers = []
        for p in params:
            st = self.state[p]
            if st.get("momentum_buffer") is None:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(st["momentum_buffer"])
        self._buffers[index] = (columns, buffers)
        return buffers

    def _check_finite(self, grads, found_inf, index):
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite or (found_inf is not None and bool(found_inf != 0)):
            raise FloatingPointError(
                f"ClippedSGD: non-finite gradient (inf or NaN) in param group {index}, which has "
                "nonfinite='raise'; nothing was modified"
            )

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every param group; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        gathered = [self._gather(i, g) for i, g in enumerate(self.param_groups)]
        for i, (cfg, params, grads, _, _, _) in enumerate(gathered):
            if params and cfg.nonfinite is NonFinite.RAISE:
                self._check_finite(grads, found_inf, i)

        for i, (group, (cfg, params, grads, columns, offsets, device)) in enumerate(zip(self.param_groups, gathered)):
            if not params:
                continue
            gstate = self.state[group["params"][0]]
            init_group_state(gstate, group["params"], self.state, _group_seed(self.seed, i), device)
            history, count = history_for_step(gstate, cfg, len(group["params"]), device)
            buffers = self._momentum_buffers(i, params, columns) if cfg.momentum != 0 else None
            tensors = GroupTensors(
                params=params,
                grads=grads,
                momentum_buffers=buffers,
                columns=columns,
                offsets=offsets,
                seed=gstate["clip_seed"],
                step=gstate["clip_step"],
                history=history,
                history_count=count,
                momentum_ready=gstate["clip_momentum_ready"],
                stats=gstate["clip_stats"],
                skipped=gstate["clip_skipped"],
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
            select_step(self.backend, device)(tensors, cfg)
            gstate["clip_steps"] += 1
        return loss

    def statistics(self) -> list:
        """Per param group, the last step's ``norm`` (before clipping), ``threshold``,
        ``clipped_fraction``, ``skipped`` (1.0 if the step was skipped) and the running
        ``skipped_steps`` and ``step`` counts, as 0-d tensors on the parameters' device.
        Nothing is read back to the host: call ``.item()`` (one sync) when you log."""
        return [group_statistics(self.state[g["params"][0]]) if g["params"] else {} for g in self.param_groups]

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim.Optimizer's; also accepts a torch.optim.SGD state_dict (its momentum
        buffers are used; the clipping settings stay those of this optimizer)."""
        previous = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        self._reset_caches()
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid, {})
            for key, value in saved.items():
                if key.startswith("clip_") and isinstance(value, torch.Tensor):
                    # torch casts state to the param's dtype; the group's state keeps its own dtypes
                    self.state[p][key] = value.to(device=p.device, copy=True)
        for group, before in zip(self.param_groups, previous):
            for key, value in before.items():
                group.setdefault(key, value)


__all__ = ["ClippedSGD", "ClipMethod"]
