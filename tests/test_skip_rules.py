"""Skip rules (skips/; issue 21 item 1): ``skip_if_norm_above`` and ``skip_if_zscore_above`` skip the whole
step on the device.  Oracles: closed forms (which steps a norm sequence with injected spikes skips,
computed here in Python floats), ``clip_grad_norm_`` + the torch optimizer on the steps that are taken,
and "a skipped step is a step that never happened" (the same optimizer run on the sequence without the
spikes); on every backend, under the no-host-reads check."""

import copy
import math

import pytest
import torch
import torch.distributed as dist

from conftest import heavy_tailed
from test_optim_db import no_host_reads

import torch_clip_fused as tcf
from torch_clip_fused import ClippedAdamW, ClippedSGD, clip_gradients_

BACKENDS = ["reference", "cpp", "triton"]
SHAPES = [(6, 5), (5,), (4, 6)]
STEPS = 24
SPIKES = (6, 13, 19)  # steps whose gradients are 60 times larger
LEVEL = 1.0


def _grads(k):
    gen = torch.Generator().manual_seed(500 + k)
    return [heavy_tailed(s, gen) * (60.0 if k in SPIKES else 0.3) for s in SHAPES]


def _start():
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _norm(grads):
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads))


def _optimizer(kind, params, backend, **kw):
    if kind == "sgd":
        return ClippedSGD(params, lr=0.05, momentum=0.9, backend=backend, seed=3, **kw)
    return ClippedAdamW(params, lr=0.01, backend=backend, seed=3, **kw)


def _run(kind, backend, steps, grads_of, check_sync=True, **kw):
    """Parameters after ``steps``, and per step (moved, spike_skipped flag)."""
    params = [torch.nn.Parameter(x.clone()) for x in _start()]
    opt = _optimizer(kind, params, backend, **kw)
    trace = []
    for k in steps:
        for p, g in zip(params, grads_of(k)):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        if check_sync and k > 0:  # (the first step builds layouts and state, reading settings once)
            with no_host_reads():
                opt.step()
        else:
            opt.step()
        moved = any(not torch.equal(b, p.detach()) for b, p in zip(before, params))
        trace.append((moved, float(opt.statistics()[0]["spike_skipped"])))
    return params, opt, trace


def _torch_oracle(kind, skipped):
    """clip_grad_norm_ + the torch optimizer on the steps that are not skipped."""
    params = [torch.nn.Parameter(x.clone()) for x in _start()]
    opt = (torch.optim.SGD(params, lr=0.05, momentum=0.9) if kind == "sgd" else torch.optim.AdamW(params, lr=0.01))
    for k in range(STEPS):
        if k in skipped:
            continue
        for p, g in zip(params, _grads(k)):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, LEVEL)
        opt.step()
    return params


def _closed_form_zscore(norms, z_above, alpha, warmup):
    """The steps skip_if_zscore_above skips (skips/zscore_above.py's docstring, in Python floats)."""
    w, records, mean, var, skipped = max(warmup, 1), [], None, None, set()
    for k, n in enumerate(norms):
        if not math.isfinite(n):  # a non-finite step: skipped by the non-finite policy, recorded nowhere
            continue
        if mean is not None and (n - mean) / (math.sqrt(var) + 1e-6) > z_above:
            skipped.add(k)
            continue
        if mean is None:
            records.append(n)
            if len(records) == w:
                mean = sum(records) / w
                var = sum((x - mean) ** 2 for x in records) / w
        else:
            mean = alpha * mean + (1 - alpha) * n
            var = alpha * var + (1 - alpha) * (n - mean) ** 2
    return skipped


NORMS = [_norm(_grads(k)) for k in range(STEPS)]


@pytest.mark.parametrize("kind,backend", [(k, b) for k in ("sgd", "adamw") for b in ("reference", "cpp")]
                         + [("adamw", "triton")])  # (the interpreter is slow: one Triton case)
def test_norm_above_skips_the_spikes_and_equals_torch_on_the_rest(kind, backend):
    threshold = 50.0
    skipped = {k for k, n in enumerate(NORMS) if n > threshold}
    assert skipped == set(SPIKES)  # the injected spikes, and only they, are above it
    params, opt, trace = _run(kind, backend, range(STEPS), _grads, clipping_level=LEVEL,
                              skip_if_norm_above=threshold)
    assert [k for k, (moved, _) in enumerate(trace) if not moved] == sorted(skipped)
    assert [k for k, (_, spike) in enumerate(trace) if spike] == sorted(skipped)
    stats = opt.statistics()[0]
    assert int(stats["spike_skipped_steps"]) == len(skipped) and int(stats["skipped_steps"]) == 0
    assert int(stats["step"]) == STEPS
    for p, e in zip(params, _torch_oracle(kind, skipped)):
        torch.testing.assert_close(p.detach(), e.detach(), rtol=1e-5, atol=1e-6)
    if kind == "adamw":  # a skipped step leaves the AdamW step counts as they were
        assert all(float(opt.state[p]["step"]) == STEPS - len(skipped) for p in params)


