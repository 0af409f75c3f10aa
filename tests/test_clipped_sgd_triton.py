"""Triton kernels against the reference.  Without CUDA they run in Triton's interpreter on CPU
tensors (conftest sets TRITON_INTERPRET=1), with a small chunk so that tensors span chunks."""

import copy

import pytest
import torch

import torch_clip_fused as tcf
from torch_clip_fused import ClipMethod, ClippedSGD
from backend_checks import (METHODS, SGD, assert_channels_last_same_as_reference, assert_non_dense_is_a_clear_error,
                            assert_same_as_reference, coordinate_mask)
from conftest import clone_params, make_params, set_grads

pytest.importorskip("triton")
from torch_clip_fused.backends.triton import step as clipped_sgd_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = ((7, 5), (0,), (5,), (3, 70), (1,), (33,))  # empty, larger than a chunk, odd sizes


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setattr(clipped_sgd_step, "CHUNK_SIZE", 64)
        monkeypatch.setattr(clipped_sgd_step, "BLOCK_SIZE", 16)
        monkeypatch.setattr(clipped_sgd_step, "REDUCE_BLOCK", 16)


def assert_same_run(method, dtype=torch.float32, shapes=SHAPES, **kwargs):
    assert_same_as_reference("triton", method, dtype, shapes, DEVICE, **kwargs)


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_every_method_equals_reference(method):
    assert_same_run(method, **SGD[0])


@pytest.mark.parametrize("sgd", SGD[1:], ids=str)
@pytest.mark.parametrize("method", ["norm", "coordinate_wise", ClipMethod("layer", "auto", "quadratic")], ids=str)
def test_sgd_variants_equal_reference(method, sgd):
    assert_same_run(method, **sgd)


@pytest.mark.parametrize("method", ["norm", "layer_wise", "coordinate_wise", "quadratic_rand_autoclip",
                                    ClipMethod("coordinate", "constant", "linear")], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_equals_reference(method, dtype):
    assert_same_run(method, dtype, **SGD[0])


@pytest.mark.parametrize("method", ["layer_wise", "coordinate_wise", "auto_clip"])
def test_clip_point_update_equals_reference(method):
    assert_same_run(method, clip_point="update", **SGD[0])


def test_coordinate_masks_are_bit_identical():
    ref = coordinate_mask("reference", SHAPES, DEVICE)
    assert ref.any() and not ref.all()
    assert torch.equal(coordinate_mask("triton", SHAPES, DEVICE), ref)


@pytest.fixture
def launches(monkeypatch):
    """Kernel launches recorded from Triton's own launcher (the interpreter's, or the JIT's on CUDA)."""
    from torch_clip_fused.kernels import clip_apply, clip_norms

    recorded = []
    for cls in {type(clip_norms.clip_norm_kernel), type(clip_apply.clip_apply_kernel)}:
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            recorded.append(getattr(self, "__name__", getattr(self, "fn", None)))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return recorded


@pytest.mark.parametrize("method", ["norm", "layer_wise", "coordinate_wise", "quadratic_rand_autoclip",
                                    ClipMethod("layer", "auto", "linear")], ids=str)
def test_launches_do_not_grow_with_tensor_count(method, launches):
    counts = []
    for n in (4, 64):
        params = make_params(shapes=[(3,)] * n, device=DEVICE)
        opt = ClippedSGD(params, lr=0.1, momentum=0.9, clipping_type=method, backend="triton")
        opt.step()  # builds and caches the plan
        set_grads(params, 1)
        launches.clear()
        opt.step()
        counts.append(len(launches))
    assert counts[0] == counts[1] <= 2  # one dtype bucket: the norm pass and the apply pass


def test_launches_per_dtype_bucket(launches):
    params = make_params(shapes=[(3,), (5,)], device=DEVICE) + make_params(shapes=[(4,)], dtype=torch.bfloat16,
                                                                           device=DEVICE)
    opt = ClippedSGD(params, lr=0.1, clipping_type="norm", backend="triton")
    opt.step()
    launches.clear()
    opt.step()
    assert len(launches) == 4


def test_launches_of_groups_sharing_one_norm(launches):
    """G param groups sharing one norm (docs/spec.md section 3.2) cost 3 launches per group and dtype
    bucket: the norm stage, the scale stage from the given norms (one program) and the apply pass; one
    group alone keeps its 2."""
    a, b = make_params(shapes=[(3,), (5,)], device=DEVICE), make_params(shapes=[(4,)], device=DEVICE)
    opt = ClippedSGD([dict(params=a), dict(params=b, lr=0.05)], lr=0.1, clipping_type="norm", backend="triton")
    opt.step()
    launches.clear()
    opt.step()
    assert len(launches) == 6
    per_group = ClippedSGD([dict(params=a), dict(params=b, lr=0.05)], lr=0.1, clipping_type="norm",
                           backend="triton", per_group_norm=True)
    per_group.step()
    launches.clear()
    per_group.step()
    assert len(launches) == 4


def _fresh_gradient_run(steps, fresh, method="quadratic_rand_autoclip"):
    """Params after ``steps`` steps whose gradients are new tensors every step (set_to_none) or
    copied into the same tensors, and the number of plans built meanwhile."""
    from torch_clip_fused.backends.triton import plan_builds

    params = make_params(shapes=SHAPES, device=DEVICE)
    opt = ClippedSGD(params, lr=0.05, momentum=0.9, clipping_type=method, clipping_level=3.0, beta=0.5, seed=2,
                     backend="triton")
    keep = [torch.empty_like(p) for p in params]
    before = plan_builds()
    for k in range(steps):
        set_grads(params, 300 + k)
        if not fresh:
            for p, g in zip(params, keep):
                g.copy_(p.grad)
                p.grad = g
        opt.step()
        if fresh:
            opt.zero_grad(set_to_none=True)
    return params, plan_builds() - before


@pytest.mark.parametrize("method", ["quadratic_rand_autoclip", ClipMethod("coordinate", "constant", "linear")],
                         ids=str)
def test_fresh_gradients_build_the_plan_once(method):
    fresh, builds = _fresh_gradient_run(50, True, method)
    reused, reused_builds = _fresh_gradient_run(50, False, method)
    assert builds == 1 and reused_builds == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh, reused))


