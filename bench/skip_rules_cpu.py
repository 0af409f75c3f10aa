"""What a skip rule costs (issue 21 item 1), on the CPU: ClippedSGD (momentum, global norm) in one param
group without a rule (the backend's fused step: one pass for the norms, one for the update), with
``skip_if_norm_above`` and with ``skip_if_zscore_above`` (neither firing: the rules' norm stage, the
decision on the device, then the apply stage with the given norms), and torch's
``clip_grad_norm_(foreach=True)`` + ``SGD(foreach=True)``.  Medians of interleaved rounds in one run; the
ratios are what to compare.

    python bench/skip_rules_cpu.py [--case "ResNet-50"] [--backend cpp] [--reps 30]
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


def contenders(shapes, backend: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    settings = dict(lr=1e-3, momentum=0.9, clipping_level=1e-3, backend=backend)
    plain = ClippedSGD(params, **settings)
    norm_above = ClippedSGD(params, skip_if_norm_above=1e30, **settings)
    zscore_above = ClippedSGD(params, skip_if_zscore_above=1e30, **settings)
    torch_sgd = torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)

    def torch_step():
        torch.nn.utils.clip_grad_norm_(params, 1e-3, foreach=True)
        torch_sgd.step()

    return {"no skip rule": plain.step, "skip_if_norm_above": norm_above.step,
            "skip_if_zscore_above": zscore_above.step, "clip_grad_norm_ + SGD(foreach)": torch_step}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="bench/model_shapes.py case (repeatable)")
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    cases = args.case or ["small (0.5M params, 130 tensors)", "ResNet-50"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}")
    print("| case | contender | ms per step | vs no skip rule |")
    print("|---|---|---|---|")
    for case in cases:
        shapes = CASES[case]
        print_ratio_rows(case, numel(shapes), contenders(shapes, args.backend), "no skip rule", torch.device("cpu"),
                         args.reps, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
