"""Scale pass, on device: thresholds (constant, or the AutoClip nearest-rank quantile of the
device-side history), Philox draws and the global or per-tensor scales.

One program per history column: one for global scope, one per tensor for layer scope.
With n the norms recorded in a column, the threshold is the ceil(p n)-th smallest, found by
counting (a value v is the answer when #{< v} < k <= #{<= v}): O(n^2 / BLOCK^2) block steps
per column, exact, no sort, no host round trip.  Long runs should cap the history
(``autoclip_history``).
"""

import triton
import triton.language as tl

from .sgd_math import RAND_NONE, SCOPE_LAYER, TINY, clip_probability


@triton.jit
def nearest_rank(history, n_cols, col, n, k, BLOCK: tl.constexpr):
    """The k-th smallest (1-based) of history[0:n, col]."""
    best = tl.full([], float("-inf"), tl.float32)
    for i in range(0, n, BLOCK):
        ri = i + tl.arange(0, BLOCK)
        vi = tl.load(history + ri * n_cols + col, mask=ri < n, other=float("inf"))
        less = tl.zeros([BLOCK], dtype=tl.int64)
        less_eq = tl.zeros([BLOCK], dtype=tl.int64)
        for j in range(0, n, BLOCK):
            rj = j + tl.arange(0, BLOCK)
            vj = tl.load(history + rj * n_cols + col, mask=rj < n, other=float("inf"))
            valid = (rj < n)[None, :]
            less += tl.sum(((vj[None, :] < vi[:, None]) & valid).to(tl.int64), axis=1)
            less_eq += tl.sum(((vj[None, :] <= vi[:, None]) & valid).to(tl.int64), axis=1)
        hit = (less < k) & (less_eq >= k) & (ri < n)
        best = tl.maximum(best, tl.max(tl.where(hit, vi, float("-inf")), axis=0))
    return best


@triton.jit
def clip_scale_kernel(
    partial_sq, tensor_chunk_start, columns, fscratch, iscratch, step_ptr, seed_ptr,
    history, counts, capacity, n_cols, scales, etas, clipped,
    level, log2_beta, p_autoclip_ptr,
    SCOPE: tl.constexpr, AUTO: tl.constexpr, RAND: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    ok = tl.load(iscratch) != 0
    key = (tl.load(step_ptr) << 32) | tl.load(seed_ptr)
    if pid == 0:
        tl.store(iscratch + 1, key)
    if SCOPE == SCOPE_LAYER:  # this tensor's norm from its chunks' partial sums
        lo = tl.load(tensor_chunk_start + pid)
        hi = tl.load(tensor_chunk_start + pid + 1)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(lo, hi, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            acc += tl.load(partial_sq + offs, mask=offs < hi, other=0.0)
        norm = tl.sqrt(tl.sum(acc, axis=0))
        col = tl.load(columns + pid)
        index = col
    else:
        norm = tl.load(fscratch)
        col = pid * 0
        index = col
    if AUTO:
        record = ok & (norm == norm) & (tl.abs(norm) != float("inf"))
        count = tl.load(counts + col)
        tl.store(history + (count % capacity) * n_cols + col, norm, mask=record)
        count += record.to(tl.int64)
        tl.store(counts + col, count)
        n = tl.minimum(count, capacity)
        k = tl.ceil(tl.load(p_autoclip_ptr) * n.to(tl.float64)).to(tl.int64)  # float64, as the reference
        k = tl.minimum(tl.maximum(k, 1), tl.maximum(n, 1))
        eta = nearest_rank(history, n_cols, col, n, k, BLOCK)
        eta = tl.where(count > 0, eta, norm)
    else:
        eta = level + 0.0 * norm
    alpha = eta / tl.maximum(norm, TINY)
    clip = norm > eta
    if RAND != RAND_NONE:
        u = tl.sum(tl.rand(key, index + tl.zeros([1], tl.int64)), axis=0)
        clip = clip & (u < clip_probability(alpha, log2_beta, RAND))
    tl.store(scales + pid, tl.where(clip, alpha, 1.0))
    tl.store(etas + pid, eta)
    tl.store(clipped + pid, clip.to(tl.float32))
