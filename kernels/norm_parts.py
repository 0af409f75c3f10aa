"""The norm type p of the norm pass (torch_clip_fused/norm_type.py): what a chunk, a tensor and the step
combine, for the constexpr NORM (torch_clip_fused.norm_type: NORM_TWO 0, NORM_INF 1, NORM_POWER 2; p a
runtime float64 ``norm_p``).

    part(x) = sum |x_i|^2 (NORM_TWO: the kernels' sums of squares, unchanged), max |x_i| (NORM_INF),
              sum |x_i|^p (NORM_POWER, float64 powers exp2(p log2 |x|))
    parts combine by sum, or by max for NORM_INF;  ||x||_p = part^(1/p) (inf: part)

The scale stage works on "squared norms" (its sqrt is the norm): ``as_sq`` turns a part into ||x||_p^2,
so that every threshold and scale reads p-norms through the same code as 2-norms.
"""

import triton
import triton.language as tl

NORM_TWO = tl.constexpr(0)
NORM_INF = tl.constexpr(1)
NORM_POWER = tl.constexpr(2)


@triton.jit
def power_sum(x, mask, norm_p):
    """sum of |x|^p over the masked block, in float64 (0 for x = 0: no log of 0 is taken; NaN kept)."""
    a = tl.abs(x).to(tl.float64)
    nonzero = mask & (a != 0)
    powered = tl.exp2(norm_p * tl.log2(tl.where(nonzero, a, 1.0)))
    return tl.sum(tl.where(nonzero, powered, 0.0), axis=0)


@triton.jit
def add_part(acc, part, NORM: tl.constexpr):
    """Two parts (or blocks of them) combined: their sum, or for NORM_INF their max (NaN kept)."""
    if NORM == NORM_INF:
        out = tl.maximum(acc, part, propagate_nan=tl.PropagateNan.ALL)
    else:
        out = acc + part
    return out


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def reduce_parts(block, NORM: tl.constexpr):
    """A block of parts combined into one (tl.sum, or for NORM_INF the max, NaN kept)."""
    if NORM == NORM_INF:
        out = tl.reduce(block, 0, _max_keeping_nan)
    else:
        out = tl.sum(block, axis=0)
    return out


@triton.jit
def as_sq(part, norm_p, NORM: tl.constexpr):
    """A part as the squared norm the scale stage reads: the part itself (NORM_TWO), part^2 (NORM_INF), or
    (part^(1/p))^2 (NORM_POWER), float64."""
    if NORM == NORM_TWO:
        out = part
    elif NORM == NORM_INF:
        out = part * part
    else:
        root = tl.where(part > 0, tl.exp2(tl.log2(tl.where(part > 0, part, 1.0)) / norm_p), part)
        out = root * root
    return out
