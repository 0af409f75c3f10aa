"""ClippedAdamW on a mixture-of-experts model whose experts live on their own mesh.

The experts' weights are one stacked tensor per projection, sharded over the expert-parallel mesh
(``Shard(0)``: each rank holds ``experts / ranks`` experts); the router and the output layer are plain
tensors, the same on every rank (every rank sees the same batch here).  One optimizer and one param
group take ``model.parameters()``: the clipping norm is the whole model's (the experts' sums of squares
summed over the expert mesh, the plain tensors' counted once), with one all-reduce per step and no host
sync.  Tokens go to their top-1 expert; each rank runs its own experts and an all-reduce combines the
outputs.  The script checks every step's clipping norm against the norm of the whole
model's gradients computed apart with torch.

    torchrun --nproc_per_node=2 examples/moe_train.py
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from torch_clip_fused import ClippedAdamW


class SumOverRanks(torch.autograd.Function):
    """The experts' outputs summed over the expert mesh (each token's output comes from one rank); every
    rank computes the same loss from the sum, so each rank's part gets the loss's gradient as it is."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class MoE(torch.nn.Module):
    def __init__(self, mesh, dim: int, hidden: int, experts: int):
        super().__init__()
        torch.manual_seed(0)  # the same full weights on every rank before sharding
        self.router = torch.nn.Linear(dim, experts)
        self.w_in = torch.nn.Parameter(distribute_tensor(torch.randn(experts, dim, hidden) / dim ** 0.5, mesh,
                                                         [Shard(0)]))
        self.w_out = torch.nn.Parameter(distribute_tensor(torch.randn(experts, hidden, dim) / hidden ** 0.5, mesh,
                                                          [Shard(0)]))
        self.head = torch.nn.Linear(dim, 1)
        self.group = mesh.get_group()
        self.first = dist.get_rank(self.group) * (experts // mesh.size())  # this rank's first expert

    def forward(self, x):
        choice = self.router(x).argmax(-1)
        w_in, w_out = self.w_in.to_local(), self.w_out.to_local()
        out = torch.zeros_like(x)
        for e in range(w_in.shape[0]):
            routed = choice == self.first + e
            h = torch.nn.functional.gelu(x[routed] @ w_in[e])
            out = out.index_put((routed.nonzero().squeeze(1),), h @ w_out[e])
        out = SumOverRanks.apply(out, self.group)  # every token's expert output, from the rank holding that expert
        # the router learns through its softmax weight of the chosen expert (top-1 gating)
        gate = torch.softmax(self.router(x), -1).gather(1, choice.unsqueeze(1))
        return self.head(x + gate * out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device_type = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    ep = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("ep",))
    model = MoE(ep, dim=8, hidden=16, experts=2 * dist.get_world_size()).to(device_type)
    opt = ClippedAdamW(model.parameters(), lr=1e-2, clipping_level=1.0, seed=0)

    data = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        x = torch.randn(64, 8, generator=data).to(device_type)
        y = x.sum(1, keepdim=True) * (20.0 if step == 3 else 1.0)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        experts_sq = sum(p.grad.to_local().double().square().sum() for p in (model.w_in, model.w_out))
        dist.all_reduce(experts_sq)  # each rank holds its own experts' gradients
        plain_sq = sum(p.grad.double().square().sum() for p in (*model.router.parameters(), *model.head.parameters()))
        whole = float((experts_sq + plain_sq).sqrt())  # the whole model's gradient norm, apart
        opt.step()
        norm = float(opt.statistics()[0]["norm"])
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.4f}, clipping norm {norm:.4f} (whole model: {whole:.4f})")
        assert abs(norm - whole) <= 1e-5 * whole, "the clipping norm is not the whole model's"
    if dist.get_rank() == 0:
        print("every rank clipped with the whole model's norm")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
