"""Unit scope and the relative threshold (AGC, clipping_type="agc") against timm's adaptive_clip_grad
formula followed by torch.optim.SGD / AdamW, on every backend; closed forms for the other combinations;
layouts and bad methods (docs/spec.md section 1)."""

import importlib.util

import pytest
import torch

from torch_clip_fused import ClipMethod, ClippedAdamW, ClippedSGD, clip_gradients_
from conftest import clone_params, device_for, make_params, set_grads

BACKENDS = ["reference", "cpp"] + (["triton"] if importlib.util.find_spec("triton") else [])
#: a linear layer's weight and bias, a conv filter bank, a scalar gain, a long row
SHAPES = ((6, 5), (6,), (4, 3, 3, 3), (1,), (2, 70))
STEPS = 50


pytestmark = pytest.mark.usefixtures("triton_small_chunks")


def unitwise_norm(x):
    """timm.utils.agc.unitwise_norm (norm_type 2)."""
    if x.ndim <= 1:
        return x.norm(2.0)
    return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)


def timm_adaptive_clip_grad(params, clip_factor=0.01, eps=1e-3):
    """timm.utils.agc.adaptive_clip_grad (Brock et al., 2021), transcribed: the oracle."""
    for p in params:
        if p.grad is None:
            continue
        p_data, g_data = p.detach(), p.grad.detach()
        max_norm = unitwise_norm(p_data).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(g_data)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        new_grads = torch.where(grad_norm < max_norm, g_data, clipped_grad)
        p.grad.detach().copy_(new_grads)


def _grads(params, k):
    set_grads(params, 700 + k)
    for p in params:
        p.grad = torch.empty_like(p).copy_(p.grad)  # autograd's layout: the parameter's (channels_last)
        if k % 6 == 1:
            p.grad.mul_(25.0)


def _on(params, device, channels_last=False):
    out = []
    for p in params:
        q, g = p.detach().clone().to(device), p.grad.clone().to(device)
        if channels_last and q.dim() == 4:
            q, g = (x.contiguous(memory_format=torch.channels_last) for x in (q, g))
        q.requires_grad_()
        q.grad = g
        out.append(q)
    return out


def _oracle(params, steps, factor, eps, optimizer):
    for k in range(steps):
        _grads(params, k)
        timm_adaptive_clip_grad(params, factor, eps)
        optimizer.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factor, eps", [(0.01, 1e-3), (0.05, 1e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sgd_equals_timm_agc(backend, factor, eps, channels_last):
    device = device_for(backend)
    params = make_params(SHAPES)
    ours = _on(params, device, channels_last)
    _oracle(params, STEPS, factor, eps, torch.optim.SGD(params, lr=0.05, momentum=0.9))
    opt = ClippedSGD(ours, lr=0.05, momentum=0.9, clipping_type="agc", clipping_level=factor, agc_eps=eps,
                     backend=backend)
    clipped = 0.0
    for k in range(STEPS):
        _grads(ours, k)
        opt.step()
        clipped += opt.statistics()[0]["clipped_fraction"].item()
    assert clipped > 0
    for p, q in zip(ours, params):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_equals_timm_agc_then_adamw(backend):
    device = device_for(backend)
    params = make_params(SHAPES)
    ours = _on(params, device)
    _oracle(params, STEPS, 0.02, 1e-3, torch.optim.AdamW(params, lr=1e-2, foreach=False))
    opt = ClippedAdamW(ours, lr=1e-2, clipping_type="agc", clipping_level=0.02, backend=backend)
    for k in range(STEPS):
        _grads(ours, k)
        opt.step()
    for p, q in zip(ours, params):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_gradients_equals_timm(backend):
    device = device_for(backend)
    params = make_params(SHAPES)
    ours = _on(params, device)
    timm_adaptive_clip_grad(params, 0.01, 1e-3)
    clip_gradients_(ours, "agc", backend=backend)
    for p, q in zip(ours, params):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_tiny_weights_take_the_eps_floor(backend):
    """A zero-initialised bias and a near-zero row: eta = clipping_level * agc_eps there, as timm's clamp."""
    device = device_for(backend)
    params = make_params(SHAPES)
    with torch.no_grad():
        params[1].zero_()  # the bias
        params[0][2].mul_(1e-6)  # one row of the weight
    ours = _on(params, device)
    timm_adaptive_clip_grad(params, 0.01, 1e-3)
    clip_gradients_(ours, "agc", backend=backend)
    for p, q in zip(ours, params):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-6, atol=1e-9)
    assert params[1].grad.norm().item() == pytest.approx(0.01 * 1e-3, rel=1e-5)  # clipped to the floor, not to 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", [ClippedSGD, ClippedAdamW], ids=["sgd", "adamw"])
def test_steps_read_nothing_back(backend, optimizer):
    """No tensor value is read back to the host in an AGC step (the first one, which builds the layout and
    the Triton plan, included), randomized, with a tensor lr (a float one for the C++ backend, which reads a CPU
    tensor lr as a float: there is no device to wait for)."""
    from test_optim_db import no_host_reads

    device = device_for(backend)
    params = _on(make_params(SHAPES), device)
    lr = 0.01 if backend == "cpp" else torch.tensor(0.01, device=device)
    opt = optimizer(params, lr=lr, clipping_type=ClipMethod("unit", "relative", "linear"),
                    clipping_level=0.02, backend=backend)
    for k in range(3):
        _grads(params, k)
        with no_host_reads():
            opt.step()
    assert opt.statistics()[0]["step"].item() == 3


