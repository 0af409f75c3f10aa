"""Compare optimizers on one task from the same initialisation and the same batches.

    python -m torch_clip_fused.experiments.compare --task digits --optimizers sgd adam norm auto_clip --steps 300 --out DIR
    python -m torch_clip_fused.experiments.compare --task heavy_tail_regression --optimizers all --steps 500 --out DIR
    python -m torch_clip_fused.experiments.compare --task digits --optimizers my_config.json --steps 300 --out DIR

Optimizer names: ``sgd`` (torch.optim.SGD, momentum 0.9), ``adam`` (torch.optim.Adam), any
clipping_type of ClippedSGD or its alias (momentum 0.9), ``sstm:<clipping_type>``
(ClippedSSTM) and ``all`` (sgd, adam and every clipping type but no_clip, which equals sgd).  A config file is a JSON list
of ``{"name": ..., "class": "SGD" | "Adam" | "ClippedSGD" | "ClippedSSTM", "kwargs": {...}}``.

Writes DIR/curves.png (train loss, train metric, validation metric), DIR/grad_norms.png (the
histogram of the gradient norms met by the first optimizer, with Hill's tail index),
DIR/results.md and DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import List

import torch

from . import missing_extra

try:
    from tqdm import tqdm
except ImportError as _error:
    raise missing_extra(_error, "torch_clip_fused.experiments.compare") from _error

from ..optim import ClippedSGD
from ..optim import ClippedSSTM
from ..methods import ALIASES, CLIPPING_TYPES
from .collector import ModelProperties, OptimizerProperties, OptimizersCollector
from .plots import PlotMaker, plot_grad_norm_histogram
from .tasks import TASKS, Task

CLASSES = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "ClippedSGD": ClippedSGD, "ClippedSSTM": ClippedSSTM}


class UsageError(ValueError):
    """A bad command-line value; reported by argparse as a usage error."""


def optimizer_from_name(name: str, task: Task, seed: int):
    """(display name, OptimizerProperties) for a command-line optimizer name."""
    if name == "sgd":
        return "SGD", OptimizerProperties(torch.optim.SGD, lr=task.lrs["sgd"], momentum=0.9)
    if name == "adam":
        return "Adam", OptimizerProperties(torch.optim.Adam, lr=task.lrs["adam"])
    if name in CLIPPING_TYPES or name in ALIASES:
        return name, OptimizerProperties(ClippedSGD, lr=task.lrs["sgd"], momentum=0.9, clipping_type=name, seed=seed)
    if name.startswith("sstm:") and (name[5:] in CLIPPING_TYPES or name[5:] in ALIASES):
        return name, OptimizerProperties(ClippedSSTM, lr=task.lrs["sstm"], L=10.0, clipping_type=name[5:],
                                         clipping_level=1.0, seed=seed)
    valid = ", ".join(["sgd", "adam", "all"] + list(CLIPPING_TYPES) + list(ALIASES) + ["sstm:<clipping_type>"])
    raise UsageError(f"unknown optimizer {name!r}; valid names: {valid}, or a JSON config file")


def optimizers_from_config(path: Path):
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read optimizer config {str(path)!r}: {err}") from None
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"optimizer config {str(path)!r} must be a non-empty JSON list")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("class") not in CLASSES:
            raise UsageError(f"optimizer config entry {i}: 'class' must be one of {', '.join(CLASSES)}")
        kwargs = entry.get("kwargs", {})
        if not isinstance(kwargs, dict) or "lr" not in kwargs:
            raise UsageError(f"optimizer config entry {i}: 'kwargs' must be an object with at least 'lr'")
        out.append((str(entry.get("name", f"{entry['class']} {i}")), OptimizerProperties(CLASSES[entry["class"]], **kwargs)))
    return out


def resolve_optimizers(specs: List[str], task: Task, seed: int):
    if len(specs) == 1 and specs[0].endswith(".json"):
        return optimizers_from_config(Path(specs[0]))
    names = []
    for spec in specs:
        # no_clip is left out of "all": it equals sgd step for step
        names += ["sgd", "adam"] + [t for t in CLIPPING_TYPES if t != "no_clip"] if spec == "all" else [spec]
    return [optimizer_from_name(n, task, seed) for n in dict.fromkeys(names)]


def grad_norm(model) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm()


def train_all(task: Task, optimizers, steps: int, batch_size: int, seed: int, eval_every: int):
    """Train every optimizer from the same initialisation on the same batches; returns per-run histories."""
    names = [n for n, _ in optimizers]
    try:
        collector = OptimizersCollector(ModelProperties(task.make_model), [p for _, p in optimizers],
                                        start_point_random_seed=seed, history_random_seed=seed)
    except (ValueError, TypeError) as err:
        raise UsageError(f"cannot build the optimizers: {err}") from None
    batches = torch.randint(0, len(task.x_train), (steps, batch_size), generator=torch.Generator().manual_seed(seed))
    runs = []
    progress = tqdm(total=steps * len(names), desc=f"{task.name}", unit="step", file=sys.stderr)
    for name, model, opt in zip(names, collector.get_nets(), collector.get_optimizer_objects()):
        run = dict(name=name, eval_steps=[], train_loss=[], train_metric=[], val_metric=[], grad_norms=[])
        step_time = opt_time = 0.0
        for k in range(steps):
            idx = batches[k]
            start = time.perf_counter()
            opt.zero_grad()
            loss = task.loss(model(task.x_train[idx]), task.y_train[idx])
            loss.backward()
            run["grad_norms"].append(grad_norm(model))
            mid = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            step_time += end - start
            opt_time += end - mid
            if (k + 1) % eval_every == 0 or k + 1 == steps:
                with torch.no_grad():
                    run["eval_steps"].append(k + 1)
                    run["train_loss"].append(task.loss(model(task.x_train), task.y_train).item())
                    run["train_metric"].append(task.metric(model, task.x_train, task.y_train))
                    run["val_metric"].append(task.metric(model, task.x_val, task.y_val))
            progress.update(1)
        run["grad_norms"] = torch.stack(run["grad_norms"]).tolist()
        run["ms_per_step"] = 1e3 * step_time / steps
        run["ms_per_optimizer_step"] = 1e3 * opt_time / steps
        runs.append(run)
    progress.close()
    return runs


def _fmt(x: float) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.4g}"


def write_results(task: Task, runs, out: Path, steps: int, batch_size: int, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    names = [r["name"] for r in runs]
    PlotMaker(f"{task.name}: {steps} steps, batch {batch_size}", names, metric_name=task.metric_name).draw_plot(
        [r["train_loss"] for r in runs], [r["train_metric"] for r in runs], [r["val_metric"] for r in runs],
        path=str(out / "curves.png"), steps=runs[0]["eval_steps"])
    tail = plot_grad_norm_histogram(runs[0]["grad_norms"], str(out / "grad_norms.png"),
                                    title=f"{task.name}, gradient norms along {names[0]}")
    summary = dict(task=task.name, steps=steps, batch_size=batch_size, seed=seed, metric=task.metric_name,
                   grad_norm_tail_index=tail, grad_norm_tail_of=names[0], optimizers=[
                       dict(name=r["name"], final_train_loss=r["train_loss"][-1], final_train_metric=r["train_metric"][-1],
                            final_val_metric=r["val_metric"][-1], ms_per_step=r["ms_per_step"],
                            ms_per_optimizer_step=r["ms_per_optimizer_step"]) for r in runs])
    (out / "results.json").write_text(json.dumps(summary, indent=1, allow_nan=True))
    lines = [f"# {task.name}: {steps} steps, batch {batch_size}, seed {seed}", "",
             f"Gradient norms along {names[0]}: Hill tail index {tail:.2f} (top 10%; below 2 = infinite variance; "
             "nan = too few steps).", "",
             f"| optimizer | final train loss | train {task.metric_name} | validation {task.metric_name} | ms/step | ms/optimizer step |",
             "|---|---:|---:|---:|---:|---:|"]
    for o in summary["optimizers"]:
        lines.append(f"| {o['name']} | {_fmt(o['final_train_loss'])} | {_fmt(o['final_train_metric'])} | "
                     f"{_fmt(o['final_val_metric'])} | {o['ms_per_step']:.3f} | {o['ms_per_optimizer_step']:.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return summary


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m torch_clip_fused.experiments.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--optimizers", required=True, nargs="+", metavar="NAME_OR_CONFIG")
    parser.add_argument("--steps", required=True, type=_positive_int)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--eval-every", type=_positive_int, default=None, help="steps between evaluations")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    task = TASKS[args.task](args.seed)
    try:
        optimizers = resolve_optimizers(args.optimizers, task, args.seed)
        runs = train_all(task, optimizers, args.steps, args.batch_size, args.seed,
                         args.eval_every or max(1, args.steps // 30))
    except UsageError as err:
        parser.error(str(err))
    summary = write_results(task, runs, args.out, args.steps, args.batch_size, args.seed)
    print(f"wrote {args.out}/curves.png, grad_norms.png, results.md and results.json")
    return summary


if __name__ == "__main__":
    main()
