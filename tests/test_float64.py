"""float64 groups get float64 arithmetic throughout (issue 10.3): norms, thresholds, scales and
the AutoClip history, in every backend that takes float64 (reference, cpp; Triton hands float64
groups to the reference).  Oracle: the clipping formula in float64 torch ops + torch.optim.SGD, whose
results agree with ours to float64 rounding (float32 norms left ~1e-8 relative errors)."""

import math

import pytest
import torch

from torch_clip_fused import ClipMethod, ClippedSGD
from conftest import device_for, make_params, set_grads

BACKENDS = ["reference", "cpp", "triton"]


def _oracle_step(params, opt, kind, level):
    """g <- min(1, level / ||g||) g in float64 (clip_grad_norm_'s formula without its 1e-6 added to
    the norm, which alone moves results by ~1e-7 relative), then torch.optim.SGD."""
    with torch.no_grad():
        if kind == "norm":
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            for p in params:
                p.grad.mul_(torch.clamp(level / total, max=1.0))
        else:
            for p in params:
                p.grad.mul_(torch.clamp(level / torch.linalg.vector_norm(p.grad), max=1.0))
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["norm", "layer_wise"])
def test_float64_matches_clip_grad_norm_to_float64_rounding(backend, kind):
    ours = make_params(dtype=torch.float64, device=device_for(backend))
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = ClippedSGD(ours, lr=0.1, momentum=0.9, clipping_type=kind, clipping_level=1.0, backend=backend)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    for k in range(5):
        set_grads(ours, 200 + k)
        for p, q in zip(theirs, ours):
            p.grad = q.grad.clone()
        opt.step()
        _oracle_step(theirs, ref, kind, 1.0)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
    assert opt.statistics()[0]["norm"].dtype == torch.float32  # statistics stay float32 for logging


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_float64_autoclip_history_is_float64(backend):
    params = make_params(dtype=torch.float64)
    opt = ClippedSGD(params, lr=0.1, clipping_type=ClipMethod("global", "auto"), p_autoclip=0.5, backend=backend)
    norms = []
    for k in range(7):
        set_grads(params, 300 + k)
        norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params)))
        before = [p.detach().clone() for p in params]
        grads = [p.grad.clone() for p in params]
        opt.step()
        ordered = sorted(norms)
        eta = ordered[max(math.ceil(0.5 * len(ordered)), 1) - 1]
        scale = min(1.0, eta / norms[-1])
        for p, b, g in zip(params, before, grads):
            torch.testing.assert_close(p, b - 0.1 * scale * g, rtol=1e-14, atol=1e-16)
    assert opt.param_groups[0]["clip_state"]["clip_history_global"].dtype == torch.float64
    assert opt.param_groups[0]["clip_state"]["clip_sorted_global"].dtype == torch.float64
