"""Pipeline parallelism (issue 20 item 3): ``norm_group`` sums the shared norm over the pipeline's
ranks.  gloo, 2 processes, each holding one stage's parameters (two param groups each, decay /
no-decay): every stage's step equals the whole model clipped with ``clip_grad_norm_`` + the torch
optimizer (independent oracle), every stage records the same norm in its threshold state, one
collective per step is made, a rank without gradients still takes part, and the functional API's
``clip_gradients_(norm_group=...)`` equals ``clip_grad_norm_`` over the whole model."""

import math

import pytest
import torch
import torch.distributed as dist

from parallel_cases import counted_all_reduces, decay_groups, seeded, torch_clipped_run
from test_distributed import WORLD, _finish, _init, _spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SHAPES = [(6, 5), (6,), (4, 6), (4,), (3, 4), (3,)]
STAGES = [[0, 1, 2], [3, 4, 5]]  # the tensors each rank holds
BACKENDS = ["reference", "cpp", "triton"]
STEPS = 6


def _grads(k):
    return seeded(SHAPES, 100 + k, 8.0 if k in (2, 4) else 0.3)  # spikes: clipped steps, and records of two kinds


def _start():
    return seeded(SHAPES, 0)


_groups = decay_groups


def _stage_run(rank, backend, kind, method, norm_group, calls):
    from torch_clip_fused import ClippedAdamW, ClippedSGD

    mine = STAGES[rank]
    params = [torch.nn.Parameter(_start()[i].clone()) for i in mine]
    if kind == "sgd":
        opt = ClippedSGD(_groups(params), lr=0.1, momentum=0.9, clipping_type=method, clipping_level=1.0,
                         backend=backend, seed=3, norm_group=norm_group, zclip_warmup=2)
    else:
        opt = ClippedAdamW(_groups(params), lr=0.01, clipping_type=method, clipping_level=1.0, backend=backend,
                           seed=3, norm_group=norm_group, zclip_warmup=2)
    per_step, norms = [], []
    for k in range(STEPS):
        grads = _grads(k)
        for p, i in zip(params, mine):
            p.grad = grads[i].clone()
        calls.clear()
        opt.step()
        per_step.append(len(calls))
        norms.append(float(opt.statistics()[0]["norm"]))
    state = opt.param_groups[0]["clip_state"]
    threshold = {key: value.tolist() for key, value in state.items()
                 if key.startswith(("clip_history", "clip_zclip", "clip_count")) and isinstance(value, torch.Tensor)}
    return params, dict(per_step=per_step, norms=norms, threshold=threshold)


def _worker(rank, tmp):
    from torch.distributed.device_mesh import init_device_mesh

    _init(rank, tmp)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("pp",))
    with counted_all_reduces() as calls:
        out = _stage_runs(rank, mesh, calls)
    _finish(rank, tmp, out)


def _stage_runs(rank, mesh, calls):
    from torch_clip_fused import ClippedSGD, clip_gradients_

    out = {}
    # the oracle: clip_grad_norm_ over the whole model + the torch optimizer
    oracles = {kind: [p.detach() for p in torch_clipped_run(_start(), _grads, STEPS, kind, _groups)[0]]
               for kind in ("sgd", "adamw")}
    for backend in BACKENDS:
        for kind, method in (("sgd", "norm"), ("adamw", "norm"), ("sgd", "auto_clip"), ("adamw", "zclip")):
            key = f"{backend}/{kind}/{method}"
            try:
                group = mesh if kind == "sgd" else dist.group.WORLD  # a 1-D mesh and a ProcessGroup
                params, found = _stage_run(rank, backend, kind, method, group, calls)
                if method == "norm":
                    expected = [oracles[kind][i] for i in STAGES[rank]]
                    found["close"] = all(torch.allclose(p.detach(), e, rtol=1e-5, atol=1e-6)
                                         for p, e in zip(params, expected))
                out[key] = found
            except Exception as err:  # noqa: BLE001 (reported by the test)
                out[key] = dict(error=f"{type(err).__name__}: {err}")
    # a stage without gradients in a step still takes part (no rank waits): rank 1 has none in step 1
    try:
        params = [torch.nn.Parameter(_start()[i].clone()) for i in STAGES[rank]]
        opt = ClippedSGD(params, lr=0.1, norm_group=mesh, backend="cpp")
        for k in range(3):
            grads = _grads(k)
            for p, i in zip(params, STAGES[rank]):
                p.grad = None if (rank == 1 and k == 1) else grads[i].clone()
            opt.step()
        out["no_grads"] = dict(norm=float(opt.statistics()[0]["norm"]))
    except Exception as err:  # noqa: BLE001
        out["no_grads"] = dict(error=f"{type(err).__name__}: {err}")
    # an inf on one stage skips the step on every stage (nonfinite="skip")
    try:
        params = [torch.nn.Parameter(_start()[i].clone()) for i in STAGES[rank]]
        opt = ClippedSGD(params, lr=0.1, momentum=0.9, norm_group=mesh, backend="cpp")
        moved = []
        for k in range(3):
            grads = _grads(k)
            for p, i in zip(params, STAGES[rank]):
                p.grad = grads[i].clone()
            if k == 1 and rank == 1:
                params[0].grad.view(-1)[0] = float("inf")
            before = [p.detach().clone() for p in params]
            opt.step()
            moved.append(any(not torch.equal(b, p.detach()) for b, p in zip(before, params)))
        out["nan"] = dict(moved=moved, skipped=int(opt.statistics()[0]["skipped_steps"]))
    except Exception as err:  # noqa: BLE001
        out["nan"] = dict(error=f"{type(err).__name__}: {err}")
    # the functional API
    grads = _grads(2)
    params = [torch.nn.Parameter(_start()[i].clone()) for i in STAGES[rank]]
    for p, i in zip(params, STAGES[rank]):
        p.grad = grads[i].clone()
    total, _ = clip_gradients_(params, "norm", clipping_level=1.0, norm_group=mesh)
    whole = [g.clone() for g in grads]
    expected_total = torch.nn.utils.get_total_norm(whole)  # torch's, over the whole model
    scale = min(1.0, 1.0 / (float(expected_total) + 1e-6))
    out["functional"] = dict(total=float(total), expected_total=float(expected_total),
                             close=all(torch.allclose(p.grad, whole[i] * scale, rtol=1e-5, atol=1e-7)
                                       for p, i in zip(params, STAGES[rank])))
    return out