def test_new_set_of_gradients_rebuilds_the_plan():
    from torch_clip_fused.backends.triton import plan_builds

    ref = make_params(shapes=SHAPES, device=DEVICE)
    tri = clone_params(ref)
    opts = [ClippedSGD(ps, lr=0.1, momentum=0.9, clipping_type="layer_wise", backend=b)
            for ps, b in ((ref, "reference"), (tri, "triton"))]
    before = plan_builds()
    for k, dropped in enumerate((None, 2, 2, None)):
        for ps in (ref, tri):
            set_grads(ps, 500 + k)
            if dropped is not None:
                ps[dropped].grad = None
        for opt in opts:
            opt.step()
    assert plan_builds() - before == 3  # all, without tensor 2, all again
    for a, b in zip(ref, tri):
        torch.testing.assert_close(b, a)


def test_gradient_restrided_in_place_is_not_read_with_the_old_layout():
    params = make_params(shapes=((6, 6), (3,)), device=DEVICE)
    opt = ClippedSGD(params, lr=0.1, backend="triton")
    opt.step()
    g = params[0].grad
    params[0].grad = g.t()  # same storage, other strides: the plan's layout no longer holds
    before = params[0].detach().clone()
    with pytest.raises(RuntimeError, match=r"gradient of parameter 0 of param group 0 has strides \(1, 6\) but the parameter has \(6, 1\)"):
        opt.step()
    assert torch.equal(before, params[0])


