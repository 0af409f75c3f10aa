"""The zscore threshold (ZClip, clipping_type="zclip") against the zclip==1.0.0 package followed by
torch.optim.SGD, step for step on the same heavy-tailed gradients, on every backend; its state
(resume, skip) and settings (docs/spec.md section 1)."""

import importlib.util

import pytest
import torch

import torch_clip_fused as tcf
from torch_clip_fused import ClipMethod, ClippedSGD
from backend_checks import (check_bad_setting_raises, check_corrupt_state_raises, check_resume_bit_identical,
                            check_steps_agree_with_reference)
from conftest import clone_params, make_params, set_grads

BACKENDS = ["reference", "cpp"] + (["triton"] if importlib.util.find_spec("triton") else [])
HAS_ZCLIP = importlib.util.find_spec("zclip") is not None
STEPS = 64
SHAPES = ((7, 5), (5,), (3, 70), (1,), (33,))


pytestmark = pytest.mark.usefixtures("triton_small_chunks")


def _grads(params, step):
    set_grads(params, 1000 + step)
    if step % 7 == 3:  # a spike now and then
        for p in params:
            p.grad.mul_(40.0)


def _zclip_run(params, steps, cap, warmup=25, alpha=0.97, z=2.5, **sgd):
    from zclip import ZClip

    module = torch.nn.Module()
    module.ps = torch.nn.ParameterList(params)
    params = list(module.ps)  # Parameters sharing the tensors' storage: their grads are the ones ZClip reads
    zc = ZClip(alpha=alpha, z_thresh=z, max_grad_norm=cap, warmup_steps=warmup, mode="zscore",
               clip_option="adaptive_scaling")
    opt = torch.optim.SGD(params, **sgd)
    for k in range(steps):
        _grads(params, k)
        zc.step(module)
        opt.step()
    return params, zc


def _ours(params, steps, backend, cap, **kwargs):
    opt = ClippedSGD(params, clipping_type="zclip", clipping_level=cap, backend=backend, **kwargs)
    clipped = 0
    for k in range(steps):
        _grads(params, k)
        opt.step()
        clipped += int(opt.statistics()[0]["clipped_fraction"].item() > 0)
    return opt, clipped


