"""``triton_step``: one ClippedSGD / ClippedAdamW step of one param group in two launches per dtype bucket,
whatever the method and the number of tensors: the norm pass (norms, then the scale stage in its
last program; skipped when no norm is needed) and the apply pass (update, then the finish in its
last program); then, where asked for, the per-tensor telemetry from the plan's scratch (tensor_stats.py).
Nothing is read back to the host, so the step can be captured in a CUDA graph
(with ``lr`` as a tensor and a capped AutoClip history).

The plan (plan.py) is kept in the group layout's backend cache and built once per
parameter set; each step only uploads the gradient pointers when they changed.
"""

from __future__ import annotations

import math

import torch
import triton.language as tl

from torch_clip_fused.kernels.clip_apply import clip_apply_kernel
from torch_clip_fused.kernels.clip_norms import clip_norm_kernel
from torch_clip_fused.kernels.clip_scales import clip_given_scale_kernel, clip_scale_kernel

from ...config import ClipPoint, GroupConfig, GroupTensors, NonFinite
from ...methods import SCOPE_CODES, UPDATE_CODES, Scope
from ...norm_type import POWER, TWO, combine, from_parts, to_parts
from ..reference import reference_clip, reference_step
from .plan import build_plan
from .tensor_stats import write_tensor_stats

#: elements per program of the norm and apply passes, per inner block, and warps per program
#: (BLOCK 1024 with 8 warps was the best launch shape measured on an H100 for fp32 and bf16:
#: docs/first-gpu-findings.md, "Launch shape of the Triton kernels")
CHUNK_SIZE = 16384
BLOCK_SIZE = 1024
NUM_WARPS = 8
#: width of the reductions over chunks and tensors, and of the AutoClip history blocks
REDUCE_BLOCK = 1024
AUTO_BLOCK = 128

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
#: bucket dtypes whose p and m are rounded stochastically with ``stochastic_rounding`` (docs/spec.md 3.1)
_STOCHASTIC_DTYPES = (torch.bfloat16, torch.float16)
_PLAN = "triton_plan"


def _plan(t: GroupTensors, unit_scope: bool = False):
    """The cached plan of this layout (None for float64 groups), rebuilt when the chunk size, the
    presence of momentum buffers or AdamW's second moments changed, or unit scope needs chunks that
    keep units whole (such a plan serves every method)."""
    cache = t.backend_cache if t.backend_cache is not None else {}
    plan = cache.get(_PLAN)
    if plan is not None and plan.chunk == CHUNK_SIZE and plan.has_buffers == (t.first_moments is not None) and \
            plan.has_v == (t.exp_avg_sqs is not None) and plan.has_vmax == (t.max_exp_avg_sqs is not None) and \
            (plan.unit_chunks or not unit_scope) and plan.index_rows == t.index_rows:
        if t.grad_ptrs_changed:
            plan.upload_grad_ptrs(t.grad_ptrs)
        return plan
    if any(p.dtype not in _TL_DTYPES for p in t.params):
        return None
    plan = build_plan(t.params, t.grads, t.first_moments, t.columns, t.offsets, CHUNK_SIZE, t.exp_avg_sqs,
                      t.max_exp_avg_sqs, t.unit_offsets, unit_scope, t.index_rows)
    grad_ptrs = t.grad_ptrs if t.grad_ptrs is not None else torch.tensor([g.data_ptr() for g in t.grads])
    plan.upload_grad_ptrs(grad_ptrs)
    cache[_PLAN] = plan
    return plan


