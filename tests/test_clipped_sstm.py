"""ClippedSSTM against a direct implementation of its recurrences on a small quadratic."""

import pytest
import torch

from torch_clip_fused import ClippedSSTM, get_optimal_L

A = torch.diag(torch.tensor([1.0, 4.0, 9.0]))
X0 = torch.tensor([3.0, -2.0, 1.0])


def direct_sstm(steps, lr, L, B, nu=1.0, noise=None):
    """y^0 = z^0 = x^0, A_0 = 0; alpha_{k+1} = (k+1)^(2nu/(1+nu)) / (2aL); x, z, y as in the paper."""
    a = 1.0 / lr
    y, z, a_k = X0.clone(), X0.clone(), 0.0
    xs = []
    for k in range(steps):
        alpha = (k + 1) ** (2 * nu / (1 + nu)) / (2 * a * L)
        a_next = a_k + alpha
        x = (a_k * y + alpha * z) / a_next
        xs.append(x)
        g = A @ x + (noise[k] if noise is not None else 0)
        lam = B / alpha
        g = g * min(1.0, lam / g.norm().item())
        z = z - alpha * g
        y = (a_k * y + alpha * z) / a_next
        a_k = a_next
    return xs


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_sstm_follows_its_recurrences(backend):
    steps, lr, L, B = 8, 0.5, 9.0, 1.0
    noise = [torch.randn(3) * 5 for _ in range(steps)]
    expected = direct_sstm(steps, lr, L, B, noise=noise)
    x = X0.clone().requires_grad_()
    opt = ClippedSSTM([x], lr=lr, L=L, clipping_type="norm", clipping_level=B, backend=backend)
    clipped = []
    for k in range(steps):
        torch.testing.assert_close(x.detach(), expected[k])  # the gradient is taken at x^{k+1}
        opt.zero_grad()
        loss = 0.5 * x @ A @ x + noise[k] @ x
        loss.backward()
        # the step's statistics from closed forms: ||g|| at x^{k+1}, lambda = B / alpha_{k+1},
        # and the global method clips exactly when ||g|| > lambda
        norm = (A @ expected[k] + noise[k]).norm().item()
        lam = B / ((k + 1) / (2 * (1 / lr) * L))
        opt.step()
        stats = opt.statistics()[0]
        assert stats["norm"].item() == pytest.approx(norm, rel=1e-5)
        assert stats["threshold"].item() == pytest.approx(lam, rel=1e-6)
        assert stats["clipped_fraction"].item() == (1.0 if norm > lam else 0.0)
        clipped.append(norm > lam)
    assert any(clipped) and not all(clipped)  # both outcomes occur: the fraction check can fail either way


def test_step_returns_the_closure_loss():
    x = X0.clone().requires_grad_()
    opt = ClippedSSTM([x], lr=0.5, L=9.0)

    def closure():
        opt.zero_grad()
        loss = 0.5 * x @ A @ x
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() == pytest.approx(0.5 * (X0 @ A @ X0).item())


def test_sstm_converges_on_the_quadratic():
    x = X0.clone().requires_grad_()
    opt = ClippedSSTM([x], lr=1.0, L=9.0, clipping_type="norm", clipping_level=10.0)
    for _ in range(200):
        opt.zero_grad()
        (0.5 * x @ A @ x).backward()
        opt.step()
    assert x.detach().norm() < 1e-2


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=0.0, L=1.0), r"Invalid learning rate: 0.0"),
    (dict(lr=0.1, L=-1.0), r"Invalid Lipschitz constant L: -1.0"),
    (dict(lr=0.1, L=1.0, nu=2.0), r"Invalid nu: 2.0"),
    (dict(lr=0.1, L=1.0, a_k_ratio_upper_bound=0.0), r"Invalid a_k_ratio_upper_bound: 0.0"),
    (dict(lr=0.1, L=1.0, clipping_iter_start=0), r"Invalid clipping_iter_start: 0"),
    (dict(lr=0.1, L=1.0, clipping_type="bad"), r"Invalid clipping_type: 'bad'"),
])
def test_bad_sstm_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClippedSSTM([X0.clone().requires_grad_()], **kwargs)


