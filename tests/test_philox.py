"""The reference's Philox draws are bit-identical to Triton's tl.rand (docs/spec.md section 2)."""

import pytest
import torch

from torch_clip_fused.backends.reference.philox import philox_key, philox_uniform, philox_uint32

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _rand_kernel(out_ptr, int_ptr, seed, base, N: tl.constexpr):
    offsets = base + tl.arange(0, N).to(tl.int64)
    tl.store(out_ptr + tl.arange(0, N), tl.rand(seed, offsets))
    tl.store(int_ptr + tl.arange(0, N), tl.randint(seed, offsets))


CASES = [(0, 0, 0), (12345, 7, 0), (2**32 - 1, 2**31 - 1, 2**33 + 5), (987654321, 123456, 4_000_000_000)]


@pytest.mark.parametrize("seed,step,base", CASES)
def test_reference_philox_equals_triton_rand(seed, step, base):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 256
    key = philox_key(seed, step)
    out = torch.empty(n, device=device)
    ints = torch.empty(n, dtype=torch.int32, device=device)
    _rand_kernel[(1,)](out, ints, key, base, N=n)
    index = torch.arange(n, dtype=torch.int64) + base
    ref = philox_uniform(torch.tensor(key), index)
    assert torch.equal(out.cpu(), ref)
    words = philox_uint32(torch.tensor(key), index)
    assert torch.equal(ints.cpu().to(torch.int64) & 0xFFFFFFFF, words)


def test_uniforms_are_in_unit_interval_and_uniform():
    u = philox_uniform(torch.tensor(philox_key(1, 1)), torch.arange(100_000))
    assert u.min() >= 0 and u.max() < 1
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert (counts - 10_000).abs().max() < 5 * 100  # 5 sigma of a binomial(1e5, 0.1)


def test_keys_separate_seed_and_step():
    index = torch.arange(64)
    a = philox_uniform(torch.tensor(philox_key(1, 2)), index)
    assert not torch.equal(a, philox_uniform(torch.tensor(philox_key(2, 1)), index))
    assert not torch.equal(a, philox_uniform(torch.tensor(philox_key(1, 3)), index))
