"""Drop-in torch.optim behaviour of the optimizers' state (issue 18, items 1, 2, 8, 10, 11, 12):
copies and pickles that step as the original, per-parameter state as torch keeps it, checkpoints and
gradients validated before anything moves, state that no longer fits its parameter.

Oracles: torch.optim.SGD / AdamW (same settings, no clipping) and the uncopied optimizer itself
stepped on the same gradients."""

import copy
import io

import pytest
import torch

from torch_clip_fused import ClippedAdamW, ClippedSGD, ClippedSSTM

BACKENDS = ("reference", "cpp")
MAKERS = {
    "sgd": lambda params, backend, **kw: ClippedSGD(params, lr=0.1, momentum=0.9, clipping_type="auto_clip",
                                                    backend=backend, **kw),
    "adamw": lambda params, backend, **kw: ClippedAdamW(params, lr=0.01, clipping_type="zclip", zclip_warmup=2,
                                                        backend=backend, **kw),
    "sstm": lambda params, backend, **kw: ClippedSSTM(params, lr=0.1, L=10.0, clipping_type="norm",
                                                      backend=backend, **kw),
}


def _model_params(seed=0, shapes=((4, 5), (5,), (3, 4))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 3


def _two_groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.05}]


def _run(opt, params, steps, start=0):
    for s in range(start, start + steps):
        _grads(params, s)
        opt.step()


# --- item 1: deepcopy and pickling ---------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copy_steps_exactly_as_the_original(kind, backend, how):
    params = _model_params()
    opt = MAKERS[kind](_two_groups(params), backend, seed=123)
    _run(opt, params, 3)
    if how == "deepcopy":
        copied_params, copied = copy.deepcopy((params, opt))
    else:
        buffer = io.BytesIO()
        torch.save((params, opt), buffer)
        buffer.seek(0)
        copied_params, copied = torch.load(buffer, weights_only=False)
    assert copied.backend == opt.backend and copied.seed == opt.seed == 123
    _run(opt, params, 3, start=3)
    _run(copied, copied_params, 3, start=3)
    for a, b in zip(params, copied_params):
        assert torch.equal(a, b)
    for a, b in zip(opt.statistics(), copied.statistics()):
        assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}


def test_copy_of_an_optimizer_with_a_group_added_later_keeps_the_seed():
    params = _model_params()
    opt = ClippedSGD(params[:2], lr=0.1, clipping_type="linear_rand_norm", clipping_level=0.1, seed=7)
    copied = copy.deepcopy(opt)
    extra = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra]})
    extra_copy = torch.nn.Parameter(torch.ones(3))
    copied.add_param_group({"params": [extra_copy]})
    for p in (extra, extra_copy):
        p.grad = torch.full((3,), 5.0)
    for p, q in zip(params[:2], copied.param_groups[0]["params"]):
        p.grad = torch.ones_like(p) * 4
        q.grad = torch.ones_like(q) * 4
    opt.step()
    copied.step()
    assert torch.equal(extra, extra_copy)