def test_reallocated_parameter_rebuilds_the_plan():
    a = make_params(shapes=SHAPES, device=DEVICE)
    b = clone_params(a)
    opt_a = ClippedSGD(a, lr=0.1, clipping_type="layer_wise", backend="triton")
    opt_b = ClippedSGD(b, lr=0.1, clipping_type="layer_wise", backend="reference")
    opt_a.step()
    opt_b.step()
    for p in (a[0], b[0]):
        p.data = p.data.clone()  # new storage under the same Parameter
        p.grad = torch.ones_like(p)
    opt_a.step()
    opt_b.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("method", ["norm", "coordinate_wise", "auto_clip"])
def test_nonfinite_step_skipped(method):
    params = make_params(shapes=SHAPES, device=DEVICE)
    opt = ClippedSGD(params, lr=0.1, momentum=0.9, clipping_type=method, backend="triton")
    opt.step()
    set_grads(params, 5)
    params[3].grad[1, 7] = float("nan")
    before = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(torch.equal(a, opt.state[p]["momentum_buffer"]) for a, p in zip(bufs, params))
    assert opt.statistics()[0]["skipped_steps"].item() == 1
    assert opt.statistics()[0]["clipped_fraction"].item() == 0.0


def test_grad_scaler_found_inf_and_unscale():
    ref = make_params(shapes=SHAPES, device=DEVICE)
    tri = clone_params(ref)
    for p in tri:
        p.grad.mul_(512.0)
    ClippedSGD(ref, lr=0.1, backend="reference").step()
    opt = ClippedSGD(tri, lr=0.1, backend="triton")
    opt.grad_scale = torch.tensor(512.0, device=DEVICE)
    opt.found_inf = torch.tensor(0.0, device=DEVICE)
    opt.step()
    for a, b in zip(ref, tri):
        torch.testing.assert_close(b, a)
    before = [p.detach().clone() for p in tri]
    opt.found_inf = torch.tensor(1.0, device=DEVICE)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, tri))


def test_lr_as_tensor():
    a = make_params(shapes=SHAPES, device=DEVICE)
    b = clone_params(a)
    ClippedSGD(a, lr=0.1, momentum=0.9, backend="triton").step()
    ClippedSGD(b, lr=torch.tensor(0.1, device=DEVICE), momentum=0.9, backend="triton").step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_resume_bit_identical():
    kwargs = dict(lr=0.1, momentum=0.9, clipping_type="quadratic_rand_autoclip", clipping_level=3.0, beta=0.5,
                  seed=4, backend="triton")
    straight = make_params(shapes=SHAPES, device=DEVICE)
    opt = ClippedSGD(straight, **kwargs)
    for k in range(4):
        set_grads(straight, 40 + k)
        opt.step()
    first = make_params(shapes=SHAPES, device=DEVICE)
    opt1 = ClippedSGD(first, **kwargs)
    for k in range(2):
        set_grads(first, 40 + k)
        opt1.step()
    resumed = clone_params(first)
    opt2 = ClippedSGD(resumed, **kwargs)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    for k in range(2, 4):
        set_grads(resumed, 40 + k)
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_float64_goes_to_reference():
    a = make_params(dtype=torch.float64, device=DEVICE)
    b = clone_params(a)
    ClippedSGD(a, lr=0.1, clipping_type="norm", backend="triton").step()
    ClippedSGD(b, lr=0.1, clipping_type="norm", backend="reference").step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_large_seed_and_inexact_quantile_equal_reference():
    # a seed >= 2**31 would reach a kernel as uint32 and p = 0.1 as float32 (ceil(0.1f * 10) = 2):
    # both are read from memory as int64 / float64
    assert_same_run("quadratic_rand_autoclip", seed=3_000_000_000, p_autoclip=0.1, steps=10, momentum=0.9)


def test_unbounded_history_grows_past_its_first_allocation():
    # the history starts with 64 rows and doubles on the host side; 70 steps cross that boundary
    assert_same_run("auto_clip", shapes=((5,), (3,)), steps=70, p_autoclip=0.3)


def test_channels_last_parameters_equal_reference():
    assert_channels_last_same_as_reference("triton", DEVICE)


def test_non_dense_parameter_is_a_clear_error():
    assert_non_dense_is_a_clear_error("triton", DEVICE)
