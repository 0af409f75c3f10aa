"""Counter-based uniforms, bit-identical to Triton's ``tl.rand`` (docs/spec.md section 2).

One uniform u in [0, 1) is a pure function of (seed, step, index):

    key     = (k0, k1) = (seed, step)                # 32 bits each
    counter = (index mod 2**32, index >> 32, 0, 0)
    x       = first word of Philox4x32-10(counter, key)
    u       = (x if x < 2**31 else ~x as int32) * 4.6566127342e-10   (float32)

which is exactly ``tl.rand(seed | (step << 32), index)``.  Everything here is
int64 torch arithmetic on the given device: no host synchronisation.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # the largest s with (2**31 - 1) * s < 1 in float32


def philox_key(seed: int, step) -> int:
    """The 64-bit ``tl.rand`` seed that encodes (seed, step); step may be an int or a tensor."""
    return (step << 32) | seed


def _mul_hi_lo(a: int, b: torch.Tensor):
    """(a * b) >> 32 and (a * b) mod 2**32 for a 32-bit constant a and 32-bit values b,
    split in 16-bit halves so no int64 product overflows."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    p_lo = b * a_lo  # < 2**48
    p_hi = b * a_hi  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi & MASK32, lo


def philox_uint32(key: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """First word of Philox4x32-10 with counter (index_lo, index_hi, 0, 0) and a 64-bit key.

    key: int64 tensor (any shape broadcastable to index), index: int64 tensor >= 0.
    Returns the word as int64 in [0, 2**32).
    """
    return philox_words(key, index)[0]


def philox_words(key: torch.Tensor, index: torch.Tensor):
    """The four output words of Philox4x32-10 (``tl.randint4x(key, index)``), int64 in [0, 2**32)."""
    c0 = index & MASK32
    c1 = (index >> 32) & MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = (key & MASK32).expand_as(c0)
    k1 = ((key >> 32) & MASK32).expand_as(c0)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words given as int64 in [0, 2**32)."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, -signed - 1, signed)  # ~x for negative int32
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def philox_uniform(key: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1), equal to ``tl.rand(key, index)``."""
    return uint32_to_uniform(philox_uint32(key, index))
