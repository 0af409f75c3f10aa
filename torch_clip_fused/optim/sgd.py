"""ClippedSGD: torch.optim.SGD with gradient clipping (every method of torch-clip 0.0.6 and more)."""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import resolve_backend
from .compile_guard import eager_step
from .base import ClippedOptimizer
from .update_rules import SGD_RULE
from ..config import GroupConfig
from ..skips import SKIP_SETTINGS
from ..thresholds import setting_defaults


class ClippedSGD(ClippedOptimizer):
    r"""SGD (momentum, dampening, weight decay, nesterov, maximize as ``torch.optim.SGD``) whose
    gradients are clipped first.  The contract is docs/spec.md: section 1 the clipping methods,
    section 2 the random draws, section 3 this step, section 4 non-finite gradients and state.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \theta_0 \text{ (params)}, \: f(\theta)
                \text{ (objective)}, \: \lambda \text{ (weight decay)},                          \\
            &\hspace{13mm} \:\mu \text{ (momentum)}, \:\tau \text{ (dampening)},
                \:\textit{ nesterov,}\:\textit{ maximize},                                       \\
            &\hspace{13mm} \text{scope} \in \{\text{global}, \text{layer}, \text{coordinate}\},
                \: \eta \text{ (clipping\_level)} \text{ or auto with } p \text{ (p\_autoclip)}, \\
            &\hspace{13mm} \text{randomization} \in \{\text{none}, \text{linear},
                \text{quadratic}\}, \: \beta, \: \textit{seed}                                   \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \nabla_{\theta} f_t (\theta_{t-1})
                \text{ (divided by the GradScaler's scale, if any)}                              \\
            &\hspace{5mm}\textbf{if} \: \textit{maximize}                                        \\
            &\hspace{10mm} g_t \leftarrow -g_t                                                   \\
            &\hspace{5mm}\textbf{if} \: g_t \text{ holds inf or NaN}
                \text{ (nonfinite="skip")}                                                       \\
            &\hspace{10mm} \theta_t \leftarrow \theta_{t-1}, \: \textbf{b}_t \leftarrow
                \textbf{b}_{t-1}; \: \textbf{continue} \text{ (the skip is counted)}             \\
            &\hspace{5mm}\nu_t \leftarrow \|g_t\|_2 \text{ (global)}, \: \|g_{t,l}\|_2
                \text{ per tensor } l \text{ (layer)}, \: |g_{t,i}| \text{ per element } i
                \text{ (coordinate)}                                                             \\
            &\hspace{5mm}\textbf{if} \: \text{auto}                                              \\
            &\hspace{10mm} \eta_t \leftarrow \text{the } \lceil p n \rceil \text{-th smallest
                of the } n \text{ norms recorded at that scope, } \nu_t \text{ included}         \\
            &\hspace{5mm}\textbf{else}                                                           \\
            &\hspace{10mm} \eta_t \leftarrow \eta                                                \\
            &\hspace{5mm}\alpha_t \leftarrow \eta_t / \nu_t, \quad
                u_t \leftarrow \text{Philox}(\textit{seed}, t - 1, \text{index}) \in [0, 1)      \\
            &\hspace{5mm}P_t \leftarrow 1 \text{ (none)}, \: \beta^{\alpha_t} \text{ (linear)},
                \: \beta^{\alpha_t^2} \text{ (quadratic)}                                        \\
            &\hspace{5mm}\textbf{if} \: \nu_t > \eta_t \: \textbf{and} \: u_t < P_t              \\
            &\hspace{10mm} g_t \leftarrow \alpha_t \, g_t \text{ (per tensor, or per element)}   \\
            &\hspace{5mm}\textbf{if} \: \lambda \neq 0                                           \\
            &\hspace{10mm} g_t \leftarrow g_t + \lambda  \theta_{t-1}                            \\
            &\hspace{5mm}\textbf{if} \: \mu \neq 0                                               \\
            &\hspace{10mm}\textbf{if} \: \textbf{b}_{t-1} \text{ exists}                         \\
            &\hspace{15mm} \textbf{b}_t \leftarrow \mu \textbf{b}_{t-1} + (1-\tau) g_t           \\
            &\hspace{10mm}\textbf{else}                                                          \\
            &\hspace{15mm} \textbf{b}_t \leftarrow g_t                                           \\
            &\hspace{10mm}\textbf{if} \: \textit{nesterov}                                       \\
            &\hspace{15mm} g_t \leftarrow g_{t} + \mu \textbf{b}_t                               \\
            &\hspace{10mm}\textbf{else}                                                          \\
            &\hspace{15mm} g_t  \leftarrow  \textbf{b}_t                                         \\
            &\hspace{5mm}\theta_t \leftarrow \theta_{t-1} - \gamma g_t                           \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\[-1.ex]
            &\bf{return} \:  \theta_t                                                            \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\[-1.ex]
       \end{aligned}

    The Philox index is 0 (global scope), the tensor's position in its param group (layer) or
    the element's position in the group's parameters laid end to end (coordinate).  Without
    randomization P_t = 1, so the scale is min(1, alpha_t); a clipped element (coordinate scope)
    becomes sign(g) eta_t.  With ``clip_point="update"`` the scales are taken from the final
    direction g_t (after weight decay and momentum) and applied to it alone: b_t is stored
    unclipped.  ``nonfinite="raise"`` raises instead of skipping, before any group moves;
    ``"apply"`` does not check.  Every group has its own seed, derived from ``seed``.

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
        **threshold_settings: the settings of the threshold policies beyond the original's, by name
            (``torch_clip_fused.thresholds.SETTINGS``; keyword-only, an unknown name is a TypeError):
        zclip_alpha, zclip_z, zclip_warmup: the ``zscore`` threshold's settings (ZClip,
            ``clipping_type="zclip"``): EMA factor (0 < alpha < 1), z threshold (> 0) and warm-up
            steps (int >= 0), as the zclip package's ``alpha``, ``z_thresh`` and ``warmup_steps``;
            ``clipping_level`` is its ``max_grad_norm`` (None: no cap).
        zclip_mode, zclip_clip_option, zclip_clip_factor, zclip_skip_update_on_spike: the zclip
            package's ``mode`` ("zscore" or "percentile"), ``clip_option`` ("adaptive_scaling" or
            "mean"), ``clip_factor`` (> 0) and ``skip_update_on_spike`` (bool), with its defaults.
        adagc_lambda, adagc_beta, adagc_warmup: the ``ema_relative`` threshold's settings (AdaGC,
            ``clipping_type="adagc"``): relative factor (> 0), EMA factor (0 <= beta < 1) and
            warm-up steps (int >= 0), as pytorch-optimizer's AdaGC ``lambda_rel``, ``beta`` and
            ``warmup_steps``; ``clipping_level`` is its ``lambda_abs`` (the warm-up's global clip).
        agc_eps: the ``relative`` threshold's floor of the weight norm (AGC, ``clipping_type="agc"``:
            unit scope, eta = clipping_level * max(||w_unit||, agc_eps), timm's ``adaptive_clip_grad``
            with ``clip_factor=clipping_level``, default 0.01, and ``eps=agc_eps``).
        skip_if_norm_above, skip_if_zscore_above, skip_zscore_alpha, skip_zscore_warmup: the skip rules
            (``torch_clip_fused.skips``; keyword-only, settings every param group takes alike): None (default)
            or a level; the whole step is skipped (parameters, momentum, every threshold's state untouched)
            when the whole model's pre-clip norm ||g|| exceeds ``skip_if_norm_above``, or when its z-score
            against EMAs of its mean and variance (factor ``skip_zscore_alpha``, 0.97, started after
            ``skip_zscore_warmup`` = 25 norms, not updated by a skipped step) exceeds
            ``skip_if_zscore_above``; counted in :meth:`statistics` as ``spike_skipped_steps``, apart from
            the non-finite ``skipped_steps`` (docs/spec.md section 4.1).
        clip_point: ``"grad"`` clips the gradient (docs/spec.md section 3); ``"update"`` clips
            the final step.
        norm_type: the p of the p-norms at global and layer scope, as ``clip_grad_norm_``'s: 2.0 (default),
            ``float('inf')`` or ``"inf"`` (max |g|), or any p >= 1; ||g||_p = (sum_i ||g_i||_p^p)^(1/p) over the
            tensors (and over every param group sharing the norm, which must agree on it).  AutoClip, ZClip and
            AdaGC take their thresholds from these norms; coordinate and unit scope and AGC take only 2.
        nonfinite: ``"skip"`` (default) leaves a group with inf/NaN gradients untouched and counts
            the skip; ``"raise"`` raises FloatingPointError before anything is modified (this
            costs a host sync); ``"apply"`` applies the update as torch would.
        seed: 32-bit seed of the Philox draws; None draws one from torch's default generator.
        stochastic_rounding: False (default) rounds the float32 result of the update to a bfloat16
            or float16 parameter (and momentum buffer) to nearest; True rounds it up or down with
            probability proportional to its distance (unbiased), with the Philox words at counter
            2**40 + i for element i (word 0 for the parameter, word 1 for the momentum buffer;
            docs/spec.md section 3.1).  No effect on float32 and float64 parameters.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``.
        per_group_norm: False (default): the param groups with a global-scope method (``norm``, the
            randomized norms, ``auto_clip`` and its randomized forms, ``zclip``) share ONE norm over all
            of them, as ``clip_grad_norm_(model.parameters())``, and one threshold state (AutoClip
            history, ZClip EMAs); they must agree on the clipping settings (a ValueError names both
            groups) and may differ in every update setting.  True: each group is clipped with its own
            norm and threshold state (torch-clip 0.0.6's behaviour).  Other scopes, and the relative threshold
            (AGC), are per group either way.
        norm_group: None, or the pipeline's ProcessGroup or 1-D DeviceMesh (each rank holds its own stage's
            parameters): the shared norm's sum of squares is summed over its ranks too, so every stage
            clips with the whole model's norm (distributed/norm_group.py).  Needs per_group_norm=False.
        foreach, fused, differentiable: torch.optim.SGD's implementation switches, accepted so that
            ClippedSGD is a drop-in replacement.  Every backend steps all tensors of a group
            together, so ``None`` and ``True`` are always fine; ``fused=False`` picks the
            foreach-based reference backend (with ``backend="auto"``), ``fused=True`` a fused one
            (C++ or Triton); ``foreach=False`` (a per-tensor loop) and ``differentiable=True``
            (autograd through the step) do not exist here and are errors, as are contradictions
            (``fused=True`` with ``foreach=True`` or with ``backend="reference"``).

    Statistics of the last step are device tensors (:meth:`statistics`); reading one with
    ``.item()`` is the only host sync, so read them when you log, not every step.

    Example (the gradient's norm 5 is above the level 1: it is scaled by 1/5)::

        >>> import torch
        >>> from torch_clip_fused import ClippedSGD
        >>> p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> opt = ClippedSGD([p], lr=0.1, clipping_type="norm", clipping_level=1.0, backend="reference")
        >>> p.grad = torch.tensor([3.0, 4.0])
        >>> opt.step()
        >>> p.detach()  # p - lr * [3, 4] / 5
        tensor([0.9400, 1.9200])
        >>> {name: value.item() for name, value in opt.statistics()[0].items()}
        {'norm': 5.0, 'threshold': 1.0, 'clipped_fraction': 1.0, 'skipped': 0.0, 'skipped_steps': 0, 'spike_skipped': 0.0, 'spike_skipped_steps': 0, 'step': 1}
    """

    _update_rule = SGD_RULE
    _param_state_keys = SGD_RULE.all_keys
    _takes_dtensors = True

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
        norm_type: float = 2.0,
        stochastic_rounding: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        per_group_norm: bool = False,
        norm_group=None,
        **threshold_settings,
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
            clip_point=clip_point,
            nonfinite=nonfinite,
            norm_type=norm_type,
            stochastic_rounding=stochastic_rounding,
            **setting_defaults(dict(threshold_settings, p_autoclip=p_autoclip, autoclip_history=autoclip_history),
                               "ClippedSGD.__init__()", SKIP_SETTINGS),
            foreach=foreach,
            fused=fused,
            differentiable=differentiable,
        )
        super().__init__(params, defaults, seed, backend, per_group_norm, norm_group)

    def _group_config(self, group: dict) -> GroupConfig:
        return GroupConfig.from_group(group)

    @eager_step  # one clean graph break under torch.compile; fullgraph=True says what works
    @torch.no_grad()
    def step(self, closure=None):
        """One step for every param group; returns the closure's loss, if any.

        Under ``torch.compile`` this is one clean graph break: the step runs eagerly (fused kernels,
        no host sync) and nothing in it is traced, so a compiled training step does not recompile
        from one step to the next."""
        loss = self._evaluate(closure)
        self._rule_step()
        return loss


__all__ = ["ClippedSGD"]