def test_get_optimal_L_on_a_quadratic():
    x = X0.clone().requires_grad_()
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(X0.clone())
    model.forward = lambda inputs: 0.5 * model.x @ A @ model.x
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = [(None, None)] * 6
    L, history = get_optimal_L(model, opt, lambda out, labels: out, loader)
    # for a quadratic, ||A dx|| / ||dx|| lies between the extreme eigenvalues
    assert all(1.0 - 1e-5 <= h <= 9.0 + 1e-5 for h in history) and len(history) == 5
    assert L == pytest.approx(2 * sum(history) / len(history))
    del x


@pytest.mark.parametrize("kind", ["no_clip", "norm", "linear_rand_norm", "quadratic_rand_norm", "layer_wise",
                                  "coordinate_wise", "auto_clip", "linear_rand_autoclip", "quadratic_rand_autoclip"])
def test_every_clipping_type_descends_on_the_quadratic(kind):
    x = X0.clone().requires_grad_()
    opt = ClippedSSTM([x], lr=1.0, L=9.0, clipping_type=kind, clipping_level=5.0, seed=0)
    start = 0.5 * (X0 @ A @ X0).item()
    for _ in range(60):
        opt.zero_grad()
        loss = 0.5 * x @ A @ x
        loss.backward()
        opt.step()
    assert (0.5 * x @ A @ x).item() < 0.05 * start


# --------------------------------------------------------------------------------------------
# Skipped steps (docs/spec.md section 4) and skip-free runs against the former step
# --------------------------------------------------------------------------------------------

import copy  # noqa: E402

from torch_clip_fused import ClippedSGD  # noqa: E402
from backend_checks import legacy_checkpoint  # noqa: E402

SKIP_BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.filterwarnings(
    "ignore::RuntimeWarning:triton.runtime.interpreter"))]
SKIP_SHAPES = ((4, 5), (3,), (2, 9))
#: the group state keys (param_groups[i]["clip_state"]) a skipped step may change: the group's step
#: and skip counters, its statistics (per group and per tensor: a skipped step reports its norms)
COUNTERS = {"clip_step", "clip_steps", "clip_skipped", "clip_stats", "clip_tensor_stats"}
SKIP_CONFIGS = {
    "norm": dict(clipping_type="norm", clipping_level=1.0),
    "norm-nu0": dict(clipping_type="norm", clipping_level=1.0, nu=0.0),
    "coordinate-nu0.5-bound": dict(clipping_type="coordinate_wise", clipping_level=0.05, nu=0.5,
                                   a_k_ratio_upper_bound=0.6),
    "auto_clip": dict(clipping_type="auto_clip", p_autoclip=0.5),
    "no_clip": dict(clipping_type="no_clip"),
}


