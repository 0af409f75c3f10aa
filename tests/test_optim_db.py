"""Generic tests over the optimizer database (tests/optim_db.py): every optimizer x backend x input.

* resume: N steps straight = N/2 steps, checkpoint through torch.save / torch.load(weights_only=True),
  a fresh optimizer (another seed) loading it, N/2 more steps (bit-identical);
* state_dict round trip: load_state_dict(state_dict()) changes nothing; a deepcopy'd state dict
  loaded into a fresh optimizer steps identically;
* error inputs: raised at construction or at step() as declared, message matched, nothing
  modified when raised at step();
* non-finite gradients: skip (nothing moves but the counters), raise (nothing moves at all),
  apply (as torch.optim.SGD after torch's clipping / the SSTM recurrences);
* statistics: keys, devices, counts, and the norm, threshold and clipped fraction against closed
  forms, with no host read inside step();
* torch.amp.GradScaler: same parameters as unscaled gradients on a twin; an inf skips the step;
* what PyTorch's generic optimizer tests (test/test_optim.py, run on ClippedSGD / ClippedAdamW by
  tests/torch_optim/) check: copies (deepcopy, pickle) step as the original; per-parameter state as
  torch keeps it; any value in ``state`` through the state-dict hooks; step hooks in torch's order;
  strided parameters; tensor lr and betas; zero gradients and missing gradients change nothing;
  gradients never written; named-parameter state dicts; state dicts without later flags or with a
  number step; param groups with their own settings under LR schedulers, against torch's optimizer.

Oracles are independent of the code under test (torch.optim.SGD, torch.nn.utils.clip_grad_*_,
torch.linalg.vector_norm, closed forms) except where a test is about self-consistency (resume,
round trip).  Triton runs in its interpreter on CPU with shrunk chunks and a subset of inputs.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import math

import pytest
import torch

from optim_db import (BACKENDS, NOT_TRITON, TRITON_INTERPRETER_SIZES, ErrorOn, device_for, gradients,
                      make_group_params, make_params, optim_db, oracle_handles, poison_, set_grads)
from torch_clip_fused import parse_method

STAT_KEYS = {"norm", "threshold", "clipped_fraction", "skipped", "skipped_steps", "spike_skipped", "spike_skipped_steps",
             "step"}

# numpy's overflow / invalid-value warnings from Triton's interpreter on inf and NaN inputs
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def _triton_available() -> bool:
    try:
        import torch_clip_fused.backends.triton.step  # noqa: F401
    except ImportError:
        return False
    return True


def _cases(test: str, kind: str, backends=BACKENDS):
    """pytest params (info, backend, case) for ``test``; known library bugs are strict xfails."""
    out = []
    for info in optim_db:
        for backend in backends:
            if kind == "inputs":
                items = info.optim_inputs_func(backend)
            elif kind == "errors":
                items = info.optim_error_inputs_func(backend)
            elif kind == "apply":
                items = info.apply_cases
            elif kind == "oracle":  # the inputs the apply oracle implements
                items = [i for i in info.optim_inputs_func(backend) if oracle_handles(i.kwargs)]
            else:
                raise ValueError(kind)
            for item in items:
                marks = []
                reason = info.bug(test, backend, item)
                if reason:
                    marks.append(pytest.mark.xfail(strict=True, reason=reason))
                if backend == "triton" and not _triton_available():
                    marks.append(pytest.mark.skip(reason="triton is not installed"))
                out.append(pytest.param(info, backend, item, marks=marks, id=f"{info.name}-{backend}-{item!r}"))
    return out


@pytest.fixture(autouse=True)
def _triton_interpreter_sizes(monkeypatch):
    """Small Triton chunks on CPU (the interpreter is slow), so that a tensor spans chunks."""
    if torch.cuda.is_available() or not _triton_available():
        return
    from torch_clip_fused.backends.triton import step

    for name, value in TRITON_INTERPRETER_SIZES.items():
        monkeypatch.setattr(step, name, value)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def train(params, opt, start: int, steps: int, seed: int = 100) -> None:
    for k in range(start, start + steps):
        set_grads(params, seed + k)
        opt.step()


def clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def assert_bit_identical(a, b, what="tensor"):
    """Same dtype, shape and bits (NaN equal to NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, what
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_params_identical(a, b):
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert_bit_identical(x.detach(), y.detach(), f"parameter {i}")


def assert_same_value(a, b, what="state"):
    """Deep equality of state dicts: tensors bit-identical, everything else ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), what
        assert_bit_identical(a, b, what)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{what}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for key in a:
            assert_same_value(a[key], b[key], f"{what}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_value(x, y, f"{what}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), what
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def assert_statistics_identical(a, b):
    assert len(a) == len(b)
    for ga, gb in zip(a, b):
        assert_same_value(ga, gb, "statistics")


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def assert_nothing_modified(opt, params, before):
    old_params, old_state = before
    assert_params_identical(old_params, params)
    assert_same_value(old_state, opt.state_dict()["state"], "state")


@contextlib.contextmanager
def no_host_reads():
    """Every Python-level read of a tensor's value (what syncs with a CUDA device) raises."""
    def forbidden(self, *args, **kwargs):
        raise AssertionError("a tensor value was read back to the host inside step()")

    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    saved = {name: torch.Tensor.__dict__.get(name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, forbidden)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, value)


# --------------------------------------------------------------------------------------------
# Resume and state_dict round trip (self-consistency)
# --------------------------------------------------------------------------------------------

N_STEPS = 4


@pytest.mark.parametrize("info,backend,inp", _cases("test_resume_is_bit_identical", "inputs"))
def test_resume_is_bit_identical(info, backend, inp):
    straight = make_params(device=device_for(backend))
    opt = info.make(straight, inp.kwargs, backend)
    train(straight, opt, 0, N_STEPS)

    first = make_params(device=device_for(backend))
    opt1 = info.make(first, inp.kwargs, backend)
    train(first, opt1, 0, N_STEPS // 2)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict()}, buffer)
    del opt1, first
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = info.make(resumed, inp.kwargs, backend, seed=999)  # the checkpoint's seed wins
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, N_STEPS // 2, N_STEPS - N_STEPS // 2)

    assert_params_identical(straight, resumed)
    assert_statistics_identical(opt.statistics(), opt2.statistics())
    assert_same_value(opt.state_dict()["state"], opt2.state_dict()["state"])
    assert opt2.statistics()[0]["step"].item() == N_STEPS


@pytest.mark.parametrize("info", optim_db, ids=repr)
def test_randomized_inputs_depend_on_the_seed(info):
    """Each randomized input draws decisions that matter on these gradients (another seed, another
    run), so that resuming into an optimizer of another seed is a real test of the checkpoint's seed."""
    for inp in info.optim_inputs_func("reference"):
        if not parse_method(inp.kwargs.get("clipping_type", "norm")).randomized:
            continue
        runs = []
        for seed in (3, 999):
            params = make_params()
            train(params, info.make(params, inp.kwargs, "reference", seed=seed), 0, N_STEPS)
            runs.append(torch.cat([p.detach().flatten() for p in params]))
        assert not torch.equal(*runs), inp


@pytest.mark.parametrize("info,backend,inp", _cases("test_state_dict_round_trip", "inputs"))
def test_state_dict_round_trip(info, backend, inp):
    """load_state_dict(state_dict()) on the same optimizer changes no state and the run goes on as a
    twin's that never round-tripped; a deepcopy'd state dict loaded into a fresh optimizer (another
    seed) steps identically too."""
    a_params, b_params = make_params(device=device_for(backend)), make_params(device=device_for(backend))
    a, b = info.make(a_params, inp.kwargs, backend), info.make(b_params, inp.kwargs, backend)
    train(a_params, a, 0, 2)
    train(b_params, b, 0, 2)

    before = copy.deepcopy(a.state_dict()["state"])
    a.load_state_dict(a.state_dict())
    assert_same_value(before, a.state_dict()["state"], "state")

    c_params = clone(b_params)
    c = info.make(c_params, inp.kwargs, backend, seed=999)
    c.load_state_dict(copy.deepcopy(b.state_dict()))
    assert_same_value(b.state_dict()["state"], c.state_dict()["state"], "state")

    for params, opt in ((a_params, a), (b_params, b), (c_params, c)):
        train(params, opt, 2, 1)
    assert_params_identical(b_params, a_params)
    assert_params_identical(b_params, c_params)
    assert_statistics_identical(b.statistics(), a.statistics())
    assert_statistics_identical(b.statistics(), c.statistics())
    assert_same_value(b.state_dict()["state"], a.state_dict()["state"])
    assert_same_value(b.state_dict()["state"], c.state_dict()["state"])


@pytest.mark.parametrize("info", optim_db, ids=repr)
def test_state_dict_round_trip_keeps_param_groups(info, request):
    """load_state_dict(state_dict()) leaves the param groups (and the defaults) as they were."""
    reason = info.bug("test_state_dict_round_trip_keeps_param_groups", "reference", None)
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    inp = info.optim_inputs_func("reference")[1]
    params = make_params()
    opt = info.make(params, inp.kwargs, "reference")
    train(params, opt, 0, 1)
    groups, defaults = copy.deepcopy(opt.state_dict()["param_groups"]), dict(opt.defaults)
    opt.load_state_dict(opt.state_dict())
    assert_same_value(groups, opt.state_dict()["param_groups"], "param_groups")
    assert opt.defaults == defaults


# --------------------------------------------------------------------------------------------
# Error inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("info,backend,err", _cases("test_error_inputs", "errors"))
def test_error_inputs(info, backend, err, monkeypatch):
    a, b = make_group_params(device_for(backend))

    def build():
        kwargs = {**info.base_kwargs, **info.error_base_kwargs, "seed": 3, "backend": backend, **err.make_kwargs()}
        params = err.params(a, b) if err.params is not None else [{"params": a}, {"params": b}]
        return info.optim_cls(params, **kwargs)

    expect = pytest.warns if issubclass(err.error_type, Warning) else pytest.raises
    if err.error_on is ErrorOn.CONSTRUCTION:
        with expect(err.error_type, match=err.error_regex):
            build()
        return

    opt = build()
    for k in range(err.good_steps):
        set_grads(a, k)
        set_grads(b, 50 + k)
        opt.step()
    set_grads(a, 2)
    set_grads(b, 52)
    err.setup(opt, a, b, monkeypatch)
    before = snapshot(opt, a + b)
    with expect(err.error_type, match=err.error_regex):
        opt.step()
    assert_nothing_modified(opt, a + b, before)


# --------------------------------------------------------------------------------------------
# Non-finite gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("info,backend,inp", _cases("test_nonfinite_skip", "inputs"))
def test_nonfinite_skip(info, backend, inp):
    """nonfinite="skip": parameters, momentum and every state tensor unchanged, counters advanced;
    the next finite step goes on as if the bad step never came (for non-randomized methods:
    randomized ones draw at the step count, which the skip advances)."""
    kwargs = {**inp.kwargs, "nonfinite": "skip"}
    params = make_params(device=device_for(backend))
    opt = info.make(params, kwargs, backend)
    train(params, opt, 0, 2)
    old_params, old_state = snapshot(opt, params)
    set_grads(params, 102)
    poison_([p.grad for p in params], "both")
    opt.step()

    assert_params_identical(old_params, params)
    new_state = opt.state_dict()["state"]
    assert set(new_state) == set(old_state)
    for index, st in old_state.items():
        assert set(st) == set(new_state[index])
        for key in st:
            if key not in info.counter_keys:
                assert_same_value(st[key], new_state[index][key], f"state[{index}][{key!r}]")
    stats = opt.statistics()[0]
    assert stats["skipped"].item() == 1.0
    assert stats["skipped_steps"].item() == 1
    assert stats["step"].item() == 3
    assert stats["clipped_fraction"].item() == 0.0  # a skipped step clips nothing

    if not parse_method(inp.kwargs.get("clipping_type", "norm")).randomized:
        twin_params = make_params(device=device_for(backend))
        twin = info.make(twin_params, kwargs, backend)
        train(twin_params, twin, 0, 2)
        set_grads(params, 103)
        set_grads(twin_params, 103)
        opt.step()
        twin.step()
        rtol = info.skip_continuation_rtol
        if rtol == 0.0:
            assert_params_identical(twin_params, params)
        else:  # equal up to rounding, for the reason the info gives
            for i, (x, y) in enumerate(zip(twin_params, params)):
                torch.testing.assert_close(y.detach(), x.detach(), rtol=rtol, atol=rtol * x.detach().abs().max().item(),
                                           msg=lambda m: f"parameter {i} ({info.skip_continuation_reason}): {m}")
        assert opt.statistics()[0]["skipped"].item() == 0.0
        for key in ("norm", "threshold", "clipped_fraction"):
            if rtol == 0.0:
                assert_bit_identical(opt.statistics()[0][key], twin.statistics()[0][key], key)
            else:
                torch.testing.assert_close(opt.statistics()[0][key], twin.statistics()[0][key], rtol=rtol, atol=0)


@pytest.mark.parametrize("info,backend,inp", _cases("test_nonfinite_raise", "inputs"))
def test_nonfinite_raise(info, backend, inp):
    """nonfinite="raise": FloatingPointError and nothing modified, counters included: with finite
    gradients again the run equals one that never saw the bad step."""
    kwargs = {**inp.kwargs, "nonfinite": "raise"}
    params = make_params(device=device_for(backend))
    opt = info.make(params, kwargs, backend)
    train(params, opt, 0, 2)
    set_grads(params, 102)
    poison_([p.grad for p in params], "inf")
    before = snapshot(opt, params)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient.*nothing was modified"):
        opt.step()
    assert_nothing_modified(opt, params, before)

    twin_params = make_params(device=device_for(backend))
    twin = info.make(twin_params, kwargs, backend)
    train(twin_params, twin, 0, 2)
    train(params, opt, 3, 1)
    train(twin_params, twin, 3, 1)
    assert_params_identical(twin_params, params)
    assert_statistics_identical(twin.statistics(), opt.statistics())


def _apply_run(info, backend, case, steps):
    """Our parameters and the oracle's after ``steps`` of: two finite steps, one with ``case.poison``
    in the gradients, one finite step again."""
    params0 = make_params(device=device_for(backend))
    grads_per_step = [gradients(params0, 200 + k) for k in range(4)]
    poison_(grads_per_step[2], case.poison)
    grads_per_step = grads_per_step[:steps]
    kwargs = {**case.kwargs, "nonfinite": "apply"}
    params = clone(params0)
    opt = info.make(params, kwargs, backend)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    expected = info.apply_oracle({**info.base_kwargs, **kwargs}, params0, grads_per_step)
    for i, (x, y) in enumerate(zip(params, expected)):
        torch.testing.assert_close(x.detach(), y, rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=lambda m: f"parameter {i}: {m}")
    stats = opt.statistics()[0]
    assert stats["skipped"].item() == 0.0 and stats["skipped_steps"].item() == 0 and stats["step"].item() == steps
    return expected


@pytest.mark.parametrize("info,backend,case", _cases("test_nonfinite_apply_matches_oracle", "apply"))
def test_nonfinite_apply_matches_oracle(info, backend, case):
    """nonfinite="apply": the step is applied as torch would (ClippedSGD: torch.optim.SGD after
    torch.nn.utils' clipping; ClippedSSTM: its recurrences written directly), inf and NaN included."""
    expected = _apply_run(info, backend, case, steps=3)
    assert any(not torch.isfinite(e).all() for e in expected)  # the oracle's step was not finite


@pytest.mark.parametrize("info,backend,case", _cases("test_nonfinite_apply_then_finite_step", "apply"))
def test_nonfinite_apply_then_finite_step(info, backend, case):
    """After an applied non-finite step, a finite step goes on as torch's would (inf stays inf)."""
    _apply_run(info, backend, case, steps=4)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _nearest_rank(values, p: float) -> float:
    """The ceil(p n)-th smallest of ``values`` (AutoClip's quantile), computed in float64."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p * len(ordered))) - 1]


def expected_threshold(info, kwargs, grads_per_step):
    """The threshold stat after these steps (mean over tensors at layer scope) and the per-scope
    thresholds of the last step, from closed forms."""
    method = parse_method(kwargs.get("clipping_type", "norm"))
    if not method.auto:
        eta = info.threshold_oracle({**info.base_kwargs, **kwargs}, len(grads_per_step))
        return eta, None
    keep = kwargs.get("autoclip_history") or len(grads_per_step)
    p = kwargs.get("p_autoclip", 0.75)
    if method.scope.value == "global":
        norms = [torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item() for grads in grads_per_step]
        eta = _nearest_rank(norms[-keep:], p)
        return eta, [eta]
    per_tensor = []
    for i in range(len(grads_per_step[0])):
        norms = [torch.linalg.vector_norm(grads[i]).item() for grads in grads_per_step]
        per_tensor.append(_nearest_rank(norms[-keep:], p))
    return sum(per_tensor) / len(per_tensor), per_tensor


@pytest.mark.parametrize("info,backend,inp", _cases("test_statistics", "inputs"))
def test_statistics(info, backend, inp):
    """Keys and devices; norm = the true global gradient norm; threshold from its closed form
    (clipping_level, B / alpha_k for SSTM, the nearest-rank quantile of past norms for AutoClip);
    clipped fraction exact for non-randomized methods (and only where the norm is above the
    threshold for randomized ones); step / skipped_steps / skipped counts; no host read inside step()."""
    params = make_params(device=device_for(backend))
    opt = info.make(params, inp.kwargs, backend)
    method = parse_method(inp.kwargs.get("clipping_type", "norm"))
    grads_per_step = []
    for k in range(3):
        set_grads(params, 300 + k)
        grads_per_step.append([p.grad.clone() for p in params])
        with no_host_reads():
            opt.step()

    stats = opt.statistics()[0]
    assert set(stats) == STAT_KEYS
    for key, value in stats.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        assert value.device == params[0].device, key
    assert stats["step"].item() == 3 and stats["skipped_steps"].item() == 0 and stats["skipped"].item() == 0.0

    grads = grads_per_step[-1]
    true_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    if inp.kwargs.get("clip_point", "grad") == "grad":  # with "update" the norm is the update's
        torch.testing.assert_close(stats["norm"], true_norm, rtol=1e-5, atol=0)
    eta, per_scope = expected_threshold(info, inp.kwargs, grads_per_step)
    torch.testing.assert_close(stats["threshold"].double().cpu(), torch.tensor(eta, dtype=torch.float64), rtol=1e-5,
                               atol=0)

    if not method.clips:
        above = 0.0
    elif method.scope.value == "global":
        above = float(true_norm.item() > eta)
    elif method.scope.value == "layer":
        etas = per_scope or [eta] * len(grads)
        above = sum(torch.linalg.vector_norm(g).item() > e for g, e in zip(grads, etas)) / len(grads)
    else:
        flat = torch.cat([g.flatten() for g in grads])
        above = (flat.abs() > eta).double().mean().item()
    fraction = stats["clipped_fraction"].item()
    if inp.kwargs.get("clip_point", "grad") == "update":
        pass  # the scales are taken from the update, not the gradient
    elif method.randomized:
        assert fraction <= above + 1e-6
    else:
        assert fraction == pytest.approx(above, abs=1e-6)

    set_grads(params, 303)
    poison_([p.grad for p in params], "nan")
    with no_host_reads():
        opt.step()
    stats = opt.statistics()[0]
    assert stats["step"].item() == 4 and stats["skipped_steps"].item() == 1 and stats["skipped"].item() == 1.0
    set_grads(params, 304)
    opt.step()
    stats = opt.statistics()[0]
    assert stats["step"].item() == 5 and stats["skipped_steps"].item() == 1 and stats["skipped"].item() == 0.0


@pytest.mark.parametrize("info", optim_db, ids=repr)
def test_statistics_on_meta_device_read_nothing_back(info):
    """The reference step on meta tensors, where any read of a value raises: no host sync at all."""
    for inp in info.optim_inputs_func("reference"):
        params = [torch.zeros(p.shape, device="meta", requires_grad=True) for p in make_params()]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = info.make(params, inp.kwargs, "reference")
        opt.step()
        opt.step()
        stats = opt.statistics()[0]
        assert set(stats) == STAT_KEYS and all(v.device.type == "meta" for v in stats.values()), inp


# --------------------------------------------------------------------------------------------
# torch.amp.GradScaler
# --------------------------------------------------------------------------------------------


def _tiny_model(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=gen).to(device).requires_grad_(),
            torch.randn(3, generator=gen).to(device).requires_grad_()]


def _loss(params, k):
    gen = torch.Generator().manual_seed(500 + k)
    x, y = torch.randn(8, 4, generator=gen) * 3, torch.randn(8, 3, generator=gen)
    w, b = params
    x, y = x.to(w.device), y.to(w.device)
    return (x @ w.t() + b - y).pow(2).mean()


@pytest.mark.parametrize("info,backend,inp", _cases("test_grad_scaler_matches_unscaled", "inputs"))
def test_grad_scaler_matches_unscaled(info, backend, inp):
    """scaler.scale(loss).backward(); scaler.step(opt); scaler.update() gives the parameters of plain
    backward() + step() on a twin (power-of-two scales: the unscaled gradients are exact)."""
    device = device_for(backend)
    scaled, plain = _tiny_model(device), _tiny_model(device)
    opt, twin = info.make(scaled, inp.kwargs, backend), info.make(plain, inp.kwargs, backend)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=1)
    for k in range(3):
        opt.zero_grad()
        scaler.scale(_loss(scaled, k)).backward()
        scaler.step(opt)
        scaler.update()
        twin.zero_grad()
        _loss(plain, k).backward()
        twin.step()
    assert scaler.get_scale() == 2.0**15  # no inf found: the scale grew at every step
    for x, y in zip(scaled, plain):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-6, atol=1e-7)
    for key in ("norm", "threshold", "clipped_fraction", "step", "skipped_steps"):
        torch.testing.assert_close(opt.statistics()[0][key], twin.statistics()[0][key], rtol=1e-6, atol=0)


def _found_inf_skips(info, backend, inp, nonfinite):
    device = device_for(backend)
    params = _tiny_model(device)
    opt = info.make(params, {**inp.kwargs, "nonfinite": nonfinite}, backend)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=100)
    opt.zero_grad()
    scaler.scale(_loss(params, 0)).backward()
    scaler.step(opt)
    scaler.update()

    opt.zero_grad()
    scaler.scale(_loss(params, 1)).backward()
    params[0].grad[1, 2] = float("inf")
    old_params, old_state = snapshot(opt, params)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    assert_params_identical(old_params, params)
    new_state = opt.state_dict()["state"]
    for index, st in old_state.items():
        for key in st:
            if key not in info.counter_keys:
                assert_same_value(st[key], new_state[index][key], f"state[{index}][{key!r}]")
    stats = opt.statistics()[0]
    assert stats["skipped"].item() == 1.0 and stats["skipped_steps"].item() == 1 and stats["step"].item() == 2


@pytest.mark.parametrize("info,backend,inp", _cases("test_grad_scaler_found_inf_skips", "inputs"))
def test_grad_scaler_found_inf_skips(info, backend, inp):
    """An inf in the scaled gradients: the scaler backs off and the optimizer skips the step
    (parameters and state untouched, the skip counted)."""
    _found_inf_skips(info, backend, inp, "skip")


@pytest.mark.parametrize("info,backend,inp", _cases("test_grad_scaler_found_inf_skips_under_nonfinite_apply", "inputs"))
def test_grad_scaler_found_inf_skips_under_nonfinite_apply(info, backend, inp):
    """The same with nonfinite="apply": the optimizer does not look for inf itself, the scaler's
    found_inf is what must skip the step."""
    _found_inf_skips(info, backend, inp, "apply")


# --------------------------------------------------------------------------------------------
# What PyTorch's generic optimizer tests check (test/test_optim.py; tests/torch_optim/ runs them on
# ClippedSGD / ClippedAdamW with a never-binding clipping), here on every optimizer, backend and
# input of the database, with binding clipping and torch's optimizers as oracles where they exist.
# --------------------------------------------------------------------------------------------


def _public_attrs(obj):
    return {k for k in obj.__dict__ if not k.startswith("_")}


def _default(info, name):
    """The constructor default of setting ``name`` (inspect.Parameter.empty when there is none)."""
    parameter = inspect.signature(info.optim_cls).parameters.get(name)
    return inspect.Parameter.empty if parameter is None else parameter.default


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("info,backend,inp", _cases("test_copy_steps_as_the_original", "inputs", NOT_TRITON))
def test_copy_steps_as_the_original(info, backend, inp, how):
    """copy.deepcopy(opt), and torch.save(opt) + torch.load(weights_only=False), give an optimizer
    over copies of the parameters that steps bit-identically to the original (its backend and seed
    travel with it) and has the same public attributes (torch's test_deepcopy_copies_all_public_attrs)."""
    params = make_params()
    opt = info.make(params, inp.kwargs, backend)
    train(params, opt, 0, 2)
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    else:
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    assert all(q is not p for q, p in zip(twin_params, params))
    assert _public_attrs(twin) == _public_attrs(opt)
    train(params, opt, 2, 2)
    train(twin_params, twin, 2, 2)
    assert_params_identical(params, twin_params)
    assert_statistics_identical(opt.statistics(), twin.statistics())
    assert_same_value(opt.state_dict()["state"], twin.state_dict()["state"])


@pytest.mark.parametrize("info,backend,inp", _cases("test_per_parameter_state_is_what_torch_keeps", "inputs"))
def test_per_parameter_state_is_what_torch_keeps(info, backend, inp):
    """optimizer.state holds, per parameter that was stepped, a non-empty dict of tensors (torch's
    tools walk it as tensors: test_foreach_matches_forloop, test_fused_matches_forloop; and
    test_non_empty_state); a parameter that never had a gradient has no entry; state_dict()["state"]
    holds tensors only (the group's own state travels in the param groups)."""
    device = device_for(backend)
    params = make_params(device=device)
    idle = torch.zeros(3, device=device, requires_grad=True)  # never gets a gradient
    opt = info.make(params + [idle], inp.kwargs, backend)
    train(params, opt, 0, 2)
    assert idle not in opt.state
    for i, p in enumerate(params):
        st = opt.state.get(p)
        assert st is None or (isinstance(st, dict) and len(st) > 0), f"parameter {i}: empty state"
        for key, value in (st or {}).items():
            assert isinstance(value, torch.Tensor), f"parameter {i}: state[{key!r}] is a {type(value).__name__}"
    for index, st in opt.state_dict()["state"].items():
        assert st and all(isinstance(v, torch.Tensor) for v in st.values()), (index, st)


@pytest.mark.parametrize("info,backend", [(i, b) for i in optim_db for b in NOT_TRITON],
                         ids=lambda x: getattr(x, "name", x))
def test_state_takes_any_value_through_the_state_dict_hooks(info, backend):
    """torch's state-dict hook tests: a pre hook puts ``state["test"] = 1``, a post hook takes it out;
    load pre hooks run in order (prepend first) and their returned dict is used; a load post hook
    puts booleans into ``state``; the optimizer then still saves, loads and steps."""
    inp = info.optim_inputs_func(backend)[1]
    params = make_params()
    opt = info.make(params, inp.kwargs, backend)
    train(params, opt, 0, 1)

    def pre(o):
        o.state["test"] = 1

    def post(o, sd):
        sd["ran_state_dict_pre_hook"] = sd["state"].pop("test", None) == 1
        return sd

    opt.register_state_dict_pre_hook(pre)
    assert opt.state_dict()["state"]["test"] == 1
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["ran_state_dict_pre_hook"] and "test" not in sd["state"]

    def load_pre_lr(o, sd):
        sd["param_groups"][0]["lr"] = 0.002

    def load_pre_copy(o, sd):  # returns a modified copy, which must be the one loaded
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.003
        return sd

    def load_post(o):
        o.state["ran_load_state_dict_pre_hook2"] = o.param_groups[0]["lr"] == 0.003
        o.state["ran_load_state_dict_post_hook"] = True

    opt.register_load_state_dict_pre_hook(load_pre_lr)
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(load_pre_copy, prepend=True)
    opt.register_load_state_dict_post_hook(load_post)
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups[0]["lr"] == 0.002  # the prepended hook ran first, the other overrode it
    assert opt.state["ran_load_state_dict_pre_hook2"] is False and opt.state["ran_load_state_dict_post_hook"] is True
    train(params, opt, 1, 1)
    opt.load_state_dict(opt.state_dict())  # a state holding booleans under string keys
    train(params, opt, 2, 1)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("info,backend", [(i, b) for i in optim_db for b in NOT_TRITON],
                         ids=lambda x: getattr(x, "name", x))
def test_step_hooks_run_in_torchs_order(info, backend):
    """Global pre, local pre, local post, global post hooks, each step; removed handles stop them
    (torch's test_step_pre_hook / test_step_post_hook / test_step_all_hooks)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    params = make_params()
    set_grads(params, 0)
    opt = info.make(params, info.optim_inputs_func(backend)[0].kwargs, backend)
    calls = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append(0)),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append(5))]
    try:
        handles += [opt.register_step_pre_hook(lambda o, a, k: calls.append(1)),
                    opt.register_step_post_hook(lambda o, a, k: calls.append(2))]
        opt.step()
        opt.step()
        assert calls == [0, 1, 2, 5] * 2
    finally:
        for handle in handles:
            handle.remove()
    opt.step()
    assert calls == [0, 1, 2, 5] * 2


def _strided(shapes, seed):
    """Parameters that are strided views (x[..., 0] of an (*shape, 2) tensor), as torch's
    non-contiguous case of test_forloop_goes_right_direction, with the tensors they view."""
    gen = torch.Generator().manual_seed(seed + 10_000)
    bases = [torch.randn(*shape, 2, generator=gen) for shape in shapes]
    return [torch.nn.Parameter(base[..., 0]) for base in bases], bases


@pytest.mark.filterwarnings("ignore:.*is not dense in memory:RuntimeWarning")
@pytest.mark.parametrize("info,backend,inp", _cases("test_strided_parameters_step_as_torch", "oracle",
                                                    ("auto", "reference")))
def test_strided_parameters_step_as_torch(info, backend, inp):
    """Parameters that are not dense in memory (strided views): "auto" and the reference step them
    as the oracle steps contiguous copies (torch's test_forloop_goes_right_direction, contiguous=False),
    writing through the views."""
    params, bases = _strided(SHAPES_2D, 0)
    params0 = [p.detach().contiguous() for p in params]
    grads_per_step = [gradients(params0, 200 + k) for k in range(3)]
    opt = info.make(params, inp.kwargs, backend)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    expected = info.apply_oracle({**info.base_kwargs, **inp.kwargs}, params0, grads_per_step)
    for i, (p, base, e) in enumerate(zip(params, bases, expected)):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6, msg=lambda m: f"parameter {i}: {m}")
        assert_bit_identical(base[..., 0], p.detach(), f"the tensor parameter {i} views")


SHAPES_2D = ((4, 5), (3,), (2, 40))


@pytest.mark.parametrize("info,backend,inp", _cases("test_tensor_lr_steps_as_its_value", "inputs", NOT_TRITON))
def test_tensor_lr_steps_as_its_value(info, backend, inp):
    """A one-element tensor lr of shape (), (1,) or (1, 1) steps as the float it holds, within
    torch's float32 tolerance as in torch's test_tensor_lr (the reference computes lr / (1 - beta1^t)
    in float32 from a tensor lr, in float64 from a float); an optimizer without tensor lr support
    (ClippedSSTM: lr is its a = 1 / lr) refuses it with a clear error."""
    lr = torch.tensor(float({**info.base_kwargs, **inp.kwargs}["lr"]))
    if not info.tensor_lr:
        with pytest.raises((TypeError, ValueError), match=r"Invalid learning rate.*expected a number"):
            info.make(make_params(), {**inp.kwargs, "lr": lr}, backend)
        return
    runs = []
    for value in [lr.item(), lr, lr.reshape(1), lr.reshape(1, 1)]:
        params = make_params()
        opt = info.make(params, {**inp.kwargs, "lr": value}, backend)
        train(params, opt, 0, 3)
        runs.append(params)
    for shape, params in zip(["()", "(1,)", "(1, 1)"], runs[1:]):
        for i, (x, y) in enumerate(zip(runs[0], params)):
            torch.testing.assert_close(y.detach(), x.detach(), msg=lambda m: f"tensor lr of shape {shape}, parameter {i}: {m}")


BETAS_FORMS = {
    "0-d tensors": lambda b1, b2: (torch.tensor(b1), torch.tensor(b2)),
    "one-element tensors of several dims": lambda b1, b2: (torch.tensor([[[b1]]]), torch.tensor([[b2]])),
    "float and tensor": lambda b1, b2: (b1, torch.tensor(b2)),
    "tensor and float": lambda b1, b2: (torch.tensor(b1), b2),
}


@pytest.mark.parametrize("foreach", [None, True])
@pytest.mark.parametrize("form", list(BETAS_FORMS))
@pytest.mark.parametrize("info,backend", [(i, b) for i in optim_db if _default(i, "betas") is not inspect.Parameter.empty
                                          for b in NOT_TRITON], ids=lambda x: getattr(x, "name", x))
def test_tensor_betas_step_as_their_values(info, backend, form, foreach):
    """Tensor betas (0-d or any one-element shape, mixed with a float, with foreach=True) step
    bit-identically to the floats they hold; torch.optim.AdamW accepts 0-d ones, and refuses the
    others for a limit of its foreach implementation that the clipped optimizers do not have."""
    for inp in info.optim_inputs_func(backend):
        b1, b2 = (float(torch.tensor(b)) for b in inp.kwargs.get("betas", _default(info, "betas")))
        floats = make_params()
        train(floats, info.make(floats, {**inp.kwargs, "betas": (b1, b2)}, backend), 0, 3)
        tensors = make_params()
        opt = info.make(tensors, {**inp.kwargs, "betas": BETAS_FORMS[form](b1, b2), "foreach": foreach}, backend)
        train(tensors, opt, 0, 3)
        assert_params_identical(floats, tensors)


def _zero_grad_cases():
    out = []
    for param in _cases("test_zero_grads_are_a_noop", "inputs", NOT_TRITON):
        info, backend, inp = param.values
        if inp.kwargs.get("weight_decay", 0) == 0:  # weight decay moves parameters whatever the gradient
            out.append(param)
    return out


@pytest.mark.parametrize("info,backend,inp", _zero_grad_cases())
def test_zero_grads_are_a_noop(info, backend, inp):
    """Zero gradients without weight decay leave the parameters bit-identical, with no NaN from a
    zero norm, and are not counted as skipped steps (torch's test_step_is_noop_for_zero_grads; a
    nonzero default weight_decay, as AdamW's, is set to 0 as torch does)."""
    kwargs = dict(inp.kwargs)
    if "weight_decay" not in kwargs and _default(info, "weight_decay") not in (0, inspect.Parameter.empty):
        kwargs["weight_decay"] = 0.0
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = info.make(params, kwargs, backend)
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    assert_params_identical(before, params)
    stats = opt.statistics()[0]
    assert stats["skipped_steps"].item() == 0 and stats["clipped_fraction"].item() == 0.0


@pytest.mark.parametrize("info,backend,inp", _cases("test_parameters_without_gradients_are_left_alone", "inputs"))
def test_parameters_without_gradients_are_left_alone(info, backend, inp):
    """step(closure) over parameters that do not require gradients returns the closure's loss and
    changes nothing (torch's test_step_is_noop_when_params_have_no_grad); in a two-group optimizer
    whose second group has no gradients, the first group steps as a one-group optimizer's does and
    the second is untouched, with no state (torch skips parameters whose grad is None)."""
    device = device_for(backend)
    frozen = [p.detach().requires_grad_(False) for p in make_params(device=device)]
    opt = info.make(frozen, inp.kwargs, backend)
    loss = torch.tensor([1.0], device=device)
    assert opt.step(lambda: loss) is loss
    assert len(opt.state) == 0

    a, b = make_params(seed=0, device=device), make_params(seed=1, device=device)
    b0 = [p.detach().clone() for p in b]
    opt = info.make([{"params": a}, {"params": b}], inp.kwargs, backend)
    alone = make_params(seed=0, device=device)
    twin = info.make([{"params": alone}], inp.kwargs, backend)
    train(a, opt, 0, 3)
    train(alone, twin, 0, 3)
    assert_params_identical(alone, a)
    assert_params_identical(b0, b)
    assert not any(p in opt.state for p in b)


@pytest.mark.parametrize("info,backend,inp", _cases("test_gradients_are_never_written", "inputs"))
def test_gradients_are_never_written(info, backend, inp):
    """step() reads the gradients and never writes them: their values and version counters are
    unchanged, whatever the clipping does (torch's test_grads_are_never_inplaced_into)."""
    params = make_params(device=device_for(backend))
    opt = info.make(params, inp.kwargs, backend)
    for k in range(3):
        set_grads(params, 100 + k)
        grads = [p.grad.clone() for p in params]
        versions = [p.grad._version for p in params]
        opt.step()
        for i, (p, g, v) in enumerate(zip(params, grads, versions)):
            assert p.grad._version == v, f"step {k}: the gradient of parameter {i} was written in place"
            assert_bit_identical(g, p.grad, f"step {k}: the gradient of parameter {i}")


@pytest.mark.parametrize("named", [(False, False), (False, True), (True, False), (True, True)],
                         ids=lambda n: "names-{}-{}".format(*n))
@pytest.mark.parametrize("info,backend,inp", _cases("test_state_dict_with_and_without_parameter_names", "inputs",
                                                    NOT_TRITON))
def test_state_dict_with_and_without_parameter_names(info, backend, inp, named):
    """Optimizers built from (name, parameter) pairs or from parameters load each other's state
    dicts and then step identically; the names travel in the param groups; the state dicts are
    equal but for the names; a repeated param group is saved as the original (torch's
    test_state_dict_deterministic and test_can_load_from_to_named_state_dict)."""
    names = [f"name{i}" for i in range(len(SHAPES_2D))]

    def build(params, with_names):
        return info.make(list(zip(names, params)) if with_names else params, inp.kwargs, backend)

    a_params = make_params()
    a = build(a_params, named[0])
    assert type(a).__name__ in repr(a)
    train(a_params, a, 0, 3)
    c_params = clone(a_params)
    c = build(c_params, named[1])
    c.load_state_dict(copy.deepcopy(a.state_dict()))
    train(a_params, a, 3, 2)
    train(c_params, c, 3, 2)
    assert_params_identical(a_params, c_params)

    def without_names(sd):
        sd = copy.deepcopy(sd)
        for group in sd["param_groups"]:
            group.pop("param_names", None)
        return sd

    assert_same_value(without_names(a.state_dict()), without_names(c.state_dict()), "state_dict")
    if named[0] or named[1]:
        assert c.state_dict()["param_groups"][0]["param_names"] == names
    c.param_groups.extend(c.param_groups)
    assert_same_value(without_names(a.state_dict())["param_groups"][-1],
                      without_names(c.state_dict())["param_groups"][-1], "repeated param group")


#: settings torch added after its optimizers' first release (OptimizerInfo.not_og_supported_flags)
LATER_FLAGS = ("foreach", "fused", "differentiable", "maximize", "capturable")


@pytest.mark.parametrize("info,backend,inp", _cases("test_state_dict_without_later_flags_loads", "inputs",
                                                    NOT_TRITON))
def test_state_dict_without_later_flags_loads(info, backend, inp):
    """A state dict whose param groups lack the later flags (foreach, fused, differentiable, maximize,
    capturable) loads and steps (torch's test_can_load_older_state_dict).  A setting missing from a
    saved group keeps the group's current value (ClippedOptimizer.load_state_dict: that is how a
    torch.optim.SGD checkpoint loads; torch fills its constructor default), so the run goes on
    bit-identically."""
    params = make_params()
    opt = info.make(params, inp.kwargs, backend)
    train(params, opt, 0, 2)
    old = copy.deepcopy(opt.state_dict())
    removed = {}
    for group in old["param_groups"]:
        for flag in LATER_FLAGS:
            if flag in group:
                removed[flag] = group.pop(flag)
    twin_params = clone(params)
    twin = info.make(twin_params, inp.kwargs, backend, seed=999)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.load_state_dict(old)
    for flag, value in removed.items():
        assert opt.param_groups[0][flag] == value, flag
    train(params, opt, 2, 2)
    train(twin_params, twin, 2, 2)
    assert_params_identical(twin_params, params)


@pytest.mark.parametrize("info,backend,inp", _cases("test_state_dict_with_a_number_step_loads", "inputs",
                                                    NOT_TRITON))
def test_state_dict_with_a_number_step_loads(info, backend, inp):
    """Per-parameter "step" tensors saved as Python numbers (older torch checkpoints) load, and the
    run goes on bit-identically (torch's test_load_nontensor_step)."""
    params = make_params()
    opt = info.make(params, inp.kwargs, backend)
    train(params, opt, 0, 2)
    sd = copy.deepcopy(opt.state_dict())
    converted = 0
    for st in sd["state"].values():
        if isinstance(st.get("step"), torch.Tensor):
            st["step"] = st["step"].item()
            converted += 1
    if not converted:
        pytest.skip(f"{info.name} keeps no per-parameter step")
    twin_params = clone(params)
    twin = info.make(twin_params, inp.kwargs, backend, seed=999)
    twin.load_state_dict(sd)
    train(params, opt, 2, 2)
    train(twin_params, twin, 2, 2)
    assert_params_identical(params, twin_params)


@pytest.mark.parametrize("info,backend,inp", [p for p in _cases("test_param_groups_and_lr_schedulers_as_torch",
                                                                 "oracle", NOT_TRITON) if p.values[0].torch_twin])
@pytest.mark.parametrize("per_group_norm", [False, True])
def test_param_groups_and_lr_schedulers_as_torch(info, backend, inp, per_group_norm):
    """Two param groups with their own lr and weight_decay, under StepLR and ExponentialLR: the
    parameters follow torch's optimizer with torch's clipping (``norm``: one clip_grad_norm_ over both
    groups, or per group with ``per_group_norm=True``), under the same schedulers (torch's
    test_param_groups_lr, test_param_groups_weight_decay and
    test_param_group_with_lrscheduler_goes_right_direction, against an oracle)."""
    from torch.optim.lr_scheduler import ExponentialLR, StepLR

    base = {**info.base_kwargs, **inp.kwargs}
    second = {**base, "lr": 0.5 * float(base["lr"]), "weight_decay": 0.05}
    a, b = make_params(seed=0), make_params(seed=1)
    twin = info.torch_twin([(a, base), (b, second)], per_group_norm=per_group_norm)
    opt = info.make([{"params": a}, {"params": b, "lr": second["lr"], "weight_decay": 0.05}],
                    {**inp.kwargs, "per_group_norm": per_group_norm}, backend)
    schedulers = [[StepLR(o, step_size=2, gamma=0.5), ExponentialLR(o, gamma=0.9)] for o in (opt, twin.optimizer)]
    for k in range(5):
        grads = [gradients(a, 300 + k), gradients(b, 400 + k)]
        for params, group_grads in zip((a, b), grads):
            for p, g in zip(params, group_grads):
                p.grad = g.clone()
        opt.step()
        twin.step(grads)
        for scheduler in schedulers[0] + schedulers[1]:
            scheduler.step()
    for params, expected in zip((a, b), twin.params):
        for i, (x, y) in enumerate(zip(params, expected)):
            torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"parameter {i}: {m}")
