"""ClippedSGD against independent computations: torch.optim.SGD, torch's clipping utilities,
torch-clip 0.0.6 where docs/spec.md section 3 says they coincide, and closed forms."""

import itertools

import pytest
import torch

from torch_clip_fused import ClipMethod, ClippedSGD
from conftest import CPU_BACKENDS, clone_params, make_params, set_grads

SGD_SETTINGS = [
    dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
    for m, d, wd, n, mx in itertools.product([0.0, 0.9], [0.0, 0.3], [0.0, 0.01], [False, True], [False, True])
    if not (n and (m == 0 or d != 0))
]


def run_steps(opt, params, steps=4, seed=100):
    for k in range(steps):
        set_grads(params, seed + k)
        opt.step()


def assert_params_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sgd", SGD_SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_no_clip_equals_torch_sgd(backend, sgd):
    ours, theirs = make_params(), make_params()
    run_steps(ClippedSGD(ours, lr=0.05, clipping_type="no_clip", backend=backend, **sgd), ours)
    run_steps(torch.optim.SGD(theirs, lr=0.05, **sgd), theirs)
    assert_params_close(ours, theirs)


def _torch_clip_then_sgd(kind, level):
    def clip(params):
        if kind == "norm":
            torch.nn.utils.clip_grad_norm_(params, level)
        elif kind == "layer_wise":
            for p in params:
                torch.nn.utils.clip_grad_norm_([p], level)
        elif kind == "coordinate_wise":
            torch.nn.utils.clip_grad_value_(params, level)
        else:
            raise ValueError(kind)
    return clip


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,level", [("norm", 2.0), ("layer_wise", 0.7), ("coordinate_wise", 0.3)])
@pytest.mark.parametrize("sgd", [dict(), dict(momentum=0.9, weight_decay=0.01), dict(momentum=0.9, nesterov=True)])
def test_clipping_equals_torch_utilities(backend, kind, level, sgd):
    ours, theirs = make_params(), make_params()
    opt = ClippedSGD(ours, lr=0.05, clipping_type=kind, clipping_level=level, backend=backend, **sgd)
    ref = torch.optim.SGD(theirs, lr=0.05, **sgd)
    clip = _torch_clip_then_sgd(kind, level)
    for k in range(4):
        set_grads(ours, 200 + k)
        set_grads(theirs, 200 + k)
        opt.step()
        clip(theirs)
        ref.step()
    # clip_grad_norm_ divides by (norm + 1e-6): agreement to that eps
    assert_params_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert opt.statistics()[0]["clipped_fraction"].item() > 0  # the data really clips


@pytest.mark.parametrize("kind,level", [("norm", 2.0), ("layer_wise", 0.7), ("coordinate_wise", 0.3)])
def test_parity_with_torch_clip_0_0_6(kind, level):
    torch_clip_optimizers = pytest.importorskip("torch_clip.optimizers")
    ours, theirs = make_params(), make_params()
    opt = ClippedSGD(ours, lr=0.05, clipping_type=kind, clipping_level=level, backend="reference")
    orig = torch_clip_optimizers.ClippedSGD(theirs, lr=0.05, clipping_type=kind, clipping_level=float(level))
    for k in range(4):
        set_grads(ours, 300 + k)
        set_grads(theirs, 300 + k)
        opt.step()
        orig.step()
    assert_params_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p_auto", [0.1, 0.5, 0.75, 1.0])
