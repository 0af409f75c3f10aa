"""One norm over every param group (issue 19 item 2; torch_clip_fused/optim/shared_norm.py).

Oracle: ``clip_grad_norm_`` over all parameters + ``torch.optim.SGD`` / ``AdamW`` with the same two
param groups (decay / no-decay, as the Hugging Face Trainer makes them, here with different learning
rates too), on heavy-tailed gradients given each step (Student-t, so that some steps clip and some do
not).  ``per_group_norm=True`` is checked against ``clip_grad_norm_`` per group (torch-clip 0.0.6's
behaviour).  The stateful thresholds (AutoClip, ZClip) and the randomized norms have no torch oracle:
two groups must step as one group holding every parameter with the same settings (that one-group
step is tested against torch-clip 0.0.6 and zclip elsewhere), with one threshold state per optimizer.
"""

import copy
import importlib.util

import pytest
import torch

from torch_clip_fused import ClipMethod, ClippedAdamW, ClippedSGD
from conftest import CPU_BACKENDS

pytestmark = pytest.mark.usefixtures("triton_small_chunks")
#: every backend (Triton in its interpreter on CPU)
BACKENDS = CPU_BACKENDS + (["triton"] if importlib.util.find_spec("triton") else [])

SHAPES = [(6, 5), (5,), (4, 6), (4,), (3, 4), (3,)]  # weights and biases of a small MLP
STEPS = 50
LEVEL = 1.0


def heavy_grads(step: int):
    """Gradients of SHAPES at ``step``: Student-t (3 degrees of freedom) times an exponential factor,
    twenty times larger every seventh step (a spike)."""
    gen = torch.Generator().manual_seed(100 + step)
    spike = float(torch.empty(()).exponential_(generator=gen)) * (20.0 if step % 7 == 3 else 1.0)
    return [_t(s, gen) * (0.08 * spike) for s in SHAPES]


def _t(shape, gen):
    """Student-t samples with 3 degrees of freedom from ``gen``: z / sqrt(chi2_3 / 3)."""
    z = torch.randn(shape, generator=gen)
    chi2 = torch.randn((3,) + tuple(shape), generator=gen).square().sum(0)
    return z / (chi2 / 3).sqrt()


def initial():
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def two_groups(params, **extra):
    """The decay / no-decay split: matrices with weight decay and lr 0.1, vectors without and lr 0.05."""
    return [dict(params=[p for p in params if p.ndim > 1], weight_decay=0.01, lr=0.1, **extra),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0, lr=0.05, **extra)]


def run_ours(cls, backend, steps=STEPS, **kwargs):
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    opt = cls(two_groups(params), backend=backend, clipping_level=LEVEL, **kwargs)
    for k in range(steps):
        for p, g in zip(params, heavy_grads(k)):
            p.grad = g
        opt.step()
    return params, opt


def run_torch(torch_cls, per_group=False, steps=STEPS, **kwargs):
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    groups = two_groups(params)
    opt = torch_cls(groups, foreach=False, **kwargs)
    for k in range(steps):
        for p, g in zip(params, heavy_grads(k)):
            p.grad = g
        for group in (groups if per_group else [dict(params=params)]):
            torch.nn.utils.clip_grad_norm_(group["params"], LEVEL, foreach=False)
        opt.step()
    return params


def relative_l2(a, b) -> float:
    num = sum(float((x.detach().double() - y.detach().double()).square().sum()) for x, y in zip(a, b))
    den = sum(float(y.detach().double().square().sum()) for y in b)
    return (num / den) ** 0.5


OPTIMIZERS = [(ClippedSGD, torch.optim.SGD, dict(momentum=0.9)), (ClippedAdamW, torch.optim.AdamW, {})]


def test_the_gradients_clip_sometimes():
    """The oracle runs are informative: some steps clip, some do not, and the groups' norms differ."""
    norms = [float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in heavy_grads(k)])))
             for k in range(STEPS)]
    assert sum(n > LEVEL for n in norms) >= 10 and sum(n <= LEVEL for n in norms) >= 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,torch_cls,kwargs", OPTIMIZERS, ids=["SGD", "AdamW"])
def test_two_groups_equal_clip_grad_norm_over_all_parameters(cls, torch_cls, kwargs, backend):
    ours, opt = run_ours(cls, backend, **kwargs)
    expected = run_torch(torch_cls, **kwargs)
    assert relative_l2(ours, expected) < 1e-5
    for p, q in zip(ours, expected):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)
    # the per-group norm is far from it (the test can fail)
    assert relative_l2(run_torch(torch_cls, per_group=True, **kwargs), expected) > 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls,torch_cls,kwargs", OPTIMIZERS, ids=["SGD", "AdamW"])