def test_pipeline_stages_clip_with_the_whole_models_norm():
    ranks = _spawn(_worker)
    for rank in ranks:
        for key, r in rank.items():
            assert "error" not in r, f"{key}: {r['error']}"
    for key in ranks[0]:
        if key in ("no_grads", "functional", "nan"):
            continue
        r0, r1 = ranks[0][key], ranks[1][key]
        assert r0["per_step"] == [1] * STEPS and r1["per_step"] == [1] * STEPS, f"{key}: collectives per step"
        assert r0["norms"] == r1["norms"], f"{key}: the stages report different norms"
        assert r0["threshold"] == r1["threshold"], f"{key}: the stages keep different threshold states"
        if key.endswith("/norm"):
            assert r0["close"] and r1["close"], f"{key}: differs from clip_grad_norm_ + the torch optimizer"
            whole = [math.sqrt(sum(float(g.norm()) ** 2 for g in _grads(k))) for k in range(STEPS)]
            assert r0["norms"] == pytest.approx(whole, rel=1e-6), key
        if key.endswith("/auto_clip") or key.endswith("/zclip"):
            assert r0["threshold"], f"{key}: no threshold state kept"
    assert ranks[0]["no_grads"]["norm"] == ranks[1]["no_grads"]["norm"]
    for rank in ranks:  # rank 1's inf in step 1 skips rank 0's stage too
        assert rank["nan"] == dict(moved=[True, False, True], skipped=1), rank["nan"]
    for rank in ranks:
        f = rank["functional"]
        assert f["total"] == pytest.approx(f["expected_total"], rel=1e-6)
        assert f["close"]


def test_norm_group_argument_checks():
    from torch_clip_fused import ClippedSGD, clip_gradients_

    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match=r"ClippedSGD: Invalid norm_group value: 3; expected None, a ProcessGroup"):
        ClippedSGD([p], norm_group=3)
    p.grad = torch.ones(2)
    with pytest.raises(TypeError, match=r"clip_gradients_: Invalid norm_group value: 'pp'"):
        clip_gradients_([p], norm_group="pp")
    assert torch.equal(p.grad, torch.ones(2))  # nothing modified


def _mesh_worker(rank, tmp):
    from torch.distributed.device_mesh import init_device_mesh

    from torch_clip_fused import ClippedSGD

    _init(rank, tmp)
    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "pp"))
    out = {}
    for name, arg, extra in (("2-D mesh", mesh, {}), ("per-group norm", mesh["pp"], dict(per_group_norm=True))):
        try:
            ClippedSGD([torch.nn.Parameter(torch.ones(2))], norm_group=arg, **extra)
            out[name] = "no error"
        except (ValueError, TypeError) as err:
            out[name] = str(err)
    _finish(rank, tmp, out)


def test_norm_group_mesh_checks():
    for rank in _spawn(_mesh_worker):
        assert "1-D DeviceMesh" in rank["2-D mesh"] and "('dp', 'pp')" in rank["2-D mesh"]
        assert "needs per_group_norm=False" in rank["per-group norm"]
