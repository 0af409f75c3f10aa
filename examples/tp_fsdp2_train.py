"""ClippedAdamW on a tensor-parallel + FSDP2 model: a small Llama-style feed-forward block (w1 / w3
column-parallel, w2 row-parallel: ``Shard(0)`` and ``Shard(1)`` weights) on a 2-D mesh (dp x tp),
then ``fully_shard`` over the dp dimension.

The optimizer takes ``model.parameters()`` as they are (DTensors of any placement): each rank steps its
local shards and clips with the norm of the whole model (one all-reduce of the per-tensor sums of
squares per step, no host sync), equal to ``clip_grad_norm_`` on the unsharded model.  The script checks
it against the gradients gathered with ``full_tensor()``.

    torchrun --nproc_per_node=2 examples/tp_fsdp2_train.py          # mesh (1, 2): tensor parallel only
    torchrun --nproc_per_node=4 examples/tp_fsdp2_train.py --dp 2   # mesh (2, 2): FSDP2 x TP
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from torch_clip_fused import ClippedAdamW


class FeedForward(torch.nn.Module):
    """Llama's SwiGLU feed-forward: w2(silu(w1 x) * w3 x), with a residual and an RMS norm."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = torch.nn.RMSNorm(dim)
        self.w1 = torch.nn.Linear(dim, hidden, bias=False)
        self.w3 = torch.nn.Linear(dim, hidden, bias=False)
        self.w2 = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.w2(torch.nn.functional.silu(self.w1(h)) * self.w3(h))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dp", type=int, default=1, help="size of the data-parallel (FSDP2) mesh dimension")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    device_type = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    mesh = init_device_mesh(device_type, (args.dp, world // args.dp), mesh_dim_names=("dp", "tp"))

    torch.manual_seed(0)  # the same weights on every rank before sharding
    model = torch.nn.Sequential(FeedForward(16, 32), FeedForward(16, 32)).to(device_type)
    for block in model:
        parallelize_module(block, mesh["tp"], {"w1": ColwiseParallel(), "w3": ColwiseParallel(),
                                               "w2": RowwiseParallel()})
    if args.dp > 1:
        for block in model:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    opt = ClippedAdamW(model.parameters(), lr=1e-2, clipping_level=1.0, seed=0)

    data = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        x = torch.randn(8, 16, generator=data).to(device_type)  # every rank the same batch (TP needs it)
        loss = model(x).square().mean() * (50.0 if step == 4 else 1.0)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]
        whole = torch.nn.utils.get_total_norm(grads)  # torch's norm of the whole model's gradients
        opt.step()
        norm = float(opt.statistics()[0]["norm"])
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.4f}, clipping norm {norm:.4f} (whole model: {float(whole):.4f})")
        assert abs(norm - float(whole)) <= 1e-5 * float(whole), "the clipping norm is not the whole model's"
    if dist.get_rank() == 0:
        print("every rank clipped with the whole model's norm")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
