"""ClippedSGD(stochastic_rounding=True): bfloat16 / float16 parameters and momentum buffers rounded
stochastically from the float32 result of the update (docs/spec.md section 3.1).

CPU only, small sizes (the Triton kernels run in Triton's interpreter here).  Statistical checks use
fixed seeds, so they are deterministic; the bounds stated are what a correct implementation meets
with overwhelming probability (5 standard errors)."""

import copy
import math

import pytest
import torch

from torch_clip_fused import ClipMethod, ClippedSGD
from torch_clip_fused.backends.reference.philox import philox_key, philox_uint32, philox_words
from torch_clip_fused.config import SR_INDEX
from conftest import heavy_tailed

triton = pytest.importorskip("triton")
from torch_clip_fused.backends.triton import step as triton_glue  # noqa: E402

ALL_BACKENDS = ["reference", "cpp", "triton"]
REDUCED = [torch.bfloat16, torch.float16]
#: log2 of the ulp of [1, 2) in each dtype
ULP_EXP = {torch.bfloat16: -7, torch.float16: -10}


@pytest.fixture
def small_chunks(monkeypatch):
    """Several Triton programs per tensor, so chunk offsets enter the Philox index."""
    monkeypatch.setattr(triton_glue, "CHUNK_SIZE", 32)
    monkeypatch.setattr(triton_glue, "BLOCK_SIZE", 16)
    monkeypatch.setattr(triton_glue, "REDUCE_BLOCK", 16)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().view(torch.int16 if x.element_size() == 2 else torch.int32)


def _neighbours(x: float, dtype: torch.dtype):
    """(lo, hi): the two values of ``dtype`` around the float32 value x (|lo| <= |x| < |hi|)."""
    lo = torch.tensor([x], dtype=torch.float32).to(dtype)
    if abs(lo.item()) > abs(x):
        lo = torch.nextafter(lo.float(), torch.zeros(1)).to(dtype)  # a step toward zero, in float32...
        while abs(lo.item()) > abs(x):  # ...until it rounds to the lower neighbour
            lo = torch.nextafter(lo.float(), torch.zeros(1)).to(dtype)
    bits = lo.view(torch.int16) + 1
    return lo.item(), bits.view(dtype).item()


# --------------------------------------------------------------------------------------------
# (1) unbiased: the mean is the float32 value, the fraction rounded up is distance / ulp
# --------------------------------------------------------------------------------------------


def _check_unbiased(values: torch.Tensor, x: torch.Tensor):
    """``values`` (one dtype) rounded from the float32 values ``x`` (all of the same magnitude)."""
    a = x.abs()[0].item()
    lo, hi = _neighbours(a, values.dtype)
    q = (a - lo) / (hi - lo)  # P(round up), exact in float64
    assert 0.05 < q < 0.95
    mags = values.double().abs()
    assert torch.all((mags == lo) | (mags == hi)), "a value rounded to neither neighbour"
    assert torch.equal(torch.signbit(values), torch.signbit(x)), "a sign changed"
    n = values.numel()
    up = (mags == hi).double().mean().item()
    se_fraction = math.sqrt(q * (1 - q) / n)
    assert abs(up - q) < 5 * se_fraction, (up, q, se_fraction)
    mean_error = (mags.mean().item() - a)
    assert abs(mean_error) < 5 * (hi - lo) * se_fraction, (mean_error, (hi - lo) * se_fraction)


N_STAT = 65536  # four C++ chunks of 16384, vector-width multiples and a scalar tail below


@pytest.mark.parametrize("dtype", REDUCED)
def test_parameter_rounding_is_unbiased(dtype):
    """p = +-1, g = -+ulp, lr = 0.3: p' = +-(1 + 0.3 ulp) in float32, between two neighbours; every
    element draws its own word.  Mean and fraction rounded up within 5 standard errors, and the
    reference and C++ backends bit-identical."""
    ulp = 2.0 ** ULP_EXP[dtype]
    sign = torch.where(torch.arange(N_STAT + 3) % 2 == 0, 1.0, -1.0)
    results = {}
    for backend in ["reference", "cpp"]:
        p = sign.to(dtype).requires_grad_()
        p.grad = (-sign * ulp).to(dtype)
        opt = ClippedSGD([p], lr=0.3, clipping_type="no_clip", seed=7, backend=backend, stochastic_rounding=True)
        opt.step()
        results[backend] = p.detach().clone()
    x = sign - (-sign * ulp) * 0.3  # float32, as every backend computes p - lr d
    _check_unbiased(results["reference"], x)
    assert torch.equal(_bits(results["reference"]), _bits(results["cpp"]))
    # plain rounding: always the nearest neighbour
    p = sign.to(dtype).requires_grad_()
    p.grad = (-sign * ulp).to(dtype)
    ClippedSGD([p], lr=0.3, clipping_type="no_clip", seed=7, backend="reference").step()
    assert torch.equal(p.detach(), x.to(dtype))


