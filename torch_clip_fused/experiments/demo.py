"""``make demo``: both comparison tasks with SGD, Adam, every clipping type of ClippedSGD, ZClip and AGC,
and ClippedAdamW (no clipping, global norm, ZClip): the comparison's default optimizers, from the same
initialisation on the same batches; then the byte-level transformer on real text in its short mode
(``python -m torch_clip_fused.experiments.lm --quick``: one seed, 40 steps, the full run's tuned learning
rates); prints the tables (each run prints its own) and where the plots are.

Needs the ``experiments`` extra (``pip install "torch_clip_fused[experiments]"``); without it
``python -m torch_clip_fused.experiments.demo`` prints that install hint and exits with status 1."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from . import exit_if_missing_extra

#: the command, as its messages name it
COMMAND = "python -m torch_clip_fused.experiments.demo (make demo)"

try:
    from .compare import main as compare
    from .lm import main as lm
except ImportError as _error:
    if __name__ == "__main__":  # the command itself: the install hint alone, no traceback
        exit_if_missing_extra(_error, COMMAND)
    raise

RUNS = [("digits", 1500, 32), ("heavy_tail_regression", 2000, 16)]

#: the transformer's short mode (its --out is added)
LM_ARGS = ["--quick"]


def main(out: str = "demo_out") -> None:
    start = time.perf_counter()
    for i, (task, steps, batch) in enumerate(RUNS):
        if i:
            print()
        compare(["--task", task, "--steps", str(steps), "--batch-size", str(batch), "--out", str(Path(out) / task)])
    print()
    lm(LM_ARGS + ["--out", str(Path(out) / "lm")])
    print(f"demo finished in {time.perf_counter() - start:.0f} s; plots and tables under {Path(out).resolve()}/")


if __name__ == "__main__":
    try:
        main(*sys.argv[1:])
    except ImportError as error:  # the digits task's scikit-learn, imported when the task is built
        exit_if_missing_extra(error, COMMAND)
        raise
