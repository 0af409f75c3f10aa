"""What ClippedSGD and ClippedSSTM share: seeds, validation, gathering a group's tensors,
running the chosen backend on them, statistics and state_dict handling."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from ..backends import select_step, validate_backend
from ..config import GroupConfig, GroupTensors, NonFinite
from ..backends.group_layout import CHANGED, GroupLayout, units_contiguous
from ..backends.layout import check_dense_layout
from ..methods import Scope, Threshold
from .tracked_state import TrackedState
from ..state import (group_statistics, history_for_step, init_group_state, rebuild_sorted_histories,
                     validate_group_state, zclip_state_for_step, adagc_state_for_step)
from ..backends.reference import all_finite
from ..distributed import SEED_LIMIT, draw_seed
from ..distributed.dtensor import ShardedLayout, any_rank_nonfinite, check_group, is_sharded_group, sharded_step

def _group_seed(seed: int, index: int) -> int:
    """Distinct Philox seeds for the groups of one optimizer (golden-ratio stride)."""
    return (seed + index * 0x9E3779B9) % SEED_LIMIT


class ClippedOptimizer(Optimizer):
    """Base of the clipped optimizers; subclasses define ``_group_config`` and ``step``."""

    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, seed, backend: str):
        self._group_config(defaults)
        self.backend = validate_backend(backend)
        if seed is None:
            seed = draw_seed()  # rank 0's draw on every rank of an initialised process group
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"Invalid seed value: {seed!r}; expected None or an int in [0, 2**32)")
        self.seed = seed
        self._reset_caches()
        super().__init__(params, defaults)
        self.state = TrackedState(self.state)

    def _group_config(self, group: dict) -> GroupConfig:
        """Validate a param group's settings into the GroupConfig of its clipped step."""
        raise NotImplementedError

    def _reset_caches(self) -> None:
        """Per-group caches of validated settings and layouts (tensors, offsets, momentum buffers)."""
        self._configs, self._layouts = {}, {}

    def add_param_group(self, param_group: dict) -> None:
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if params is not None and not isinstance(params, (torch.Tensor, set)):
            params = param_group["params"] = list(params)
            seen = {}
            for i, p in enumerate(params):
                if id(p) in seen:  # a duplicate would be stepped twice (and raced over by the C++ threads)
                    raise ValueError(f"Invalid param group: parameter {i} of param group {len(self.param_groups)} "
                                     f"is the same tensor as parameter {seen[id(p)]}; list each parameter once")
                seen[id(p)] = i
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            # validated here, where reading a tensor lr's value is allowed, and cached for step()
            self._config(len(self.param_groups) - 1, group)
            if check_group(group["params"], len(self.param_groups) - 1):  # DTensors: supported placements only
                from .sgd import ClippedSGD

                if not isinstance(self, ClippedSGD):
                    raise NotImplementedError(f"{type(self).__name__} does not support DTensor (FSDP2) parameters; "
                                              "ClippedSGD and clip_gradients_ do")
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(f"{type(self).__name__} does not support complex parameters, got one of dtype {p.dtype}")
            devices = {p.device for p in group["params"]}
            if len(devices) > 1:
                raise ValueError(
                    f"Invalid param group: its parameters are on several devices ({sorted(map(str, devices))}); "
                    "put each device's parameters in a param group of their own"
                )
        except (ValueError, TypeError, NotImplementedError):
            self.param_groups.pop()
            raise

    def __setstate__(self, state):
        super().__setstate__(state)
        if not isinstance(self.state, TrackedState):
            self.state = TrackedState(self.state)
        self._reset_caches()
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._seed_configs()

    def _seed_configs(self) -> None:
        """Validate every group's settings now (outside step(): a tensor lr's value is read once
        here) so that step() finds them cached and syncs with nothing."""
        for index, group in enumerate(self.param_groups):
            self._config(index, group)

    def _config(self, index: int, group: dict) -> GroupConfig:
        """The group's validated settings, re-validated whenever one of them changes (a new tensor
        lr object set between steps is read once then; a tensor lr changed in place is not re-read:
        the kernels check its value on the device)."""
        key = tuple((k, id(v) if isinstance(v, torch.Tensor) else v) for k, v in group.items() if k != "params")
        cached = self._configs.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        cfg = self._group_config(group)
        self._configs[index] = (key, cfg)
        return cfg

    def _gather(self, index: int, group: dict):
        """The group's validated settings and layout; modifies nothing.  The cached layout is kept
        while its per-step refresh (gradient pointers, O(1) work per tensor) says it still holds;
        otherwise the group is gathered and validated again."""
        cfg = self._config(index, group)
        group_params = group["params"]
        layout = self._layouts.get(index)
        status = layout.refresh(group_params) if layout is not None else 0
        if status >= 0:
            layout = self._new_layout(index, group_params)
            status = CHANGED
        layout.grad_ptrs_changed = status == CHANGED
        return cfg, layout

    def _new_layout(self, index: int, group_params) -> GroupLayout:
        for i, p in enumerate(group_params):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (parameter {i} of group {index})")
        if is_sharded_group(group_params):  # FSDP2 / HSDP: the local shards (distributed/dtensor.py)
            layout = ShardedLayout.gather(group_params, index)
        else:
            layout = GroupLayout.gather(group_params)
        self._check_layouts(index, layout)
        self._layouts[index] = layout
        return layout

    def _check_layouts(self, index: int, layout: GroupLayout) -> None:
        """The fused kernels walk gradient and parameter memory with the same offsets: check every
        group's layouts here, before any group moves (a backend discovering it mid-step would leave
        the earlier groups stepped)."""
        if not layout.params:
            return
        method = self._config(index, self.param_groups[index]).clip.method
        if isinstance(layout, ShardedLayout) and (method.scope is Scope.UNIT or method.threshold is Threshold.RELATIVE):
            raise NotImplementedError(f"param group {index}: clipping method {method.name!r} (unit scope / relative "
                                      "threshold, AGC) is not offered on DTensor (FSDP2) parameters yet: it needs the "
                                      "weights' norms reduced across ranks too")
        step = select_step(self.backend, layout.device)
        name = getattr(step, "__name__", "")
        if name not in ("cpp_step", "triton_step"):
            return
        fused_dtypes = (torch.float32, torch.bfloat16, torch.float16) + ((torch.float64,) if name == "cpp_step" else ())
        backend = "cpp" if name == "cpp_step" else "triton"
        pairs = layout.local_pairs() if isinstance(layout, ShardedLayout) else [(p, p.grad) for p in layout.params]
        unit_scope = method.scope is Scope.UNIT
        for column, (p, g) in zip(layout.columns, pairs):
            if p.dtype in fused_dtypes:
                check_dense_layout(backend, column, p, g, None, group=index)
                if unit_scope and not units_contiguous(p):
                    raise RuntimeError(
                        f"backend={backend!r}: parameter {column} of param group {index} (shape {tuple(p.shape)}, "
                        f"strides {p.stride()}) does not keep each output unit (slice along dim 0) contiguous in "
                        "memory, which unit-scope clipping (AGC) needs; make it contiguous or use backend='reference'")

    def _check_finite(self, grads, found_inf, index, layout=None):
        if isinstance(layout, ShardedLayout):  # every rank raises, or none: the flag is reduced
            bad = any_rank_nonfinite(layout, found_inf)
        else:
            bad = ~all_finite(grads)
            if found_inf is not None:
                bad = bad | (found_inf.to(bad.device) != 0)
        if bool(bad):  # the one host sync of nonfinite="raise"
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite gradient (inf or NaN) in param group {index}, which has "
                "nonfinite='raise'; nothing was modified"
            )

    @staticmethod
    def _evaluate(closure):
        """The closure's loss (computed with gradients enabled), or None."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _prepare(self):
        """Validate every group and gather its tensors; raise (nonfinite='raise') before anything
        is modified."""
        gathered = [self._gather(i, g) for i, g in enumerate(self.param_groups)]
        found_inf = getattr(self, "found_inf", None)
        for i, (cfg, layout) in enumerate(gathered):
            if layout.params and cfg.nonfinite is NonFinite.RAISE:
                self._check_finite([p.grad for p in layout.params], found_inf, i, layout)
        return gathered

    def _group_state(self, index: int, group: dict, device) -> dict:
        """The group's own state (created on first use, before any momentum buffer, so that only
        buffers loaded from a checkpoint count as initialised)."""
        gstate = self.state[group["params"][0]]
        init_group_state(gstate, group["params"], self.state, _group_seed(self.seed, index), device)
        return gstate

    def _clipped_step(self, index: int, group: dict, cfg: GroupConfig, layout: GroupLayout, targets,
                      buffers=None, cache_key: str = "params", adam: dict = None) -> None:
        """Run the backend's clipped SGD step of group ``index`` on ``targets`` (the group's
        parameters, or another list of tensors of the same shapes, named by ``cache_key``) with
        the group's gradients."""
        gstate = self._group_state(index, group, layout.device)
        history, ordered, count = history_for_step(gstate, cfg, len(group["params"]), layout.device,
                                                   layout.norm_dtype)
        zclip, zclip_count = zclip_state_for_step(gstate, cfg, len(group["params"]), layout.device, layout.norm_dtype)
        adagc, adagc_count = adagc_state_for_step(gstate, cfg, len(group["params"]), layout.device, layout.norm_dtype)
        tensors = GroupTensors(
            params=targets,
            grads=None,
            grad_owners=layout.params,
            momentum_buffers=buffers,
            columns=layout.columns,
            offsets=layout.offsets,
            seed=gstate["clip_seed"],
            step=gstate["clip_step"],
            history=history,
            history_count=count,
            history_sorted=ordered,
            zclip=zclip,
            zclip_count=zclip_count,
            adagc=adagc,
            adagc_count=adagc_count,
            momentum_ready=gstate["clip_momentum_ready"],
            stats=gstate["clip_stats"],
            skipped=gstate["clip_skipped"],
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
            grad_ptrs=layout.grad_ptrs,
            grad_ptrs_changed=layout.grad_ptrs_changed,
            backend_cache=layout.backend_cache.setdefault(cache_key, {}),
            unit_offsets=layout.unit_offsets,
            **(adam or {}),
        )
        step = select_step(self.backend, layout.device)
        if isinstance(layout, ShardedLayout):
            if cache_key != "params":
                raise NotImplementedError(f"{type(self).__name__} does not support DTensor (FSDP2) parameters; "
                                          "ClippedSGD and clip_gradients_ do")
            sharded_step(step, tensors, cfg, layout)  # local norms, one all-reduce, the step on the local shards
        else:
            step(tensors, cfg)
        gstate["clip_steps"] += 1

    def statistics(self) -> list:
        """Per param group, the last step's ``norm`` (before clipping), ``threshold``,
        ``clipped_fraction``, ``skipped`` (1.0 if the step was skipped) and the running
        ``skipped_steps`` and ``step`` counts, as 0-d tensors on the parameters' device.
        Nothing is read back to the host: call ``.item()`` (one sync) when you log."""
        return [group_statistics(self.state[g["params"][0]]) if g["params"] else {} for g in self.param_groups]

    def state_dict(self) -> dict:
        """As torch.optim.Optimizer's, with plain dicts of per-parameter state (loadable with
        ``torch.load(weights_only=True)``)."""
        saved = super().state_dict()
        saved["state"] = {key: dict(value) for key, value in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim.Optimizer's; also accepts a torch.optim.SGD state_dict (its momentum
        buffers are used; the clipping settings stay those of this optimizer)."""
        for index, (group, current) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            self._group_config({**current, **group})  # the loaded settings, validated before anything changes
            if group["params"]:
                saved = state_dict["state"].get(group["params"][0], {})
                validate_group_state(saved, index, len(group["params"]))  # before anything is replaced
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
            if group["params"]:
                gstate = self.state[group["params"][0]]
                if "clip_step" in gstate and "clip_steps" not in gstate:  # a checkpoint from before the key
                    gstate["clip_steps"] = int(gstate["clip_step"])  # once, at load time
                rebuild_sorted_histories(gstate)
        self._seed_configs()

