"""3-D parallelism (issue 20): 4 gloo processes on a (pp=2, dp=1, tp=2) mesh.  Each pipeline stage holds its
own layers as DTensors on its (dp, tp) mesh, a 2-D mesh of 2 of the 4 ranks (column- and row-parallel
weights, a replicated bias), and ClippedAdamW with ``norm_group=`` the pipeline's mesh.  Every step's
clipping norm equals the norm of the whole model's gradients computed apart (gathered with
``full_tensor()`` on each stage, summed over the stages), and both stages report it."""

import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_distributed import _finish

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 4
SHAPES = [(6, 4), (4, 6), (4,)]


def _worker(rank, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from torch_clip_fused import ClippedAdamW

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=WORLD)
    world = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("pp", "dp", "tp"))
    stage = world.get_coordinate()[0]
    mesh = world["dp", "tp"]  # this stage's 2-D mesh: 2 of the 4 ranks
    placements = [[Replicate(), Shard(0)], [Replicate(), Shard(1)], [Replicate(), Replicate()]]
    gen = torch.Generator().manual_seed(stage)
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(s, generator=gen), mesh, pl))
              for s, pl in zip(SHAPES, placements)]
    out = {}
    for backend in ("reference", "cpp"):
        try:
            opt = ClippedAdamW(params, lr=0.01, clipping_level=1.0, backend=backend, norm_group=world["pp"])
            found = []
            for k in range(3):
                data = torch.Generator().manual_seed(10 * k + stage)
                for p, s, pl in zip(params, SHAPES, placements):
                    p.grad = distribute_tensor(torch.randn(s, generator=data) * (5.0 if k == 1 else 0.5), mesh, pl)
                own = sum(float(p.grad.full_tensor().double().square().sum()) for p in params)
                whole = torch.tensor([own], dtype=torch.float64)
                dist.all_reduce(whole, group=world["pp"].get_group())  # the stages' sums, apart
                opt.step()
                found.append((float(opt.statistics()[0]["norm"]), float(whole.sqrt())))
            out[backend] = found
        except Exception as err:  # noqa: BLE001 (reported by the test)
            out[backend] = f"{type(err).__name__}: {err}"
    _finish(rank, tmp, out)


def test_pipeline_of_tensor_parallel_stages_clips_with_the_whole_models_norm():
    os.environ["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(tmp,), nprocs=WORLD, join=True, start_method="spawn")
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(WORLD)]
    for rank in ranks:
        for backend, found in rank.items():
            assert isinstance(found, list), f"{backend}: {found}"
            for norm, whole in found:
                assert norm == pytest.approx(whole, rel=1e-6), f"{backend}: clipping norm {norm}, whole model {whole}"
    assert all(rank == ranks[0] for rank in ranks[1:]), "the ranks report different norms"
