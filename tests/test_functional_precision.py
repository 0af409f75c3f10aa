"""The functional API's arithmetic dtype (issue 18 item 7): a list of float64 gradients gets float64
norms, thresholds and scales on every backend (docs/spec.md section 1), as the optimizers; any other
list gets float32 norms.  Oracles: torch's own ``get_total_norm`` (float64 for float64 gradients)
and ``clip_grads_with_norm_`` given the norm less its 1e-6 (so that its clip coefficient is
level / norm, our formula), to float64 rounding (1e-15 relative; float32 norms left ~1e-8)."""

import pytest
import torch

from torch_clip_fused import clip_gradients_, clip_grads_with_norms_, get_grad_norms
from conftest import device_for, heavy_tailed

BACKENDS = ["reference", "cpp", "triton"]
SHAPES = ((7, 5), (5,), (3, 70), (1,))
RTOL = 1e-15


def _params(backend, dtypes=(torch.float64,) * len(SHAPES), seed=0, scale=10.0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape, dtype in zip(SHAPES, dtypes):
        p = torch.randn(shape, generator=gen).to(dtype=dtype, device=device_for(backend)).requires_grad_()
        p.grad = (heavy_tailed(shape, gen, torch.float64) * scale).to(dtype=dtype, device=p.device)
        params.append(p)
    return params


def _grads(params):
    return [p.grad.clone() for p in params]


def _torch_clip(grads, level, norm):
    """torch.nn.utils.clip_grads_with_norm_ with coefficient level / norm (its 1e-6 taken back)."""
    out = [g.clone().requires_grad_(False) for g in grads]
    holders = [torch.zeros_like(g).requires_grad_() for g in out]
    for h, g in zip(holders, out):
        h.grad = g
    torch.nn.utils.clip_grads_with_norm_(holders, level, norm - 1e-6)
    return [h.grad for h in holders]


def _assert_float64_close(actual, expected):
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_grad_norms_of_float64_gradients_are_torchs(backend):
    params = _params(backend)
    total, per_tensor = get_grad_norms(params, backend=backend)
    grads = _grads(params)
    _assert_float64_close(total, torch.nn.utils.get_total_norm(grads))
    _assert_float64_close(per_tensor, torch.stack([torch.linalg.vector_norm(g) for g in grads]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_gradients_of_float64_gradients_equals_torch(backend):
    params = _params(backend)
    raw = _grads(params)
    total, per_tensor = clip_gradients_(params, "norm", 2.0, backend=backend)
    expected_total = torch.nn.utils.get_total_norm(raw)
    _assert_float64_close(total, expected_total)
    _assert_float64_close(per_tensor, torch.stack([torch.linalg.vector_norm(g) for g in raw]))
    for p, expected in zip(params, _torch_clip(raw, 2.0, expected_total)):
        _assert_float64_close(p.grad, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_wise_float64_equals_torch_per_tensor(backend):
    params = _params(backend)
    raw = _grads(params)
    clip_gradients_(params, "layer_wise", 1.5, backend=backend)
    for p, g in zip(params, raw):
        (expected,) = _torch_clip([g], 1.5, torch.nn.utils.get_total_norm([g]))
        _assert_float64_close(p.grad, expected)


@pytest.mark.parametrize("method", ["norm", "layer_wise"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_given_float64_norms_are_used_unrounded(backend, method):
    """Norms combined elsewhere in float64 (reduced across pipeline stages, say) clip float64
    gradients with those norms, not with their float32 roundings."""
    params = _params(backend)
    raw = _grads(params)
    total, per_tensor = get_grad_norms(params, backend=backend)
    assert total.dtype == per_tensor.dtype == torch.float64
    given = (total * 1.2345678901234567, per_tensor * 1.2345678901234567)  # not float32-representable
    clip_grads_with_norms_(params, given, method, 1.0, backend=backend)
    if method == "norm":
        expected = _torch_clip(raw, 1.0, given[0])
    else:
        expected = [_torch_clip([g], 1.0, n)[0] for g, n in zip(raw, given[1])]
    for p, e in zip(params, expected):
        _assert_float64_close(p.grad, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_autoclip_over_calls_equals_reference(backend):
    """A stateful method keeps its float64 history in float64 on every backend: the clipped
    gradients and the norms of 4 calls equal the reference's to float64 rounding."""
    runs = {}
    for name in (backend, "reference"):
        state, out = {}, []
        for k in range(4):
            params = _params(backend, seed=k, scale=1.0 + k)
            norms = clip_gradients_(params, "quadratic_rand_autoclip", beta=0.5, p_autoclip=0.5, seed=3,
                                    state=state, backend=name)
            out.append((norms, _grads(params)))
        runs[name] = out
    for (n_ours, g_ours), (n_ref, g_ref) in zip(runs[backend], runs["reference"]):
        for a, b in zip([*n_ours, *g_ours], [*n_ref, *g_ref]):
            _assert_float64_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_and_float32_lists_get_float32_norms(backend):
    """docs/spec.md section 1: a list mixing float64 with other dtypes takes float32 norms."""
    mixed = _params(backend, dtypes=(torch.float64, torch.float32, torch.float64, torch.float32))
    raw = _grads(mixed)
    total, per_tensor = clip_gradients_(mixed, "norm", 2.0, backend=backend)
    assert total.dtype == per_tensor.dtype == torch.float32
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(raw).float())
    float32 = _params(backend, dtypes=(torch.float32,) * len(SHAPES))
    total, per_tensor = get_grad_norms(float32, backend=backend)
    assert total.dtype == per_tensor.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_gradients_with_float64_given_norms(backend):
    """float64 norms given for float32 gradients are taken in float32 (the list's arithmetic)."""
    params = _params(backend, dtypes=(torch.float32,) * len(SHAPES))
    raw = _grads(params)
    total, per_tensor = get_grad_norms(params, backend=backend)
    clip_grads_with_norms_(params, (total.double(), per_tensor.double()), "norm", 1.0, backend=backend)
    for p, g in zip(params, raw):
        torch.testing.assert_close(p.grad, g * (1.0 / total))
