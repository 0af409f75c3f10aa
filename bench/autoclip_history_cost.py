"""Cost of one AutoClip step against the length of the run (issue 10.10).

An uncapped AutoClip history holds every norm recorded so far.  A run of n steps is simulated by
filling a group's history with n norms (state edited directly, then re-derived as a checkpoint
load does), then ``--steps`` steps are timed.  Before the sorted history, a step's cost grew with
n (a full sort per step in the reference, nth_element in C++, O(n^2) counting in Triton); now a
step moves O(n) bytes at most (the shift of the sorted row) and reads the quantile in O(1).

Usage:  python bench/autoclip_history_cost.py [--device cpu|cuda] [--sizes 1000,10000,100000]
Output: a markdown table (us per step, per backend and history length) on stdout and under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from torch_clip_fused import ClipMethod, ClippedSGD
from torch_clip_fused.state import rebuild_sorted_histories


def timed_steps(device, backend, method, n_history, steps, n_params=32, size=4096):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(size, generator=gen).to(device).requires_grad_() for _ in range(n_params)]
    for p in params:
        p.grad = torch.randn(size, generator=gen).to(device)
    opt = ClippedSGD(params, lr=1e-4, clipping_type=method, backend=backend)
    opt.step()
    gstate = opt.state[params[0]]
    scope = "global" if method == "auto_clip" else "layer"
    history = gstate[f"clip_history_{scope}"]
    rows = max(n_history + steps + 8, history.shape[0])
    ring = torch.rand((rows, history.shape[1]), generator=gen).to(device) * 10
    gstate[f"clip_history_{scope}"] = ring
    gstate[f"clip_count_{scope}"] = torch.full((history.shape[1],), n_history, dtype=torch.int64, device=device)
    gstate["clip_steps"] = n_history
    rebuild_sorted_histories(gstate)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default="100,1000,10000,100000")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = ["cpp", "reference"] if device.type == "cpu" else ["triton", "reference"]
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for method in ("auto_clip", "layer_auto"):
        clip = method if method == "auto_clip" else ClipMethod("layer", "auto")
        for backend in backends:
            for n in sizes:
                us = timed_steps(device, backend, clip, n, args.steps)
                rows.append(dict(method=method, backend=backend, history=n, us_per_step=us))
                print(json.dumps(rows[-1]), flush=True)
    lines = ["| method (32 tensors of 4096) | backend | " + " | ".join(f"n = {n:,}" for n in sizes) + " |",
             "|---|---|" + "---:|" * len(sizes)]
    for method in ("auto_clip", "layer_auto"):
        for backend in backends:
            cells = [f"{r['us_per_step']:.0f}" for r in rows if r["method"] == method and r["backend"] == backend]
            lines.append(f"| {method} | {backend} | " + " | ".join(cells) + " |")
    tag = ("gpu-" + torch.cuda.get_device_name().replace(" ", "_")) if device.type == "cuda" else "cpu2"
    stem = f"autoclip_history_{tag}_{datetime.date.today().isoformat()}"
    md = (f"# AutoClip step cost (us, median of {args.steps}) against the history length n\n\n"
          f"torch {torch.__version__}; `python bench/autoclip_history_cost.py --device {args.device}`\n\n"
          + "\n".join(lines) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(md)
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
