"""What one norm over several param groups costs (issue 19), on the CPU: ClippedSGD with the
decay / no-decay split the Hugging Face Trainer makes (matrices in one group, vectors in the other),
``per_group_norm=False`` (one norm over both: the norm stage, one reduction, the steps with given norms)
against ``per_group_norm=True`` (each group's own fused step) and against torch's
``clip_grad_norm_(foreach=True)`` + ``SGD(foreach=True)``, and the same model in one param group.
Times are medians of interleaved rounds in one run; the ratios are what to compare.

    python bench/shared_norm_cpu.py [--case "ResNet-50"] [--backend cpp] [--reps 30]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model_shapes import CASES, numel  # noqa: E402
from benchmark_clipped_sgd import print_ratio_rows  # noqa: E402

from torch_clip_fused import ClippedSGD  # noqa: E402


def contenders(shapes, backend: str, groups: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    split = [dict(params=[p for p in params if p.ndim > 1], weight_decay=0.01),
             dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]
    if groups > 2:  # more groups: the matrices cut into groups - 1 groups
        matrices = split[0]["params"]
        size = -(-len(matrices) // (groups - 1))
        split = [dict(params=matrices[i:i + size], weight_decay=0.01) for i in range(0, len(matrices), size)] + split[1:]
    settings = dict(lr=1e-3, momentum=0.9, clipping_level=1e-3, backend=backend)
    shared = ClippedSGD(split, **settings)
    per_group = ClippedSGD([dict(g) for g in split], per_group_norm=True, **settings)
    one_group = ClippedSGD(params, **settings)
    torch_sgd = torch.optim.SGD([dict(g) for g in split], lr=1e-3, momentum=0.9, foreach=True)

    def torch_step():
        torch.nn.utils.clip_grad_norm_(params, 1e-3, foreach=True)
        torch_sgd.step()

    return {"shared norm (default)": shared.step, "per_group_norm=True": per_group.step,
            "one param group": one_group.step, "clip_grad_norm_ + SGD(foreach)": torch_step}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="bench/model_shapes.py case (repeatable)")
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    cases = args.case or ["small (0.5M params, 130 tensors)", "ResNet-50"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}, "
          f"{args.groups} param groups")
    print("| case | contender | ms per step | vs shared norm |")
    print("|---|---|---|---|")
    for case in cases:
        shapes = CASES[case]
        print_ratio_rows(case, numel(shapes), contenders(shapes, args.backend, args.groups), "shared norm (default)",
                         torch.device("cpu"), args.reps, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
