"""ClippedSGD under FSDP2 (``fully_shard``), or HSDP with ``--hsdp`` (a 2-D mesh: replicate x shard).

Each rank steps its own shard of every parameter.  The per-tensor sums of squares of the local
shards are combined with ONE all-reduce per param group and step (no host sync), so every rank
clips with the norms of the whole model; coordinate-scope draws use each element's index in the
unsharded parameter, so the run takes the decisions of a single-process run.  Momentum buffers are
DTensors, so the optimizer's state dict goes through torch.distributed.checkpoint.

    torchrun --nproc_per_node=2 examples/fsdp2_train.py           # FSDP2, mesh (2,)
    torchrun --nproc_per_node=2 examples/fsdp2_train.py --hsdp    # HSDP, mesh (1, 2)
"""

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from torch_clip_fused import ClipMethod, ClippedSGD


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hsdp", action="store_true", help="a 2-D mesh (replicate, shard) instead of 1-D")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device_type = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if args.hsdp:  # replicate across the first dimension, shard across the second
        mesh = init_device_mesh(device_type, (1, world), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device_type, (world,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).to(device_type)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # parameters are now DTensors, Shard(0) (HSDP: Replicate(), Shard(0))
    opt = ClippedSGD(model.parameters(), lr=0.05, momentum=0.9,
                     clipping_type=ClipMethod("coordinate", "constant", "linear"), clipping_level=0.5)
    data = torch.Generator().manual_seed(100 + rank)
    for step in range(args.steps):
        x = torch.randn(16, 32, generator=data).to(device_type)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 and rank == 0:
            stats = {k: round(float(v), 4) for k, v in opt.statistics()[0].items()}
            print(f"step {step}: loss {loss.item():.4f} {stats}", flush=True)
    # a distributed checkpoint of the model and the optimizer (momentum DTensors, step, seed, histories)
    path = os.path.join(tempfile.gettempdir(), "tcf_fsdp2_example")
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_optimizer_state_dict(model, opt, state["optim"])
    if rank == 0:
        print(f"checkpoint saved and loaded: {path}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