class _Launch:
    """The arguments the kernels of one step share, derived once from the group's tensors and config."""

    def __init__(self, plan, t: GroupTensors, cfg: GroupConfig):
        clip, update = cfg.clip, cfg.update
        self.plan, self.t, self.cfg = plan, t, cfg
        device = plan.grad_ptrs.device
        self.dummy = plan.fscratch
        self.ready = t.momentum_ready.view(torch.uint8)
        self.grad_scale = t.grad_scale.to(device) if t.grad_scale is not None else self.dummy
        self.found_inf = t.found_inf.to(device) if t.found_inf is not None else self.dummy
        self.sign = -1.0 if update.maximize else 1.0
        self.log2_beta = math.log2(clip.beta)
        self.skip = cfg.nonfinite is not NonFinite.APPLY
        # the threshold policy's state, the generic container (kernels/clip_scales.py threshold()), and its
        # kernel_params (a float64 device tensor)
        ts = t.threshold_state
        values = ts.values if ts is not None else self.dummy
        ordered = ts.sorted_values if ts is not None and ts.sorted_values is not None else self.dummy
        rows, cols = ts.values.shape if ts is not None else (1, 1)
        self.threshold_args = (values, ordered, ts.counts if ts is not None else plan.iscratch, rows, cols,
                               plan.threshold_params)
        plan.set_settings(t.seed, clip.kernel_params)
        self.lr_is_tensor = isinstance(update.lr, torch.Tensor)
        self.lr_tensor = update.lr.to(device) if self.lr_is_tensor else self.dummy
        self.adam = update.code == UPDATE_CODES["adamw"]
        if self.adam:  # AdamW: no SGD momentum; its moments and step counts (kernels/adamw_math.py)
            self.momentum, self.dampening, nesterov = 0.0, 0.0, False
            plan.set_betas(update.beta1, update.beta2)
            self.adam_args = (t.adam_steps, plan.adam_consts, 1.0 - update.beta1, update.beta2, 1.0 - update.beta2,
                              update.eps)
        else:
            self.momentum, self.dampening, nesterov = update.momentum, update.dampening, update.nesterov
            self.adam_args = (self.dummy, plan.threshold_params, 0.0, 0.0, 0.0, 0.0)
        # unit scope: per-unit scales; the relative threshold (AGC): the weights' norms too
        self.scales = plan.unit_scales if clip.method.scope is Scope.UNIT else plan.scales
        self.agc_args = (plan.partial_psq, plan.tensor_psq, plan.unit_sq, plan.unit_psq, plan.unit_rand, plan.n_units)
        self.flags = dict(HAS_SCALE=t.grad_scale is not None, HAS_FOUND_INF=t.found_inf is not None,
                          HAS_MOM=self.momentum != 0, NESTEROV=nesterov, HAS_WD=update.weight_decay != 0,
                          CLIP_UPDATE=clip.clip_point is ClipPoint.UPDATE, SCOPE=clip.scope_code,
                          RAND=clip.randomization_code, CHUNK=CHUNK_SIZE, BLOCK=BLOCK_SIZE, RBLOCK=REDUCE_BLOCK,
                          num_warps=NUM_WARPS)
        self.scale_flags = dict(CHECK=self.skip, THRESHOLD=clip.threshold_code,
                                STATEFUL=clip.policy.stateful, ABLOCK=AUTO_BLOCK)
        # the norm type (kernels/norm_parts.py): NORM is left out for the 2-norm, whose kernels are unchanged
        self.norm_p = clip.norm_type if clip.norm_kind == POWER else 2.0
        if clip.norm_kind != TWO:
            self.scale_flags["NORM"] = clip.norm_kind

    def norms(self, scope=None) -> None:
        """Launch 1 per bucket: norms, then the scale stage (``scope`` overrides the method's)."""
        plan, t, update = self.plan, self.t, self.cfg.update
        flags = dict(self.flags, **({} if scope is None else dict(SCOPE=scope)))
        for b in plan.buckets:
            clip_norm_kernel[(b.n_chunks,)](
                b.tensor_table, b.chunk_table, plan.grad_ptrs, plan.tensor_chunk_start, plan.partial_sq,
                plan.partial_bad, plan.tensor_sq, plan.tensor_bad, plan.tensor_done, plan.norm_done, plan.n_tensors,
                self.ready, self.grad_scale, self.sign, update.weight_decay, self.momentum, self.dampening,
                plan.columns, self.found_inf, t.step, plan.seed, *self.threshold_args, self.scales, plan.fscratch, plan.iscratch,
                self.cfg.clip.level, self.log2_beta, self.lr_tensor, *self.agc_args, self.norm_p,
                DTYPE=_TL_DTYPES[b.dtype],
                LR_IS_TENSOR=self.lr_is_tensor, **self.scale_flags, **flags)

    def scales_from(self, norms: torch.Tensor) -> None:
        """The scale stage alone (one program) from given norms (float32 or float64 [T + 1]).  A NaN
        global norm marks a non-finite gradient (a sharded group's reduced norms): the step is skipped
        where non-finite gradients skip; so is a tensor lr gone bad (checked here, on the device).  A
        global norm past float32's range takes its scale from the per-tensor norms' float64 sum."""
        plan, t = self.plan, self.t
        if self.cfg.clip.norm_kind == TWO:
            torch.mul(norms[:-1].double(), norms[:-1].double(), out=plan.tensor_sq)
        else:  # the kernels read parts (norm_parts.py)
            plan.tensor_sq.copy_(to_parts(norms[:-1].double(), self.cfg.clip.norm_type))
        if t.given_norms is None:
            plan.tensor_bad.zero_()
        else:
            bad = torch.isnan(norms[-1])
            if self.lr_is_tensor:
                lr = self.lr_tensor.reshape(())
                bad = bad | ~(torch.isfinite(lr) & (lr >= 0))
            plan.tensor_bad.copy_(bad.expand(plan.tensor_bad.shape))
        plan.fscratch[3:].copy_(norms[-1:])
        if self.given_sums(t.given_sums):
            return
        clip_scale_kernel[(1,)](
            plan.tensor_sq, plan.tensor_bad, plan.n_tensors, plan.columns, self.found_inf, t.step, plan.seed,
            *self.threshold_args, plan.scales, plan.fscratch, plan.iscratch, self.cfg.clip.level, self.log2_beta,
            self.norm_p, HAS_FOUND_INF=self.flags["HAS_FOUND_INF"],
            SCOPE=self.flags["SCOPE"], RAND=self.flags["RAND"], RBLOCK=REDUCE_BLOCK, **self.scale_flags)

    def given_sums(self, sums) -> bool:
        """At unit scope or with the relative threshold, the scale stage alone from the given norms (set by
        ``scales_from``) and ``sums``, the units' or weights' sums of squares (GroupTensors.given_sums, a
        sharded group's, reduced across ranks) copied into the plan's buffers.  False (nothing launched)
        for other methods."""
        plan, cfg = self.plan, self.cfg
        unit, relative = cfg.clip.method.scope is Scope.UNIT, cfg.clip.policy.needs_weights
        if not (unit or relative) or not cfg.clip.method.clips:
            return False
        count = plan.n_units if unit else plan.n_tensors
        expected = count * (2 if unit and relative else 1)
        if sums is None or sums.numel() != expected:
            raise ValueError(f"triton backend: given norms with {cfg.clip.method.name!r} need given_sums of "
                             f"{expected} elements, got {None if sums is None else sums.numel()}")
        sums = sums.to(device=plan.unit_sq.device, dtype=torch.float64)
        if unit:
            plan.unit_sq[:count].copy_(sums[:count])
            if relative:
                plan.unit_psq[:count].copy_(sums[count:])
        else:
            plan.tensor_psq[:count].copy_(sums)
        clip_given_scale_kernel[(1,)](
            plan.tensor_sq, plan.tensor_bad, plan.n_tensors, plan.columns, self.found_inf, self.t.step, plan.seed,
            *self.threshold_args, self.scales, plan.fscratch, plan.iscratch, cfg.clip.level, self.log2_beta,
            plan.tensor_psq, plan.unit_sq, plan.unit_psq, plan.unit_rand, plan.n_units,
            HAS_FOUND_INF=self.flags["HAS_FOUND_INF"], SCOPE=self.flags["SCOPE"], RAND=self.flags["RAND"],
            RBLOCK=REDUCE_BLOCK, **self.scale_flags)
        return True

    def apply(self, norms_ran: bool) -> None:
        """Launch 2 per bucket: the scales applied with the update rule's epilogue, then the finish."""
        plan, t, update = self.plan, self.t, self.cfg.update
        lr_is_tensor, lr_tensor = self.lr_is_tensor, self.lr_tensor
        for b in plan.buckets:
            clip_apply_kernel[(b.n_chunks,)](
                b.tensor_table, b.chunk_table, plan.grad_ptrs, self.scales, plan.iscratch, self.found_inf, t.step,
                plan.seed, self.ready, self.grad_scale, lr_tensor, plan.clip_counts, plan.apply_done, plan.n_chunks,
                plan.fscratch, plan.columns, plan.n_tensors, plan.numel, t.stats, t.skipped,
                0.0 if lr_is_tensor else update.lr, self.sign, update.weight_decay, self.momentum, self.dampening,
                self.cfg.clip.level, self.log2_beta, *self.adam_args, DTYPE=_TL_DTYPES[b.dtype], NORMS=norms_ran,
                SKIP=self.skip, LR_IS_TENSOR=lr_is_tensor, RULE=update.code,
                AMSGRAD=self.adam and update.amsgrad, **self.flags, **self._rounding(b.dtype))

    def _rounding(self, dtype) -> dict:
        """STOCH_ROUND for a bucket; its launches keep every product rounded (no fused multiply-add, as
        the C++ and reference backends) so that the float32 values rounded stochastically, and hence the
        bits, are those of the other backends (docs/spec.md section 3.1)."""
        if self.cfg.update.stochastic_rounding and dtype in _STOCHASTIC_DTYPES:
            return dict(STOCH_ROUND=True, enable_fp_fusion=False)
        return dict(STOCH_ROUND=False)


