"""AutoClip's sorted history in the Triton scale stage (one program; the math is in
torch_clip_fused/thresholds/autoclip.py): a ring [capacity, n_cols] in the order recorded
and, per column, a row [capacity] of the recorded norms ascending with +inf padding.  Recording
counts the row's values below the leaving and the new norm, then moves only the positions
between them by one; the quantile is one read.
"""

import triton
import triton.language as tl


@triton.jit
def autoclip_record_and_threshold(
    norm,  # float32 []: the scope column's norm this step
    record,  # bool []: whether the norm is recorded (the step is ok and the norm finite)
    col,  # int []: the scope column
    ring,  # float32 [capacity, n_cols]: norms in the order recorded
    sorted_rows,  # float32 [n_cols, capacity]: per column, the recorded norms ascending, then +inf
    counts,  # int64 [n_cols]: norms recorded per column
    capacity, n_cols,  # the history's rows and columns
    p,  # float64 []: the AutoClip quantile
    ABLOCK: tl.constexpr,  # positions per block of the scans and shifts
):
    """Record ``norm`` in column ``col`` (when ``record``) and return the column's nearest-rank
    p-quantile, the current norm included (the norm itself while the column is empty)."""
    row = sorted_rows + col * capacity
    count = tl.load(counts + col)
    full = count >= capacity
    slot = count % capacity
    old = tl.load(ring + slot * n_cols + col)
    n = tl.minimum(count, capacity)
    less_old = tl.zeros([ABLOCK], dtype=tl.int64)
    less_new = tl.zeros([ABLOCK], dtype=tl.int64)
    for i in range(0, n, ABLOCK):
        r = i + tl.arange(0, ABLOCK)
        v = tl.load(row + r, mask=r < n, other=float("inf"))
        less_old += (v < old).to(tl.int64)
        less_new += (v < norm).to(tl.int64)
    a = tl.minimum(tl.where(full, tl.sum(less_old, axis=0), n), capacity - 1)
    b = tl.sum(less_new, axis=0) - (full & (old < norm)).to(tl.int64)
    b = tl.maximum(tl.minimum(b, capacity - 1), 0)
    if record:
        if a <= b:  # a left shift over [a, b]: ascending blocks read ahead of what they write
            for i in range(a, b + 1, ABLOCK):
                j = i + tl.arange(0, ABLOCK)
                v = tl.load(row + j + 1, mask=j < b, other=0.0)
                v = tl.where(j == b, norm, v)
                tl.debug_barrier()  # every thread has read before any writes
                tl.store(row + j, v, mask=j <= b)
                tl.debug_barrier()
        else:  # a right shift over [b, a]: descending blocks
            for t in range(0, tl.cdiv(a - b + 1, ABLOCK)):
                j = a - t * ABLOCK - tl.arange(0, ABLOCK)
                v = tl.load(row + j - 1, mask=j > b, other=0.0)
                v = tl.where(j == b, norm, v)
                tl.debug_barrier()
                tl.store(row + j, v, mask=j >= b)
                tl.debug_barrier()
        tl.store(ring + slot * n_cols + col, norm)
        count += 1
        tl.store(counts + col, count)
    n = tl.minimum(count, capacity)
    k = tl.ceil(p * n.to(tl.float64)).to(tl.int64)  # float64, as the reference
    k = tl.minimum(tl.maximum(k, 1), tl.maximum(n, 1))
    eta = tl.load(row + k - 1)
    return tl.where(count > 0, eta, norm)