@pytest.mark.skipif(not HAS_ZCLIP, reason="the zclip package (test-only dependency) is not installed")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cap", [None, 6.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_zclip_package(backend, cap, dtype):
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    theirs = make_params(SHAPES, dtype=dtype)
    ours = clone_params(theirs)
    theirs, zc = _zclip_run(theirs, STEPS, cap, **sgd)
    opt, clipped = _ours(ours, STEPS, backend, cap, **sgd)
    assert clipped >= 3  # spikes were clipped (and the cap, when given)
    # the scales differ from ZClip's in its 1e-6: it scales by eta / (||g|| + 1e-6), as clip_grad_norm_,
    # where every method here scales by eta / ||g|| (docs/spec.md section 1); the thresholds and EMAs agree
    # to rounding (checked below)
    tol = dict(rtol=1e-5, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-7)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), **tol)
    state = opt.param_groups[0]["clip_state"]
    ema = state["clip_zclip_global"]
    assert ema.dtype == dtype and ema.shape == (27, 1)
    assert state["clip_zclip_count_global"].tolist() == [25]
    torch.testing.assert_close(ema[0, 0].item(), zc.mean, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    torch.testing.assert_close(ema[1, 0].item(), zc.var, rtol=1e-4 if dtype == torch.float32 else 1e-11, atol=0)


@pytest.mark.skipif(not HAS_ZCLIP, reason="the zclip package (test-only dependency) is not installed")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("warmup", [0, 1, 5])
def test_equals_zclip_package_short_warmup(backend, warmup):
    theirs = make_params(SHAPES, dtype=torch.float64)
    ours = clone_params(theirs)
    _, zc = _zclip_run(theirs, 30, 4.0, warmup=warmup, alpha=0.9, z=1.5, lr=0.1)
    opt, _ = _ours(ours, 30, backend, 4.0, lr=0.1, zclip_warmup=warmup, zclip_alpha=0.9, zclip_z=1.5)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    ema = opt.param_groups[0]["clip_state"]["clip_zclip_global"]
    torch.testing.assert_close(ema[:2, 0].tolist(), [zc.mean, zc.var], rtol=1e-11, atol=0)


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("method", [ClipMethod("global", "zscore"), ClipMethod("layer", "zscore"),
                                    ClipMethod("global", "zscore", "linear"), ClipMethod("layer", "zscore", "quadratic")])
def test_backends_agree_with_reference(backend, method):
    """Every scope and randomization: the fused backends take the reference's steps (float32)."""
    kw = dict(lr=0.05, momentum=0.9, clipping_type=method, clipping_level=20.0, zclip_warmup=4, seed=3, beta=0.5)
    a, ref, b, other = check_steps_agree_with_reference(backend, kw, _grads, SHAPES)
    scope = method.scope.value
    torch.testing.assert_close(b.param_groups[0]["clip_state"][f"clip_zclip_{scope}"],
                               a.param_groups[0]["clip_state"][f"clip_zclip_{scope}"], rtol=1e-5, atol=1e-6)


def test_layer_scope_is_zclip_per_tensor():
    """Layer scope: one EMA pair per tensor, each tensor as a global-scope ZClip of its own."""
    params = make_params(SHAPES, dtype=torch.float64)
    alone = [clone_params([p]) for p in params]
    kw = dict(lr=0.05, clipping_level=None, zclip_warmup=5)
    opt = ClippedSGD(params, clipping_type=ClipMethod("layer", "zscore"), backend="reference", **kw)
    opts = [ClippedSGD(a, clipping_type="zclip", backend="reference", **kw) for a in alone]
    for k in range(20):
        _grads(params, k)
        opt.step()
        for a, o, p in zip(alone, opts, params):
            a[0].grad = p.grad.clone()
            o.step()
    for a, p in zip(alone, params):
        torch.testing.assert_close(a[0].detach(), p.detach(), rtol=1e-12, atol=1e-12)
    assert opt.param_groups[0]["clip_state"]["clip_zclip_layer"].shape == (7, len(SHAPES))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["zclip", ClipMethod("layer", "zscore", "linear")])
@pytest.mark.parametrize("stop", [3, 12])  # during the warm-up, after it
def test_resume_is_bit_identical(backend, method, stop):
    kw = dict(lr=0.05, momentum=0.9, clipping_type=method, zclip_warmup=6, clipping_level=30.0, seed=5, backend=backend)
    key = "clip_zclip_global" if method == "zclip" else "clip_zclip_layer"
    check_resume_bit_identical(SHAPES, kw, _grads, stop, "zclip_warmup", 25, dict(zclip_warmup=6, zclip_alpha=0.97),
                               [key])

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps_before", [2, 8])
def test_skipped_step_leaves_state_untouched(backend, steps_before):
    params = make_params(SHAPES)
    opt = ClippedSGD(params, lr=0.05, clipping_type="zclip", zclip_warmup=5, backend=backend)
    for k in range(steps_before):
        _grads(params, k)
        opt.step()
    state = opt.param_groups[0]["clip_state"]
    before = state["clip_zclip_global"].clone(), state["clip_zclip_count_global"].clone()
    values = [p.detach().clone() for p in params]
    _grads(params, 99)
    params[1].grad[0] = float("nan")
    opt.step()
    assert opt.statistics()[0]["skipped"].item() == 1.0
    state = opt.param_groups[0]["clip_state"]
    assert torch.equal(state["clip_zclip_global"], before[0])
    assert torch.equal(state["clip_zclip_count_global"], before[1])
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)


