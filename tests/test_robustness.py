"""Inputs that once corrupted a model or crashed a step (issue 10): each test failed before its fix."""

import copy

import pytest
import torch

from torch_clip_fused import ClipMethod, ClippedSGD, clip_gradients_
from backend_checks import legacy_checkpoint
from conftest import make_params, set_grads

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = ["cpp", "triton"] if DEVICE == "cpu" else ["triton"]


def test_duplicate_parameter_in_a_group_is_rejected():
    p, q = make_params(shapes=((3,), (2,)))
    with pytest.raises(ValueError, match=r"parameter 2 of param group 0 is the same tensor as parameter 0"):
        ClippedSGD([p, q, p], lr=0.1)
    opt = ClippedSGD([q], lr=0.1)
    with pytest.raises(ValueError, match=r"parameter 1 of param group 1 is the same tensor as parameter 0"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_infinite_parameter_without_weight_decay_keeps_momentum_finite(backend):
    """weight_decay=0 adds nothing: an inf parameter stays inf and its momentum finite, as torch's."""
    ours, theirs = make_params(shapes=((4,), (3,)), device=DEVICE), make_params(shapes=((4,), (3,)), device=DEVICE)
    for ps in (ours, theirs):
        with torch.no_grad():
            ps[0][1] = float("inf")
    opt = ClippedSGD(ours, lr=0.1, momentum=0.9, clipping_type="no_clip", backend=backend)
    sgd = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    for k in range(2):
        set_grads(ours, k)
        set_grads(theirs, k)
        opt.step()
        sgd.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(opt.state[a]["momentum_buffer"], sgd.state[b]["momentum_buffer"])
    assert torch.isfinite(opt.state[ours[0]]["momentum_buffer"]).all()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_checkpoint_without_the_host_step_count_loads(backend):
    params = make_params()
    opt = ClippedSGD(params, lr=0.1, clipping_type="auto_clip", seed=1, backend=backend)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["clip_state"].pop("clip_steps")
    # a checkpoint written before the key existed kept the group state in the first parameter's state
    old = legacy_checkpoint(saved)
    assert "clip_steps" not in old["state"][0] and "clip_step" in old["state"][0]
    for checkpoint in (old, saved):
        again = ClippedSGD(make_params(), lr=0.1, clipping_type="auto_clip", seed=1, backend=backend)
        again.load_state_dict(checkpoint)
        again.step()
        assert again.statistics()[0]["step"].item() == 2


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_functional_state_reused_with_other_parameters_is_a_clear_error(backend):
    state = {}
    clip_gradients_(make_params(shapes=((3,), (4,)), device=DEVICE), "layer_wise", state=state, backend=backend)
    with pytest.raises(ValueError, match=r"state was used with 2 parameters, now 3"):
        clip_gradients_(make_params(shapes=((3,), (4,), (5,)), device=DEVICE), "auto_clip", state=state,
                        backend=backend)


def _trained(kind="auto_clip", backend="cpp", **kwargs):
    params = make_params()
    opt = ClippedSGD(params, lr=0.1, momentum=0.9, clipping_type=kind, seed=1, backend=backend, **kwargs)
    for k in range(2):
        set_grads(params, 60 + k)
        opt.step()
    return params, opt


CORRUPTIONS = [
    ("auto_clip", "clip_count_global", lambda t: torch.tensor([-1]), r"'clip_count_global'.*negative"),
    ("auto_clip", "clip_history_global", lambda t: t[:, :0], r"'clip_history_global'.*shape"),
    (ClipMethod("layer", "auto"), "clip_count_layer",
     lambda t: t[:2], r"'clip_count_layer'.*shape"),
    ("norm", "clip_momentum_ready", lambda t: t[:1], r"'clip_momentum_ready'.*shape"),
    ("norm", "clip_step", lambda t: torch.tensor(-3), r"'clip_step'.*negative"),
    ("norm", "clip_stats", lambda t: t.double(), r"'clip_stats'.*dtype"),
    ("auto_clip", "clip_history_global", lambda t: t.half(), r"'clip_history_global'.*dtype"),
]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("kind,key,corrupt,message", CORRUPTIONS, ids=[c[1] + str(i) for i, c in enumerate(CORRUPTIONS)])
def test_corrupt_checkpoint_is_rejected_before_anything_changes(backend, kind, key, corrupt, message):
    params, opt = _trained(kind, backend)
    saved = copy.deepcopy(opt.state_dict())
    gstate = saved["param_groups"][0]["clip_state"]
    gstate[key] = corrupt(gstate[key])
    old = legacy_checkpoint(saved)  # the former layout: the group state in the first parameter's state
    first = old["param_groups"][0]["params"][0]
    assert key in old["state"][first]
    for checkpoint in (saved, old):
        fresh_params = make_params()
        fresh = ClippedSGD(fresh_params, lr=0.1, momentum=0.9, clipping_type=kind, seed=1, backend=backend)
        before = copy.deepcopy(fresh.state_dict())
        with pytest.raises(ValueError, match=r"param group 0.*" + message):
            fresh.load_state_dict(checkpoint)
        after = fresh.state_dict()
        assert after["state"] == before["state"] and after["param_groups"] == before["param_groups"]
        set_grads(fresh_params, 70)
        fresh.step()  # still usable


def test_cpp_kernel_checks_history_indices_itself():
    """A corrupt history that bypasses load_state_dict (edited in place) is a clear error, not a
    write before the buffer."""
    params, opt = _trained("auto_clip", "cpp")
    opt.param_groups[0]["clip_state"]["clip_count_global"].fill_(-1)
    set_grads(params, 80)
    with pytest.raises(RuntimeError, match=r"AutoClip count .*-1"):
        opt.step()


@pytest.mark.parametrize("lr,message", [(float("nan"), r"nan"), (-0.5, r"-0.5"), (float("inf"), r"inf")])
def test_bad_tensor_lr_is_rejected_when_set(lr, message):
    bad = torch.tensor(lr)
    with pytest.raises(ValueError, match=r"Invalid learning rate: the tensor lr holds " + message):
        ClippedSGD(make_params(), lr=bad)
    opt = ClippedSGD(make_params(), lr=torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"Invalid learning rate: the tensor lr holds " + message):
        opt.add_param_group({"params": make_params(seed=3), "lr": bad})
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["lr"] = bad
    with pytest.raises(ValueError, match=r"Invalid learning rate: the tensor lr holds " + message):
        opt.load_state_dict(saved)
    with pytest.raises(ValueError, match=r"Invalid learning rate: a tensor lr must be floating point"):
        ClippedSGD(make_params(), lr=torch.tensor(1))


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("kind", ["norm", "auto_clip", "coordinate_wise", "no_clip"])
def test_tensor_lr_turned_bad_during_training_skips_the_step(backend, kind):
    """No host sync inside step(): a non-finite or negative tensor lr is caught on the device and the
    step skips (parameters, momentum and AutoClip history untouched) and is counted."""
    params = make_params(device=DEVICE)
    lr = torch.tensor(0.1, device=DEVICE)
    opt = ClippedSGD(params, lr=lr, momentum=0.9, clipping_type=kind, backend=backend)
    set_grads(params, 1)
    opt.step()
    for bad in (float("nan"), -1.0):
        lr.fill_(bad)  # a scheduler gone wrong
        set_grads(params, 2)
        before = [p.detach().clone() for p in params]
        state = copy.deepcopy(opt.param_groups[0]["clip_state"])
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, params))
        for key in ("clip_history_global", "clip_count_global"):
            if key in state:
                assert torch.equal(state[key], opt.param_groups[0]["clip_state"][key])
    stats = opt.statistics()[0]
    assert stats["skipped_steps"].item() == 2 and stats["skipped"].item() == 1.0


