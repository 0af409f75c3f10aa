"""Norm pass (launch 1 of 2 per dtype bucket): sums of squares and the non-finite flag in one read
of the gradients, reduced to per-tensor and global norms, then the scales, in the same launch.

Every program (one per chunk) writes its chunk's partial sum of squares and non-finite flag.
The last program to finish a tensor's chunks (an atomic counter per tensor) adds that tensor's
partials in chunk order; the last program to finish a tensor (an atomic counter per step) adds
the tensors' sums in tensor order and runs the scale stage (clip_scales.py).  Both reductions
have a fixed order, so the results repeat bit for bit however the programs are scheduled; each
counter is set back to 0 by the program that finishes it, so the step can be replayed in a CUDA
graph.  Under ``clip_point="update"`` the squares are those of the final update direction; the
flag is always that of the gradient.

    ||g_t||^2 = sum over t's chunks c (in order) of sum_{i in c} g_i^2
    ||g||^2   = sum over tensors t (in order) of ||g_t||^2
"""

import triton
import triton.language as tl

from .clip_scales import scale_stage
from .columns import T_COLUMN
from .sgd_math import check_codes, decode_chunk, inverse_scale, load_grad, sgd_direction, with_decay


@triton.jit
def clip_source(g_ptr, p_ptr, m_ptr, offs, mask, sign, inv_scale, ready, weight_decay, momentum, dampening,
                HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, HAS_WD: tl.constexpr, CLIP_UPDATE: tl.constexpr):
    """(what the norms are taken of, the gradient): the gradient, or under clip_point="update" the
    final update direction; float32."""
    g = load_grad(g_ptr, offs, mask, sign, inv_scale)
    x = g
    if CLIP_UPDATE:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.zeros_like(g)
        if HAS_MOM:
            m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x, _ = sgd_direction(with_decay(g, p, weight_decay, HAS_WD), m, ready, momentum, dampening, HAS_MOM, NESTEROV)
    return x, g


@triton.jit
def clip_norm_kernel(
    tensor_table,  # int64 [T_b, TABLE_WIDTH]: this bucket's tensors (torch_clip_fused/backends/triton/plan.py)
    chunk_table,  # int64 [C_b, CHUNK_WIDTH]: this bucket's chunks
    grad_ptrs,  # int64 [T]: gradient data pointers of this step
    tensor_chunk_start,  # int64 [T + 1]: tensor t's chunks are [start[t], start[t + 1])
    partial_sq, partial_bad,  # float64 / int32 [C]: per-chunk results (written)
    tensor_sq, tensor_bad,  # float64 / int32 [T]: per-tensor results (written)
    tensor_done, done,  # int32 [T] / [1]: per-tensor chunk counters, step tensor counter
    n_tensors,  # tensors in the step (all buckets)
    ready_ptr,  # uint8 [G]: momentum buffer initialised, by column (CLIP_UPDATE)
    scale_ptr,  # float32 [1]: GradScaler's scale (HAS_SCALE)
    sign, weight_decay, momentum, dampening,  # float: -1 to maximize; SGD settings (CLIP_UPDATE)
    # the scale stage's arguments (clip_scales.scale_stage)
    columns, found_inf_ptr, step_ptr, seed_ptr, history, sorted_rows, counts, capacity, n_cols, p_autoclip_ptr, zstate, zcounts, zrows, zcols, zalpha, zoma, zz,
    scales, fscratch, iscratch, level, log2_beta, lr_ptr,
    DTYPE: tl.constexpr,  # the bucket's parameter (= gradient) dtype
    HAS_SCALE: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, HAS_WD: tl.constexpr,
    CLIP_UPDATE: tl.constexpr,  # clip_point="update": the norms are those of the update direction
    CHECK: tl.constexpr,  # whether a non-finite gradient makes the step skip
    HAS_FOUND_INF: tl.constexpr,  # whether GradScaler's found_inf is read
    SCOPE: tl.constexpr, THRESHOLD: tl.constexpr, STATEFUL: tl.constexpr, RAND: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,  # elements per program and per inner step
    RBLOCK: tl.constexpr, ABLOCK: tl.constexpr,  # reduction width; AutoClip history block
    LR_IS_TENSOR: tl.constexpr,  # the step's lr is the tensor at lr_ptr (checked by the scale stage)
):
    check_codes(SCOPE, RAND)
    row, start, chunk_id, index, g_ptr, p_ptr, m_ptr, numel = decode_chunk(
        tensor_table, chunk_table, grad_ptrs, tl.program_id(0), DTYPE)
    inv_scale = inverse_scale(scale_ptr, HAS_SCALE)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    ready = False
    if CLIP_UPDATE and HAS_MOM:
        ready = tl.load(ready_ptr + tl.load(row + T_COLUMN)) != 0
    for i in range(0, tl.minimum(CHUNK, numel - start), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = offs < numel
        x, g = clip_source(g_ptr, p_ptr, m_ptr, offs, mask, sign, inv_scale, ready, weight_decay, momentum,
                           dampening, HAS_MOM, NESTEROV, HAS_WD, CLIP_UPDATE)
        bad = bad | ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)
        acc += x * x
    chunk_sq = tl.sum(acc, axis=0).to(tl.float64)
    flag = tl.max(bad, axis=0)
    if (chunk_sq == float("inf")) & (flag == 0):  # finite values whose float32 squares overflow: again in float64
        acc64 = tl.zeros([BLOCK], dtype=tl.float64)
        for i in range(0, tl.minimum(CHUNK, numel - start), BLOCK):
            offs = start + i + tl.arange(0, BLOCK)
            x, g = clip_source(g_ptr, p_ptr, m_ptr, offs, offs < numel, sign, inv_scale, ready, weight_decay,
                               momentum, dampening, HAS_MOM, NESTEROV, HAS_WD, CLIP_UPDATE)
            acc64 += x.to(tl.float64) * x.to(tl.float64)
        chunk_sq = tl.sum(acc64, axis=0)
    tl.store(partial_sq + chunk_id, chunk_sq)
    tl.store(partial_bad + chunk_id, flag)

    lo = tl.load(tensor_chunk_start + index)
    hi = tl.load(tensor_chunk_start + index + 1)
    if tl.atomic_add(tensor_done + index, 1) == hi - lo - 1:  # the tensor's last chunk
        tl.store(tensor_done + index, 0)
        sq = tl.zeros([RBLOCK], dtype=tl.float64)
        flags = tl.zeros([RBLOCK], dtype=tl.int32)
        for k in range(lo, hi, RBLOCK):
            offs = k + tl.arange(0, RBLOCK)
            sq += tl.load(partial_sq + offs, mask=offs < hi, other=0.0, volatile=True)
            flags = tl.maximum(flags, tl.load(partial_bad + offs, mask=offs < hi, other=0, volatile=True))
        tl.store(tensor_sq + index, tl.sum(sq, axis=0))
        tl.store(tensor_bad + index, tl.max(flags, axis=0))
        if tl.atomic_add(done, 1) == n_tensors - 1:  # the step's last tensor
            tl.store(done, 0)
            scale_stage(tensor_sq, tensor_bad, n_tensors, columns, found_inf_ptr, step_ptr, seed_ptr,
                        history, sorted_rows, counts, capacity, n_cols, p_autoclip_ptr, zstate, zcounts, zrows, zcols, zalpha, zoma, zz, scales, fscratch,
                        iscratch, level, log2_beta, lr_ptr, CHECK, HAS_FOUND_INF, SCOPE, THRESHOLD, STATEFUL, RAND,
                        RBLOCK, ABLOCK, LR_IS_TENSOR)