# --- item 10: per-parameter state holds what torch keeps -----------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_per_parameter_state_is_what_torch_sgd_keeps(backend):
    for momentum in (0.0, 0.9):
        params, ref_params = _model_params(), _model_params()
        opt = ClippedSGD(_two_groups(params), lr=0.1, momentum=momentum, clipping_type="norm", backend=backend)
        ref = torch.optim.SGD(_two_groups(ref_params), lr=0.1, momentum=momentum)
        for o, ps in ((opt, params), (ref, ref_params)):
            _run(o, ps, 2)
        assert len(opt.state) == len(ref.state)
        for p, q in zip(params, ref_params):
            if q in ref.state:
                assert set(opt.state[p]) == set(ref.state[q])
                assert all(isinstance(v, torch.Tensor) for v in opt.state[p].values())
            else:
                assert p not in opt.state
        assert set(opt.state_dict()["state"]) == set(ref.state_dict()["state"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_parameter_state_is_what_torch_adamw_keeps(backend):
    params, ref_params = _model_params(), _model_params()
    opt = ClippedAdamW(_two_groups(params), lr=0.01, amsgrad=True, clipping_type="norm", backend=backend)
    ref = torch.optim.AdamW(_two_groups(ref_params), lr=0.01, amsgrad=True)
    for o, ps in ((opt, params), (ref, ref_params)):
        _run(o, ps, 2)
    for p, q in zip(params, ref_params):
        assert set(opt.state[p]) == set(ref.state[q])
        assert all(isinstance(v, torch.Tensor) for v in opt.state[p].values())


def test_group_state_lives_in_the_param_group_and_round_trips_weights_only():
    params = _model_params()
    opt = ClippedSGD(_two_groups(params), lr=0.1, momentum=0.9, clipping_type="auto_clip", seed=5,
                     backend="reference")
    _run(opt, params, 3)
    for index, group in enumerate(opt.param_groups):
        assert int(group["clip_state"]["clip_step"]) == 3
        assert "clip_step" not in opt.state[group["params"][0]]
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)  # weights_only=True
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = ClippedSGD(_two_groups(params2), lr=0.1, momentum=0.9, clipping_type="auto_clip", seed=99,
                      backend="reference")
    opt2.load_state_dict(saved)
    assert opt2.backend == "reference" and opt2.seed == 99  # loading a checkpoint keeps the optimizer's own
    _run(opt, params, 2, start=3)
    _run(opt2, params2, 2, start=3)
    for a, b in zip(params, params2):
        assert torch.equal(a, b)


def test_a_checkpoint_with_group_state_in_the_first_parameter_still_loads():
    """Checkpoints written before the group state moved into the param group."""
    params = _model_params()
    opt = ClippedSGD(_two_groups(params), lr=0.1, momentum=0.9, clipping_type="auto_clip", seed=5)
    _run(opt, params, 3)
    saved = copy.deepcopy(opt.state_dict())
    ids = [group["params"] for group in saved["param_groups"]]
    for group, pids in zip(saved["param_groups"], ids):  # the former layout
        saved["state"].setdefault(pids[0], {}).update(group.pop("clip_state"))
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = ClippedSGD(_two_groups(params2), lr=0.1, momentum=0.9, clipping_type="auto_clip", seed=99)
    opt2.load_state_dict(saved)
    assert all(not any(str(k).startswith("clip_") for k in opt2.state[p]) for p in params2)
    _run(opt, params, 2, start=3)
    _run(opt2, params2, 2, start=3)
    for a, b in zip(params, params2):
        assert torch.equal(a, b)


# --- item 8: any value in optimizer.state ---------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_state_takes_any_value_as_torch_does(kind):
    params = _model_params()
    opt = MAKERS[kind](params, "reference")
    _run(opt, params, 1)
    opt.state["test_key"] = 1
    assert opt.state["test_key"] == 1
    saved = opt.state_dict()
    assert saved["state"]["test_key"] == 1
    _run(opt, params, 1, start=1)
    del opt.state["test_key"]
    _run(opt, params, 1, start=2)


# --- item 2: checkpoints and gradients that do not fit, before anything moves --------------------

def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _unchanged(before, opt, params):
    for a, b in zip(before[0], params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind,key", [("sgd", "momentum_buffer"), ("adamw", "exp_avg"), ("adamw", "exp_avg_sq"),
                                      ("sstm", "sstm_y")])
def test_a_state_tensor_of_another_shape_is_refused_at_load(kind, key):
    params = _model_params()
    opt = MAKERS[kind](_two_groups(params), "reference")
    _run(opt, params, 1)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0][key] = torch.zeros(1, 5)  # parameter 0 of group 0 is (4, 5)
    fresh = MAKERS[kind](_two_groups(_model_params()), "reference")
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=rf"param group 0.*parameter 0.*{key}.*\(1, 5\).*\(4, 5\)"):
        fresh.load_state_dict(saved)
    assert repr(fresh.state_dict()) == repr(before)


def test_a_state_tensor_of_another_shape_names_the_parameter():
    model = torch.nn.Linear(5, 4)
    opt = ClippedSGD(model.named_parameters(), lr=0.1, momentum=0.9, backend="reference")
    model(torch.randn(2, 5)).sum().backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][1]["momentum_buffer"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"param group 0.*parameter 1 \('bias'\).*momentum_buffer.*\(3,\).*\(4,\)"):
        opt.load_state_dict(saved)


def test_a_non_float_state_tensor_is_refused_at_load():
    params = _model_params()
    opt = ClippedSGD(params, lr=0.1, momentum=0.9, backend="reference")
    _run(opt, params, 1)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][2]["momentum_buffer"] = torch.zeros(3, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"param group 0.*parameter 2.*momentum_buffer.*torch.int64"):
        opt.load_state_dict(saved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_gradient_of_another_shape_in_group_1_moves_no_group(kind, backend):
    params = _model_params()
    opt = MAKERS[kind](_two_groups(params), backend)
    _run(opt, params, 1)
    _grads(params, 1)
    params[2].data = torch.zeros(4, 3)  # the gradient (3, 4) no longer fits
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"param group 1.*parameter 0.*gradient.*\(3, 4\).*\(4, 3\)"):
        opt.step()
    _unchanged(before, opt, params)


# --- item 12: momentum buffers that no longer fit their parameter --------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_cast_mid_run_steps_as_torch_sgd(backend, dtype):
    model, ref_model = torch.nn.Linear(5, 4), torch.nn.Linear(5, 4)
    ref_model.load_state_dict(model.state_dict())
    opt = ClippedSGD(model.parameters(), lr=0.1, momentum=0.9, clipping_type="no_clip", backend=backend)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 5)
    for step in range(4):
        if step == 2:
            model.to(dtype)
            ref_model.to(dtype)
            for st in ref.state.values():
                st["momentum_buffer"] = st["momentum_buffer"].to(dtype)  # torch keeps no cast; its foreach needs one
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            m(x.to(m.weight.dtype)).square().sum().backward()
            o.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert a.dtype == dtype
        # bfloat16: the update is computed in float32 and rounded once (docs/spec.md section 1), torch
        # rounds each of its bfloat16 operations: a few ulps apart
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(a, b, **tol)
    assert all(opt.state[p]["momentum_buffer"].dtype == dtype for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,key", [("sgd", "momentum_buffer"), ("adamw", "exp_avg"), ("sstm", "sstm_y"),
                                      ("sstm", "sstm_z")])
