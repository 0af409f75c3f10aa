"""ClippedAdamW on DTensor (FSDP2) parameters (issue 20 item 4): gloo, 2 processes, Shard(0) on a 1-D
mesh.  Its moments are DTensors with their parameter's placements; two param groups (decay /
no-decay) equal torch's ``clip_grad_norm_`` + ``torch.optim.AdamW`` on the whole tensors in one process
(the independent oracle), on every backend, with amsgrad too; a ``torch.distributed.checkpoint``
round trip resumes bit-identically."""

import os

import pytest
import torch
import torch.distributed as dist

from parallel_cases import decay_groups, record, resumed_through_dcp, seeded, torch_clipped_run
from test_distributed import WORLD, _finish, _init, _spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SHAPES = [(6, 5), (6,), (4, 6), (4,), (2, 4)]
BACKENDS = ["reference", "cpp", "triton"]
STEPS = 4


def _grads(k):
    return seeded(SHAPES, 20 + k, 6.0 if k == 1 else 0.4)


def _start():
    return seeded(SHAPES, 0)


def _groups(params):
    return decay_groups(params, 0.05)


def _compare(mesh, backend, amsgrad):
    from torch.distributed.tensor import Shard, distribute_tensor

    from torch_clip_fused import ClippedAdamW

    params = [torch.nn.Parameter(distribute_tensor(x.clone(), mesh, [Shard(0)])) for x in _start()]
    opt = ClippedAdamW(_groups(params), lr=0.01, amsgrad=amsgrad, clipping_level=1.0, backend=backend, seed=1)
    for k in range(STEPS):
        for p, g in zip(params, _grads(k)):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        opt.step()
    expected, torch_opt = torch_clipped_run(_start(), _grads, STEPS, "adamw", _groups, amsgrad=amsgrad)
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    close = all(torch.allclose(p.detach().full_tensor(), e.detach(), rtol=1e-5, atol=1e-7)
                for p, e in zip(params, expected))
    moments = all(torch.allclose(opt.state[p][key].full_tensor(), torch_opt.state[e][key], rtol=1e-5, atol=1e-8)
                  for p, e in zip(params, expected) for key in keys)
    dtensors = all(type(opt.state[p][key]).__name__ == "DTensor" and opt.state[p][key].placements == p.placements
                   for p in params for key in keys)
    steps = all(float(opt.state[p]["step"]) == STEPS for p in params)
    return dict(close=close, moments=moments, dtensors=dtensors, steps=steps)


def _resume(mesh, backend, tmp, name):
    from torch.distributed.tensor import Shard, distribute_tensor

    from torch_clip_fused import ClippedAdamW

    def make():
        module = torch.nn.Module()
        module.ps = torch.nn.ParameterList(
            [torch.nn.Parameter(distribute_tensor(x.clone(), mesh, [Shard(0)])) for x in _start()])
        return module, ClippedAdamW(_groups(list(module.ps)), lr=0.01, clipping_type="zclip", zclip_warmup=1,
                                    backend=backend, seed=9)

    def run(module, opt, steps):
        for k in steps:
            for p, g in zip(module.ps, _grads(k)):
                p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            opt.step()
            opt.zero_grad()

    (m1, o1), (m3, o3) = resumed_through_dcp(make, run, STEPS, os.path.join(tmp, f"ckpt-{name}"))
    same = all(torch.equal(a.detach().full_tensor(), b.detach().full_tensor()) for a, b in zip(m1.ps, m3.ps))
    return same and all(torch.equal(o1.state[a][key].full_tensor(), o3.state[b][key].full_tensor())
                        for a, b in zip(m1.ps, m3.ps) for key in ("exp_avg", "exp_avg_sq"))


def _worker(rank, tmp):
    from torch.distributed.device_mesh import init_device_mesh

    _init(rank, tmp)
    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for backend in BACKENDS:
        for amsgrad in (False, True):
            key = f"{backend}/amsgrad={amsgrad}"
            record(out, key, lambda: _compare(mesh, backend, amsgrad))
        record(out, f"{backend}/resume", lambda: dict(same=_resume(mesh, backend, tmp, backend)))
    _finish(rank, tmp, out)


def test_clipped_adamw_on_dtensors_equals_clip_grad_norm_and_adamw():
    for rank in _spawn(_worker):
        for key, r in rank.items():
            assert "error" not in r, f"{key}: {r['error']}"
            if key.endswith("/resume"):
                assert r["same"], f"{key}: a resumed run differs"
                continue
            assert r["close"], f"{key}: parameters differ from clip_grad_norm_ + torch.optim.AdamW"
            assert r["moments"], f"{key}: moments differ from torch.optim.AdamW's"
            assert r["dtensors"], f"{key}: moments are not DTensors with the parameter's placements"
            assert r["steps"], f"{key}: step counts"
