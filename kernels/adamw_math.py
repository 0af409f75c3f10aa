"""AdamW's epilogue of the apply pass (UPDATE code 2), in the order of torch.optim.AdamW
(foreach=False): with g the clipped gradient and t = adam_steps[column] + 1,

    p <- p (1 - lr wd);  m <- lerp(m, g, 1 - b1);  v <- v b2 + (1 - b2) g g;  vmax <- max(vmax, v) (amsgrad)
    p <- p - (lr / (1 - b1^t)) m / (sqrt(vmax or v) / sqrt(1 - b2^t) + eps)

Element arithmetic in float32 (square root and divisions rounded to nearest, as torch's); the
per-tensor bias corrections in float64 from log2(b1), log2(b2) held in float64 (a float32 b2^t
loses the bits 1 - b2^t keeps: 1 - 0.999 in float32 is only good to 6e-5).
"""

import triton
import triton.language as tl


@triton.jit
def adamw_scalars(adam_steps, col, adam_consts, lr, weight_decay, HAS_WD: tl.constexpr):
    """(decay, step_size, sqrt(bc2)) in float32 for the tensor of column ``col``: decay = 1 - lr wd,
    step_size = lr / (1 - b1^t), bc2 = 1 - b2^t, with t = adam_steps[col] + 1 and ``adam_consts``
    float64 [2] = (log2 b1, log2 b2)."""
    t = (tl.load(adam_steps + col) + 1.0).to(tl.float64)
    lr64 = tl.zeros([], dtype=tl.float64) + lr  # (a float argument, or a float32 loaded from the lr tensor)
    bc1 = 1.0 - tl.exp2(t * tl.load(adam_consts))
    bc2 = 1.0 - tl.exp2(t * tl.load(adam_consts + 1))
    step_size = (lr64 / bc1).to(tl.float32)
    bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
    if HAS_WD:
        decay = (1.0 - lr64 * (tl.zeros([], dtype=tl.float64) + weight_decay)).to(tl.float32)
    else:
        decay = tl.full([], 1.0, tl.float32)
    return decay, step_size, bc2_sqrt


@triton.jit
def adamw_update(p, g, m, v, vmax, decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
                 HAS_WD: tl.constexpr, AMSGRAD: tl.constexpr):
    """(p', m', v', vmax') from float32 blocks (vmax ignored without amsgrad)."""
    if HAS_WD:  # without weight decay p stays exactly p (0 * inf would make an infinite parameter NaN)
        p = p * decay
    if one_minus_beta1 < 0.5:  # torch.lerp's formula
        m = m + one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - one_minus_beta1)
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        vhat = vmax
    else:
        vhat = v
    denom = tl.div_rn(tl.sqrt_rn(vhat), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    return p, m, v, vmax