def test_autoclip_threshold_is_nearest_rank(backend, p_auto):
    params = make_params()
    opt = ClippedSGD(params, lr=0.0, clipping_type="auto_clip", p_autoclip=p_auto, backend=backend)
    seen = []
    for k in range(9):
        set_grads(params, 400 + k)
        seen.append(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params)).item())
        opt.step()
        n = len(seen)
        rank = -(-int(round(p_auto * n * 1e9)) // int(1e9))  # ceil(p n) without float trouble
        expected = sorted(seen)[max(rank, 1) - 1]
        assert opt.statistics()[0]["threshold"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layer_auto_history_is_per_tensor(backend):
    params = make_params()
    opt = ClippedSGD(params, lr=0.1, clipping_type=ClipMethod("layer", "auto"), p_autoclip=0.5, backend=backend)
    norms = []
    for k in range(5):
        set_grads(params, 500 + k)
        norms.append([p.grad.norm().item() for p in params])
        before = [p.detach().clone() for p in params]
        grads = [p.grad.clone() for p in params]
        opt.step()
    for i, (b, g, p) in enumerate(zip(before, grads, params)):
        col = sorted(row[i] for row in norms)
        eta = col[2]  # ceil(0.5 * 5) = 3rd smallest
        scale = min(1.0, eta / norms[-1][i])
        torch.testing.assert_close(p.detach(), b - 0.1 * scale * g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autoclip_history_cap_keeps_last_n(backend):
    params = make_params()
    opt = ClippedSGD(params, lr=0.0, clipping_type="auto_clip", p_autoclip=1.0, autoclip_history=3, backend=backend)
    seen = []
    for k in range(8):
        set_grads(params, 600 + k)
        seen.append(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params)).item())
        opt.step()
        assert opt.statistics()[0]["threshold"].item() == pytest.approx(max(seen[-3:]), rel=1e-5)


def _clip_rate(clipping_type, beta, alpha, backend, steps=2000, level=1.0):
    """Fraction of steps clipped when ||g|| = level / alpha (a single 4-element tensor)."""
    p = torch.zeros(4, requires_grad=True)
    opt = ClippedSGD([p], lr=0.0, clipping_type=clipping_type, clipping_level=level, beta=beta, seed=7, backend=backend)
    g = torch.full((4,), level / alpha / 2.0)  # norm = level / alpha
    clipped = torch.zeros(())
    for _ in range(steps):
        p.grad = g.clone()
        opt.step()
        clipped += opt.statistics()[0]["clipped_fraction"]
    return clipped.item() / steps


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,power", [("linear_rand_norm", 1), ("quadratic_rand_norm", 2)])
@pytest.mark.parametrize("beta,alpha", [(0.85, 0.5), (0.5, 0.8), (0.3, 0.25)])
def test_randomized_clip_frequency(backend, kind, power, beta, alpha):
    steps = 2000
    rate = _clip_rate(kind, beta, alpha, backend, steps)
    prob = beta ** (alpha ** power)
    sigma = (prob * (1 - prob) / steps) ** 0.5
    assert abs(rate - prob) <= 5 * sigma, (rate, prob)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_coordinate_randomized_frequency(backend):
    n, level, alpha, beta = 20_000, 1.0, 0.5, 0.85
    p = torch.zeros(n, requires_grad=True)
    p.grad = torch.full((n,), level / alpha) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    opt = ClippedSGD([p], lr=1.0, clipping_type=ClipMethod("coordinate", "constant", "linear"),
                     clipping_level=level, beta=beta, seed=3, backend=backend)
    g = p.grad.clone()
    opt.step()
    step = -p.detach()
    clipped = step.abs() == level
    assert torch.all(clipped | (step == g))  # every element is either clipped to eta or untouched
    assert torch.all(torch.sign(step) == torch.sign(g))
    prob = beta ** alpha
    assert abs(clipped.float().mean().item() - prob) <= 5 * (prob * (1 - prob) / n) ** 0.5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_gradient_is_never_nan(backend):
    for kind in ["norm", "layer_wise", "coordinate_wise", "auto_clip", "quadratic_rand_norm"]:
        p = torch.ones(3, requires_grad=True)
        p.grad = torch.zeros(3)
        ClippedSGD([p], lr=0.1, clipping_type=kind, backend=backend).step()
        assert torch.equal(p.detach(), torch.ones(3)), kind


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clip_point_update_clips_the_step_not_the_momentum(backend):
    params = make_params(shapes=((6,),))
    p = params[0]
    lr, mu, level = 0.1, 0.9, 0.5
    opt = ClippedSGD(params, lr=lr, momentum=mu, clipping_type="norm", clipping_level=level,
                     clip_point="update", backend=backend)
    x, m = p.detach().clone(), None
    for k in range(3):
        set_grads(params, 700 + k)
        g = p.grad.clone()
        m = g if m is None else mu * m + g
        x = x - lr * m * min(1.0, level / m.norm().item())
        opt.step()
    torch.testing.assert_close(p.detach(), x)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], m)