def triton_step(t: GroupTensors, cfg: GroupConfig) -> None:
    """One step of one param group with the Triton kernels (float32 / bfloat16 / float16).

    float64 groups go to the reference: the kernels compute in float32, and a user who keeps
    float64 parameters wants float64 arithmetic."""
    plan = _plan(t, cfg.clip.method.scope is Scope.UNIT)
    if plan is None:
        reference_step(t, cfg)
        return
    launch = _Launch(plan, t, cfg)
    if t.given_norms is not None:  # norms reduced across ranks (a sharded group): the norm pass is not run
        given = t.given_norms
        launch.scales_from(given.to(device=plan.grad_ptrs.device,
                                    dtype=given.dtype if given.dtype == torch.float64 else torch.float32))
        launch.apply(norms_ran=True)
    else:
        norms = cfg.needs_norms or cfg.clip.clip_point is ClipPoint.UPDATE
        if norms:
            launch.norms()
        launch.apply(norms)
    if t.tensor_stats is not None:
        write_tensor_stats(plan, t, cfg, t.given_norms is not None or norms)


def triton_clip(t: GroupTensors, cfg: GroupConfig, norms: torch.Tensor, stage: str) -> None:
    """The functional API's stages with the Triton kernels (``cfg.update`` is the clip-only rule):
    "norms" writes the per-tensor norms then the global norm into ``norms`` (float32 [T + 1], or float64:
    norms past float32's range kept);
    "clip" clips the gradients in place with the norms given in ``norms``; "both" does both."""
    plan = _plan(t, stage != "norms" and cfg.clip.method.scope is Scope.UNIT)
    if plan is None:
        reference_clip(t, cfg, norms, stage)
        return
    launch = _Launch(plan, t, cfg)
    if stage == "clip":
        launch.scales_from(norms)
    else:
        launch.norms(scope=SCOPE_CODES[None] if stage == "norms" else None)
        p = cfg.clip.norm_type  # plan.tensor_sq holds the parts (norm_parts.py; p = 2: sums of squares)
        if norms.dtype == torch.float64:
            torch.cat([from_parts(plan.tensor_sq, p), from_parts(combine(plan.tensor_sq, p), p).reshape(1)], out=norms)
        else:
            torch.cat([from_parts(plan.tensor_sq, p).float(), plan.fscratch[:1]], out=norms)
        if stage == "norms":
            return
    launch.apply(norms_ran=True)


__all__ = ["triton_clip", "triton_step"]
