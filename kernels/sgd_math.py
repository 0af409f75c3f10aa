"""Pieces shared by the Triton kernels: chunk decoding and element-wise float32 math."""

import triton
import triton.language as tl

from torch_clip_fused import config, methods
from torch_clip_fused.methods import (RANDOMIZATION_CODES, SCOPE_CODES, THRESHOLD_CODES, UPDATE_CODES, Randomization,
                                      Scope, Threshold)

from .columns import C_END, C_ID, C_ROW, C_START, CHUNK_WIDTH, T_INDEX, T_M_PTR, T_P_PTR, TABLE_WIDTH

# the kernels' SCOPE, THRESHOLD, RAND and RULE constexpr codes
SCOPE_NONE = tl.constexpr(SCOPE_CODES[None])
SCOPE_GLOBAL = tl.constexpr(SCOPE_CODES[Scope.GLOBAL])
SCOPE_LAYER = tl.constexpr(SCOPE_CODES[Scope.LAYER])
SCOPE_COORDINATE = tl.constexpr(SCOPE_CODES[Scope.COORDINATE])
SCOPE_UNIT = tl.constexpr(SCOPE_CODES[Scope.UNIT])
THRESHOLD_CONSTANT = tl.constexpr(THRESHOLD_CODES[Threshold.CONSTANT])
THRESHOLD_AUTO = tl.constexpr(THRESHOLD_CODES[Threshold.AUTO])
THRESHOLD_ZSCORE = tl.constexpr(THRESHOLD_CODES[Threshold.ZSCORE])
THRESHOLD_EMA_RELATIVE = tl.constexpr(THRESHOLD_CODES[Threshold.EMA_RELATIVE])
THRESHOLD_RELATIVE = tl.constexpr(THRESHOLD_CODES[Threshold.RELATIVE])
RULE_CLIP_ONLY = tl.constexpr(UPDATE_CODES["clip_only"])
RULE_SGD = tl.constexpr(UPDATE_CODES["sgd"])
RULE_ADAMW = tl.constexpr(UPDATE_CODES["adamw"])
RAND_NONE = tl.constexpr(RANDOMIZATION_CODES[Randomization.NONE])
RAND_LINEAR = tl.constexpr(RANDOMIZATION_CODES[Randomization.LINEAR])
RAND_QUADRATIC = tl.constexpr(RANDOMIZATION_CODES[Randomization.QUADRATIC])
TINY = tl.constexpr(methods.TINY)  # the smallest normal float32; coordinate scope: alpha = eta / max(|x|, TINY)
# a scale s below TINY is stored as -(s * SPLIT_POST) and applied as x * SPLIT_PRE * |stored| (clip_scales.py)
SPLIT_POST = tl.constexpr(2.0**64)
SPLIT_PRE = tl.constexpr(2.0**-64)
# Philox counter offset of the stochastic-rounding draws (docs/spec.md section 2): words 0 (p), 1 (m)
SR_INDEX = tl.constexpr(config.SR_INDEX)
# unit scope: columns of the norm pass's [units, UNIT_EB] tiles (chunks holding several whole units)
UNIT_EB = tl.constexpr(16)


@triton.jit
def check_codes(SCOPE: tl.constexpr, RAND: tl.constexpr):
    """An unknown method code is a compile-time error, never a silent fallback."""
    tl.static_assert((SCOPE == SCOPE_NONE) or (SCOPE == SCOPE_GLOBAL) or (SCOPE == SCOPE_LAYER)
                     or (SCOPE == SCOPE_COORDINATE) or (SCOPE == SCOPE_UNIT), "unknown SCOPE code")
    tl.static_assert((RAND == RAND_NONE) or (RAND == RAND_LINEAR) or (RAND == RAND_QUADRATIC), "unknown RAND code")


