"""The functional API on every backend: torch's two halves (norms, clip with given norms) and the
one-call ``clip_gradients_``, against torch's own clip functions and the reference backend."""

import pytest
import torch

from torch_clip_fused import ClipMethod, clip_gradients_, clip_grads_with_norms_, get_grad_norms
from conftest import heavy_tailed

pytest.importorskip("triton")
from torch_clip_fused.backends.triton import step as triton_glue  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "cpp", "triton"] if DEVICE == "cpu" else ["reference", "triton"]
SHAPES = ((7, 5), (0,), (5,), (3, 70), (1,))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    if DEVICE == "cpu":  # tensors span several chunks in Triton's interpreter
        monkeypatch.setattr(triton_glue, "CHUNK_SIZE", 64)
        monkeypatch.setattr(triton_glue, "BLOCK_SIZE", 16)
        monkeypatch.setattr(triton_glue, "REDUCE_BLOCK", 16)


def params_with_grads(seed=0, scale=10.0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(DEVICE).requires_grad_() for s in shapes]
    for p in params:
        p.grad = (heavy_tailed(p.shape, gen) * scale).to(DEVICE)
    return params


def grads(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_equals_clip_grad_norm(backend):
    ours, theirs = params_with_grads(), params_with_grads()
    total, per_tensor = clip_gradients_(ours, "norm", 2.0, backend=backend)
    expected_total = torch.nn.utils.clip_grad_norm_(theirs, 2.0)
    torch.testing.assert_close(total, expected_total)
    torch.testing.assert_close(per_tensor, torch.stack([torch.linalg.vector_norm(g) for g in grads(params_with_grads())]))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coordinate_wise_equals_clip_grad_value(backend):
    ours, theirs = params_with_grads(), params_with_grads()
    clip_gradients_(ours, "coordinate_wise", 0.5, backend=backend)
    torch.nn.utils.clip_grad_value_(theirs, 0.5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_wise_equals_per_tensor_clip_grad_norm(backend):
    ours, theirs = params_with_grads(), params_with_grads()
    clip_gradients_(ours, "layer_wise", 1.5, backend=backend)
    for p in theirs:
        torch.nn.utils.clip_grad_norm_([p], 1.5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_grad_norms_equals_torch(backend):
    params = params_with_grads()
    params[2].grad = None  # left out of the norms
    total, per_tensor = get_grad_norms(params, backend=backend)
    present = [p.grad for p in params if p.grad is not None]
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(present))
    torch.testing.assert_close(per_tensor, torch.stack([torch.linalg.vector_norm(g) for g in present]))
    before = [g.clone() for g in present]
    assert all(torch.equal(a, b) for a, b in zip(before, present))  # the norms stage modifies nothing


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_norms_are_used(backend):
    """Norms combined elsewhere (say, reduced across ranks) drive the clipping: with the norms
    doubled, a global clip scales by level / (2 ||g||), a closed form."""
    params = params_with_grads()
    raw = grads(params)
    total, per_tensor = get_grad_norms(params, backend=backend)
    clip_grads_with_norms_(params, (2 * total, 2 * per_tensor), "norm", 1.0, backend=backend)
    scale = 1.0 / (2 * torch.linalg.vector_norm(torch.cat([g.flatten() for g in raw])))
    for p, g in zip(params, raw):
        torch.testing.assert_close(p.grad, g * scale)


METHODS = ["quadratic_rand_autoclip", ClipMethod("layer", "auto", "linear"), ClipMethod("coordinate", "constant", "quadratic")]


@pytest.mark.parametrize("method", METHODS, ids=str)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_stateful_methods_equal_reference_over_calls(backend, method):
    """Histories, step counts and random draws kept in ``state`` evolve as the reference's, for the
    one-call form and for the two halves."""
    results = {}
    for name, form in ((backend, "one"), (backend, "halves"), ("reference", "one")):
        state, history = {}, []
        for k in range(5):
            params = params_with_grads(seed=k, scale=1.0 + k)
            kwargs = dict(clipping_level=3.0, beta=0.5, p_autoclip=0.5, seed=7, state=state, backend=name)
            if form == "one":
                clip_gradients_(params, method, **kwargs)
            else:
                clip_grads_with_norms_(params, get_grad_norms(params, backend=name), method, **kwargs)
            history.append((grads(params), state["clip_stats"].clone()))
        results[(name, form)] = (history, state["clip_step"].item())
    reference, steps = results[("reference", "one")]
    assert steps == 5
    for key in ((backend, "one"), (backend, "halves")):
        history, key_steps = results[key]
        assert key_steps == steps
        for (g_ours, s_ours), (g_ref, s_ref) in zip(history, reference):
            assert s_ours[2] == s_ref[2]  # the same clip decisions
            torch.testing.assert_close(s_ours, s_ref, equal_nan=True)
            for a, b in zip(g_ours, g_ref):
                torch.testing.assert_close(a, b)


def test_triton_clip_runs_two_launches_per_bucket(monkeypatch):
    from torch_clip_fused.kernels import clip_apply, clip_norms

    launched = []
    for cls in {type(clip_norms.clip_norm_kernel), type(clip_apply.clip_apply_kernel)}:
        original = cls.run
        monkeypatch.setattr(cls, "run", lambda self, *a, _o=original, **k: (launched.append(1), _o(self, *a, **k))[1])
    state = {}
    clip_gradients_(params_with_grads(), "layer_wise", 1.0, state=state, backend="triton")
    launched.clear()
    clip_gradients_(params_with_grads(seed=1), "layer_wise", 1.0, state=state, backend="triton")
    assert len(launched) == 2