def test_per_group_norm_keeps_a_norm_per_group(cls, torch_cls, kwargs, backend):
    ours, _ = run_ours(cls, backend, per_group_norm=True, **kwargs)
    expected = run_torch(torch_cls, per_group=True, **kwargs)
    for p, q in zip(ours, expected):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_statistics_report_the_norm_over_every_group(backend):
    params, opt = run_ours(ClippedSGD, backend, steps=4)
    grads = heavy_grads(3)
    total = torch.nn.utils.get_total_norm(grads, foreach=False)
    for stats in opt.statistics():
        torch.testing.assert_close(stats["norm"], total, rtol=1e-6, atol=0)
        assert float(stats["threshold"]) == LEVEL
        assert float(stats["clipped_fraction"]) == float(total > LEVEL)


STATEFUL = ["auto_clip", "zclip", "linear_rand_norm", "quadratic_rand_autoclip", ClipMethod("global", "ema_relative")]


def one_group_run(backend, clipping_type, steps, **kwargs):
    """The same parameters in one group, lr 0.1 and no weight decay for all."""
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    opt = ClippedSGD(params, lr=0.1, backend=backend, clipping_type=clipping_type, clipping_level=LEVEL,
                     zclip_warmup=3, seed=11, **kwargs)
    for k in range(steps):
        for p, g in zip(params, heavy_grads(k)):
            p.grad = g
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("clipping_type", STATEFUL, ids=str)
def test_stateful_and_randomized_methods_step_as_one_group(backend, clipping_type):
    steps = 20
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    groups = [dict(params=[p for p in params if p.ndim > 1]), dict(params=[p for p in params if p.ndim <= 1])]
    opt = ClippedSGD(groups, lr=0.1, backend=backend, clipping_type=clipping_type, clipping_level=LEVEL,
                     zclip_warmup=3, seed=11)
    for k in range(steps):
        for p, g in zip(params, heavy_grads(k)):
            p.grad = g
        opt.step()
    expected, single = one_group_run(backend, clipping_type, steps)
    for p, q in zip(params, expected):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    for stats in opt.statistics():
        for key in ("norm", "threshold", "clipped_fraction"):
            torch.testing.assert_close(stats[key], single.statistics()[0][key], rtol=1e-5, atol=0)
    # one threshold state per optimizer: in the first group's clip_state only
    lead, follower = (g["clip_state"] for g in opt.param_groups)
    def threshold_keys(state):
        return {k for k in state if any(word in k for word in ("history", "zclip", "adagc"))}

    assert threshold_keys(lead) == threshold_keys(single.param_groups[0]["clip_state"])
    assert not threshold_keys(follower)


