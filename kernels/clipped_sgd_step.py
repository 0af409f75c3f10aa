"""``triton_step``: one ClippedSGD step of one param group in five or so launches, whatever the
number of tensors: a norm pass per dtype bucket, a reduce, a scale pass, an apply pass per
dtype bucket and a finish.  Nothing is read back to the host, so the step can be captured in
a CUDA graph (with ``lr`` as a tensor and a capped AutoClip history)."""

from __future__ import annotations

import math

import torch
import triton.language as tl

from torch_clip_fused.config import ClipPoint, GroupConfig, GroupTensors, NonFinite
from torch_clip_fused.methods import RANDOMIZATION_CODES, SCOPE_CODES
from torch_clip_fused.reference import reference_step

from .clip_apply import clip_apply_kernel, clip_finish_kernel
from .clip_norms import clip_norm_kernel, clip_reduce_kernel
from .clip_scales import clip_scale_kernel
from .multi_tensor import TABLE_WIDTH, get_plan
from .sgd_math import SCOPE_LAYER

#: elements per program of the norm and apply passes, and per inner block
CHUNK_SIZE = 16384
BLOCK_SIZE = 1024
REDUCE_BLOCK = 1024
#: number of kernel launches so far (tests check it does not grow with the tensor count)
launch_count = 0

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _launch(kernel, grid, *args, **kwargs):
    global launch_count
    launch_count += 1
    kernel[grid](*args, **kwargs)


def triton_step(t: GroupTensors, cfg: GroupConfig) -> None:
    """One step of one param group with the Triton kernels (float32 / bfloat16 / float16).

    float64 groups go to the reference: the kernels compute in float32, and a user who keeps
    float64 parameters wants float64 arithmetic."""
    if any(p.dtype not in _TL_DTYPES or g.dtype not in _TL_DTYPES for p, g in zip(t.params, t.grads)):
        reference_step(t, cfg)
        return
    method = cfg.method
    scope = SCOPE_CODES[method.scope]
    rand = RANDOMIZATION_CODES[method.randomization]
    update = cfg.clip_point is ClipPoint.UPDATE
    has_mom = cfg.momentum != 0
    skip = cfg.nonfinite is not NonFinite.APPLY
    norms = cfg.needs_norms or update
    plan = get_plan(t.params, t.grads, t.momentum_buffers, t.columns, t.offsets, CHUNK_SIZE)
    ready = t.momentum_ready.view(torch.uint8)
    dummy = plan.fscratch
    grad_scale = t.grad_scale.to(t.device) if t.grad_scale is not None else None
    found_inf = t.found_inf.to(t.device) if t.found_inf is not None else None
    sign = -1.0 if cfg.maximize else 1.0
    common = dict(TABLE_WIDTH=TABLE_WIDTH, CHUNK=CHUNK_SIZE, BLOCK=BLOCK_SIZE)

    if norms:
        for b in plan.buckets:
            if b.n_chunks:
                _launch(clip_norm_kernel, (b.n_chunks,), b.tensor_table, b.chunk_table, plan.partial_sq,
                        plan.partial_bad, ready, grad_scale if grad_scale is not None else dummy,
                        sign, cfg.weight_decay, cfg.momentum, cfg.dampening,
                        GDTYPE=_TL_DTYPES[b.grad_dtype], PDTYPE=_TL_DTYPES[b.param_dtype],
                        HAS_SCALE=grad_scale is not None, HAS_MOM=has_mom, NESTEROV=cfg.nesterov,
                        UPDATE=update, **common)
    _launch(clip_reduce_kernel, (1,), plan.partial_sq, plan.partial_bad, plan.n_chunks,
            found_inf if found_inf is not None else dummy, plan.fscratch, plan.iscratch,
            NORMS=norms, CHECK=skip, HAS_FOUND_INF=found_inf is not None, BLOCK=REDUCE_BLOCK)

    history = t.history if t.history is not None else dummy
    counts = t.history_count if t.history_count is not None else plan.iscratch
    capacity = t.history.shape[0] if t.history is not None else 1
    n_cols = t.history.shape[1] if t.history is not None else 1
    log2_beta = math.log2(cfg.beta)
    plan.set_settings(t.seed, cfg.p_autoclip)
    _launch(clip_scale_kernel, (plan.n_tensors if scope == SCOPE_LAYER.value else 1,), plan.partial_sq,
            plan.tensor_chunk_start, plan.columns, plan.fscratch, plan.iscratch, t.step, plan.seed, history, counts,
            capacity, n_cols, plan.scales, plan.etas, plan.clipped, cfg.level, log2_beta, plan.p_autoclip,
            SCOPE=scope, AUTO=method.auto, RAND=rand, BLOCK=128 if method.auto else REDUCE_BLOCK)

    lr_is_tensor = isinstance(cfg.lr, torch.Tensor)
    lr_tensor = cfg.lr.to(t.device) if lr_is_tensor else dummy
    for b in plan.buckets:
        if b.n_chunks:
            _launch(clip_apply_kernel, (b.n_chunks,), b.tensor_table, b.chunk_table, plan.scales, plan.iscratch,
                    ready, grad_scale if grad_scale is not None else dummy, lr_tensor, plan.clip_counts,
                    0.0 if lr_is_tensor else cfg.lr, sign, cfg.weight_decay, cfg.momentum, cfg.dampening,
                    cfg.level, log2_beta,
                    GDTYPE=_TL_DTYPES[b.grad_dtype], PDTYPE=_TL_DTYPES[b.param_dtype], SCOPE=scope, RAND=rand,
                    SKIP=skip, HAS_SCALE=grad_scale is not None, LR_IS_TENSOR=lr_is_tensor, HAS_MOM=has_mom,
                    NESTEROV=cfg.nesterov, UPDATE=update, **common)
    _launch(clip_finish_kernel, (1,), plan.iscratch, plan.fscratch, plan.etas, plan.clipped, plan.clip_counts,
            plan.n_chunks, plan.numel, plan.n_tensors, plan.columns, ready, t.stats, t.skipped, t.step,
            cfg.level, SCOPE=scope, SKIP=skip, HAS_MOM=has_mom, BLOCK=REDUCE_BLOCK)
