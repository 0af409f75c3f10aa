"""Tensor parallelism (issue 20 item 1): DTensor parameters with any ``Shard(d)`` (column- and
row-parallel layers: ``Shard(0)`` / ``Shard(1)``), ``Replicate()``, strided shards and 2-D meshes
(HSDP x TP), mixed in one param group.  gloo, 2 processes.  Each run equals the same optimizer on the
whole tensors in one process, and ``norm`` equals torch's ``clip_grad_norm_`` + ``torch.optim.SGD`` /
``AdamW`` (the independent oracle), on every backend; an inf in one rank's shard skips every rank's step."""

import pytest
import torch
import torch.distributed as dist

from parallel_cases import record, seeded, torch_clipped_run
from test_distributed import WORLD, _finish, _init, _spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SHAPES = [(6, 4), (4, 6), (6,), (3, 5)]
BACKENDS = ["reference", "cpp", "triton"]
STEPS = 3
#: every method on the reference backend; on the fused ones (whose norms, thresholds and scales are those of
#: one process, tested at length elsewhere) what the placements change: the whole model's norm (against
#: torch) and the per-element draws' indices
METHODS = (("sgd", "norm"), ("adamw", "norm"), ("sgd", "layer_wise"), ("sgd", "auto_clip"), ("adamw", "zclip"),
           ("sgd", "coordinate_wise"), ("sgd", "coordinate+constant+linear"), ("adamw", "layer+auto+quadratic"))
FUSED_METHODS = (("sgd", "norm"), ("adamw", "norm"), ("sgd", "coordinate+constant+linear"))


def _grads(k):
    return seeded(SHAPES, 40 + k, 5.0 if k == 1 else 0.3)


def _start():
    return seeded(SHAPES, 0)


def _layouts(mesh1, mesh2):
    """(name, mesh, placements of each tensor of SHAPES): a column- and a row-parallel matrix, a replicated
    bias, an unevenly split matrix; then HSDP x TP on a 2-D mesh."""
    from torch.distributed.tensor import Replicate, Shard

    yield "tp", mesh1, [[Shard(0)], [Shard(1)], [Replicate()], [Shard(1)]]
    yield "hsdp_tp", mesh2, [[Shard(0), Shard(1)], [Replicate(), Shard(1)], [Shard(0), Replicate()],
                             [Replicate(), Shard(0)]]


def _make(kind, params, method, backend, **settings):
    from torch_clip_fused import ClippedAdamW, ClippedSGD

    if kind == "sgd":
        return ClippedSGD(params, lr=0.1, momentum=0.9, clipping_type=method, clipping_level=1.0, backend=backend,
                          seed=2, zclip_warmup=1, beta=0.1, **settings)  # beta 0.1: most decisions hang on a draw
    return ClippedAdamW(params, lr=0.01, clipping_type=method, clipping_level=1.0, backend=backend, seed=2,
                        zclip_warmup=1, beta=0.1)


def _compare(mesh, placements, kind, method, backend, dtype=torch.float32, **settings):
    """The optimizer on the DTensors vs on the whole tensors in one process: parameters (bit for bit on the
    reference: the random draws of coordinate scope and stochastic rounding index each element by its
    place in the unsharded parameter, whatever the placement)."""
    from torch.distributed.tensor import distribute_tensor

    single = [torch.nn.Parameter(x.clone().to(dtype)) for x in _start()]
    sharded = [torch.nn.Parameter(distribute_tensor(x.clone().to(dtype), mesh, pl))
               for x, pl in zip(_start(), placements)]
    o1, o2 = _make(kind, single, method, backend, **settings), _make(kind, sharded, method, backend, **settings)
    for k in range(STEPS):
        for p, q, g, pl in zip(single, sharded, _grads(k), placements):
            p.grad = g.clone().to(dtype)
            q.grad = distribute_tensor(g.clone().to(dtype), mesh, pl)
        o1.step()
        o2.step()
    gathered = [p.detach().full_tensor() for p in sharded]
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=0, atol=0)
    out = dict(close=all(torch.allclose(a.detach(), b, **tol) for a, b in zip(single, gathered)),
               equal=all(torch.equal(a.detach(), b) for a, b in zip(single, gathered)),
               norms=[float(o1.statistics()[0]["norm"]), float(o2.statistics()[0]["norm"])])
    if method == "norm":
        expected, _ = torch_clipped_run(_start(), _grads, STEPS, kind)
        out["torch"] = all(torch.allclose(b, e.detach(), rtol=1e-5, atol=1e-7) for b, e in zip(gathered, expected))
    return out


