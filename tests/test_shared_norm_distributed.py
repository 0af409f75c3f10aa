"""One norm over every param group on DTensor (FSDP2) parameters (issue 19): one optimizer step makes
exactly ONE collective for all its groups (counted), takes its sums of squares from the backend's own norms
stage (Backend.norms, not torch foreach reductions), and equals the same groups of plain tensors in one
process.  gloo, 2 processes, as tests/test_distributed.py."""

import pytest
import torch
import torch.distributed as dist

from parallel_cases import counted_all_reduces, record
from test_distributed import WORLD, _finish, _init, _spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SHAPES = [(6, 5), (6,), (4, 6), (4,), (2, 4)]
BACKENDS = ["reference", "cpp", "triton"]


def _groups(params, layer_wise):
    groups = [dict(params=[params[0], params[2]], weight_decay=0.01, lr=0.1),
              dict(params=[params[1], params[3]], weight_decay=0.0, lr=0.05)]
    groups.append(dict(params=[params[4]], clipping_type="layer_wise" if layer_wise else "norm"))
    return groups


def _run(backend, layer_wise, mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    from torch_clip_fused import ClippedSGD

    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=gen) for s in SHAPES]
    single = [torch.nn.Parameter(x.clone()) for x in full]
    sharded = [torch.nn.Parameter(distribute_tensor(x.clone(), mesh, [Shard(0)])) for x in full]
    settings = dict(momentum=0.9, clipping_level=1.0, backend=backend, seed=5)
    o1, o2 = ClippedSGD(_groups(single, layer_wise), **settings), ClippedSGD(_groups(sharded, layer_wise), **settings)
    import torch_clip_fused.distributed.dtensor as dtensor

    foreach_norms = []  # the norm stage by torch foreach reductions instead of the backend's own norms stage
    own_norm_code = dtensor.local_norm_parts
    dtensor.local_norm_parts = lambda *a, **k: (foreach_norms.append(1), own_norm_code(*a, **k))[1]

    per_step = []
    for k in range(3):
        data = torch.Generator().manual_seed(10 + k)
        grads = [torch.randn(s, generator=data) * (3.0 if k == 1 else 0.2) for s in SHAPES]
        for p, g in zip(single, grads):
            p.grad = g.clone()
        for p, g in zip(sharded, grads):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        o1.step()
        with counted_all_reduces() as calls:
            o2.step()
        per_step.append(len(calls))
    close = all(torch.allclose(a.detach(), b.detach().full_tensor(), rtol=1e-5, atol=1e-6)
                for a, b in zip(single, sharded))
    dtensor.local_norm_parts = own_norm_code
    norms = [[float(s["norm"]) for s in o.statistics()] for o in (o1, o2)]
    return dict(per_step=per_step, close=close, norms=norms, foreach_norms=len(foreach_norms))


def _worker(rank, tmp):
    from torch.distributed.device_mesh import init_device_mesh

    _init(rank, tmp)
    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for backend in BACKENDS:
        for layer_wise in (False, True):
            key = f"{backend}/{'layer_wise' if layer_wise else 'norm'}"
            record(out, key, lambda: _run(backend, layer_wise, mesh))
    _finish(rank, tmp, out)


def test_one_collective_per_step_for_every_group_and_the_single_process_result():
    for rank in _spawn(_worker):
        for key, r in rank.items():
            assert "error" not in r, f"{key}: {r['error']}"
            assert r["per_step"] == [1, 1, 1], f"{key}: collectives per step {r['per_step']}"
            assert r["close"], f"{key}: differs from the single-process run"
            assert r["foreach_norms"] == 0, f"{key}: a norm stage outside the backend's ({r['foreach_norms']} calls)"
            single, sharded = r["norms"]
            assert sharded == pytest.approx(single, rel=1e-5), key
            shared = single[:3] if key.endswith("/norm") else single[:2]
            assert len(set(shared)) == 1, f"{key}: the global-scope groups report one norm, got {single}"
