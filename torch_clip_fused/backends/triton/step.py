"""``triton_step``: one ClippedSGD step of one param group in two launches per dtype bucket,
whatever the method and the number of tensors: the norm pass (norms, then the scale stage in its
last program; skipped when no norm is needed) and the apply pass (update, then the finish in its
last program).  Nothing is read back to the host, so the step can be captured in a CUDA graph
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

from ...config import ClipPoint, GroupConfig, GroupTensors, NonFinite
from ...methods import THRESHOLD_STATE
from ..reference import reference_step
from .plan import build_plan

#: elements per program of the norm and apply passes, per inner block, and warps per program
#: (BLOCK 1024 with 8 warps was the best launch shape measured on an H100 for fp32 and bf16:
#: ../shared/gpu-findings.md section 2)
CHUNK_SIZE = 16384
BLOCK_SIZE = 1024
NUM_WARPS = 8
#: width of the reductions over chunks and tensors, and of the AutoClip history blocks
REDUCE_BLOCK = 1024
AUTO_BLOCK = 128

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_PLAN = "triton_plan"


def _plan(t: GroupTensors):
    """The cached plan of this layout (None for float64 groups), rebuilt when the chunk size or the
    presence of momentum buffers changed."""
    cache = t.backend_cache if t.backend_cache is not None else {}
    plan = cache.get(_PLAN)
    if plan is not None and plan.chunk == CHUNK_SIZE and plan.has_buffers == (t.momentum_buffers is not None):
        if t.grad_ptrs_changed:
            plan.upload_grad_ptrs(t.grad_ptrs)
        return plan
    if any(p.dtype not in _TL_DTYPES for p in t.params):
        return None
    plan = build_plan(t.params, t.grads, t.momentum_buffers, t.columns, t.offsets, CHUNK_SIZE)
    grad_ptrs = t.grad_ptrs if t.grad_ptrs is not None else torch.tensor([g.data_ptr() for g in t.grads])
    plan.upload_grad_ptrs(grad_ptrs)
    cache[_PLAN] = plan
    return plan


def triton_step(t: GroupTensors, cfg: GroupConfig) -> None:
    """One step of one param group with the Triton kernels (float32 / bfloat16 / float16).

    float64 groups go to the reference: the kernels compute in float32, and a user who keeps
    float64 parameters wants float64 arithmetic."""
    plan = _plan(t)
    if plan is None:
        reference_step(t, cfg)
        return
    clip = cfg.clip
    update = clip.clip_point is ClipPoint.UPDATE
    has_mom = cfg.update.momentum != 0
    skip = cfg.nonfinite is not NonFinite.APPLY
    norms = cfg.needs_norms or update
    device = plan.grad_ptrs.device
    ready = t.momentum_ready.view(torch.uint8)
    dummy = plan.fscratch
    grad_scale = t.grad_scale.to(device) if t.grad_scale is not None else dummy
    found_inf = t.found_inf.to(device) if t.found_inf is not None else dummy
    sign = -1.0 if cfg.update.maximize else 1.0
    log2_beta = math.log2(cfg.clip.beta)
    plan.set_settings(t.seed, cfg.clip.p_autoclip)
    flags = dict(HAS_SCALE=t.grad_scale is not None, HAS_FOUND_INF=t.found_inf is not None, HAS_MOM=has_mom,
                 NESTEROV=cfg.update.nesterov, CLIP_UPDATE=update, SCOPE=clip.scope_code, RAND=clip.randomization_code, CHUNK=CHUNK_SIZE, BLOCK=BLOCK_SIZE,
                 RBLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS)

    if norms:
        history = t.history if t.history is not None else dummy
        counts = t.history_count if t.history_count is not None else plan.iscratch
        capacity, n_cols = t.history.shape if t.history is not None else (1, 1)
        for b in plan.buckets:
            clip_norm_kernel[(b.n_chunks,)](
                b.tensor_table, b.chunk_table, plan.grad_ptrs, plan.tensor_chunk_start, plan.partial_sq,
                plan.partial_bad, plan.tensor_sq, plan.tensor_bad, plan.tensor_done, plan.norm_done, plan.n_tensors,
                ready, grad_scale, sign, cfg.update.weight_decay, cfg.update.momentum, cfg.update.dampening,
                plan.columns, found_inf, t.step, plan.seed, history, counts, capacity, n_cols, plan.p_autoclip,
                plan.scales, plan.fscratch, plan.iscratch, cfg.clip.level, log2_beta,
                DTYPE=_TL_DTYPES[b.dtype], CHECK=skip, THRESHOLD=clip.threshold_code,
                STATEFUL=THRESHOLD_STATE[clip.method.threshold] is not None, ABLOCK=AUTO_BLOCK, **flags)

    lr_is_tensor = isinstance(cfg.update.lr, torch.Tensor)
    lr_tensor = cfg.update.lr.to(device) if lr_is_tensor else dummy
    for b in plan.buckets:
        clip_apply_kernel[(b.n_chunks,)](
            b.tensor_table, b.chunk_table, plan.grad_ptrs, plan.scales, plan.iscratch, found_inf, t.step, plan.seed,
            ready, grad_scale, lr_tensor, plan.clip_counts, plan.apply_done, plan.n_chunks,
            plan.fscratch, plan.columns, plan.n_tensors, plan.numel, t.stats, t.skipped,
            0.0 if lr_is_tensor else cfg.update.lr, sign, cfg.update.weight_decay, cfg.update.momentum, cfg.update.dampening, cfg.clip.level, log2_beta,
            DTYPE=_TL_DTYPES[b.dtype], NORMS=norms, SKIP=skip, LR_IS_TENSOR=lr_is_tensor, RULE=cfg.update.code,
            **flags)


__all__ = ["triton_step"]
