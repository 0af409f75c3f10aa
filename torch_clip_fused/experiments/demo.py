"""``make demo``: both comparison tasks with SGD, Adam, every clipping type of ClippedSGD, ZClip and AGC,
and ClippedAdamW (no clipping, global norm, ZClip): the comparison's default optimizers, from the same
initialisation on the same batches; prints the tables and where the plots are."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .compare import main as compare

RUNS = [("digits", 1500, 32), ("heavy_tail_regression", 2000, 16)]


def main(out: str = "demo_out") -> None:
    start = time.perf_counter()
    for task, steps, batch in RUNS:
        target = Path(out) / task
        compare(["--task", task, "--steps", str(steps), "--batch-size", str(batch), "--out", str(target)])
        print()
        print((target / "results.md").read_text())
    print(f"demo finished in {time.perf_counter() - start:.0f} s; plots and tables under {Path(out).resolve()}/")


if __name__ == "__main__":
    main(*sys.argv[1:])