@pytest.mark.parametrize("dtype", REDUCED)
def test_momentum_rounding_is_unbiased(dtype):
    """First step with momentum: m = d = g + wd p = 1 + 0.3 ulp (float32) with g = p = 1 and
    wd = 0.3 ulp; lr = 0 keeps p (an exact value is never moved).  Mean and fraction rounded up
    within 5 standard errors; reference and C++ bit-identical."""
    wd = 0.3 * 2.0 ** ULP_EXP[dtype]
    results = {}
    for backend in ["reference", "cpp"]:
        p = torch.ones(N_STAT + 3, dtype=dtype, requires_grad=True)
        p.grad = torch.ones_like(p)
        opt = ClippedSGD([p], lr=0.0, momentum=0.9, weight_decay=wd, clipping_type="no_clip", seed=3,
                         backend=backend, stochastic_rounding=True)
        opt.step()
        assert torch.equal(p.detach(), torch.ones_like(p))
        results[backend] = opt.state[p]["momentum_buffer"].clone()
    x = torch.ones(N_STAT + 3) + torch.ones(N_STAT + 3) * wd
    _check_unbiased(results["reference"], x)
    assert torch.equal(_bits(results["reference"]), _bits(results["cpp"]))


def test_triton_rounding_is_unbiased(small_chunks):
    """The same statistics on the Triton kernels (fewer elements: the interpreter is slow)."""
    n = 4096
    for dtype in REDUCED:
        ulp = 2.0 ** ULP_EXP[dtype]
        p = torch.ones(n, dtype=dtype, requires_grad=True)
        p.grad = torch.full_like(p, -ulp)
        ClippedSGD([p], lr=0.3, clipping_type="no_clip", seed=11, backend="triton", stochastic_rounding=True).step()
        _check_unbiased(p.detach(), torch.ones(n) - torch.full((n,), -ulp) * 0.3)


def test_draws_are_philox_words_at_the_documented_indices():
    """Element i of the group rounds p with word 0 and m with word 1 of
    tl.randint4x(seed | step << 32, 2**40 + i): for bfloat16, x's bits plus the word's upper 16
    bits, truncated."""
    n, seed, lr, wd = 300, 5, 0.3, 0.3 * 2.0**-14

    def expected(x, words):
        bits = (x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF) + (words >> 16)
        bits = bits & 0xFFFF0000
        return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)

    for backend in ALL_BACKENDS:
        p = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
        opt = ClippedSGD([p], lr=lr, momentum=0.9, weight_decay=wd, clipping_type="no_clip", seed=seed,
                         backend=backend, stochastic_rounding=True)
        for step in range(2):
            p.grad = torch.full_like(p, -2.0**-7)
            p0 = p.detach().float()
            m0 = opt.state[p]["momentum_buffer"].float() if step else None
            d = p.grad.float() + p0 * wd  # float32, as every backend
            m = d if step == 0 else m0 * 0.9 + d * 1.0
            opt.step()
            words = philox_words(torch.tensor(philox_key(seed, step)), torch.arange(n) + SR_INDEX)
            assert torch.equal(opt.state[p]["momentum_buffer"].float(), expected(m, words[1])), backend
            assert torch.equal(p.detach().float(), expected(p0 - m * lr, words[0])), backend
    assert SR_INDEX == 2**40


def test_reference_philox_matches_triton_above_2_32():
    """The stochastic-rounding counters have a non-zero high word: the reference's Philox words
    equal tl.randint4x's there too (and its first word tl.randint's)."""
    import triton.language as tl

    @triton.jit
    def draw(out, key, base, N: tl.constexpr):
        offs = tl.arange(0, N)
        w0, w1, w2, w3 = tl.randint4x(key, offs.to(tl.int64) + base)
        tl.store(out + offs, w0.to(tl.int64))
        tl.store(out + N + offs, w1.to(tl.int64))
        tl.store(out + 2 * N + offs, w2.to(tl.int64))
        tl.store(out + 3 * N + offs, w3.to(tl.int64))
        tl.store(out + 4 * N + offs, tl.randint(key, offs.to(tl.int64) + base).to(tl.int64))

    n, key = 64, philox_key(12345, 17)
    for base in (SR_INDEX, SR_INDEX + 2**32 - 5, 2**41):
        out = torch.empty(5 * n, dtype=torch.int64)
        draw[(1,)](out, key, base, N=n)
        expected = philox_words(torch.tensor(key), torch.arange(n) + base)
        for j in range(4):
            assert torch.equal(out[j * n:(j + 1) * n] & 0xFFFFFFFF, expected[j])
        assert torch.equal(out[4 * n:] & 0xFFFFFFFF, philox_uint32(torch.tensor(key), torch.arange(n) + base))


