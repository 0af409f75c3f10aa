"""ClippedAdamW takes tensor betas as torch.optim.AdamW does (one-element tensors, 0 <= beta < 1) and steps
as torch.optim.AdamW with the same tensor betas (the oracle), on the reference and C++ backends."""

import pytest
import torch

from torch_clip_fused import ClippedAdamW
from conftest import clone_params, make_params, set_grads

BACKENDS = ["reference", "cpp"]
SHAPES = ((7, 5), (5,), (3, 20), (1,))
STEPS = 6


def _betas(dtype=torch.float32, shape=()):
    return (torch.full(shape, 0.9, dtype=dtype), torch.full(shape, 0.999, dtype=dtype))


def _run(opt, params, steps=STEPS, clip=None, between=None):
    for k in range(steps):
        set_grads(params, 700 + k)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=False)
        opt.step()
        if between is not None:
            between(opt, k)
    return opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-d", "1-element"])
def test_tensor_betas_equal_torch_adamw(backend, amsgrad, clip, shape):
    params = make_params(SHAPES)
    ours = clone_params(params)
    kw = dict(lr=1e-2, weight_decay=0.01, amsgrad=amsgrad)
    oracle = _run(torch.optim.AdamW(params, betas=_betas(shape=shape), foreach=False, **kw), params, clip=clip)
    opt = _run(ClippedAdamW(ours, betas=_betas(shape=shape), backend=backend, clipping_level=clip,
                            clipping_type="no_clip" if clip is None else "norm", **kw), ours)
    for p, q in zip(ours, params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-5, atol=2e-6)
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            torch.testing.assert_close(opt.state[p][key], oracle.state[q][key], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_tensor_betas_equal_torch_adamw(backend):
    params = make_params(SHAPES, dtype=torch.float64)
    ours = clone_params(params)
    betas = _betas(torch.float64)
    _run(torch.optim.AdamW(params, lr=1e-2, betas=betas, foreach=False), params)
    _run(ClippedAdamW(ours, lr=1e-2, betas=betas, backend=backend, clipping_type="no_clip"), ours)
    for p, q in zip(ours, params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_beta_changed_in_place_is_used_at_the_next_step(backend):
    """torch.optim.AdamW reads a tensor beta at every step: a scheduler may fill it in place."""
    params = make_params(SHAPES)
    ours = clone_params(params)

    def schedule(opt, k):
        opt.param_groups[0]["betas"][0].fill_(0.9 - 0.1 * (k + 1))

    kw = dict(lr=1e-2, weight_decay=0.0)
    _run(torch.optim.AdamW(params, betas=_betas(), foreach=False, **kw), params, between=schedule)
    _run(ClippedAdamW(ours, betas=_betas(), backend=backend, clipping_type="no_clip", **kw), ours, between=schedule)
    for p, q in zip(ours, params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-5, atol=2e-6)


def test_betas_replaced_by_a_scheduler_with_a_float_are_used():
    """OneCycleLR / CyclicLR with cycle_momentum replace betas[0] by a float, keeping betas[1]: a
    tensor and a float together are accepted and used."""
    params = make_params(SHAPES)
    ours = clone_params(params)
    opt = ClippedAdamW(ours, lr=1e-2, betas=_betas(), backend="reference", clipping_type="no_clip")
    oracle = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), foreach=False)
    for k in range(3):
        for o in (opt, oracle):
            o.param_groups[0]["betas"] = (0.85 - 0.05 * k, o.param_groups[0]["betas"][1])
        set_grads(params, 900 + k)
        set_grads(ours, 900 + k)
        oracle.step()
        opt.step()
    for p, q in zip(ours, params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-5, atol=2e-6)


BAD_BETAS = [
    ((torch.tensor([0.9, 0.8]), torch.tensor(0.999)), ValueError,
     r"Invalid beta parameter at index 0: Tensor beta must be 1-element \(a tensor beta must hold one element\), got shape \(2,\)"),
    ((torch.tensor(0.9), torch.tensor(1.0)), ValueError, r"Invalid beta parameter at index 1: 1.0; expected 0 <= beta < 1"),
    ((torch.tensor(-0.1), torch.tensor(0.999)), ValueError, r"Invalid beta parameter at index 0: -0.1"),
    ((torch.tensor(float("nan")), torch.tensor(0.999)), ValueError, r"Invalid beta parameter at index 0: nan"),
    ((torch.tensor(1, dtype=torch.int64), torch.tensor(0.999)), ValueError,
     r"Invalid beta parameter at index 0: a tensor beta must be floating point, got dtype torch.int64"),
    ((0.9, "0.999"), TypeError, r"Invalid beta parameter at index 1 value: '0.999'; expected a number"),
]


@pytest.mark.parametrize("betas,error,message", BAD_BETAS, ids=[m for _, _, m in BAD_BETAS])
def test_bad_tensor_betas_are_clear_errors(betas, error, message):
    with pytest.raises(error, match=message):
        ClippedAdamW(make_params(SHAPES), betas=betas)
    # and torch refuses the same tensors (the string is refused by its comparison)
    if betas[0].__class__ is torch.Tensor and betas[0].dtype != torch.int64:
        with pytest.raises((ValueError, RuntimeError)):
            torch.optim.AdamW(make_params(SHAPES), betas=betas)
