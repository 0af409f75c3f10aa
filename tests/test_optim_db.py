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
* torch.amp.GradScaler: same parameters as unscaled gradients on a twin; an inf skips the step.

Oracles are independent of the code under test (torch.optim.SGD, torch.nn.utils.clip_grad_*_,
torch.linalg.vector_norm, closed forms) except where a test is about self-consistency (resume,
round trip).  Triton runs in its interpreter on CPU with shrunk chunks and a subset of inputs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch

from optim_db import (BACKENDS, TRITON_INTERPRETER_SIZES, ErrorOn, device_for, gradients, make_group_params,
                      make_params, optim_db, poison_, set_grads)
from torch_clip_fused import parse_method

STAT_KEYS = {"norm", "threshold", "clipped_fraction", "skipped", "skipped_steps", "step"}

# numpy's overflow / invalid-value warnings from Triton's interpreter on inf and NaN inputs
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def _triton_available() -> bool:
    try:
        import torch_clip_fused.backends.triton.step  # noqa: F401
    except ImportError:
        return False
    return True


def _cases(test: str, kind: str):
    """pytest params (info, backend, case) for ``test``; known library bugs are strict xfails."""
    out = []
    for info in optim_db:
        for backend in BACKENDS:
            if kind == "inputs":
                items = info.optim_inputs_func(backend)
            elif kind == "errors":
                items = info.optim_error_inputs_func(backend)
            elif kind == "apply":
                items = info.apply_cases
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
    for k in range(2):
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
