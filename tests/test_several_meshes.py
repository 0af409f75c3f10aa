"""Several meshes under one norm (issue 20 item 2): one optimizer, even one param group (as
``model.parameters()`` gives), over dense layers sharded on the FSDP mesh, experts sharded on an
expert-parallel mesh and plain (replicated) tensors.  The norm is the global norm over all of them, with
one collective per distinct reduction domain; each run equals torch's ``clip_grad_norm_`` +
``torch.optim.AdamW`` / ``SGD`` on the whole tensors in one process.  gloo, 2 processes."""

import pytest
import torch
import torch.distributed as dist

from parallel_cases import counted_all_reduces, record, seeded, torch_clipped_run
from test_distributed import WORLD, _finish, _init, _spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SHAPES = [(6, 4), (6,), (4, 3, 2), (5,)]  # dense weight and bias (FSDP), stacked experts (EP), a plain norm weight
BACKENDS = ["reference", "cpp", "triton"]
STEPS = 3


def _grads(k):
    return seeded(SHAPES, 60 + k, 4.0 if k == 1 else 0.3)


def _start():
    return seeded(SHAPES, 0)


def _one_group(params):
    return [dict(params=params)]


def _two_groups(params):
    return [dict(params=[params[0], params[2]], weight_decay=0.01), dict(params=[params[1], params[3]],
                                                                         weight_decay=0.0)]


def _run(fsdp, ep, backend, kind, groups_of, calls):
    from torch.distributed.tensor import Shard, distribute_tensor

    from torch_clip_fused import ClippedAdamW, ClippedSGD

    start = _start()
    place = [(fsdp, [Shard(0)]), (fsdp, [Shard(0)]), (ep, [Shard(0)]), None]
    params = [torch.nn.Parameter(x.clone() if where is None else distribute_tensor(x.clone(), *where))
              for x, where in zip(start, place)]
    groups = groups_of(params)
    opt = (ClippedSGD(groups, lr=0.1, momentum=0.9, clipping_level=1.0, backend=backend, seed=1) if kind == "sgd"
           else ClippedAdamW(groups, lr=0.01, clipping_level=1.0, backend=backend, seed=1))
    per_step = []
    for k in range(STEPS):
        for p, g, where in zip(params, _grads(k), place):
            p.grad = g.clone() if where is None else distribute_tensor(g.clone(), *where)
        calls.clear()
        opt.step()
        per_step.append(len(calls))
    full = [p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in params]
    expected, _ = torch_clipped_run(_start(), _grads, STEPS, kind, groups_of)
    close = all(torch.allclose(a, b.detach(), rtol=1e-5, atol=1e-7) for a, b in zip(full, expected))
    return dict(close=close, per_step=per_step)


def _worker(rank, tmp):
    from torch.distributed.device_mesh import init_device_mesh

    _init(rank, tmp)
    fsdp = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
    ep = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))  # the same ranks: one reduction domain
    out = {}
    with counted_all_reduces() as calls:
        for backend in BACKENDS:
            for kind in ("sgd", "adamw"):
                for name, groups_of in (("one group", _one_group), ("two groups", _two_groups)):
                    key = f"{backend}/{kind}/{name}"
                    record(out, key, lambda: _run(fsdp, ep, backend, kind, groups_of, calls))
    _finish(rank, tmp, out)


def test_dense_experts_and_plain_tensors_under_one_norm():
    for rank in _spawn(_worker):
        for key, r in rank.items():
            assert "error" not in r, f"{key}: {r['error']}"
            assert r["close"], f"{key}: differs from clip_grad_norm_ + the torch optimizer on the whole model"
            assert r["per_step"] == [1] * STEPS, f"{key}: collectives per step {r['per_step']}"
