"""Benchmark of the functional clip (``clip_gradients_``) against torch's ``clip_grad_norm_``, for users
who keep their own optimizer: 3.3M parameters in 100 tensors (the case of the architecture issue),
``norm`` and ``layer_wise``, every backend that runs on the device.

Contenders take turns in rounds (interleaved, garbage collector off); reported: median ms per call
and the ratio to ``clip_grad_norm_(foreach=True)`` in the same run.

Usage:  python bench/benchmark_functional.py [--device cpu|cuda] [--rounds 15] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

from torch_clip_fused import clip_gradients_


def make_params(device, n=100, total=3_300_000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = total // n
    params = [torch.randn(size, generator=gen).to(device).requires_grad_() for _ in range(n)]
    for p in params:
        p.grad = (torch.randn(size, generator=gen) * 10).to(device)
    return params


def contenders(device):
    backends = ["cpp", "reference"] if device.type == "cpu" else ["triton", "reference"]
    out = {"torch clip_grad_norm_": lambda ps, st: torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True)}
    for b in backends:
        out[f"clip_gradients_(norm, {b})"] = lambda ps, st, b=b: clip_gradients_(ps, "norm", 1.0, state=st, backend=b)
        out[f"clip_gradients_(layer_wise, {b})"] = (
            lambda ps, st, b=b: clip_gradients_(ps, "layer_wise", 1.0, state=st, backend=b))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    funcs = contenders(device)
    setups = {name: (make_params(device), {}) for name in funcs}
    times = {name: [] for name in funcs}
    for name, fn in funcs.items():  # warm-up: builds, plans, caches
        fn(*setups[name])
    gc.disable()
    try:
        for r in range(args.rounds):
            names = list(funcs)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                params, state = setups[name]
                sync()
                start = time.perf_counter()
                for _ in range(args.calls):
                    funcs[name](params, state)
                sync()
                times[name].append((time.perf_counter() - start) / args.calls * 1e3)
    finally:
        gc.enable()
    base = statistics.median(times["torch clip_grad_norm_"])
    lines = [f"Functional clip, 3.3M parameters in 100 tensors, {device.type} ({os.cpu_count()} CPUs, torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads); median of {args.rounds} interleaved rounds "
             f"of {args.calls} calls.", "", "| contender | ms per call | vs clip_grad_norm_ |", "|---|---:|---:|"]
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(contender=name, ms=med, speedup=base / med))
        lines.append(f"| {name} | {med:.3f} | {base / med:.2f}x |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"functional_{device.type}{os.cpu_count()}_{datetime.date.today().isoformat()}"
    stem.with_suffix(".md").write_text(table + "\n\nCommand: `python bench/benchmark_functional.py`\n")
    stem.with_suffix(".json").write_text(json.dumps(dict(torch=torch.__version__, device=str(device), rows=rows), indent=2))


if __name__ == "__main__":
    main()