def test_statistics_report_the_effective_threshold():
    params = make_params(SHAPES, dtype=torch.float64)
    opt = ClippedSGD(params, lr=0.0, clipping_type="zclip", zclip_warmup=3, clipping_level=None, backend="reference")
    norms = []
    for k in range(3):
        _grads(params, 0)
        opt.step()
        st = opt.statistics()[0]
        assert st["threshold"].item() == st["norm"].item()  # warm-up without a cap: no clipping
        norms.append(st["norm"].item())
    mean = sum(norms) / 3
    for p in params:
        p.grad.mul_(1000.0)
    opt.step()
    st = opt.statistics()[0]
    assert st["threshold"].item() < st["norm"].item() and st["clipped_fraction"].item() == 1.0
    std = 0.0  # three equal norms: no variance
    z = (st["norm"].item() - mean) / (std + 1e-6)
    assert st["threshold"].item() == pytest.approx(mean + 2.5 * std / (z / 2.5))
    capped = ClippedSGD(make_params(SHAPES), lr=0.0, clipping_type="zclip", clipping_level=0.5, backend="reference")
    capped.step()
    assert capped.statistics()[0]["threshold"].item() == 0.5  # the cap applies during the warm-up


def test_names_and_scopes():
    assert tcf.parse_method("zclip") == ClipMethod("global", "zscore")
    assert ClipMethod("global", "zscore").name == "zclip"
    with pytest.raises(ValueError, match="threshold 'zscore' cannot be combined with scope 'coordinate'"):
        ClipMethod("coordinate", "zscore")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(zclip_alpha=1.0), ValueError, r"Invalid zclip_alpha value: 1.0; expected 0 < zclip_alpha < 1"),
    (dict(zclip_alpha=0.0), ValueError, r"Invalid zclip_alpha value: 0.0"),
    (dict(zclip_alpha="0.9"), TypeError, r"Invalid zclip_alpha value: '0.9'; expected a number"),
    (dict(zclip_z=0.0), ValueError, r"Invalid zclip_z value: 0.0; expected zclip_z > 0"),
    (dict(zclip_z=float("nan")), ValueError, r"Invalid zclip_z value: nan; expected a finite number"),
    (dict(zclip_warmup=-1), ValueError, r"Invalid zclip_warmup value: -1; expected an int >= 0"),
    (dict(zclip_warmup=2.5), ValueError, r"Invalid zclip_warmup value: 2.5; expected an int >= 0"),
    (dict(zclip_warmup=True), ValueError, r"Invalid zclip_warmup value: True"),
])
def test_bad_settings_are_clear_errors(kwargs, error, match):
    check_bad_setting_raises("zclip", kwargs, error, match, SHAPES)


def test_corrupt_checkpoint_is_a_clear_error():
    check_corrupt_state_raises("zclip", [
        ("clip_zclip_count_global", torch.tensor([1, 2]), r"'clip_zclip_count_global' has shape \(2,\), expected \(1,\)"),
        ("clip_zclip_global", torch.zeros(27, 1, dtype=torch.int32), r"'clip_zclip_global' has dtype torch.int32"),
    ], SHAPES)


def test_changing_warmup_keeps_the_ema():
    params = make_params(SHAPES)
    opt = ClippedSGD(params, lr=0.1, clipping_type="zclip", zclip_warmup=3, backend="reference")
    for k in range(5):
        _grads(params, k)
        opt.step()
    ema = opt.param_groups[0]["clip_state"]["clip_zclip_global"][:2].clone()
    opt.param_groups[0]["zclip_warmup"] = 10
    _grads(params, 0)
    opt.step()
    state = opt.param_groups[0]["clip_state"]
    assert state["clip_zclip_global"].shape == (12, 1) and state["clip_zclip_count_global"].item() == 10
    assert not torch.equal(state["clip_zclip_global"][:2], ema)  # the EMAs went on (no new warm-up)