# --------------------------------------------------------------------------------------------
# (2) bit-identical across the backends
# --------------------------------------------------------------------------------------------

IDENTITY_METHODS = ["coordinate_wise", ClipMethod("coordinate", "constant", "linear"), "layer_wise", "norm"]


def _run(backend, method, dtypes, steps=3, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (33,), (3, 7), (1,)]
    params = [torch.randn(s, generator=gen).to(dtypes[i % len(dtypes)]).requires_grad_()
              for i, s in enumerate(shapes)]
    opt = ClippedSGD(params, lr=0.05, clipping_type=method, clipping_level=0.5, seed=seed + 1, backend=backend,
                     **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = heavy_tailed(p.shape, gen, p.dtype)
        opt.step()
    return params, [opt.state[p]["momentum_buffer"] for p in params if "momentum_buffer" in opt.state[p]]


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("method", IDENTITY_METHODS, ids=str)
def test_backends_bit_identical(small_chunks, dtype, method):
    """bf16 / fp16 parameters with momentum (and nesterov, weight decay) over three steps: the same
    bits from every backend, and not those of plain rounding."""
    kwargs = dict(momentum=0.9, weight_decay=0.01, nesterov=True)
    ref_p, ref_m = _run("reference", method, [dtype], stochastic_rounding=True, **kwargs)
    for backend in ["cpp", "triton"]:
        p, m = _run(backend, method, [dtype], stochastic_rounding=True, **kwargs)
        for a, b in zip(ref_p + ref_m, p + m):
            assert torch.equal(_bits(a), _bits(b)), backend
    plain_p, plain_m = _run("reference", method, [dtype], **kwargs)
    assert any(not torch.equal(a, b) for a, b in zip(ref_p + ref_m, plain_p + plain_m))


def test_backends_bit_identical_mixed_dtypes(small_chunks):
    """One group of bf16, fp16 and fp32 tensors, clip_point="update": each tensor is rounded
    stochastically to its own dtype (fp32 not at all), the same bits from every backend."""
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    kwargs = dict(momentum=0.5, dampening=0.1, clip_point="update", stochastic_rounding=True)
    method = ClipMethod("coordinate", "constant", "quadratic")
    ref_p, ref_m = _run("reference", method, dtypes, **kwargs)
    for backend in ["cpp", "triton"]:
        p, m = _run(backend, method, dtypes, **kwargs)
        for a, b in zip(ref_p + ref_m, p + m):
            assert torch.equal(_bits(a), _bits(b)), backend
    # the fp32 tensor (third) is what it is without stochastic rounding
    plain_p, plain_m = _run("reference", method, dtypes, **{**kwargs, "stochastic_rounding": False})
    assert torch.equal(ref_p[2], plain_p[2]) and torch.equal(ref_m[2], plain_m[2])


# --------------------------------------------------------------------------------------------
# (3) updates under half an ulp
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("dtype", REDUCED)
def test_small_updates_are_not_lost(backend, dtype):
    """p = 1, g = 1, lr = 1e-4 (under half an ulp of both dtypes at 1), 100 steps: plain rounding
    never moves p; stochastic rounding moves the mean of 4096 elements to within 5% of the float32
    run's displacement (0.01; 5% is about 5 standard errors for bfloat16, 16 for float16)."""
    n, steps, lr = 4096, 100, 1e-4
    out = {}
    for sr, dt in ((False, dtype), (True, dtype), (False, torch.float32)):
        p = torch.ones(n, dtype=dt, requires_grad=True)
        opt = ClippedSGD([p], lr=lr, clipping_type="norm", clipping_level=1e9, seed=2, backend=backend,
                         stochastic_rounding=sr)
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
        out[(sr, dt)] = p.detach().double()
    assert torch.equal(out[(False, dtype)], torch.ones(n, dtype=torch.float64))
    fp32_displacement = 1.0 - out[(False, torch.float32)].mean().item()
    assert abs(fp32_displacement - steps * lr) < 1e-5
    sr_displacement = 1.0 - out[(True, dtype)].mean().item()
    assert abs(sr_displacement - fp32_displacement) < 0.05 * fp32_displacement, (sr_displacement, fp32_displacement)


# --------------------------------------------------------------------------------------------
# (4) resume
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_resume_is_bit_identical(small_chunks, backend):
    """Six steps in a row equal three steps, state_dict, a fresh optimizer that loads it, three more."""
    def grads(step, params):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = heavy_tailed(p.shape, gen, p.dtype)

    def make():
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).to(dt).requires_grad_()
                  for s, dt in (((9, 4), torch.bfloat16), ((21,), torch.float16))]
        return params

    kwargs = dict(lr=0.05, momentum=0.9, clipping_type=ClipMethod("coordinate", "constant", "linear"),
                  clipping_level=0.3, seed=9, backend=backend, stochastic_rounding=True)
    whole = make()
    opt = ClippedSGD(whole, **kwargs)
    for step in range(6):
        grads(step, whole)
        opt.step()
    first = make()
    opt = ClippedSGD(first, **kwargs)
    for step in range(3):
        grads(step, first)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["stochastic_rounding"] is True
    second = [p.detach().clone().requires_grad_() for p in first]
    opt = ClippedSGD(second, **{**kwargs, "stochastic_rounding": False, "seed": 1})
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["stochastic_rounding"] is True
    for step in range(3, 6):
        grads(step, second)
        opt.step()
    for a, b in zip(whole, second):
        assert torch.equal(_bits(a), _bits(b))


