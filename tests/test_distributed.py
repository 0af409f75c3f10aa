"""torch.distributed on CPU with gloo, 2 processes (issue 11): DDP replicas stay bit-identical
with ``seed=None`` when each rank seeds its default generator differently, for randomized
methods on every backend.

The workers run in processes started with torch.multiprocessing (file:// rendezvous in a
temporary directory, no network port); each writes its findings to a JSON file that the test
reads back.
"""

import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
METHODS = ["linear_rand_norm", "quadratic_rand_autoclip", ("coordinate", "constant", "linear"),
           ("layer", "auto", "quadratic")]
BACKENDS = ["reference", "cpp", "triton"]


def _init(rank, tmp):
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=WORLD)


def _ddp_worker(rank, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from torch_clip_fused import ClipMethod, ClippedSGD

    _init(rank, tmp)
    torch.manual_seed(1000 + rank)  # different generators per rank, as data augmentation often does
    out = {"draws_differ": None, "results": {}}
    mine = torch.randint(0, 2**31, (1,))
    both = [torch.zeros_like(mine) for _ in range(WORLD)]
    dist.all_gather(both, mine)
    out["draws_differ"] = bool(both[0] != both[1])
    for backend in BACKENDS:
        for method in METHODS:
            clip = ClipMethod(*method) if isinstance(method, tuple) else method
            init = torch.Generator().manual_seed(7)
            model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=init))
            ddp = DDP(model)
            opt = ClippedSGD(ddp.parameters(), lr=0.1, momentum=0.9, clipping_type=clip, clipping_level=0.5,
                             backend=backend)
            data = torch.Generator().manual_seed(50 + rank)  # each rank its own batch
            for _ in range(4):
                x = torch.randn(8, 6, generator=data) * 3
                loss = ddp(x).pow(2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
            dist.all_gather(gathered, flat)
            key = f"{backend}/{clip}"
            out["results"][key] = dict(identical=bool(torch.equal(gathered[0], gathered[1])),
                                       seed=opt.seed, moved=bool((flat != 0).any()))
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def _spawn(worker):
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(tmp,), nprocs=WORLD, join=True, start_method="spawn")
        return [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(WORLD)]


def test_ddp_ranks_stay_identical_with_seed_none():
    ranks = _spawn(_ddp_worker)
    assert ranks[0]["draws_differ"], "the ranks' generators must differ for this test to mean anything"
    for key, result in ranks[0]["results"].items():
        assert result["identical"], f"{key}: DDP replicas diverged"
        assert result["seed"] == ranks[1]["results"][key]["seed"], key