def _backend(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    return backend


def _device(backend):
    """Triton runs on the GPU when there is one (its kernels are compiled for it), else in its
    interpreter on CPU tensors (tests/conftest.py)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _params(dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(s, generator=gen).to(dtype=dtype, device=device).requires_grad_() for s in SKIP_SHAPES]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=gen) * (1 - torch.rand(p.shape, generator=gen)).pow(-0.6)).to(p.dtype)
            .to(p.device) for p in params]


def _set(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def _state_equal(a, b, skip=frozenset()):
    """Deep equality of two state dicts' "state" (tensors with torch.equal and the same dtype)."""
    assert set(a) == set(b)
    for index in a:
        assert set(a[index]) == set(b[index])
        for key, value in a[index].items():
            if key in skip:
                continue
            other = b[index][key]
            if isinstance(value, torch.Tensor):
                assert isinstance(other, torch.Tensor) and value.dtype == other.dtype, key
                assert torch.equal(value, other), (index, key)
            else:
                assert value == other, (index, key)


def _groups_equal(a, b, skip=frozenset()):
    """Equality of two state dicts' "param_groups": the settings, and each group's own state
    ("clip_state") as _state_equal compares per-parameter state."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "clip_state"} == {k: v for k, v in y.items() if k != "clip_state"}
        _state_equal({0: x["clip_state"]}, {0: y["clip_state"]}, skip=skip)


@pytest.mark.parametrize("backend", SKIP_BACKENDS)
@pytest.mark.parametrize("config", list(SKIP_CONFIGS))
def test_skipped_step_leaves_everything_unchanged(backend, config):
    """A NaN gradient with nonfinite="skip": parameters, y, z, k, A_k and every other state value
    unchanged, only the counters and statistics move; the next good step equals the step of an
    optimizer that never saw the bad one (bit for bit with nu = 0, where alpha does not depend on k;
    up to float32 rounding otherwise: the backends take alpha as a host float, see ClippedSSTM._z_step)."""
    kwargs = dict(lr=0.5, L=2.0, seed=3, backend=_backend(backend), nonfinite="skip", **SKIP_CONFIGS[config])
    params, twin_params = _params(device=_device(backend)), _params(device=_device(backend))
    opt, twin = ClippedSSTM(params, **kwargs), ClippedSSTM(twin_params, **kwargs)
    for k in range(3):
        _set(params, _grads(params, 100 + k))
        _set(twin_params, _grads(params, 100 + k))
        opt.step()
        twin.step()
    before_params = [p.detach().clone() for p in params]
    before = copy.deepcopy(opt.state_dict())
    bad = _grads(params, 200)
    bad[2][1, 3] = float("nan")
    _set(params, bad)
    opt.step()
    for old, p in zip(before_params, params):
        assert torch.equal(old, p.detach())
    after = opt.state_dict()
    _groups_equal(before["param_groups"], after["param_groups"], skip=COUNTERS)
    _state_equal(before["state"], after["state"])
    k = after["param_groups"][0]["clip_state"]["sstm_k"]
    assert isinstance(k, torch.Tensor) and k.item() == 3
    stats = opt.statistics()[0]
    assert stats["skipped"].item() == 1.0 and stats["skipped_steps"].item() == 1 and stats["step"].item() == 4

    good = _grads(params, 300)
    _set(params, good)
    _set(twin_params, good)
    opt.step()
    twin.step()
    exact = SKIP_CONFIGS[config].get("nu", 1.0) == 0.0
    for x, y in zip(params, twin_params):
        if exact:
            assert torch.equal(x.detach(), y.detach())
        else:
            torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-6, atol=1e-7)
    for key in ("sstm_k", "sstm_A"):
        assert torch.equal(opt.param_groups[0]["clip_state"][key], twin.param_groups[0]["clip_state"][key]), key
    for index in range(len(params)):
        for key in ("sstm_y", "sstm_z"):
            a, b = opt.state_dict()["state"][index][key], twin.state_dict()["state"][index][key]
            if exact:
                assert torch.equal(a, b), key
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def former_sstm(params0, grads_per_step, backend, **kwargs):
    """The step as it was before skipped steps stopped moving (k and A_k Python numbers): the z
    step as a ClippedSGD step with lr alpha_{k+1} and level B / alpha_{k+1}, the averages with
    Python floats.  Without skipped steps the new step must give these parameters bit for bit."""
    lr, L, nu = kwargs.pop("lr"), kwargs.pop("L"), kwargs.get("nu", 1.0)
    bound = kwargs.get("a_k_ratio_upper_bound", 1.0)
    sgd_kwargs = {k: v for k, v in kwargs.items() if k not in ("nu", "a_k_ratio_upper_bound")}
    level = sgd_kwargs.pop("clipping_level", None)
    x = [p.detach().clone() for p in params0]
    y = [p.clone() for p in x]
    z = [p.clone().requires_grad_() for p in x]
    sgd = ClippedSGD(z, lr=1.0, backend=backend, clipping_level=level, **sgd_kwargs)
    level = sgd.param_groups[0]["clipping_level"]
    level = sgd._group_config(sgd.param_groups[0]).clip.level

    def coefficients(k, a_k):
        alpha = (k + 1) ** (2 * nu / (1 + nu)) / (2 * (1.0 / lr) * L)
        if bound < 1.0 and a_k > (1.0 / (1.0 - bound)) * alpha:
            a_k = (1.0 / (1.0 - bound) - 1.0) * alpha
        return a_k, alpha, a_k + alpha

    a_k = 0.0
    for k, grads in enumerate(grads_per_step):
        a_k, alpha, a_next = coefficients(k, a_k)
        sgd.param_groups[0]["lr"] = alpha
        sgd.param_groups[0]["clipping_level"] = level / alpha
        _set(z, grads)
        sgd.step()
        zd = [t.detach() for t in z]
        torch._foreach_mul_(y, a_k / a_next)
        torch._foreach_add_(y, zd, alpha=alpha / a_next)
        a_k = a_next
        a2, alpha2, a_next2 = coefficients(k + 1, a_k)
        x = [yi * (a2 / a_next2) + zi * (alpha2 / a_next2) for yi, zi in zip(y, zd)]
    return x


@pytest.mark.parametrize("backend", SKIP_BACKENDS)
@pytest.mark.parametrize("config", list(SKIP_CONFIGS) + ["layer+auto+linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_skip_free_runs_equal_the_former_step(backend, config, dtype):
    """Without skipped steps nothing changed: the parameters equal the former step's bit for bit
    (float32 and float64; bfloat16 / float16 y averages are rounded once in float32 now)."""
    kwargs = dict(lr=0.5, L=2.0, seed=3, **SKIP_CONFIGS.get(config, {}))
    if config == "layer+auto+linear":
        from torch_clip_fused import ClipMethod
        kwargs.update(clipping_type=ClipMethod("layer", "auto", "linear"), p_autoclip=0.5, beta=0.1,
                      a_k_ratio_upper_bound=0.9)
    params = _params(dtype, _device(backend))
    grads_per_step = [_grads(params, 100 + k) for k in range(5)]
    expected = former_sstm(params, grads_per_step, _backend(backend), **dict(kwargs))
    opt = ClippedSSTM(params, backend=backend, **kwargs)
    for grads in grads_per_step:
        _set(params, grads)
        opt.step()
    for x, e in zip(params, expected):
        assert torch.equal(x.detach(), e), (x.detach() - e).abs().max()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_checkpoint_of_the_former_format_loads(backend):
    """A checkpoint whose k and A_k are a Python int and float (the former format, which kept them in
    the first parameter's state; also in the param group's "clip_state") loads: they become int64 /
    float64 tensors in the param group's state and the run goes on as the uninterrupted one, bit for bit."""
    kwargs = dict(lr=0.5, L=2.0, nu=0.5, a_k_ratio_upper_bound=0.6, clipping_level=1.0, seed=3, backend=backend)
    params = _params()
    opt = ClippedSSTM(params, **kwargs)
    for k in range(3):
        _set(params, _grads(params, 100 + k))
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    former = legacy_checkpoint(saved)
    for gstate in (former["state"][0], saved["param_groups"][0]["clip_state"]):
        gstate["sstm_k"] = int(gstate["sstm_k"])
        gstate["sstm_A"] = float(gstate["sstm_A"])
    at_stop = [p.detach().clone() for p in params]
    a_k = opt.param_groups[0]["clip_state"]["sstm_A"].item()
    for k in range(3, 5):
        _set(params, _grads(params, 100 + k))
        opt.step()
    for checkpoint in (former, saved):
        resumed = [p.clone().requires_grad_() for p in at_stop]
        opt2 = ClippedSSTM(resumed, **dict(kwargs, seed=9))
        opt2.load_state_dict(checkpoint)
        state = opt2.param_groups[0]["clip_state"]
        assert state["sstm_k"].dtype == torch.int64 and state["sstm_k"].item() == 3
        assert state["sstm_A"].dtype == torch.float64
        assert state["sstm_A"].item() == a_k
        assert not any(key in opt2.state[p] for p in resumed for key in ("sstm_k", "sstm_A"))
        for k in range(3, 5):
            _set(resumed, _grads(params, 100 + k))
            opt2.step()
        for x, y in zip(params, resumed):
            assert torch.equal(x.detach(), y.detach())
        _state_equal(opt.state_dict()["state"], opt2.state_dict()["state"])
        _groups_equal(opt.state_dict()["param_groups"], opt2.state_dict()["param_groups"])


@pytest.mark.parametrize("bad", [dict(sstm_k=-1), dict(sstm_k=1.5), dict(sstm_A=float("nan")), dict(sstm_A=-2.0)])
def test_bad_sstm_checkpoint_is_rejected_before_loading(bad):
    params = _params()
    opt = ClippedSSTM(params, lr=0.5, L=2.0, seed=3, backend="reference")
    _set(params, _grads(params, 100))
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["clip_state"].update(bad)
    before = copy.deepcopy(opt.state_dict())
    for checkpoint in (saved, legacy_checkpoint(saved)):  # in the param group; as former checkpoints kept it
        with pytest.raises(ValueError, match=r"Invalid checkpoint: param group 0: state key 'sstm_"):
            opt.load_state_dict(checkpoint)
        _state_equal(before["state"], opt.state_dict()["state"])
        _groups_equal(before["param_groups"], opt.state_dict()["param_groups"])