def test_statistics_count_units():
    """6 + 1 + 4 + 1 + 2 = 14 units; a unit is clipped exactly when its norm exceeds 0.01 max(|w_u|, 1e-3)."""
    params = make_params(SHAPES)
    opt = ClippedSGD(clone_params(params), lr=0.0, clipping_type="agc", backend="reference")
    opt.step()
    hits, etas = 0, []
    for p in params:
        eta = unitwise_norm(p.detach()).clamp(min=1e-3) * 0.01
        hits += int((unitwise_norm(p.grad) > eta).sum())
        etas.append(eta.reshape(-1))
    stats = opt.statistics()[0]
    assert stats["clipped_fraction"].item() == pytest.approx(hits / 14)
    assert stats["threshold"].item() == pytest.approx(torch.cat(etas).mean().item(), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unit_constant_threshold_closed_form(backend):
    """Unit scope with a constant threshold: every row / filter / 1-d tensor clipped to norm <= level."""
    device = device_for(backend)
    params = make_params(SHAPES)
    ours = _on(params, device)
    clip_gradients_(ours, ClipMethod("unit", "constant"), clipping_level=0.7, backend=backend)
    for p, q in zip(ours, params):
        n = unitwise_norm(q.grad)
        expected = q.grad * torch.where(n > 0.7, 0.7 / n, torch.ones_like(n))
        torch.testing.assert_close(p.grad.cpu(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_relative_threshold_at_layer_and_global_scope(backend, scope):
    """eta = level * max(||w||, eps) over the tensor (layer; LARS/LAMB-like) or all weights (global)."""
    device = device_for(backend)
    params = make_params(SHAPES)
    ours = _on(params, device)
    clip_gradients_(ours, ClipMethod(scope, "relative"), clipping_level=0.05, backend=backend)
    if scope == "layer":
        for p, q in zip(ours, params):
            eta = 0.05 * max(q.detach().norm().item(), 1e-3)
            n = q.grad.norm().item()
            torch.testing.assert_close(p.grad.cpu(), q.grad * min(1.0, eta / n), rtol=1e-6, atol=1e-7)
    else:
        w = torch.cat([q.detach().reshape(-1) for q in params]).norm().item()
        g = torch.cat([q.grad.reshape(-1) for q in params]).norm().item()
        for p, q in zip(ours, params):
            torch.testing.assert_close(p.grad.cpu(), q.grad * min(1.0, 0.05 * w / g), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("randomization", ["linear", "quadratic"])
def test_randomized_unit_scope_equals_reference(backend, randomization):
    """Randomized AGC: the fused backends draw the same Philox numbers per unit as the reference."""
    if backend not in BACKENDS:
        pytest.skip("triton is not installed")
    device = device_for(backend)
    params = make_params(SHAPES)
    ref, fused = _on(params, "cpu"), _on(params, device)
    method = ClipMethod("unit", "relative", randomization)
    kw = dict(lr=0.05, clipping_type=method, clipping_level=0.02, beta=0.5, seed=11)
    a, b = ClippedSGD(ref, backend="reference", **kw), ClippedSGD(fused, backend=backend, **kw)
    for k in range(10):
        _grads(ref, k)
        _grads(fused, k)
        a.step()
        b.step()
        assert b.statistics()[0]["clipped_fraction"].item() == a.statistics()[0]["clipped_fraction"].item()
    for p, q in zip(fused, ref):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-5, atol=1e-6)


def test_reference_takes_a_transposed_weight_and_fused_backends_say_why_not():
    params = make_params(SHAPES)
    base = params[0].detach().t().contiguous().requires_grad_()  # [5, 6]
    weight = base.detach().t().requires_grad_()  # [6, 5], strides (1, 6): rows are not contiguous
    weight.grad = torch.empty_like(weight).copy_(params[0].grad)  # autograd's gradient takes the same strides
    ref = clone_params([params[0]])
    timm_adaptive_clip_grad(ref)
    clip_gradients_([weight], "agc", backend="reference")
    torch.testing.assert_close(weight.grad, ref[0].grad, rtol=1e-6, atol=1e-7)
    opt = ClippedSGD([weight], lr=0.1, clipping_type="agc", backend="cpp")
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 0 .* output unit"):
        opt.step()


BAD_METHODS = [
    (lambda: ClipMethod("unit", "auto"), "threshold 'auto' cannot be combined with scope 'unit'"),
    (lambda: ClipMethod("unit", "zscore"), "threshold 'zscore' cannot be combined with scope 'unit'"),
    (lambda: ClipMethod("coordinate", "relative"), "threshold 'relative' cannot be combined with scope 'coordinate'"),
    (lambda: ClippedSGD(make_params(SHAPES), clipping_type="agc", clip_point="update"), "clip_point"),
    (lambda: ClippedSGD(make_params(SHAPES), clipping_type="agc", agc_eps=float("nan")), "agc_eps"),
    (lambda: ClippedSGD(make_params(SHAPES), clipping_type="agc", clipping_level=-0.01), "clipping_level"),
]


@pytest.mark.parametrize("make, needle", BAD_METHODS, ids=[b[1][:30] for b in BAD_METHODS])
def test_bad_methods_are_clear_errors(make, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        make()


def test_default_level_is_agc_clip_factor():
    opt = ClippedSGD(make_params(SHAPES), clipping_type="agc", backend="reference")
    opt.step()
    params = make_params(SHAPES)
    eta = torch.cat([(unitwise_norm(p.detach()).clamp(min=1e-3) * 0.01).reshape(-1) for p in params]).mean()
    assert opt.statistics()[0]["threshold"].item() == pytest.approx(eta.item(), rel=1e-6)
