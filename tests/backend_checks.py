"""Runs of one backend against the reference on the same inputs (shared by the cpp and triton suites)."""

import copy

import pytest
import torch

from torch_clip_fused import ClipMethod, ClippedSGD
from conftest import ALL_TYPES, clone_params, make_params, set_grads

METHODS = ALL_TYPES + [ClipMethod("layer", "auto", "quadratic"), ClipMethod("coordinate", "constant", "linear"),
                       ClipMethod("layer", "constant", "linear")]
SGD = [dict(momentum=0.9, weight_decay=0.01), dict(momentum=0.9, nesterov=True, maximize=True), dict()]
TOLERANCE = {
    torch.float64: dict(rtol=1e-5, atol=1e-6),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=6e-2),  # a few ulps of the largest terms after 3 steps
    torch.float16: dict(rtol=4e-3, atol=1e-2),
}


def run(backend, method, dtype, shapes, device="cpu", steps=3, **kwargs):
    """Params, optimizer and the clipped fraction of each step after ``steps`` steps."""
    params = make_params(shapes=shapes, dtype=dtype, device=device)
    settings = dict(lr=0.1, clipping_type=method, clipping_level=3.0, beta=0.5, p_autoclip=0.5, seed=3)
    settings.update(kwargs)
    opt = ClippedSGD(params, backend=backend, **settings)
    fractions = []
    for k in range(steps):
        set_grads(params, 20 + k)
        opt.step()
        fractions.append(opt.statistics()[0]["clipped_fraction"].item())
    return params, opt, fractions


def assert_same_as_reference(backend, method, dtype, shapes, device="cpu", **kwargs):
    ref_params, ref_opt, ref_fracs = run("reference", method, dtype, shapes, device, **kwargs)
    params, opt, fracs = run(backend, method, dtype, shapes, device, **kwargs)
    assert fracs == ref_fracs  # identical clip decisions, step by step
    tol = TOLERANCE[dtype]
    for a, b in zip(ref_params, params):
        torch.testing.assert_close(b, a, **tol)
        if "momentum_buffer" in ref_opt.state[a]:
            torch.testing.assert_close(opt.state[b]["momentum_buffer"], ref_opt.state[a]["momentum_buffer"], **tol)
    for key in ("norm", "threshold", "skipped_steps", "step"):
        torch.testing.assert_close(opt.statistics()[0][key], ref_opt.statistics()[0][key], rtol=1e-5, atol=0)


def coordinate_mask(backend, shapes, device="cpu", randomization="quadratic"):
    """Which elements a coordinate-scope step clipped (lr 1, plain SGD: those that moved by exactly eta)."""
    params = make_params(shapes=shapes, device=device)
    before = [p.detach().clone() for p in params]
    opt = ClippedSGD(params, lr=1.0, clipping_type=ClipMethod("coordinate", "constant", randomization),
                     clipping_level=0.8, beta=0.4, seed=9, backend=backend)
    opt.step()
    return torch.cat([((b - p.detach()).abs() == 0.8).flatten() for b, p in zip(before, params)])


def channels_last_params(seed=0):
    """Conv-like weights in channels_last memory format (dense but not contiguous) and a bias."""
    from conftest import set_grads

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 5, 3, 3, generator=gen).to(memory_format=torch.channels_last).requires_grad_()
    bias = torch.randn(6, generator=gen).requires_grad_()
    params = [weight, bias]
    set_grads(params, seed)
    weight.grad = weight.grad.to(memory_format=torch.channels_last)
    return params


def assert_channels_last_same_as_reference(backend, device="cpu"):
    """Coordinate-scope randomized clipping on a channels_last weight: identical decisions
    (the draws follow memory order in every backend) and close parameters."""
    results = []
    for name in ("reference", backend):
        params = [p.detach().to(device).requires_grad_() for p in channels_last_params()]
        for p, q in zip(params, channels_last_params()):
            p.grad = q.grad.to(device)
        assert not params[0].is_contiguous() and params[0].is_contiguous(memory_format=torch.channels_last)
        before = [p.detach().clone() for p in params]
        opt = ClippedSGD(params, lr=1.0, momentum=0.9, clipping_type=ClipMethod("coordinate", "constant", "quadratic"),
                         clipping_level=0.8, beta=0.4, seed=9, backend=name)
        opt.step()
        masks = torch.cat([((b - p.detach()).abs() == 0.8).flatten() for b, p in zip(before, params)])
        results.append((params, masks))
    assert results[0][1].any() and not results[0][1].all()
    assert torch.equal(results[0][1], results[1][1])
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(b, a)


def assert_non_dense_is_a_clear_error(backend, device="cpu"):
    import pytest

    base = torch.randn(8, 8, device=device)
    p = base[:, ::2].requires_grad_()  # a view with gaps: not dense
    p.grad = torch.randn(8, 4, device=device)
    opt = ClippedSGD([p], lr=0.1, backend=backend)
    with pytest.raises(RuntimeError, match=rf"backend='{backend}': parameter 0 .* is not dense in memory"):
        opt.step()


