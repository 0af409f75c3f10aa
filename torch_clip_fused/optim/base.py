"""What the clipped optimizers (ClippedSGD, ClippedAdamW, ClippedSSTM) share: seeds, validation,
gathering a group's tensors, running the chosen backend on them, statistics, state_dict handling,
copies and pickles.

A param group's own state (its seed, step count, threshold state, statistics: state.py) lives in the
param group, under ``GROUP_STATE``, so that ``optimizer.state`` holds only what torch.optim keeps per
parameter and torch's tools that walk it find tensors only; ``state_dict()`` carries it with the
param groups, and ``load_state_dict`` still takes checkpoints that kept it in the first parameter's
state."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

import warnings
from collections.abc import Mapping

from .._warnings import user_stacklevel
from ..backends import validate_backend
from ..backends.capabilities import Backend, reference_backend
from ..backends.dispatch import select_backend
from ..config import GroupConfig, GroupTensors, NonFinite, naming_group, settings_key
from ..backends.group_layout import CHANGED, GroupLayout
from ..methods import Scope
from .tracked_state import TrackedState
from .param_state import check_grad, check_saved_param_state, fitted_state, is_group_key, where
from ..state import (group_statistics, init_group_state, rebuild_sorted_histories, threshold_state_for_step,
                     validate_group_state)
from ..backends.reference import all_finite
from ..distributed import SEED_LIMIT, draw_seed
from ..distributed.norm_group import resolve_norm_group
from ..distributed.dtensor import (ShardedLayout, any_rank_nonfinite, check_element_indices, check_group,
                                   clipped_fraction, is_sharded_group, localize)
from ..skips import check_skip_agreement, count_spike, decide_and_record, skip_flag
from .shared_norm import check_agreement, follower_config, follower_norms, shares_norm, step_norms
from .. import tensor_stats as tstats

#: The param-group entry that holds the group's own state (state.py lists its keys).
GROUP_STATE = "clip_state"


def _group_seed(seed: int, index: int) -> int:
    """Distinct Philox seeds for the groups of one optimizer (golden-ratio stride)."""
    return (seed + index * 0x9E3779B9) % SEED_LIMIT


class ClippedOptimizer(Optimizer):
    """Base of the clipped optimizers; subclasses define ``_group_config`` and ``step``."""

    _step_supports_amp_scaling = True
    #: per-parameter state keys that hold a tensor of the parameter's shape (checked at load)
    _param_state_keys = ()
    #: the update rule (update_rules.py) whose per-parameter state _rule_state collects
    _update_rule = None
    #: whether param groups of DTensor (FSDP2) parameters are stepped
    _takes_dtensors = False

    def __init__(self, params, defaults: dict, seed, backend: str, per_group_norm: bool = True, norm_group=None):
        from ..integrations.accelerate import install_accelerate_guard  # lazily: integrations imports this module
        install_accelerate_guard()
        self._group_config(defaults)
        self.backend = validate_backend(backend)
        if not isinstance(per_group_norm, bool):
            raise TypeError(f"Invalid per_group_norm value: {per_group_norm!r}; expected True or False")
        self.per_group_norm = per_group_norm
        self._norm_group = resolve_norm_group(norm_group, type(self).__name__)
        if self._norm_group is not None and per_group_norm:
            raise ValueError(f"{type(self).__name__}: norm_group sums the norm shared by the global-scope groups over "
                             "the pipeline's ranks; it needs per_group_norm=False")
        if seed is None:
            seed = draw_seed()  # rank 0's draw on every rank of an initialised process group
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"Invalid seed value: {seed!r}; expected None or an int in [0, 2**32)")
        self.seed = seed
        self._reset_caches()
        super().__init__(params, defaults)
        self.state = TrackedState(self.state)

    @property
    def backend(self):
        """The backend name ("auto", "reference", "cpp", "triton") or step function; setting it
        validates the value and drops the groups' cached layouts and backend records."""
        return self._backend

    @backend.setter
    def backend(self, value) -> None:
        self._backend = validate_backend(value)
        self._layouts, self._backends = {}, {}

    def _group_config(self, group: dict) -> GroupConfig:
        """Validate a param group's settings into the GroupConfig of its clipped step."""
        raise NotImplementedError

    def _reset_caches(self) -> None:
        """Per-group caches of validated settings, layouts (tensors, offsets, momentum buffers) and
        backend records (backends/capabilities.py)."""
        self._configs, self._layouts, self._backends = {}, {}, {}
        self._agreed = None  # the configs last found to agree on the shared norm's settings
        self._warned_layouts = getattr(self, "_warned_layouts", set())

    def add_param_group(self, param_group: dict) -> None:
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if params is not None and not isinstance(params, (torch.Tensor, set)):
            params = param_group["params"] = list(params)
            seen = {}
            for i, p in enumerate(params):
                p = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # named_parameters(): (name, tensor)
                if id(p) in seen:  # a duplicate would be stepped twice (and raced over by the C++ threads)
                    raise ValueError(f"Invalid param group: parameter {i} of param group {len(self.param_groups)} "
                                     f"is the same tensor as parameter {seen[id(p)]}; list each parameter once")
                seen[id(p)] = i
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            # validated here, where reading a tensor lr's value is allowed, and cached for step()
            self._config(len(self.param_groups) - 1, group)
            self._check_shared_norm()
            if check_group(group["params"], len(self.param_groups) - 1):  # DTensors: supported placements only
                if not self._takes_dtensors:
                    raise NotImplementedError(f"{type(self).__name__} does not support DTensor (FSDP2) parameters; "
                                              "ClippedSGD, ClippedAdamW and clip_gradients_ do")
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

    def __getstate__(self):
        """torch.optim's (defaults, state, param_groups) and this optimizer's backend and seed: a deepcopy
        or an unpickled ``torch.save(optimizer)`` steps as the original (each group's own state, its
        seed and step count included, travels with the param groups)."""
        state = super().__getstate__()
        state.update(backend=self.backend, seed=self.seed, per_group_norm=self.per_group_norm,
                     norm_group=self._norm_group)
        return state

    def __setstate__(self, state):
        state = dict(state)  # torch's load_state_dict passes only state and param_groups: keep ours then
        self.backend = state.pop("backend", getattr(self, "_backend", "auto"))  # "auto": pickled before it was kept
        self.seed = state.pop("seed", getattr(self, "seed", None))
        # pickled before the option: its groups had each their own norm
        self.per_group_norm = state.pop("per_group_norm", getattr(self, "per_group_norm", True))
        self._norm_group = state.pop("norm_group", getattr(self, "_norm_group", None))
        if self.seed is None:
            self.seed = draw_seed()
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
        self._check_shared_norm()

    def _check_shared_norm(self) -> None:
        """The groups that share one norm (shared_norm.py) agree on its settings, and all groups on the skip
        rules' (ValueError naming both groups otherwise); checked again only when a group's settings changed."""
        if len(self.param_groups) < 2:
            return
        configs = tuple((i, self._configs[i][1]) for i, g in enumerate(self.param_groups) if g["params"])
        if self._agreed is not None and len(configs) == len(self._agreed) and all(
                a[1] is b[1] for a, b in zip(configs, self._agreed)):
            return
        check_skip_agreement(configs)  # the skip rules skip the whole step: one setting per optimizer
        if not self.per_group_norm:
            check_agreement(configs)
        self._agreed = configs

    def _config(self, index: int, group: dict) -> GroupConfig:
        """The group's validated settings, re-validated whenever one of them changes (a new tensor
        lr object set between steps is read once then; a tensor lr changed in place is not re-read:
        the kernels check its value on the device)."""
        key = settings_key(group, ("params", GROUP_STATE))
        cached = self._configs.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        with naming_group(index):
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
        group = self.param_groups[index]
        for i, p in enumerate(group_params):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({where(index, group, i)})")
            check_grad(p, where(index, group, i))
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
        cfg = self._config(index, self.param_groups[index])
        method = cfg.clip.method
        if isinstance(layout, ShardedLayout):
            check_element_indices(layout, cfg, index)
        backend = select_backend(self.backend, layout.device)
        self._backends[index] = backend
        pairs = layout.local_pairs() if isinstance(layout, ShardedLayout) else [(p, p.grad) for p in layout.params]
        try:
            backend.check_layouts(index, pairs, layout.columns, method.scope is Scope.UNIT)
        except RuntimeError as err:
            if self.backend != "auto" or isinstance(layout, ShardedLayout):
                raise
            # "auto" steps every parameter torch steps: this group goes to the reference backend
            self._backends[index] = reference_backend()
            if index not in self._warned_layouts:
                self._warned_layouts.add(index)
                warnings.warn(f"{type(self).__name__}(backend='auto'): {err.args[0].split(': ', 1)[1].split(';')[0]}; "
                              f"param group {index} is stepped with the reference backend (same results, slower). "
                              "Make the parameter contiguous to use the fused kernels.", RuntimeWarning,
                              stacklevel=user_stacklevel())

    def _backend_of(self, index: int, device) -> Backend:
        """The backend record of group ``index`` (chosen with its layout)."""
        return self._backends.get(index) or select_backend(self.backend, device)

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
        from ..integrations.accelerate import install_accelerate_guard  # accelerate imported after __init__
        install_accelerate_guard()
        gathered = [self._gather(i, g) for i, g in enumerate(self.param_groups)]
        self._check_shared_norm()
        found_inf = getattr(self, "found_inf", None)
        for i, (cfg, layout) in enumerate(gathered):
            if layout.params and cfg.nonfinite is NonFinite.RAISE:
                self._check_finite([p.grad for p in layout.params], found_inf, i, layout)
        return gathered

    def _rule_state(self, index: int, group: dict, layout, update) -> dict:
        """The update rule's per-parameter state of the layout's parameters (optim/update_rules.py), as
        GroupTensors fields: each declared tensor created (zeros, not yet initialised) where missing, cast
        and laid out as its parameter where that changed (``model.to(dtype)`` mid-run; fitted_state), and
        with ``step_counts`` a float32 [G] device tensor of which every parameter's ``step`` is a 0-d view.
        Kept with the layout until ``self.state`` is edited (tracked_state.py) or the declared tensors
        change (momentum or amsgrad switched); a tensor of another shape is a RuntimeError naming the
        parameter.  Every tensor is checked before any is stored."""
        rule = self._update_rule
        declared = rule.tensors(update)
        cached = layout.buffers
        if cached is not None and layout.buffers_version == self.state.version and cached[0] == declared:
            return cached[1]
        if not declared and not rule.step_counts:  # nothing kept (SGD without momentum): no state entry made
            layout.buffers, layout.buffers_version = (declared, {}), self.state.version
            return {}
        lists = {spec.key: [] for spec in declared}
        for column, p in zip(layout.columns, layout.params):
            st = self.state[p]
            for spec in declared:
                buf = st.get(spec.key)
                buf = (torch.zeros_like(p, memory_format=torch.preserve_format) if buf is None
                       else fitted_state(p, buf, spec.key, where(index, group, column)))
                lists[spec.key].append(buf)
        for j, p in enumerate(layout.params):  # stored once every tensor is known to fit
            st = self.state[p]
            for spec in declared:
                if st.get(spec.key) is not lists[spec.key][j]:
                    st[spec.key] = lists[spec.key][j]
        fields = {spec.field: lists[spec.key] for spec in declared}
        changed = cached is not None and any(
            any(a is not b for a, b in zip(new, cached[1].get(name) or ())) for name, new in fields.items())
        if rule.step_counts:
            fields["adam_steps"] = self._step_counts(group, layout.device)
            changed = True  # a new tensor of step counts
        if changed:
            layout.backend_cache.clear()  # a backend's cache (the Triton plan) holds the former tensors
        layout.buffers, layout.buffers_version = (declared, fields), self.state.version
        return fields

    def _step_counts(self, group: dict, device) -> torch.Tensor:
        """float32 [G]: each parameter's ``step`` (0 where it has none yet), of which the parameters'
        ``step`` state entries (those with any state) become 0-d views."""
        params = group["params"]
        steps = torch.zeros(len(params), dtype=torch.float32, device=device)
        for j, p in enumerate(params):
            value = self.state[p].get("step") if p in self.state else None
            if value is not None:
                steps[j] = torch.as_tensor(value, dtype=torch.float32).to(device)  # at rebuilds only
        for j, p in enumerate(params):
            if p in self.state and any(key in self.state[p] for key in self._update_rule.all_keys + ("step",)):
                dict.__setitem__(self.state[p], "step", steps[j])  # a view: not an edit of the state
        return steps

    def _group_state(self, index: int, group: dict, device) -> dict:
        """The group's own state (created on first use, before any momentum buffer, so that only
        buffers loaded from a checkpoint count as initialised)."""
        gstate = group.get(GROUP_STATE)
        if gstate is None:
            gstate = group[GROUP_STATE] = {}
        init_group_state(gstate, group["params"], self.state, _group_seed(self.seed, index), device)
        tstats.init_tensor_stats(gstate, len(group["params"]), device)
        return gstate

    def _rule_step(self) -> None:
        """One step of every param group with the optimizer's update rule: every group's settings, layout
        and rule state (update_rules.py) gathered and checked before any group moves, then the groups'
        steps (_step_groups)."""
        work = []
        for i, (group, (cfg, layout)) in enumerate(zip(self.param_groups, self._prepare())):
            if layout.params:
                self._group_state(i, group, layout.device)
                work.append((i, group, cfg, layout, self._rule_state(i, group, layout, cfg.update)))
        self._step_groups(work)

    def _clipped_step(self, index: int, group: dict, cfg: GroupConfig, layout: GroupLayout, targets,
                      fields: dict = None, cache_key: str = "params", state_from=None) -> None:
        """Run the backend's fused clipped step of group ``index`` (plain tensors: sharded groups go
        through _step_groups' reduction) on ``targets`` (the group's parameters, or another list of
        tensors of the same shapes, named by ``cache_key``) with the group's gradients and its own norm;
        ``state_from`` as _group_tensors."""
        tensors = self._group_tensors(index, group, cfg, layout, targets, fields, cache_key, state_from)
        self._backend_of(index, layout.device).step(tensors, cfg)
        group[GROUP_STATE]["clip_steps"] += 1

    def _step_groups(self, work) -> None:
        """Step every group of ``work`` ((index, group, cfg, layout, rule state fields)): the norm stage
        of the groups that share one norm and of the sharded groups, one reduction, then each group's
        step with its given norms (shared_norm.py); a group that needs no given norm runs its backend's
        fused step."""
        shared = [] if self.per_group_norm else [k for k, item in enumerate(work) if shares_norm(item[2])]
        owner = self._threshold_owner() if shared else None  # where the shared threshold state lives
        norm_group = self._norm_group  # the pipeline's ranks, whose shared norms are summed too
        skip = work[0][2].skip if work else None  # the groups agree (_check_shared_norm)
        skipping = skip is not None and bool(skip.rules)  # a skip rule needs the whole model's norm first
        if not skipping and len(shared) < 2 and norm_group is None and not any(
                isinstance(item[3], ShardedLayout) for item in work):
            for k, (i, group, cfg, layout, fields) in enumerate(work):
                # a lone shared group takes the owner's threshold state (the owner may have no gradients)
                self._clipped_step(i, group, cfg, layout, layout.params, fields,
                                   state_from=owner if k in shared else None)
            return
        items = []
        for k, (i, group, cfg, layout, fields) in enumerate(work):
            if k in shared[1:]:
                cfg = follower_config(cfg)  # the lead decides; this group applies its scale
            t = self._group_tensors(i, group, cfg, layout, layout.params, fields, "params",
                                    owner if k in shared else None)
            if isinstance(layout, ShardedLayout):
                localize(t, layout)
            elif t.grads is None:
                t.grads = [p.grad for p in layout.params]
            items.append((cfg, layout, t, self._backend_of(i, layout.device)))
        # a pipeline whose groups do not all share the norm: their non-finite counts are summed over the stages too
        slots = ([item[0] for item in work], len(self.param_groups)) if norm_group is not None and any(
            not shares_norm(c) and c.nonfinite is not NonFinite.APPLY for _, c in self._configs.values()) else None
        given, model_norm = step_norms(items, shared if len(shared) > 1 or norm_group is not None else [], norm_group,
                                       whole_model=skipping, slots=slots)
        lead = shared[0] if len(shared) > 1 else None
        spike = None
        if skipping:  # skips/: decided on the device, then seen by every backend as an external skip flag
            found_inf = getattr(self, "found_inf", None)
            first = next(i for i, g in enumerate(self.param_groups) if g["params"])  # keeps the rules' state
            spike = decide_and_record(skip, model_norm,
                                      self._group_state(first, self.param_groups[first], model_norm.device), found_inf)
            flag = skip_flag(found_inf, spike)
            for _, _, t, _ in items:
                t.found_inf = flag
        for k, ((i, group, *_), (cfg, layout, t, _)) in enumerate(zip(work, items)):
            norms, clips = given.get(k, (None, None))
            if lead is not None and k in shared[1:]:
                norms = follower_norms(given[lead][0], items[lead][2].stats, norms)
            items[k][3].apply(t, cfg, norms)
            if isinstance(layout, ShardedLayout):
                clipped_fraction(t.stats, clips, layout)
            if lead is not None and k in shared[1:]:
                t.stats[:3].copy_(items[lead][2].stats[:3])  # the shared norm, threshold and decision
                lead_t = items[lead][2]  # its own norms, the lead's scale (tensor_stats.py)
                tstats.follow_lead(t.tensor_stats, _columns_tensor(layout, t), given[k][0], lead_t.tensor_stats,
                                   lead_t.columns[0])
            if spike is not None:
                count_spike(group[GROUP_STATE], spike)
            group[GROUP_STATE]["clip_steps"] += 1

    def _threshold_owner(self):
        """The param group that keeps the threshold state of the norm shared by the groups (shared_norm.py):
        the first one with parameters whose method shares the norm, whether or not it has gradients in
        this step."""
        for i, group in enumerate(self.param_groups):
            if group["params"] and shares_norm(self._configs[i][1]):
                return i
        return None

    def _group_tensors(self, index: int, group: dict, cfg: GroupConfig, layout, targets, fields: dict = None,
                       cache_key: str = "params", state_from=None) -> GroupTensors:
        """The GroupTensors of group ``index``'s step on ``targets``: the update rule's state ``fields``
        (GroupTensors fields: _rule_state), and the threshold state ``cfg`` needs, the group's own or param
        group ``state_from``'s (the owner of a shared norm's state)."""
        gstate = self._group_state(index, group, layout.device)
        owner = gstate if state_from is None or state_from == index else self._group_state(
            state_from, self.param_groups[state_from], layout.device)
        threshold_state = threshold_state_for_step(owner, cfg, len(group["params"]), layout.device, layout.norm_dtype)
        tensor_stats = gstate[tstats.KEY]
        tstats.prepare_for_step(tensor_stats, len(layout.columns))
        tensors = GroupTensors(
            params=targets,
            grads=None,
            grad_owners=layout.params,
            first_moments=(fields or {}).get("first_moments"),
            columns=layout.columns,
            offsets=layout.offsets,
            seed=gstate["clip_seed"],
            step=gstate["clip_step"],
            threshold_state=threshold_state,
            momentum_ready=gstate["clip_momentum_ready"],
            stats=gstate["clip_stats"],
            skipped=gstate["clip_skipped"],
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
            grad_ptrs=layout.grad_ptrs,
            grad_ptrs_changed=layout.grad_ptrs_changed,
            backend_cache=layout.backend_cache.setdefault(cache_key, {}),
            unit_offsets=layout.unit_offsets,
            tensor_stats=tensor_stats,
            **{k: v for k, v in (fields or {}).items() if k != "first_moments"},
        )
        return tensors

    def statistics(self) -> list:
        """Per param group, the last step's ``norm`` (before clipping), ``threshold``,
        ``clipped_fraction``, ``skipped`` (1.0 if the step was skipped, for any reason), ``spike_skipped``
        (1.0 if a skip rule skipped it) and the running ``skipped_steps`` (non-finite gradients),
        ``spike_skipped_steps`` (skip rules) and ``step`` counts, as 0-d tensors on the parameters' device.
        Nothing is read back to the host: call ``.item()`` (one sync) when you log.

        Which norm: a group whose method has global scope reports the norm shared by all such groups
        (``per_group_norm=False``, the default: the norm ``clip_grad_norm_(model.parameters())`` returns),
        and so do its ``threshold`` and ``clipped_fraction``; with ``per_group_norm=True``, and at layer,
        unit or coordinate scope, the group's own (at layer scope the norm over the group's tensors).
        :meth:`shared_norm_groups` lists the groups that share it."""
        return [group_statistics(g.get(GROUP_STATE, {})) if g["params"] else {} for g in self.param_groups]

    def tensor_statistics(self) -> list:
        """Per param group, the last step's per-tensor telemetry (torch_clip_fused/tensor_stats.py), with no
        host sync: ``"names"`` (from ``named_parameters()`` when the optimizer was given names, else
        ``"0"``, ``"1"``, ... by position in the group), ``"norm"`` (float32 [n_params] device tensor: each
        parameter's pre-clip norm ||g_i||, the one the decision took) and ``"scale"`` (each parameter's
        applied scale: eta / ||g|| where clipped, else 1, at global and layer scope; the fraction of its
        output units scaled down at unit scope, of its elements clipped at coordinate scope).  A skipped
        step reports its norms and scales of 1 (fractions 0); a parameter without a gradient in the step
        is NaN.  The tensors are views of the group's state, overwritten by the next step (``.clone()``
        to keep them); {} for a group without parameters or before its first step."""
        return [tstats.group_tensor_statistics(g, g.get(GROUP_STATE, {})) if g["params"] else {}
                for g in self.param_groups]

    def shared_norm_groups(self) -> list:
        """The indices of the param groups clipped with the one norm they share (docs/spec.md section
        3.2): the groups with parameters whose method has global scope; [] with ``per_group_norm=True``."""
        if self.per_group_norm:
            return []
        return [i for i, g in enumerate(self.param_groups) if g["params"] and shares_norm(self._config(i, g))]

    def __repr__(self) -> str:
        """torch.optim's listing of the param groups' settings, without the groups' own state."""
        lines = [self.__class__.__name__ + " ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines.extend(f"    {key}: {group[key]}" for key in sorted(group) if key not in ("params", GROUP_STATE))
        return "\n".join(lines) + "\n)"

    def state_dict(self) -> dict:
        """As torch.optim.Optimizer's, with plain dicts of per-parameter state and of each group's own
        state (``param_groups[i]["clip_state"]``), loadable with ``torch.load(weights_only=True)``."""
        saved = super().state_dict()
        saved["state"] = {key: dict(value) if isinstance(value, Mapping) else value
                          for key, value in saved["state"].items()}
        for group in saved["param_groups"]:
            if GROUP_STATE in group:
                group[GROUP_STATE] = dict(group[GROUP_STATE])
        return saved

    @staticmethod
    def _saved_group_state(state_dict: dict, group: dict) -> dict:
        """A checkpoint's state of one param group: its ``clip_state`` entry, or, in checkpoints written
        before that entry, the group keys of its first parameter's state (param_state.is_group_key)."""
        if GROUP_STATE in group:
            return group[GROUP_STATE] if isinstance(group[GROUP_STATE], Mapping) else {}
        if not group["params"]:
            return {}
        first = state_dict["state"].get(group["params"][0], {})
        return {k: v for k, v in first.items() if is_group_key(k)} if isinstance(first, Mapping) else {}

    def _validate_checkpoint(self, state_dict: dict) -> None:
        """Every group's settings, own state and per-parameter state, checked before anything is
        replaced (raises ValueError naming the group, the parameter and the key)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(g["params"]) != len(c["params"]) for g, c in zip(saved_groups, self.param_groups)):
            return  # torch.optim's own check raises its error before anything changes
        loaded = []
        for index, (group, current) in enumerate(zip(saved_groups, self.param_groups)):
            with naming_group(index):
                cfg = self._group_config({**current, **group})  # the loaded settings
            if current["params"]:
                loaded.append((index, cfg))
            validate_group_state(self._saved_group_state(state_dict, group), index, len(group["params"]))
            for position, (pid, p) in enumerate(zip(group["params"], current["params"])):
                saved = state_dict["state"].get(pid)
                if isinstance(saved, Mapping):
                    check_saved_param_state(saved, p, self._param_state_keys, where(index, current, position))
        if not self.per_group_norm:
            check_agreement(loaded)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim.Optimizer's; also accepts a torch.optim.SGD state_dict (its momentum
        buffers are used; the clipping settings stay those of this optimizer), and checkpoints that
        kept each group's own state in its first parameter's state.  The whole checkpoint is checked
        before anything is replaced."""
        self._validate_checkpoint(state_dict)
        group_states = [self._saved_group_state(state_dict, g) for g in state_dict["param_groups"]]
        previous = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        self._reset_caches()
        for group, before, saved in zip(self.param_groups, previous, group_states):
            for key, value in before.items():
                if key != GROUP_STATE:
                    group.setdefault(key, value)
            group.pop(GROUP_STATE, None)
            for p in group["params"]:  # a former checkpoint's group keys: not per-parameter state
                st = self.state.get(p) if p in self.state else None
                if isinstance(st, Mapping) and any(is_group_key(k) for k in st):
                    for key in [k for k in st if is_group_key(k)]:
                        del st[key]
                    if not st:
                        del self.state[p]
            if group["params"] and saved:
                device = group["params"][0].device
                # torch casts per-parameter state to the param's dtype; the group's state keeps its own
                gstate = group[GROUP_STATE] = {k: v.to(device=device, copy=True) if isinstance(v, torch.Tensor) else v
                                               for k, v in saved.items()}
                if "clip_step" in gstate and "clip_steps" not in gstate:  # a checkpoint from before the key
                    gstate["clip_steps"] = int(gstate["clip_step"])  # once, at load time
                rebuild_sorted_histories(gstate)
        self._seed_configs()


def _columns_tensor(layout, t: GroupTensors) -> torch.Tensor:
    """The step's columns (int64 [T]) on the group's device, made once per layout (kept in its backend cache)."""
    cache = layout.backend_cache.setdefault("tensor_stats", {})
    columns = cache.get("columns")
    if columns is None or columns.device != t.tensor_stats.device:
        columns = cache["columns"] = torch.tensor(list(t.columns), dtype=torch.int64, device=t.tensor_stats.device)
    return columns