def test_other_scopes_take_no_part():
    """A layer-wise group beside two global-scope groups is clipped per tensor; the global groups share."""
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    layer, first, second = params[:2], params[2:4], params[4:]
    opt = ClippedSGD([dict(params=first), dict(params=layer, clipping_type="layer_wise"), dict(params=second),
                      dict(params=[torch.nn.Parameter(torch.zeros(2))], clipping_type="no_clip")],
                     lr=1.0, clipping_level=LEVEL, backend="reference")
    grads = [g * 10 for g in heavy_grads(0)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    clipped = [g.clone() for g in grads]
    torch.nn.utils.clip_grad_norm_([_holding(g) for g in clipped[2:]], LEVEL, foreach=False)
    for g in clipped[:2]:
        torch.nn.utils.clip_grad_norm_([_holding(g)], LEVEL, foreach=False)
    for p, x, g in zip(params, initial(), clipped):
        torch.testing.assert_close(p.detach(), x - g, rtol=1e-5, atol=1e-6)


def _holding(g):
    """A parameter whose .grad is ``g`` itself (clipped in place)."""
    h = torch.zeros_like(g, requires_grad=True)
    h.grad = g
    return h


@pytest.mark.parametrize("cls", [ClippedSGD, ClippedAdamW])
@pytest.mark.parametrize("setting,value,shown", [
    ("clipping_level", 2.0, "clipping_level: 1.0 and 2.0"),
    ("clipping_type", "auto_clip", "clipping_type: 'norm' and 'auto_clip'"),
    ("nonfinite", "apply", "nonfinite: 'skip' and 'apply'"),
])
def test_a_mismatched_clipping_setting_names_both_groups(cls, setting, value, shown):
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    message = rf"param groups 0 and 1 both clip with the one norm .* differ in {shown}.*per_group_norm=True"
    with pytest.raises(ValueError, match=message):
        cls([dict(params=params[:3]), dict(params=params[3:], **{setting: value})], clipping_level=LEVEL)
    opt = cls([dict(params=params[:3])], clipping_level=LEVEL)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group(dict(params=params[3:], **{setting: value}))
    assert len(opt.param_groups) == 1
    cls([dict(params=params[:3]), dict(params=params[3:], **{setting: value})], clipping_level=LEVEL,
        per_group_norm=True)  # each group its own norm: fine


def test_a_setting_changed_between_steps_is_an_error_before_anything_moves():
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    opt = ClippedSGD(two_groups(params), clipping_level=LEVEL, momentum=0.9)
    for p, g in zip(params, heavy_grads(0)):
        p.grad = g
    opt.step()
    before = [p.detach().clone() for p in params]
    opt.param_groups[1]["clipping_level"] = 3.0
    with pytest.raises(ValueError, match="param groups 0 and 1 .* clipping_level: 1.0 and 3.0"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_update_settings_may_differ_and_layer_groups_may_differ():
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    ClippedSGD([dict(params=params[:2], lr=0.1, momentum=0.9, nesterov=True),
                dict(params=params[2:4], lr=0.01, weight_decay=0.1, maximize=True),
                dict(params=params[4:5], clipping_type="layer_wise", clipping_level=5.0),
                dict(params=params[5:], clipping_type="coordinate_wise", clipping_level=0.3)], clipping_level=LEVEL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_nonfinite_gradient_in_one_group_skips_every_shared_group(backend):
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    opt = ClippedSGD(two_groups(params), clipping_level=LEVEL, backend=backend)
    grads = heavy_grads(0)
    grads[1][0] = float("nan")  # a bias: the no-decay group
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert all(torch.equal(p.detach(), x) for p, x in zip(params, initial()))
    assert [int(s["skipped_steps"]) for s in opt.statistics()] == [1, 1]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_resume_from_a_checkpoint_and_a_copy_step_exactly_as_the_original(backend):
    params, opt = run_ours(ClippedSGD, backend, steps=5, momentum=0.9, clipping_type="auto_clip")
    copied_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = ClippedSGD(two_groups(copied_params), backend=backend, clipping_level=LEVEL, momentum=0.9,
                         clipping_type="auto_clip")
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin = copy.deepcopy((params, opt))
    for k in range(5, 10):
        for ps in (params, copied_params, twin[0]):
            for p, g in zip(ps, heavy_grads(k)):
                p.grad = g
        opt.step()
        resumed.step()
        twin[1].step()
    for a, b, c in zip(params, copied_params, twin[0]):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert twin[1].per_group_norm is False


def test_per_group_norm_must_be_a_bool():
    with pytest.raises(TypeError, match="Invalid per_group_norm value: 'yes'; expected True or False"):
        ClippedSGD([torch.nn.Parameter(torch.zeros(2))], per_group_norm="yes")


def test_a_checkpoint_whose_groups_disagree_is_refused_before_anything_changes():
    """A checkpoint written with per_group_norm=True and different levels, loaded into an optimizer that
    shares the norm: a clear error, and the optimizer is as it was."""
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    saved = ClippedSGD([dict(params=params[:3]), dict(params=params[3:], clipping_level=2.0)], clipping_level=LEVEL,
                       per_group_norm=True).state_dict()
    opt = ClippedSGD([dict(params=params[:3]), dict(params=params[3:])], clipping_level=LEVEL)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="param groups 0 and 1 .* clipping_level: 1.0 and 2.0"):
        opt.load_state_dict(saved)
    assert opt.state_dict() == before


def test_the_relative_threshold_at_global_scope_stays_per_group():
    """eta = level * ||w|| takes each group's own weights: such groups share nothing (levels may differ)."""
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    agc = ClipMethod("global", "relative")
    opt = ClippedSGD([dict(params=params[:3], clipping_level=0.01), dict(params=params[3:], clipping_level=0.02)],
                     lr=1.0, clipping_type=agc, backend="reference")
    for p, g in zip(params, heavy_grads(3)):
        p.grad = g * 100
    opt.step()
    norms = [float(s["norm"]) for s in opt.statistics()]
    for group, norm in zip(opt.param_groups, norms):
        assert norm == pytest.approx(float(torch.nn.utils.get_total_norm([p.grad for p in group["params"]])), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs", [(ClippedSGD, dict(momentum=0.9)), (ClippedAdamW, {})], ids=["SGD", "AdamW"])
def test_under_a_grad_scaler_the_shared_norm_is_of_the_unscaled_gradients(cls, kwargs, backend):
    """GradScaler's attributes (grad_scale, found_inf) on an optimizer with two groups sharing the norm:
    the step equals the unscaled one (the oracle: clip_grad_norm_ over all parameters + torch's optimizer)."""
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    opt = cls(two_groups(params), backend=backend, clipping_level=LEVEL, **kwargs)
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    for k in range(5):
        for p, g in zip(params, heavy_grads(k)):
            p.grad = g * 1024.0
        opt.step()
    expected = run_torch({ClippedSGD: torch.optim.SGD, ClippedAdamW: torch.optim.AdamW}[cls], steps=5, **kwargs)
    for p, q in zip(params, expected):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)
    assert float(opt.statistics()[0]["norm"]) == pytest.approx(
        float(torch.nn.utils.get_total_norm(heavy_grads(4))), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_point_update_shares_the_norm_of_the_update_directions(backend):
    """clip_point="update": the shared norm is that of every group's final direction (weight decay and
    momentum included): two groups with the same settings step as one group holding every parameter."""
    settings = dict(lr=0.1, momentum=0.9, weight_decay=0.01, clip_point="update", clipping_level=LEVEL,
                    backend=backend, seed=11)
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    single = [torch.nn.Parameter(x.clone()) for x in initial()]
    two = ClippedSGD([dict(params=params[:3]), dict(params=params[3:])], **settings)
    one = ClippedSGD(single, **settings)
    for k in range(6):
        for ps in (params, single):
            for p, g in zip(ps, heavy_grads(k)):
                p.grad = g
        two.step()
        one.step()
    for p, q in zip(params, single):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two.statistics()[1]["norm"], one.statistics()[0]["norm"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("clipping_type", ["auto_clip", "zclip"])
def test_the_threshold_state_stays_with_the_first_group_when_it_has_no_gradients(backend, clipping_type):
    """A step where the first group's parameters have no gradient (frozen for a while): the second group
    steps alone, with the one threshold state (kept in the first group), as one group holding every
    parameter does when some have no gradient."""
    settings = dict(lr=0.1, backend=backend, clipping_type=clipping_type, clipping_level=LEVEL, zclip_warmup=2,
                    seed=11)
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    single = [torch.nn.Parameter(x.clone()) for x in initial()]
    two = ClippedSGD([dict(params=params[:3]), dict(params=params[3:])], **settings)
    one = ClippedSGD(single, **settings)
    for k in range(10):
        for ps in (params, single):
            for j, (p, g) in enumerate(zip(ps, heavy_grads(k))):
                p.grad = None if (k in (4, 5) and j < 3) else g
        two.step()
        one.step()
    for p, q in zip(params, single):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    follower = two.param_groups[1]["clip_state"]
    assert not {k for k in follower if "history" in k or "zclip" in k}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_level_zeroes_every_shared_group(backend):
    """clipping_level=0: the lead's scale is 0 / ||g|| = 0 and every follower applies 0 too (its given norm
    is capped at shared_norm.FOLLOWER_NORM_CAP, not +inf), as clip_grad_norm_(max_norm=0) zeroes all."""
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    opt = ClippedSGD([dict(params=params[:3]), dict(params=params[3:], lr=0.05)], lr=0.1, clipping_level=0.0,
                     backend=backend)
    for p, g in zip(params, heavy_grads(3)):
        p.grad = g
    opt.step()
    for p, x in zip(params, initial()):
        assert torch.equal(p.detach(), x)
    assert [float(s["clipped_fraction"]) for s in opt.statistics()] == [1.0, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_follower_clipped_past_float32s_range_takes_the_leads_scale(backend):
    """||g|| / eta past float32's range (||g|| ~ 1e30 clipped to 1e-10: s ~ 1e-40): every group's gradient
    is s * g with s = eta / ||g|| from the float64 norm over both groups (the closed form)."""
    grads = [g * 1e31 for g in heavy_grads(2)]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    opt = ClippedSGD([dict(params=params[:3]), dict(params=params[3:])], lr=1.0, clipping_level=1e-10,
                     backend=backend)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    total = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
    assert float(total) / 1e-10 > torch.finfo(torch.float32).max
    for p, g in zip(params, grads):
        torch.testing.assert_close(-p.detach().double(), g.double() * (1e-10 / total), rtol=1e-5, atol=0)


def test_shared_norm_groups_names_the_groups_that_share_the_norm():
    params = [torch.nn.Parameter(x.clone()) for x in initial()]
    groups = [dict(params=params[:2]), dict(params=params[2:3], clipping_type="layer_wise"), dict(params=params[3:]),
              dict(params=[])]
    assert ClippedSGD(groups, clipping_level=LEVEL).shared_norm_groups() == [0, 2]
    assert ClippedSGD([dict(g) for g in groups], clipping_level=LEVEL, per_group_norm=True).shared_norm_groups() == []