def check_resume_bit_identical(shapes, kw, grads, stop, setting, other, saved_settings, state_keys, steps=20):
    """A run stopped after ``stop`` steps, saved with ``state_dict`` (which holds ``saved_settings``)
    and loaded into an optimizer built with ``setting=other`` continues bit for bit as the
    uninterrupted run of ``steps`` steps: parameters and the group state tensors ``state_keys``; the
    saved ``setting`` wins over the new one.  Checked for the checkpoint as saved and in the former
    layout (legacy_checkpoint).  ``grads(params, k)`` sets step k's gradients."""
    full = make_params(shapes)
    resumed = clone_params(full)
    opt = ClippedSGD(full, **kw)
    for k in range(steps):
        grads(full, k)
        opt.step()
    first = ClippedSGD(resumed, **kw)
    for k in range(stop):
        grads(resumed, k)
        first.step()
    saved = copy.deepcopy(first.state_dict())
    assert all(saved["param_groups"][0][name] == value for name, value in saved_settings.items())
    for checkpoint in (saved, legacy_checkpoint(saved)):  # as saved now, and as former checkpoints kept it
        params = [p.detach().clone().requires_grad_() for p in resumed]
        second = ClippedSGD(params, **dict(kw, **{setting: other}))
        second.load_state_dict(checkpoint)
        assert second.param_groups[0][setting] == kw[setting]
        for k in range(stop, steps):
            grads(params, k)
            second.step()
        for p, q in zip(params, full):
            assert torch.equal(p.detach(), q.detach())
        for key in state_keys:
            assert torch.equal(second.param_groups[0]["clip_state"][key], opt.param_groups[0]["clip_state"][key]), key


def check_bad_setting_raises(clipping_type, kwargs, error, match, shapes):
    """A bad threshold setting raises ``error`` matching ``match`` at construction and at add_param_group."""
    with pytest.raises(error, match=match):
        ClippedSGD(make_params(shapes), lr=0.1, clipping_type=clipping_type, **kwargs)
    opt = ClippedSGD(make_params(shapes), lr=0.1, clipping_type=clipping_type)
    with pytest.raises(error, match=match):
        opt.add_param_group(dict(params=make_params(((2,),)), **kwargs))


def legacy_checkpoint(state_dict):
    """A copy of ``state_dict`` in the former layout: each param group's own state (its
    ``clip_state`` entry) in the per-parameter state of the group's first parameter."""
    saved = copy.deepcopy(state_dict)
    for group in saved["param_groups"]:
        gstate = group.pop("clip_state", None)
        if gstate is not None and group["params"]:
            saved["state"].setdefault(group["params"][0], {}).update(gstate)
    return saved


def check_corrupt_state_raises(clipping_type, edits, shapes):
    """After one step, each ``(key, value, match)`` of ``edits`` applied alone to the saved group state
    (``value`` None deletes the key) makes load_state_dict raise a ValueError matching ``match``, both
    where the state is saved (the param group's ``clip_state``) and where former checkpoints kept it
    (the first parameter's state); the optimizer is left as it was."""
    opt = ClippedSGD(make_params(shapes), lr=0.1, clipping_type=clipping_type, backend="reference")
    opt.step()
    for key, value, match in edits:
        saved = copy.deepcopy(opt.state_dict())
        if value is None:
            del saved["param_groups"][0]["clip_state"][key]
        else:
            saved["param_groups"][0]["clip_state"][key] = value
        for checkpoint in (saved, legacy_checkpoint(saved)):
            before = copy.deepcopy(opt.state_dict())
            with pytest.raises(ValueError, match=match):
                opt.load_state_dict(checkpoint)
            _assert_same_state_dict(opt.state_dict(), before)


def _assert_same_state_dict(a, b):
    """Two state_dicts hold equal settings, per-parameter state and group state (tensors compared exactly)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_state_dict(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state_dict(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b or (a != a and b != b), (a, b)


def check_steps_agree_with_reference(backend, kw, grads, shapes, steps=30):
    """``steps`` ClippedSGD steps of ``backend`` and of the reference on the same gradients (``grads(params,
    k)`` sets step k's): the same threshold every step and the same parameters at the end (float32).
    Returns (reference optimizer, its params, backend optimizer, its params) for further checks."""
    ref = make_params(shapes)
    other = clone_params(ref)
    a = ClippedSGD(ref, backend="reference", **kw)
    b = ClippedSGD(other, backend=backend, **kw)
    for k in range(steps):
        grads(ref, k)
        grads(other, k)
        a.step()
        b.step()
        sa, sb = a.statistics()[0], b.statistics()[0]
        torch.testing.assert_close(sb["threshold"], sa["threshold"], rtol=1e-5, atol=1e-6)
    for p, q in zip(other, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5)
    return a, ref, b, other
