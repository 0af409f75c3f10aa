"""ClippedSGD under DDP: every rank holds the whole model; DDP all-reduces the gradients during
backward(), so every rank clips the same gradients the same way.  ``seed=None`` takes rank 0's draw
on every rank (one broadcast at construction), so randomized methods agree across ranks too.

    torchrun --nproc_per_node=2 examples/ddp_train.py            # CPU (gloo) or one GPU per rank (nccl)
"""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from torch_clip_fused import ClippedSGD


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts rank 0's)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).to(device)
    model = DDP(model, device_ids=[device.index] if cuda else None)
    opt = ClippedSGD(model.parameters(), lr=0.05, momentum=0.9, clipping_type="linear_rand_autoclip")
    data = torch.Generator(device="cpu").manual_seed(100 + rank)  # each rank its own batches
    for step in range(20):
        x = torch.randn(16, 32, generator=data).to(device)
        y = x.sum(dim=1, keepdim=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 and rank == 0:
            stats = {k: round(float(v), 4) for k, v in opt.statistics()[0].items()}  # .item(): one sync, when logging
            print(f"step {step}: loss {loss.item():.4f} {stats}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
