"""Element-wise pieces shared by the Triton kernels (all float32)."""

import triton
import triton.language as tl

SCOPE_NONE = 0
SCOPE_GLOBAL = 1
SCOPE_LAYER = 2
SCOPE_COORDINATE = 3
RAND_NONE = 0
RAND_LINEAR = 1
RAND_QUADRATIC = 2
TINY = 1.1754943508222875e-38  # smallest normal float32


@triton.jit
def load_grad(g_ptr, offs, mask, sign, inv_scale):
    """g (negated if maximize, unscaled) as float32."""
    return tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sign * inv_scale


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
    if RAND == 1:
        e = alpha
    else:
        e = alpha * alpha
    return tl.exp2(e * log2_beta)


@triton.jit
def coordinate_clip(x, level, key, index, log2_beta, RAND: tl.constexpr):
    """Per-element clipping: clipped elements become sign(x) * level.  Returns (x', clipped)."""
    mag = tl.abs(x)
    above = mag > level
    if RAND == 0:
        clip = above
    else:
        alpha = level / tl.maximum(mag, 1.1754943508222875e-38)
        u = tl.rand(key, index)
        clip = above & (u < clip_probability(alpha, log2_beta, RAND))
    out = tl.where(clip, tl.where(x < 0, -level, level), x)
    return out, clip
