"""ClippedAdamW against torch.optim.AdamW (no clipping) and clip_grad_norm_ + AdamW (global norm), on every
backend and option; torch.optim.AdamW checkpoints, resume, skipped steps and bad arguments."""

import copy
import importlib.util
import itertools

import pytest
import torch

from torch_clip_fused import ClippedAdamW, ClippedSGD
from backend_checks import legacy_checkpoint
from conftest import clone_params, device_for, make_params, set_grads

BACKENDS = ["reference", "cpp"] + (["triton"] if importlib.util.find_spec("triton") else [])
SHAPES = ((7, 5), (5,), (3, 70), (1,), (33,))
STEPS = 12


pytestmark = pytest.mark.usefixtures("triton_small_chunks")


def _grads(params, k):
    set_grads(params, 500 + k)
    if k % 5 == 2:  # a heavy-tailed spike now and then
        for p in params:
            p.grad.mul_(30.0)


def _torch_run(params, steps, clip=None, **kw):
    opt = torch.optim.AdamW(params, foreach=False, **kw)
    for k in range(steps):
        _grads(params, k)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=False)
        opt.step()
    return opt


def _ours_run(params, steps, backend, **kw):
    opt = ClippedAdamW(params, backend=backend, **kw)
    for k in range(steps):
        _grads(params, k)
        opt.step()
    return opt


def _on(params, device):
    out = clone_params(params)
    return [p.detach().to(device).requires_grad_() for p in out]


#: (lr, betas, eps, weight_decay, amsgrad, maximize): every option set and unset at least once
OPTIONS = [
    (1e-2, (0.9, 0.999), 1e-8, 1e-2, False, False),
    (3e-3, (0.8, 0.99), 1e-6, 0.0, True, False),
    (1e-2, (0.0, 0.95), 1e-8, 0.1, False, True),
    (5e-3, (0.9, 0.999), 1e-3, 0.05, True, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr, betas, eps, weight_decay, amsgrad, maximize", OPTIONS)
@pytest.mark.parametrize("clip", [None, 1.0])
def test_equals_torch_adamw(backend, lr, betas, eps, weight_decay, amsgrad, maximize, clip):
    """no_clip == torch.optim.AdamW; norm == clip_grad_norm_ + torch.optim.AdamW, step for step."""
    device = device_for(backend)
    params = make_params(SHAPES)
    ours = _on(params, device)
    kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    oracle = _torch_run(params, STEPS, clip=clip, **kw)
    opt = _ours_run(ours, STEPS, backend, clipping_type="no_clip" if clip is None else "norm",
                    clipping_level=clip, **kw)
    for p, q in zip(ours, params):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=2e-5, atol=2e-6)
    for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
        for p, q in zip(ours, params):
            torch.testing.assert_close(opt.state[p][key].cpu(), oracle.state[q][key], rtol=2e-5, atol=1e-7)
    for p, q in zip(ours, params):
        assert opt.state[p]["step"].dtype == torch.float32
        assert float(opt.state[p]["step"]) == float(oracle.state[q]["step"]) == STEPS


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_equals_float_lr(backend):
    device = device_for(backend)
    params = make_params(SHAPES)
    a, b = _on(params, device), _on(params, device)
    _ours_run(a, 5, backend, lr=3e-3, clipping_type="norm")
    _ours_run(b, 5, backend, lr=torch.tensor(3e-3, device=device), clipping_type="norm")
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("method", ["layer_wise", "coordinate_wise", "quadratic_rand_autoclip", "zclip", "agc",
                                    "linear_rand_norm"])
def test_fused_backends_equal_reference(backend, method):
    """Every clipping method before the AdamW moments: the fused backends take the reference's decisions."""
    if backend not in BACKENDS:
        pytest.skip("triton is not installed")
    device = device_for(backend)
    params = make_params(SHAPES)
    ref, fused = _on(params, "cpu"), _on(params, device)
    kw = dict(lr=1e-2, weight_decay=0.01, clipping_type=method, seed=7,
              clipping_level={"coordinate_wise": 0.5, "agc": 0.05}.get(method))
    a = _ours_run(ref, 8, "reference", **kw)
    b = _ours_run(fused, 8, backend, **kw)
    for p, q in zip(fused, ref):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=2e-5, atol=2e-6)
    sa, sb = a.statistics()[0], b.statistics()[0]
    for name in ("norm", "threshold", "clipped_fraction"):
        torch.testing.assert_close(sb[name].cpu(), sa[name], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_torch_adamw_checkpoint_loads(backend, amsgrad):
    """A torch.optim.AdamW state_dict loads into ClippedAdamW (no_clip), which goes on as AdamW would."""
    device = device_for(backend)
    params = make_params(SHAPES)
    kw = dict(lr=1e-2, weight_decay=0.02, amsgrad=amsgrad)
    oracle = torch.optim.AdamW(params, foreach=False, **kw)
    for k in range(4):
        _grads(params, k)
        oracle.step()
    saved = copy.deepcopy(oracle.state_dict())
    ours = _on(params, device)
    opt = ClippedAdamW(ours, clipping_type="no_clip", backend=backend, **kw)
    opt.load_state_dict(saved)
    for k in range(4, 9):
        _grads(params, k)
        oracle.step()
        _grads(ours, k)
        opt.step()
    for p, q in zip(ours, params):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=2e-5, atol=2e-6)
        assert float(opt.state[p]["step"]) == 9.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["norm", "quadratic_rand_autoclip"])
