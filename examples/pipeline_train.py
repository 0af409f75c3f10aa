"""ClippedAdamW under pipeline parallelism (``torch.distributed.pipelining``) with ``norm_group``.

Each rank holds one stage of a small MLP and its own ClippedAdamW over that stage's parameters.  With
``norm_group=`` the pipeline's process group, the global-scope clipping norm is the whole model's:
every stage's sum of squares is summed over the pipeline's ranks (one all-reduce of two numbers per
step, no host sync), so every stage clips with the same scale and keeps the same ZClip state, as
``clip_grad_norm_`` over the whole model would.  The script checks it: after training, each stage's
last clipping norm equals the norm of the whole model's gradients, computed apart with torch.

    torchrun --nproc_per_node=2 examples/pipeline_train.py            # 2 stages, GPipe, 4 micro-batches
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

from torch_clip_fused import ClippedAdamW


def stage_module(stage: int, stages: int, width: int) -> torch.nn.Module:
    """Stage ``stage`` of a 2 x ``stages``-layer MLP (the same weights on every run: seeded per stage)."""
    torch.manual_seed(stage)
    layers = []
    for _ in range(2):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    if stage == stages - 1:
        layers.append(torch.nn.Linear(width, 1))
    return torch.nn.Sequential(*layers)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--micro-batches", type=int, default=4)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, stages = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    module = stage_module(rank, stages, args.width).to(device)
    stage = PipelineStage(module, rank, stages, device)
    schedule = ScheduleGPipe(stage, args.micro_batches, loss_fn=torch.nn.functional.mse_loss)
    # decay / no-decay groups, one norm over both and over every stage (norm_group: the pipeline's ranks)
    groups = [dict(params=[p for p in module.parameters() if p.dim() > 1], weight_decay=0.01),
              dict(params=[p for p in module.parameters() if p.dim() == 1], weight_decay=0.0)]
    opt = ClippedAdamW(groups, lr=1e-2, clipping_type="zclip", zclip_warmup=3, norm_group=dist.group.WORLD,
                       seed=0)

    data = torch.Generator().manual_seed(100)
    for step in range(args.steps):
        x = torch.randn(32, args.width, generator=data).to(device)
        y = (x.sum(1, keepdim=True) * (10.0 if step == 6 else 1.0)).to(device)  # step 6: a loss spike
        opt.zero_grad()
        losses = []
        if rank == 0:
            schedule.step(x)
        elif rank == stages - 1:
            schedule.step(target=y, losses=losses)
        else:
            schedule.step()
        # the whole model's gradient norm, apart: every stage's sum of squares summed over the pipeline
        own = torch.stack([p.grad.double().square().sum() for p in module.parameters()]).sum().reshape(1)
        dist.all_reduce(own)
        opt.step()
        stats = opt.statistics()[0]
        if rank == stages - 1:
            loss = torch.stack(losses).mean().item()
            print(f"step {step}: loss {loss:.4f}, clipping norm {float(stats['norm']):.4f}, "
                  f"threshold {float(stats['threshold']):.4f}")
        assert abs(float(stats["norm"]) - float(own.sqrt())) <= 1e-5 * float(own.sqrt()), \
            "a stage clipped with another norm than the whole model's"
    if rank == 0:
        print("every stage clipped with the whole model's norm")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