@triton.jit
def element_index(flat_offset, offs, inner, extra):
    """The Philox index of a tensor's elements ``offs``: their place in the unsharded group (docs/spec.md
    section 2), flat_offset + offs, plus (offs // inner) * extra for a DTensor shard that is not one
    row-major range of its parameter (GroupTensors.index_rows; extra is 0 elsewhere)."""
    index = flat_offset + offs
    if extra != 0:
        index = index + (offs // inner) * extra
    return index


@triton.jit
def decode_chunk(tensor_table, chunk_table, grad_ptrs, c, DTYPE: tl.constexpr):
    """Chunk c of a bucket: (tensor-table row, first element, chunk id, tensor index, grad / param
    / momentum pointers, one past the chunk's last element)."""
    chunk = chunk_table + c * CHUNK_WIDTH
    row = tensor_table + tl.load(chunk + C_ROW) * TABLE_WIDTH
    index = tl.load(row + T_INDEX)
    g_ptr = tl.load(grad_ptrs + index).to(tl.pointer_type(DTYPE))
    p_ptr = tl.load(row + T_P_PTR).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(row + T_M_PTR).to(tl.pointer_type(DTYPE))
    return row, tl.load(chunk + C_START), tl.load(chunk + C_ID), index, g_ptr, p_ptr, m_ptr, tl.load(chunk + C_END)


@triton.jit
def inverse_scale(scale_ptr, HAS_SCALE: tl.constexpr):
    """1 / GradScaler's scale, or 1."""
    inv = 1.0
    if HAS_SCALE:
        inv = 1.0 / tl.load(scale_ptr).to(tl.float32)
    return inv


@triton.jit
def load_grad(g_ptr, offs, mask, sign, inv_scale):
    """g (negated if maximize, unscaled) as float32."""
    return tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sign * inv_scale


@triton.jit
def lr_ok(lr_ptr):
    """1 (int64) when the learning-rate tensor holds a finite value >= 0, else 0."""
    lr = tl.load(lr_ptr).to(tl.float32)
    return ((lr == lr) & (tl.abs(lr) != float("inf")) & (lr >= 0)).to(tl.int64)


@triton.jit
def with_decay(g, p, weight_decay, HAS_WD: tl.constexpr):
    """d = g + wd p; without weight decay exactly g (0 * inf would turn an infinite parameter's
    direction into NaN)."""
    if HAS_WD:
        g = g + weight_decay * p
    return g


@triton.jit
def sgd_direction(d, m, ready, mu, damp, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr):
    """From d = g + wd p: (direction, new momentum).  m' = mu m + (1 - damp) d, or d where the
    buffer is not ready; direction = d + mu m' (nesterov) or m'."""
    if HAS_MOM:
        m_new = tl.where(ready, mu * m + (1.0 - damp) * d, d)
        if NESTEROV:
            out = d + mu * m_new
        else:
            out = m_new
    else:
        m_new = m
        out = d
    return out, m_new


@triton.jit
def clip_probability(alpha, log2_beta, RAND: tl.constexpr):
    """beta**alpha (linear) or beta**(alpha**2) (quadratic)."""
    if RAND == RAND_LINEAR:
        e = alpha
    else:
        e = alpha * alpha
    return tl.exp2(e * log2_beta)


@triton.jit
def coordinate_clip(x, level, key, index, log2_beta, RAND: tl.constexpr):
    """Per-element clipping: clipped elements become sign(x) * level.  Returns (x', clipped)."""
    mag = tl.abs(x)
    above = mag > level
    if RAND == RAND_NONE:
        clip = above
    else:
        alpha = level / tl.maximum(mag, TINY)
        u = tl.rand(key, index)
        clip = above & (u < clip_probability(alpha, log2_beta, RAND))
    out = tl.where(clip, tl.where(x < 0, -level, level), x)
    return out, clip


@triton.jit
def stochastic_round(x, word, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to DTYPE (bfloat16 or float16) stochastically with the Philox ``word``
    (uint32; docs/spec.md section 3.1); non-finite x rounds to nearest.

    bfloat16: the word's upper 16 bits are added to the low 16 bits of x's bits, which are dropped.
    float16: lo = |x| toward zero, hi the next float16 away from zero (65536 past the largest: inf);
    hi when (word >> 8) / 2**24 < (|x| - lo) / (hi - lo), every operation exact in float32."""
    tl.static_assert((DTYPE == tl.bfloat16) or (DTYPE == tl.float16), "stochastic rounding: bfloat16 or float16")
    bits = x.to(tl.uint32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    if DTYPE == tl.bfloat16:
        up = (bits + tl.where(finite, word >> 16, 0)) >> 16
        out = tl.where(finite, up.to(tl.uint16).to(tl.bfloat16, bitcast=True), x.to(tl.bfloat16))
    else:
        a = tl.abs(x)
        nearest = a.to(tl.float16)
        lo_bits = nearest.to(tl.uint16, bitcast=True).to(tl.uint32) - (nearest.to(tl.float32) > a).to(tl.uint32)
        lo = lo_bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        inv_ulp = ((152 - tl.maximum(lo_bits >> 10, 1)) << 23).to(tl.float32, bitcast=True)  # 2**(25 - max(e, 1))
        u = (word >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
        out_bits = (lo_bits + (u < (a - lo) * inv_ulp).to(tl.uint32)) | ((bits >> 31) << 15)
        out = tl.where(finite, out_bits.to(tl.uint16).to(tl.float16, bitcast=True), x.to(tl.float16))
    return out