def test_resume_is_bit_identical(backend, method):
    device = device_for(backend)
    params = make_params(SHAPES)
    full, resumed = _on(params, device), _on(params, device)
    kw = dict(lr=1e-2, amsgrad=True, clipping_type=method, seed=3, backend=backend)
    opt = ClippedAdamW(full, **kw)
    for k in range(10):
        _grads(full, k)
        opt.step()
    first = ClippedAdamW(resumed, **kw)
    for k in range(4):
        _grads(resumed, k)
        first.step()
    saved = copy.deepcopy(first.state_dict())
    for checkpoint in (saved, legacy_checkpoint(saved)):  # as saved, and in the former layout
        again = [p.detach().clone().requires_grad_() for p in resumed]
        second = ClippedAdamW(again, **dict(kw, lr=0.5))
        second.load_state_dict(checkpoint)
        for k in range(4, 10):
            _grads(again, k)
            second.step()
        for p, q in zip(again, full):
            assert torch.equal(p.detach(), q.detach())
            assert set(second.state[p]) == set(opt.state[q])
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
                assert torch.equal(second.state[p][key], opt.state[q][key]), key
        for key in ("clip_step", "clip_steps", "clip_stats"):
            assert torch.equal(torch.as_tensor(second.param_groups[0]["clip_state"][key]),
                               torch.as_tensor(opt.param_groups[0]["clip_state"][key])), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_step_moves_nothing(backend):
    """A non-finite gradient (nonfinite='skip'): parameters, moments and step counts stay as they were."""
    device = device_for(backend)
    params = _on(make_params(SHAPES), device)
    opt = ClippedAdamW(params, lr=1e-2, amsgrad=True, backend=backend)
    for k in range(3):
        _grads(params, k)
        opt.step()
    before = copy.deepcopy({i: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
                            for i, p in enumerate(params)})
    weights = [p.detach().clone() for p in params]
    _grads(params, 3)
    params[1].grad[0] = float("nan")
    opt.step()
    assert opt.statistics()[0]["skipped"].item() == 1.0
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), weights[i])
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], before[i][key]), key
    _grads(params, 4)
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 4.0


def test_state_edits_and_params_without_grads():
    """A parameter without a gradient takes no step (as torch.optim.AdamW); replacing a state tensor is seen."""
    params = make_params(SHAPES)
    ours = clone_params(params)
    oracle = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    opt = ClippedAdamW(ours, lr=1e-2, clipping_type="no_clip", backend="reference")
    for k in range(5):
        for ps in (params, ours):
            _grads(ps, k)
            if k % 2:
                ps[2].grad = None
        oracle.step()
        opt.step()
        if k == 2:
            for st_ours, st_torch in ((opt.state[ours[0]], oracle.state[params[0]]),):
                st_ours["exp_avg"] = torch.zeros_like(ours[0])
                st_torch["exp_avg"] = torch.zeros_like(params[0])
    for p, q in zip(ours, params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-5, atol=2e-6)
        assert float(opt.state[p]["step"]) == float(oracle.state[q]["step"])


BAD = [
    (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    (dict(betas=0.9), "betas"),
    (dict(eps=-1e-8), "epsilon"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(lr=-1.0), "learning rate"),
    (dict(amsgrad="yes"), "amsgrad"),
    (dict(clip_point="update"), "clip_point"),
    (dict(clipping_type="agc", agc_eps=-1.0), "agc_eps"),
    (dict(capturable="no"), "capturable"),
]


@pytest.mark.parametrize("kwargs, needle", BAD, ids=[b[1] for b in BAD])
def test_bad_arguments_are_clear_errors(kwargs, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        ClippedAdamW(make_params(SHAPES), backend="reference", **kwargs)


def test_bad_group_added_later_changes_nothing():
    params = make_params(SHAPES)
    opt = ClippedAdamW(params[:2], backend="reference")
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        opt.add_param_group({"params": params[2:], "betas": (0.9, 1.5)})
    assert len(opt.param_groups) == 1


def test_sgd_and_adamw_share_the_clipping_stage():
    """The same clipped gradients feed both optimizers: with lr tiny and one step, AdamW's exp_avg is
    (1 - beta1) times the gradient that ClippedSGD (momentum 0) applies."""
    params = make_params(SHAPES)
    a, b = clone_params(params), clone_params(params)
    sgd = ClippedSGD(a, lr=1.0, clipping_type="layer_wise", clipping_level=0.5, backend="reference")
    adamw = ClippedAdamW(b, lr=0.0, weight_decay=0.0, clipping_type="layer_wise", clipping_level=0.5,
                         backend="reference")
    sgd.step()
    adamw.step()
    for p, q, orig in zip(a, b, params):
        clipped = orig.detach() - p.detach()
        torch.testing.assert_close(adamw.state[q]["exp_avg"], 0.1 * clipped, rtol=1e-5, atol=1e-7)


def test_importable_from_the_original_path():
    from torch_clip_fused.optimizers import ClippedAdamW as again

    assert again is ClippedAdamW


@pytest.mark.parametrize("options", list(itertools.product([False, True], [False, True])))
def test_float64_equals_torch(options):
    """float64 in, float64 arithmetic throughout (C++): torch.optim.AdamW to 1e-12 (clip_grad_norm_'s
    +1e-6 in its coefficient would differ from ours by ~1e-8: no clipping here)."""
    amsgrad, maximize = options
    params = make_params(SHAPES, dtype=torch.float64)
    ours = clone_params(params)
    kw = dict(lr=1e-2, weight_decay=0.01, amsgrad=amsgrad, maximize=maximize)
    _torch_run(params, 6, **kw)
    _ours_run(ours, 6, "cpp", clipping_type="no_clip", **kw)
    for p, q in zip(ours, params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