def test_a_state_tensor_of_another_shape_at_step_is_a_clear_error_before_any_group_moves(kind, key, backend):
    params = _model_params()
    opt = MAKERS[kind](_two_groups(params), backend)
    _run(opt, params, 1)
    opt.state[params[2]][key] = torch.zeros(4, 3)
    _grads(params, 1)
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=rf"param group 1.*parameter 0.*{key}.*\(4, 3\).*\(3, 4\)"):
        opt.step()
    _unchanged(before, opt, params)


# --- item 11: backend="auto" steps a parameter that is not dense --------------------------------

@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_auto_steps_a_strided_view_as_torch_does(kind):
    base = torch.randn(6, 8)
    ref_base = base.clone()
    p = torch.nn.Parameter(base[:, ::2])  # not dense in memory
    q = torch.nn.Parameter(ref_base[:, ::2])
    assert not p.is_contiguous()
    if kind == "sgd":
        opt = ClippedSGD([p], lr=0.1, momentum=0.9, clipping_type="no_clip", backend="auto")
        ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    else:
        opt = ClippedAdamW([p], lr=0.1, clipping_type="no_clip", backend="auto")
        ref = torch.optim.AdamW([q], lr=0.1)
    for step in range(3):
        g = torch.randn(6, 4)
        p.grad, q.grad = g.clone(), g.clone()
        with pytest.warns(RuntimeWarning, match="not dense") if step == 0 else _no_warning():
            opt.step()
        ref.step()
    torch.testing.assert_close(p, q)


class _no_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_a_duplicate_named_parameter_is_refused():
    model = torch.nn.Linear(3, 2)
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match=r"parameter 2 of param group 0 is the same tensor as parameter 0"):
        ClippedSGD(named + [("again", model.weight)], lr=0.1)


def test_setting_backend_after_a_step_takes_effect():
    params = _model_params()
    opt = ClippedSGD(params, lr=0.1, clipping_type="norm", backend="cpp")
    _run(opt, params, 1)
    calls = []

    def spy(tensors, cfg):
        calls.append(cfg)

    opt.backend = spy
    _run(opt, params, 1, start=1)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="Invalid backend: 'gpu'"):
        opt.backend = "gpu"


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_sstm_after_a_model_cast_mid_run_equals_the_reference(backend):
    """y and z are cast with the model, and a z replaced in the state is used: a fused backend's cached
    plan must follow the new z."""
    if backend == "triton":
        pytest.importorskip("triton")
    runs = []
    for name in ("reference", backend):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 4)
        opt = ClippedSSTM(model.parameters(), lr=0.1, L=10.0, clipping_type="norm", backend=name)
        x = torch.randn(8, 5)
        for step in range(4):
            if step == 2:
                model.to(torch.bfloat16)
            if step == 3:  # a new z tensor under an unchanged layout (a user's edit of the state)
                for p in model.parameters():
                    opt.state[p]["sstm_z"] = opt.state[p]["sstm_z"].clone()
            opt.zero_grad()
            model(x.to(model.weight.dtype)).square().sum().backward()
            opt.step()
        assert all(opt.state[p]["sstm_z"].dtype == torch.bfloat16 for p in model.parameters())
        runs.append([p.detach().float() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("cls,torch_cls,setting,before,after", [
    (ClippedSGD, torch.optim.SGD, "momentum", 0.0, 0.9),
    (ClippedSGD, torch.optim.SGD, "momentum", 0.9, 0.0),
], ids=["SGD-momentum-on", "SGD-momentum-off"])
def test_an_update_setting_switched_mid_run_keeps_the_state_torch_keeps(cls, torch_cls, setting, before, after,
                                                                        backend):
    """momentum switched on or off between steps, as torch.optim.SGD allows: the rule's state
    (update_rules.py) is collected again, so the run follows torch's optimizer (no clipping here).
    (torch.optim.AdamW does not take amsgrad switched on mid-run: KeyError 'max_exp_avg_sq'.)"""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    opt = cls(ours, lr=0.1, clipping_type="no_clip", backend=backend, **{setting: before})
    ref = torch_cls(theirs, lr=0.1, foreach=False, **{setting: before})
    for k in range(6):
        if k == 3:
            opt.param_groups[0][setting] = after
            ref.param_groups[0][setting] = after
        grads = [torch.randn(x.shape, generator=gen) for x in init]
        for ps in (ours, theirs):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