def _strided(mesh2, backend):
    """FSDP2 over a tensor-parallel parameter: a strided shard, against the whole tensor in one process."""
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from torch_clip_fused import ClippedSGD

    placements = [_StridedShard(0, split_factor=2), Replicate()]  # 8 rows: 2 stripes of 2 rows per rank
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, generator=gen)
    p = torch.nn.Parameter(distribute_tensor(x.clone(), mesh2, placements))
    q = torch.nn.Parameter(x.clone())
    o1 = ClippedSGD([q], lr=0.1, momentum=0.9, clipping_level=0.5, backend=backend)
    o2 = ClippedSGD([p], lr=0.1, momentum=0.9, clipping_level=0.5, backend=backend)
    for k in range(STEPS):
        g = torch.randn(8, 4, generator=gen) * (5.0 if k == 1 else 0.3)
        q.grad = g.clone()
        p.grad = distribute_tensor(g.clone(), mesh2, placements)
        o1.step()
        o2.step()
    return torch.allclose(p.detach().full_tensor(), q.detach(), rtol=1e-5, atol=1e-7)


def _inf_skip(mesh, rank, backend):
    """An inf in rank 1's shard of a row-parallel (Shard(1)) weight: every rank skips the step."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from torch_clip_fused import ClippedAdamW

    params = [torch.nn.Parameter(distribute_tensor(x.clone(), mesh, [Shard(1)])) for x in _start()[:2]]
    opt = ClippedAdamW(params, lr=0.01, backend=backend)
    moved = []
    for k in range(3):
        for p, g in zip(params, _grads(k)[:2]):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(1)])
        if k == 1 and rank == 1:
            params[1].grad.to_local().view(-1)[0] = float("inf")
        before = [p.detach().full_tensor() for p in params]
        opt.step()
        moved.append(any(not torch.equal(b, p.detach().full_tensor()) for b, p in zip(before, params)))
    return dict(close=moved == [True, False, True], moved=moved)


def _worker(rank, tmp):
    from torch.distributed.device_mesh import init_device_mesh

    _init(rank, tmp)
    mesh1 = init_device_mesh("cpu", (WORLD,))
    mesh2 = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp"))
    out = {}
    for name, mesh, placements in _layouts(mesh1, mesh2):
        for backend in BACKENDS:
            for kind, method in METHODS if backend == "reference" else FUSED_METHODS:
                key = f"{name}/{backend}/{kind}/{method}"
                record(out, key, lambda: _compare(mesh, placements, kind, method, backend))
        for backend in BACKENDS:  # stochastic rounding of bfloat16: one Philox draw per element, by its place
            key = f"{name}/{backend}/sgd/stochastic_rounding"
            record(out, key, lambda: _compare(mesh, placements, "sgd", "coordinate+constant+linear", backend,
                                              torch.bfloat16, stochastic_rounding=True))
    for backend in BACKENDS:
        record(out, f"inf/{backend}", lambda: _inf_skip(mesh1, rank, backend))
    strided_mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("dp", "tp"))
    for backend in BACKENDS:
        record(out, f"strided/{backend}", lambda: dict(close=_strided(strided_mesh, backend)))
    _finish(rank, tmp, out)


def test_tensor_parallel_placements_equal_the_single_process_step():
    for rank in _spawn(_worker):
        for key, r in rank.items():
            assert "error" not in r, f"{key}: {r['error']}"
            assert r["close"], f"{key}: differs from the same optimizer on the whole tensors"
            if "/reference/" in key and "equal" in r:
                assert r["equal"], f"{key}: not bit-identical to the single-process run on the reference backend"
            if "norms" in r:
                assert r["norms"][1] == pytest.approx(r["norms"][0], rel=1e-6), key
            if "torch" in r:
                assert r["torch"], f"{key}: differs from clip_grad_norm_ + the torch optimizer"
