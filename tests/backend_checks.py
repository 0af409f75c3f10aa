"""Runs of one backend against the reference on the same inputs (shared by the cpp and triton suites)."""

import torch

from torch_clip_fused import ClipMethod, ClippedSGD
from conftest import ALL_TYPES, make_params, set_grads

METHODS = ALL_TYPES + [ClipMethod("layer", "auto", "quadratic"), ClipMethod("coordinate", "constant", "linear"),
                       ClipMethod("layer", "constant", "linear")]
SGD = [dict(momentum=0.9, weight_decay=0.01), dict(momentum=0.9, nesterov=True, maximize=True), dict()]
TOLERANCE = {
    torch.float64: dict(rtol=1e-5, atol=1e-6),  # norms and scales are float32 by design
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