@pytest.mark.parametrize("backend", FUSED)
def test_a_bad_layout_in_a_later_group_moves_no_group(backend):
    first, second = make_params(shapes=((3,), (2,)), device=DEVICE), make_params(shapes=((4, 4), (5,)), device=DEVICE)
    opt = ClippedSGD([{"params": first}, {"params": second}], lr=0.1, momentum=0.9, backend=backend)
    opt.step()
    set_grads(first + second, 5)
    second[0].grad = second[0].grad.t()  # a layout the fused kernel cannot walk with the parameter's
    before = [p.detach().clone() for p in first + second]
    with pytest.raises(RuntimeError, match=r"the gradient of parameter 0 of param group 1 has strides \(1, 4\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, first + second))
    assert opt.statistics()[0]["step"].item() == 1


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_empty_parameters_pass_the_layout_checks(backend):
    params = [torch.zeros(0, 3, device=DEVICE).t().requires_grad_(), torch.ones(4, device=DEVICE, requires_grad=True)]
    for p in params:
        p.grad = torch.ones_like(p)
    ClippedSGD(params, lr=0.1, backend=backend).step()
    assert params[1].detach().lt(1).all()


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_edits_to_optimizer_state_are_seen(backend):
    """After opt.state.clear() the next step starts afresh as torch's SGD does (and the checkpoint
    carries the momentum in use); an assigned momentum buffer is the one stepped."""
    ours, theirs = make_params(device=DEVICE), make_params(device=DEVICE)
    opt = ClippedSGD(ours, lr=0.1, momentum=0.9, clipping_type="no_clip", backend=backend)
    sgd = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    for k in range(4):
        if k == 2:
            opt.state.clear()
            sgd.state.clear()
        set_grads(ours, k)
        set_grads(theirs, k)
        opt.step()
        sgd.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    saved = opt.state_dict()["state"]
    for i, b in enumerate(theirs):
        torch.testing.assert_close(saved[i]["momentum_buffer"], sgd.state[b]["momentum_buffer"])
    new = torch.full_like(ours[0], 5.0)
    opt.state[ours[0]]["momentum_buffer"] = new
    sgd.state[theirs[0]]["momentum_buffer"] = new.clone()
    set_grads(ours, 9)
    set_grads(theirs, 9)
    opt.step()
    sgd.step()
    torch.testing.assert_close(opt.state[ours[0]]["momentum_buffer"], sgd.state[theirs[0]]["momentum_buffer"])
    assert opt.state[ours[0]]["momentum_buffer"] is new


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("kind", ["norm", "layer_wise", "auto_clip"])
def test_exploding_finite_gradient_is_clipped_not_applied_raw_or_zeroed(backend, kind):
    """|g| = 1e20: float32 squares overflow; the norm must stay finite and the step be clipped to the
    level, as clip_grad_norm_ computes it in float64."""
    params = make_params(shapes=((7, 5), (3, 70)), device=DEVICE)
    for p in params:
        p.grad = torch.full_like(p, 1e20)
    expected = [p.detach().double().clone() for p in params]
    grads64 = [p.grad.double() for p in params]
    if kind == "layer_wise":
        for g in grads64:
            g.mul_(1.0 / torch.linalg.vector_norm(g))
    else:  # global: the first AutoClip threshold is the norm itself, so auto_clip takes the raw direction scaled
        level = 1.0 if kind == "norm" else float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads64])))
        total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads64]))
        for g in grads64:
            g.mul_(min(1.0, level / float(total)))
    opt = ClippedSGD(params, lr=0.1, clipping_type=kind, clipping_level=1.0, backend=backend)
    opt.step()
    stats = opt.statistics()[0]
    assert torch.isfinite(stats["norm"]) and stats["norm"].item() > 1e20
    for p, e, g in zip(params, expected, grads64):
        torch.testing.assert_close(p.detach().double(), e - 0.1 * g, rtol=1e-5, atol=1e-6)
