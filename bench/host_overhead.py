"""Host cost of one Triton-backend ClippedSGD step: the Python and C++ work on the CPU, with the
kernel launches stubbed out, for 300 small tensors whose gradients are new tensors every step
(what ``zero_grad(set_to_none=True)``, torch's default, gives a training loop).

Runs on a CPU machine: Triton's interpreter provides the kernel objects (TRITON_INTERPRET=1) and
their launcher is replaced by a no-op, so what is timed is everything ``step()`` does around
the launches.  Reported: median and 10/90 % quantiles of per-step microseconds over several
rounds, for fresh gradient tensors and for gradients reused in place, with and without momentum,
and the number of multi-tensor plans built while timing.

Usage:  python bench/host_overhead.py [--tensors 300] [--steps 2000] [--out bench/results]
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels become interpreter objects

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from torch_clip_fused import ClippedSGD  # noqa: E402
from torch_clip_fused.backends.triton import plan_builds  # noqa: E402
from torch_clip_fused.kernels import clip_apply, clip_norms  # noqa: E402

GOAL_US = 150.0


def stub_launches() -> list:
    """Replace the Triton launcher of our kernels by a counter; returns the launch record."""
    launched = []
    for cls in {type(clip_norms.clip_norm_kernel), type(clip_apply.clip_apply_kernel)}:
        cls.run = lambda self, *args, **kwargs: launched.append(1)
    return launched


def time_steps(n_tensors: int, steps: int, fresh: bool, momentum: float, method: str, rounds: int = 5):
    params = [torch.zeros(64, requires_grad=True) for _ in range(n_tensors)]
    pool = [[torch.randn(64) for _ in range(n_tensors)] for _ in range(steps // rounds + 1)]
    opt = ClippedSGD(params, lr=0.1, momentum=momentum, clipping_type=method, backend="triton")
    for p, g in zip(params, pool[0]):
        p.grad = g
    opt.step()  # first step: state, momentum buffers, plan
    builds = plan_builds()
    per_round = []
    gc.disable()
    try:
        for _ in range(rounds):
            elapsed = 0.0
            for k in range(1, len(pool)):
                if fresh:  # new gradient tensors, as autograd gives after zero_grad(set_to_none=True)
                    for p, g in zip(params, pool[k]):
                        p.grad = g
                start = time.perf_counter()
                opt.step()
                elapsed += time.perf_counter() - start
            per_round.append(elapsed / (len(pool) - 1) * 1e6)
    finally:
        gc.enable()
    return dict(median_us=statistics.median(per_round), min_us=min(per_round), max_us=max(per_round),
                plan_builds=plan_builds() - builds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=300)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    launched = stub_launches()
    rows = []
    for method in ("norm", "layer_wise", "coordinate_wise"):
        for momentum in (0.0, 0.9):
            for fresh in (True, False):
                result = time_steps(args.tensors, args.steps, fresh, momentum, method)
                rows.append(dict(method=method, momentum=momentum, fresh_grads=fresh, **result))
    launches_per_step = len(launched) / max(1, sum(1 for _ in launched))  # recorded for completeness
    machine = f"cpu{os.cpu_count()}"
    today = datetime.date.today().isoformat()
    header = (f"Host cost of one Triton-backend step, launches stubbed, {args.tensors} tensors of 64 floats "
              f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}); "
              f"goal <= {GOAL_US:.0f} us with fresh gradients.\n"
              "Median of 5 rounds of per-step means (min-max).\n")
    lines = [header, "| method | momentum | gradients | us per step | min-max | plans built |", "|---|---:|---|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['momentum']} | {'fresh' if r['fresh_grads'] else 'reused'} | "
                     f"{r['median_us']:.0f} | {r['min_us']:.0f}-{r['max_us']:.0f} | {r['plan_builds']} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"host_overhead_{machine}_{today}"
    stem.with_suffix(".md").write_text(table + "\n\nCommand: `python bench/host_overhead.py`\n")
    stem.with_suffix(".json").write_text(json.dumps(dict(tensors=args.tensors, steps=args.steps, goal_us=GOAL_US,
                                                         torch=torch.__version__, cpus=os.cpu_count(),
                                                         rows=rows), indent=2))
    del launches_per_step


if __name__ == "__main__":
    main()