def test_checkpoint_without_the_setting_loads_as_false():
    p = torch.ones(3, dtype=torch.bfloat16, requires_grad=True)
    saved = ClippedSGD([p], lr=0.1, backend="reference").state_dict()
    del saved["param_groups"][0]["stochastic_rounding"]
    opt = ClippedSGD([p], lr=0.1, backend="reference", stochastic_rounding=True)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["stochastic_rounding"] is True  # kept from the optimizer, as other settings


# --------------------------------------------------------------------------------------------
# (5) the default and float32 / float64 parameters are unaffected
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_default_false_and_wide_dtypes_unchanged(small_chunks, backend):
    method = ClipMethod("coordinate", "constant", "linear")
    kwargs = dict(momentum=0.9, weight_decay=0.01)
    for dtype in REDUCED:
        p0, m0 = _run(backend, method, [dtype], **kwargs)
        p1, m1 = _run(backend, method, [dtype], stochastic_rounding=False, **kwargs)
        for a, b in zip(p0 + m0, p1 + m1):
            assert torch.equal(_bits(a), _bits(b))
    wide = [torch.float32] + ([torch.float64] if backend != "triton" else [])  # triton sends fp64 to the reference
    for dtype in wide:
        p0, m0 = _run(backend, method, [dtype], **kwargs)
        p1, m1 = _run(backend, method, [dtype], stochastic_rounding=True, **kwargs)
        for a, b in zip(p0 + m0, p1 + m1):
            assert torch.equal(a, b)


def test_param_groups_choose_independently():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, generator=gen).to(torch.bfloat16).requires_grad_()
    b = a.detach().clone().requires_grad_()
    opt = ClippedSGD([{"params": [a], "stochastic_rounding": True}, {"params": [b]}], lr=0.01, seed=0,
                     clipping_type="no_clip", backend="reference")
    a.grad = b.grad = torch.randn(50, generator=gen).to(torch.bfloat16)
    start = b.detach().clone()
    opt.step()
    assert opt.param_groups[1]["stochastic_rounding"] is False
    assert torch.equal(b.detach(), (start.float() - b.grad.float() * 0.01).to(torch.bfloat16))
    assert not torch.equal(a.detach(), b.detach())


# --------------------------------------------------------------------------------------------
# (6) bad values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", 1, 0, None, 1.0, torch.tensor(True)])
def test_bad_values_are_clear_errors(value):
    p = torch.ones(2, requires_grad=True)
    with pytest.raises(TypeError, match=r"stochastic_rounding.*" + repr(value)[:8].replace("(", r"\(")):
        ClippedSGD([p], lr=0.1, stochastic_rounding=value)
    opt = ClippedSGD([p], lr=0.1)
    with pytest.raises(TypeError, match="stochastic_rounding"):
        opt.add_param_group({"params": [torch.ones(2, requires_grad=True)], "stochastic_rounding": value})
    saved = opt.state_dict()
    saved["param_groups"][0]["stochastic_rounding"] = value
    with pytest.raises(TypeError, match="stochastic_rounding"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["stochastic_rounding"] is False