@pytest.mark.parametrize("method,backend", [(m, b) for m in ("no_clip", "auto_clip", "zclip", "layer_wise",
                                                               "coordinate_wise") for b in ("reference", "cpp")]
                         + [("auto_clip", "triton"), ("zclip", "triton")])
def test_a_skipped_step_is_a_step_that_never_happened(method, backend):
    """Every method's threshold state (AutoClip history, ZClip EMAs), momentum and parameters: skipping the
    spikes gives what the same optimizer gives on the sequence without them (a rule that never fires
    puts both runs on the same two-stage path: bit for bit)."""
    kw = dict(clipping_type=method, zclip_warmup=3)
    taken = [k for k in range(STEPS) if k not in SPIKES]
    with_spikes, opt_a, _ = _run("sgd", backend, range(STEPS), _grads, skip_if_norm_above=50.0, **kw)
    without, opt_b, _ = _run("sgd", backend, taken, _grads, skip_if_norm_above=1e30, **kw)
    for a, b in zip(with_spikes, without):
        assert torch.equal(a.detach(), b.detach())
    state_a, state_b = opt_a.param_groups[0]["clip_state"], opt_b.param_groups[0]["clip_state"]
    for key, value in state_b.items():
        if key.startswith(("clip_count", "clip_zclip")):
            assert torch.equal(state_a[key], value), key
        if key.startswith("clip_history") and isinstance(value, torch.Tensor):  # the records (capacity may differ)
            count = int(state_b[key.replace("history", "count")].max())
            assert torch.equal(state_a[key][:count], value[:count]), key
    if method in ("auto_clip", "zclip"):
        assert any(key.startswith(("clip_count", "clip_zclip_count")) for key in state_b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zscore_rule_skips_what_the_closed_form_skips(backend):
    z, alpha, warmup = 3.0, 0.9, 4
    expected = _closed_form_zscore(NORMS, z, alpha, warmup)
    assert expected == set(SPIKES)
    params, opt, trace = _run("adamw", backend, range(STEPS), _grads, clipping_type="auto_clip",
                              skip_if_zscore_above=z, skip_zscore_alpha=alpha, skip_zscore_warmup=warmup)
    assert {k for k, (_, spike) in enumerate(trace) if spike} == expected
    state = opt.param_groups[0]["clip_state"]
    # the EMAs took the norms of the steps taken only
    taken = [n for k, n in enumerate(NORMS) if k not in expected]
    mean, var = sum(taken[:warmup]) / warmup, None
    var = sum((x - mean) ** 2 for x in taken[:warmup]) / warmup
    for n in taken[warmup:]:
        mean = alpha * mean + (1 - alpha) * n
        var = alpha * var + (1 - alpha) * (n - mean) ** 2
    assert float(state["clip_skip_zscore"][0, 0]) == pytest.approx(mean, rel=1e-6)
    assert float(state["clip_skip_zscore"][1, 0]) == pytest.approx(var, rel=1e-5)
    assert int(state["clip_skip_zscore_count"][0]) == warmup


def test_zscore_spike_early_in_warmup_is_not_skipped_and_a_nonfinite_step_is_not_a_spike():
    grads = lambda k: [g * (float("nan") if k == 8 else 1.0) for g in _grads(k)]  # noqa: E731
    params, opt, trace = _run("sgd", "reference", range(STEPS), grads, check_sync=False,
                              skip_if_zscore_above=3.0, skip_zscore_warmup=10)
    # step 6's spike falls in the warm-up (10 norms): taken; step 8's NaN: a non-finite skip, not a spike
    assert trace[6] == (True, 0.0) and trace[8] == (False, 0.0)
    stats = opt.statistics()[0]
    assert int(stats["skipped_steps"]) == 1
    expected = _closed_form_zscore([math.nan if k == 8 else n for k, n in enumerate(NORMS)], 3.0, 0.97, 10)
    assert 6 not in expected and expected  # (a spike in the warm-up raises the variance: fewer spikes after)
    assert {k for k, (_, spike) in enumerate(trace) if spike} == expected
    assert int(stats["spike_skipped_steps"]) == len(expected)
    assert int(opt.param_groups[0]["clip_state"]["clip_skip_zscore_count"][0]) == 10  # the NaN recorded nothing


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_the_model_norm_spans_every_param_group(backend):
    """Two groups (one layer-wise, one global, per_group_norm=True): the rule reads the norm over both."""
    params = [torch.nn.Parameter(x.clone()) for x in _start()]
    opt = ClippedSGD([dict(params=params[:2], clipping_type="layer_wise"), dict(params=params[2:])], lr=0.1,
                     backend=backend, per_group_norm=True, skip_if_norm_above=1.0)
    grads = [torch.full(s, 0.1) for s in SHAPES]  # ||g|| = 0.1 sqrt(30 + 5 + 24) > 0.77 only over both groups
    assert _norm(grads[:2]) < 1.0 and _norm(grads[2:]) < 1.0 and _norm(grads) < 1.0
    for scale, skipped in ((1.0, 0), (1.4, 1)):  # 0.1 * 1.4 * sqrt(59) = 1.08 > 1
        for p, g in zip(params, grads):
            p.grad = g * scale
        before = [p.detach().clone() for p in params]
        opt.step()
        assert [int(s["spike_skipped_steps"]) for s in opt.statistics()] == [skipped, skipped]
        assert all(torch.equal(b, p.detach()) == bool(skipped) for b, p in zip(before, params))


def test_resume_mid_run_is_bit_identical():
    kw = dict(clipping_type="zclip", zclip_warmup=3, skip_if_zscore_above=2.5, skip_zscore_warmup=4,
              skip_if_norm_above=200.0)
    full, _, trace = _run("adamw", "cpp", range(STEPS), _grads, **kw)
    assert any(spike for _, spike in trace)
    params = [torch.nn.Parameter(x.clone()) for x in _start()]
    opt = _optimizer("adamw", params, "cpp", **kw)
    for k in range(STEPS):
        if k == 10:  # save, then load into a fresh optimizer over fresh parameters
            saved = copy.deepcopy(opt.state_dict())
            values = [p.detach().clone() for p in params]
            params = [torch.nn.Parameter(v) for v in values]
            opt = _optimizer("adamw", params, "cpp", **kw)
            opt.load_state_dict(saved)
            assert "clip_skip_zscore" in opt.param_groups[0]["clip_state"]
        for p, g in zip(params, _grads(k)):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(full, params):
        assert torch.equal(a.detach(), b.detach())


def test_bad_settings_are_clear_errors_before_anything_moves():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"Invalid skip_if_norm_above value: -1.0; expected None or skip_if_norm_above >= 0"):
        ClippedSGD([p], skip_if_norm_above=-1.0)
    with pytest.raises(TypeError, match=r"Invalid skip_if_zscore_above value: 'high'; expected a number"):
        ClippedAdamW([p], skip_if_zscore_above="high")
    with pytest.raises(ValueError, match=r"skip_zscore_alpha.*0 < skip_zscore_alpha < 1"):
        ClippedSGD([p], skip_if_zscore_above=3.0, skip_zscore_alpha=1.0)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'skip_if_norm_abov'"):
        ClippedSGD([p], skip_if_norm_abov=3.0)
    q = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"param groups 0 and 1 differ in skip_if_norm_above: 5.0 and None"):
        ClippedSGD([dict(params=[p], skip_if_norm_above=5.0), dict(params=[q])], lr=0.1)
    opt = ClippedSGD([dict(params=[p]), dict(params=[q])], lr=0.1, skip_if_norm_above=5.0)
    opt.param_groups[1]["skip_if_norm_above"] = 6.0  # changed between steps: checked at the next step
    p.grad, q.grad = torch.ones(3), torch.ones(2)
    with pytest.raises(ValueError, match=r"param groups 0 and 1 differ in skip_if_norm_above: 5.0 and 6.0"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and torch.equal(q.detach(), torch.ones(2))


def test_corrupt_rule_state_in_a_checkpoint_is_refused():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ClippedSGD([p], lr=0.1, skip_if_zscore_above=3.0, backend="reference")
    p.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["clip_state"]["clip_skip_zscore"] = torch.zeros(27, 1)  # float32, not float64
    with pytest.raises(ValueError, match=r"param group 0: state key 'clip_skip_zscore' has dtype torch.float32"):
        ClippedSGD([p], lr=0.1, skip_if_zscore_above=3.0).load_state_dict(bad)
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["clip_state"]["clip_skip_zscore_count"] = torch.tensor([-2])
    with pytest.raises(ValueError, match=r"'clip_skip_zscore_count' holds a negative value"):
        ClippedSGD([p], lr=0.1, skip_if_zscore_above=3.0).load_state_dict(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_gradients_zeroes_a_skipped_call_and_records_nothing(backend):
    params = [torch.nn.Parameter(x.clone()) for x in _start()]
    state, seen = {}, []
    for k in range(8):
        grads = _grads(k)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        count_before = state["clip_count_global"].clone() if "clip_count_global" in state else None
        total, _ = clip_gradients_(params, "auto_clip", state=state, backend=backend, skip_if_norm_above=50.0)
        assert float(total) == pytest.approx(NORMS[k], rel=1e-5)  # the norm before the call
        if k in SPIKES:
            assert all(torch.equal(p.grad, torch.zeros_like(p.grad)) for p in params)
            assert torch.equal(state["clip_count_global"], count_before)  # the AutoClip history took nothing
        else:
            expected = [g * min(1.0, float(state["clip_stats"][1]) / NORMS[k]) for g in grads]
            for p, e in zip(params, expected):
                torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
        seen.append(float(state["clip_spike"]))
    assert seen == [float(k in SPIKES) for k in range(8)]
    assert int(state["clip_spike_skipped"]) == 1 and int(state["clip_count_global"][0]) == 7
    with pytest.raises(ValueError, match="skip_if_zscore_above keeps EMAs of the norm between calls"):
        clip_gradients_(params, skip_if_zscore_above=3.0)


def test_rules_are_registered_plugins():
    assert [r.switch for r in tcf.skips.RULES] == ["skip_if_norm_above", "skip_if_zscore_above"]
    assert set(tcf.skips.SKIP_SETTINGS) == {"skip_if_norm_above", "skip_if_zscore_above", "skip_zscore_alpha",
                                            "skip_zscore_warmup"}


# ------------------------------------------------------------------------------------------------
# every rank skips together: a pipeline norm_group (a spike on one stage) and FSDP2 (a spike in one shard)
# ------------------------------------------------------------------------------------------------


def _distributed_worker(rank, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from test_distributed import _finish, _init

    _init(rank, tmp)
    out = {}
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    # pipeline: rank r holds tensor r; rank 1's gradient spikes in step 1
    params = [torch.nn.Parameter(_start()[rank].clone())]
    opt = ClippedSGD(params, lr=0.1, momentum=0.9, norm_group=mesh, backend="cpp", skip_if_norm_above=50.0)
    moved = []
    for k in range(3):
        params[0].grad = _grads(k)[rank].clone() * (100.0 if (k == 1 and rank == 1) else 1.0)
        before = params[0].detach().clone()
        opt.step()
        moved.append(not torch.equal(before, params[0].detach()))
    out["pipeline"] = dict(moved=moved, spikes=int(opt.statistics()[0]["spike_skipped_steps"]))
    # stages that differ in their param groups and methods still meet in one collective of one size
    params = [torch.nn.Parameter(x.clone()) for x in _start()]
    groups = ([dict(params=params)] if rank == 0 else
              [dict(params=params[:1], clipping_type="layer_wise"), dict(params=params[1:2]),
               dict(params=params[2:], clipping_type="coordinate_wise")])
    opt = ClippedSGD(groups, lr=0.1, norm_group=mesh, backend="reference")
    for k in range(2):
        for p, g in zip(params, _grads(k)):
            p.grad = g.clone()
        opt.step()
    out["uneven_stages"] = dict(steps=int(opt.statistics()[0]["step"]))
    # FSDP2: one model sharded over both ranks, the spike in the rows rank 1 holds
    model = torch.nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.arange(24.0).reshape(4, 6) / 24)
    fully_shard(model, mesh=mesh)
    opt = ClippedAdamW(model.parameters(), lr=0.01, backend="reference", skip_if_norm_above=50.0)
    moved = []
    for k in range(3):
        g = torch.full((4, 6), 0.1)
        if k == 1:
            g[3] = 100.0
        w = model.weight
        w.grad = torch.distributed.tensor.distribute_tensor(g, w.device_mesh, w.placements)
        before = w.to_local().detach().clone()
        opt.step()
        moved.append(not torch.equal(before, w.to_local().detach()))
    out["fsdp"] = dict(moved=moved, spikes=int(opt.statistics()[0]["spike_skipped_steps"]))
    _finish(rank, tmp, out)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_every_rank_skips_together():
    from test_distributed import _spawn

    for rank in _spawn(_distributed_worker):
        assert rank["pipeline"] == dict(moved=[True, False, True], spikes=1), rank
        assert rank["fsdp"] == dict(moved=[True, False, True], spikes=1), rank
        assert rank["uneven_stages"] == dict(steps=2), rank
