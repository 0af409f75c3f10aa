"""The ema_relative threshold (AdaGC, clipping_type="adagc") against pytorch-optimizer==4.1.0's AdaGC,
step for step on the same heavy-tailed gradients, on every backend; its state (resume, skip) and
settings (docs/spec.md section 1).

The oracle.  pytorch-optimizer's AdaGC is Adam with the clipping inside, so only its clipping is
compared, read off its own code path: it is run with betas=(0.0, 0.999), weight_decay=0 and lr=0
on shadow parameters receiving the same gradients.  With beta1 = 0 its first moment is
``exp_avg.lerp_(g_hat, weight=1.0)``, which is exactly g_hat (torch.lerp with weight 1 returns the
end point), the clipped gradient of that step, and lr=0 leaves the shadow parameters (hence
nothing it reads) unchanged.  torch.optim.SGD then takes a step with g_hat as the gradient on a
second copy of the parameters; ClippedSGD(clipping_type="adagc") with the same SGD settings must
take the same steps, and its per-tensor EMA (``clip_adagc_layer``) must equal AdaGC's ``gamma``.
The gradients do not depend on the parameters (conftest.set_grads), so both runs see the same
sequence: heavy-tailed, with a 40x spike every 7 steps.
"""

import importlib.util

import pytest
import torch

import torch_clip_fused as tcf
from torch_clip_fused import ClipMethod, ClippedSGD
from backend_checks import (check_bad_setting_raises, check_corrupt_state_raises, check_resume_bit_identical,
                            check_steps_agree_with_reference)
from conftest import clone_params, make_params, set_grads

BACKENDS = ["reference", "cpp"] + (["triton"] if importlib.util.find_spec("triton") else [])
HAS_ADAGC = importlib.util.find_spec("pytorch_optimizer") is not None
STEPS = 60
SHAPES = ((7, 5), (5,), (3, 70), (1,), (33,))


pytestmark = pytest.mark.usefixtures("triton_small_chunks")


def _grads(params, step):
    set_grads(params, 2000 + step)
    if step % 7 == 3:  # a spike now and then
        for p in params:
            p.grad.mul_(40.0)


def _adagc_run(params, steps, level, warmup, lam=1.05, beta=0.98, **sgd):
    """SGD on pytorch-optimizer AdaGC's clipped gradients (module docstring); returns the
    parameters and AdaGC's gamma per tensor."""
    from pytorch_optimizer.optimizer.adagc import AdaGC

    shadow = [p.detach().clone().requires_grad_() for p in params]
    adagc = AdaGC(shadow, lr=0.0, betas=(0.0, 0.999), beta=beta, lambda_abs=level, lambda_rel=lam,
                  warmup_steps=warmup, weight_decay=0.0, eps=1e-8, foreach=False)
    opt = torch.optim.SGD(params, **sgd)
    for k in range(steps):
        _grads(shadow, k)
        adagc.step()
        for p, s in zip(params, shadow):
            p.grad = adagc.state[s]["exp_avg"].clone()  # g_hat: beta1 = 0
        opt.step()
    return params, [adagc.state[s]["gamma"].item() for s in shadow]


def _ours(params, steps, backend, level, **kwargs):
    opt = ClippedSGD(params, clipping_type="adagc", clipping_level=level, backend=backend, **kwargs)
    clipped = 0
    for k in range(steps):
        _grads(params, k)
        opt.step()
        clipped += int(opt.statistics()[0]["clipped_fraction"].item() > 0)
    return opt, clipped


@pytest.mark.skipif(not HAS_ADAGC, reason="pytorch-optimizer (test-only dependency) is not installed")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level, warmup", [(5.0, 10), (2.0, 1), (50.0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_pytorch_optimizer_adagc(backend, level, warmup, dtype):
    sgd = dict(lr=0.05, momentum=0.9)
    theirs = make_params(SHAPES, dtype=dtype)
    ours = clone_params(theirs)
    theirs, gamma = _adagc_run(theirs, STEPS, level, warmup, **sgd)
    opt, clipped = _ours(ours, STEPS, backend, level, adagc_warmup=warmup, **sgd)
    assert clipped >= 8  # spikes were clipped
    # AdaGC's global norm is float32 even for float64 gradients, and it takes the EMA's input as the
    # norm of the clipped gradient where every backend here takes norm * scale: equal to rounding
    tol = dict(rtol=2e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-5, atol=1e-5)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), **tol)
    state = opt.param_groups[0]["clip_state"]
    ema = state["clip_adagc_layer"]
    assert ema.dtype == dtype and ema.shape == (1, len(SHAPES))
    assert state["clip_adagc_count_layer"].tolist() == [STEPS] * len(SHAPES)
    torch.testing.assert_close(ema[0].tolist(), gamma, rtol=2e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("method", [ClipMethod("layer", "ema_relative"), ClipMethod("global", "ema_relative"),
                                    ClipMethod("layer", "ema_relative", "linear"),
                                    ClipMethod("global", "ema_relative", "quadratic")])
def test_backends_agree_with_reference(backend, method):
    """Every scope and randomization: the fused backends take the reference's steps (float32)."""
    kw = dict(lr=0.05, momentum=0.9, clipping_type=method, clipping_level=8.0, adagc_warmup=4, seed=3, beta=0.5)
    a, ref, b, other = check_steps_agree_with_reference(backend, kw, _grads, SHAPES)
    key = "clip_adagc_layer" if method.scope.value == "layer" else "clip_adagc_global"
    torch.testing.assert_close(b.param_groups[0]["clip_state"][key], a.param_groups[0]["clip_state"][key],
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["adagc", ClipMethod("global", "ema_relative", "linear")])
@pytest.mark.parametrize("stop", [3, 12])  # during the warm-up, after it
def test_resume_is_bit_identical(backend, method, stop):
    kw = dict(lr=0.05, momentum=0.9, clipping_type=method, adagc_warmup=6, clipping_level=30.0, seed=5,
              backend=backend)
    key = "clip_adagc_layer" if method == "adagc" else "clip_adagc_global"
    check_resume_bit_identical(SHAPES, kw, _grads, stop, "adagc_warmup", 100, dict(adagc_warmup=6, adagc_lambda=1.05),
                               [key, key.replace("adagc", "adagc_count")])

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps_before", [0, 2, 8])
def test_skipped_step_leaves_state_untouched(backend, steps_before):
    params = make_params(SHAPES)
    opt = ClippedSGD(params, lr=0.05, clipping_type="adagc", adagc_warmup=5, backend=backend)
    for k in range(steps_before):
        _grads(params, k)
        opt.step()
    _grads(params, 99)
    params[1].grad[0] = float("nan")
    values = [p.detach().clone() for p in params]
    if steps_before:
        state = opt.param_groups[0]["clip_state"]
        before = state["clip_adagc_layer"].clone(), state["clip_adagc_count_layer"].clone()
    opt.step()
    assert opt.statistics()[0]["skipped"].item() == 1.0
    state = opt.param_groups[0]["clip_state"]
    if steps_before:
        assert torch.equal(state["clip_adagc_layer"], before[0])
        assert torch.equal(state["clip_adagc_count_layer"], before[1])
    else:  # nothing recorded yet: gamma unseeded, no step counted
        assert torch.isinf(state["clip_adagc_layer"]).all() and state["clip_adagc_count_layer"].sum().item() == 0
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)


def test_statistics_and_formula():
    """Warm-up: global clipping at clipping_level; after it: eta = lambda * gamma per tensor."""
    params = make_params(SHAPES, dtype=torch.float64)
    opt = ClippedSGD(params, lr=0.0, clipping_type="adagc", clipping_level=2.0, adagc_warmup=3, backend="reference")
    gamma = None
    for k in range(2):  # steps 1 and 2 < 3: warm-up
        _grads(params, k)
        norms = torch.stack([p.grad.norm() for p in params])
        total = norms.square().sum().sqrt()
        opt.step()
        st = opt.statistics()[0]
        s = min(2.0 / (total.item() + 1e-8), 1.0)
        assert st["norm"].item() == pytest.approx(total.item())
        assert st["threshold"].item() == pytest.approx((norms * s).mean().item())
        gamma = norms * s if gamma is None else torch.minimum(gamma, norms * s)
    torch.testing.assert_close(opt.param_groups[0]["clip_state"]["clip_adagc_layer"][0], gamma)
    _grads(params, 5)
    norms = torch.stack([p.grad.norm() for p in params])
    opt.step()  # step 3: relative
    eta = 1.05 * gamma
    assert opt.statistics()[0]["threshold"].item() == pytest.approx(eta.mean().item())
    torch.testing.assert_close(opt.param_groups[0]["clip_state"]["clip_adagc_layer"][0],
                               torch.lerp(gamma, torch.minimum(norms, eta), 0.02))


def test_names_and_scopes():
    assert tcf.parse_method("adagc") == ClipMethod("layer", "ema_relative")
    assert ClipMethod("layer", "ema_relative").name == "adagc"
    with pytest.raises(ValueError, match="threshold 'ema_relative' cannot be combined with scope 'coordinate'"):
        ClipMethod("coordinate", "ema_relative")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(adagc_lambda=0.0), ValueError, r"Invalid adagc_lambda value: 0.0; expected a finite adagc_lambda > 0"),
    (dict(adagc_lambda=float("inf")), ValueError, r"Invalid adagc_lambda value: inf"),
    (dict(adagc_lambda="1"), TypeError, r"Invalid adagc_lambda value: '1'; expected a number"),
    (dict(adagc_beta=1.0), ValueError, r"Invalid adagc_beta value: 1.0; expected 0 <= adagc_beta < 1"),
    (dict(adagc_beta=-0.1), ValueError, r"Invalid adagc_beta value: -0.1"),
    (dict(adagc_beta=float("nan")), ValueError, r"Invalid adagc_beta value: nan"),
    (dict(adagc_warmup=-1), ValueError, r"Invalid adagc_warmup value: -1; expected an int >= 0"),
    (dict(adagc_warmup=2.5), ValueError, r"Invalid adagc_warmup value: 2.5; expected an int >= 0"),
    (dict(adagc_warmup=True), ValueError, r"Invalid adagc_warmup value: True"),
    (dict(clipping_level=0.0), ValueError, r"ema_relative threshold \(AdaGC\) .* needs clipping_level > 0"),
])
def test_bad_settings_are_clear_errors(kwargs, error, match):
    check_bad_setting_raises("adagc", kwargs, error, match, SHAPES)


def test_corrupt_checkpoint_is_a_clear_error():
    check_corrupt_state_raises("adagc", [
        ("clip_adagc_count_layer", torch.tensor([1, 2]), r"'clip_adagc_count_layer' has shape \(2,\), expected \(5,\)"),
        ("clip_adagc_layer", torch.zeros(1, 5, dtype=torch.int32), r"'clip_adagc_layer' has dtype torch.int32"),
        ("clip_adagc_layer", None, r"'clip_adagc_count_layer' comes without its 'clip_adagc_layer'"),
    ], SHAPES)
