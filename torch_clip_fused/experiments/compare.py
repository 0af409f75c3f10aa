"""Compare optimizers on one task from the same initialisation and the same batches.

    python -m torch_clip_fused.experiments.compare --task heavy_tail_regression --steps 500 --out DIR
    python -m torch_clip_fused.experiments.compare --task digits --optimizers sgd adam norm auto_clip --steps 300 --out DIR
    python -m torch_clip_fused.experiments.compare --task digits --optimizers my_config.json --steps 300 --out DIR

Optimizer names: ``sgd`` (torch.optim.SGD, momentum 0.9), ``adam`` (torch.optim.Adam), any
clipping_type of ClippedSGD or its alias (momentum 0.9; also ``zclip``, ``adagc``, ``agc``),
``sstm:<clipping_type>`` (ClippedSSTM), ``adamw:<clipping_type>`` (ClippedAdamW, Adam's lr) and
``all`` (sgd, adam, every original clipping type but no_clip, which equals sgd, then zclip, agc,
adamw:no_clip, adamw:norm and adamw:zclip).  Without --optimizers: all, as ``make demo`` runs.
A config file is a JSON list of ``{"name": ..., "class": "SGD" | "Adam" | "ClippedSGD" |
"ClippedSSTM" | "ClippedAdamW", "kwargs": {...}}``; in
kwargs, ``clipping_type`` is a name or a ClipMethod triple
``{"scope": "global" | "layer" | "coordinate" | "unit" | null, "threshold": "constant" | "auto" |
"zscore" | "ema_relative" | "relative",
"randomization": "none" | "linear" | "quadratic"}`` (threshold and randomization optional).

Every optimizer takes one untimed warm-up step (on a throwaway copy of its model, so the run is
unchanged) before any step is timed: the C++ extension's first build or load and other one-off
costs stay out of the ms/step columns.

Writes DIR/curves.png (train loss, train metric, validation metric), DIR/grad_norms.png (the
histogram of the gradient norms met by the first optimizer, with Hill's tail index),
DIR/results.md and DIR/results.json (per optimizer: name, class, module and the kwargs it was
built with, in the config file's form, then the final metrics and times), and prints the table of
results.md.

Needs the ``experiments`` extra (``pip install "torch_clip_fused[experiments]"``); without it the
command prints that install hint and exits with status 1.
"""

from __future__ import annotations

import argparse
import copy
import enum
import json
import math
import sys
import time
from pathlib import Path
from typing import List

import torch

from . import exit_if_missing_extra, missing_extra

#: the command, as its usage line and its messages name it
COMMAND = "python -m torch_clip_fused.experiments.compare"

try:
    from tqdm import tqdm

    from .plots import PlotMaker, plot_grad_norm_histogram
except ImportError as _error:
    if __name__ == "__main__":  # the command itself (even --help): the install hint alone, no traceback
        exit_if_missing_extra(_error, COMMAND)
    raise missing_extra(_error, "torch_clip_fused.experiments.compare") from _error

from ..optim import ClippedAdamW, ClippedSGD, ClippedSSTM
from ..methods import ALIASES, CLIPPING_TYPES, EXTRA_CLIPPING_TYPES, ClipMethod
from .collector import ModelProperties, OptimizerProperties, OptimizersCollector
from .tasks import TASKS, Task

CLASSES = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "ClippedSGD": ClippedSGD, "ClippedSSTM": ClippedSSTM,
           "ClippedAdamW": ClippedAdamW}

#: what ``all`` adds after the original's clipping types: the newer thresholds with SGD, and ClippedAdamW
#: (no clipping, global norm, ZClip)
ALL_EXTRAS = ["zclip", "agc", "adamw:no_clip", "adamw:norm", "adamw:zclip"]

#: --optimizers when it is not given: what ``make demo`` runs
DEFAULT_OPTIMIZERS = ["all"]

#: The keys of a ClipMethod triple in a config file (``scope`` is required)
TRIPLE_KEYS = ("scope", "threshold", "randomization")


class UsageError(ValueError):
    """A bad command-line value; reported by argparse as a usage error."""


def optimizer_from_name(name: str, task: Task, seed: int):
    """(display name, OptimizerProperties) for a command-line optimizer name."""
    if name == "sgd":
        return "SGD", OptimizerProperties(torch.optim.SGD, lr=task.lrs["sgd"], momentum=0.9)
    if name == "adam":
        return "Adam", OptimizerProperties(torch.optim.Adam, lr=task.lrs["adam"])
    if name in CLIPPING_TYPES or name in ALIASES or name in EXTRA_CLIPPING_TYPES:
        return name, OptimizerProperties(ClippedSGD, lr=task.lrs["sgd"], momentum=0.9, clipping_type=name, seed=seed)
    kind = name.partition(":")[2]
    if name.startswith("adamw:") and (kind in CLIPPING_TYPES or kind in ALIASES or kind in EXTRA_CLIPPING_TYPES):
        return name, OptimizerProperties(ClippedAdamW, lr=task.lrs["adam"], clipping_type=kind, seed=seed)
    if name.startswith("sstm:") and (name[5:] in CLIPPING_TYPES or name[5:] in ALIASES):
        return name, OptimizerProperties(ClippedSSTM, lr=task.lrs["sstm"], L=10.0, clipping_type=name[5:],
                                         clipping_level=1.0, seed=seed)
    valid = ", ".join(["sgd", "adam", "all"] + list(CLIPPING_TYPES) + list(ALIASES) + list(EXTRA_CLIPPING_TYPES)
                      + ["sstm:<clipping_type>", "adamw:<clipping_type>"])
    raise UsageError(f"unknown optimizer {name!r}; valid names: {valid}, or a JSON config file")


def clipping_type_from_config(value, entry: int):
    """A config file's clipping_type: a name is kept (the optimizer validates it), an object
    ``{"scope": ..., "threshold": ..., "randomization": ...}`` becomes a ClipMethod."""
    where = f"optimizer config entry {entry}: clipping_type {value!r}"
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a name (such as \"norm\") or a ClipMethod triple "
                         '{"scope": ..., "threshold": ..., "randomization": ...}')
    unknown = [key for key in value if key not in TRIPLE_KEYS]
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}; a ClipMethod triple has the keys "
                         f"{', '.join(TRIPLE_KEYS)}")
    if "scope" not in value:
        raise UsageError(f"{where} needs a 'scope': \"global\", \"layer\", \"coordinate\", or null for no clipping")
    try:
        return ClipMethod(**value)
    except (ValueError, TypeError) as err:
        raise UsageError(f"{where}: {err}") from None


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
        if "clipping_type" in kwargs:
            kwargs = dict(kwargs, clipping_type=clipping_type_from_config(kwargs["clipping_type"], i))
        out.append((str(entry.get("name", f"{entry['class']} {i}")), OptimizerProperties(CLASSES[entry["class"]], **kwargs)))
    return out


def resolve_optimizers(specs: List[str], task: Task, seed: int):
    if len(specs) == 1 and specs[0].endswith(".json"):
        return optimizers_from_config(Path(specs[0]))
    names = []
    for spec in specs:
        # no_clip is left out of "all": it equals sgd step for step
        names += (["sgd", "adam"] + [t for t in CLIPPING_TYPES if t != "no_clip"] + ALL_EXTRAS
                  if spec == "all" else [spec])
    return [optimizer_from_name(n, task, seed) for n in dict.fromkeys(names)]


def grad_norm(model) -> torch.Tensor:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm()


def jsonable(value):
    """``value`` as JSON: a ClipMethod as its triple, a tensor as a float (a list if it has several
    elements), an enum as its value, tuples as lists; anything else JSON cannot hold as its repr."""
    if isinstance(value, ClipMethod):
        return {"scope": None if value.scope is None else value.scope.value, "threshold": value.threshold.value,
                "randomization": value.randomization.value}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return repr(value)


def describe_optimizer(props: OptimizerProperties) -> dict:
    """The class name, its module and the kwargs an optimizer is built with, as JSON values (the
    config file's ``class`` and ``kwargs``)."""
    cls = props.optimizer_class
    return {"class": getattr(cls, "__qualname__", type(cls).__name__),
            "module": getattr(cls, "__module__", type(cls).__module__),
            "kwargs": jsonable(props.optimizer_kwargs)}


def warm_up(task: Task, props: OptimizerProperties, model: torch.nn.Module, idx: torch.Tensor) -> None:
    """One untimed step, as a timed one, of a new optimizer from ``props`` on a throwaway copy of
    ``model``: one-off costs (the C++ extension's build or load on the first fused step, first-call
    allocations) are paid before the timing starts.  ``model``, its optimizer and torch's global RNG
    are left as they were."""
    with torch.random.fork_rng(devices=[]):
        throwaway = copy.deepcopy(model)
        opt = props.make(throwaway.parameters())
        opt.zero_grad()
        task.loss(throwaway(task.x_train[idx]), task.y_train[idx]).backward()
        grad_norm(throwaway)
        opt.step()


def train_all(task: Task, optimizers, steps: int, batch_size: int, seed: int, eval_every: int):
    """Train every optimizer from the same initialisation on the same batches; returns per-run histories.

    Every optimizer takes one warm-up step (:func:`warm_up`) before any step is timed."""
    names = [n for n, _ in optimizers]
    try:
        collector = OptimizersCollector(ModelProperties(task.make_model), [p for _, p in optimizers],
                                        start_point_random_seed=seed, history_random_seed=seed)
    except (ValueError, TypeError) as err:
        raise UsageError(f"cannot build the optimizers: {err}") from None
    batches = torch.randint(0, len(task.x_train), (steps, batch_size), generator=torch.Generator().manual_seed(seed))
    for (_, props), model in zip(optimizers, collector.get_nets()):
        warm_up(task, props, model, batches[0])
    runs = []
    progress = tqdm(total=steps * len(names), desc=f"{task.name}", unit="step", file=sys.stderr)
    for (name, props), model, opt in zip(optimizers, collector.get_nets(), collector.get_optimizer_objects()):
        run = dict(name=name, **describe_optimizer(props), eval_steps=[], train_loss=[], train_metric=[],
                   val_metric=[], grad_norms=[])
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
                       dict(name=r["name"], **{k: r[k] for k in ("class", "module", "kwargs")},
                            final_train_loss=r["train_loss"][-1], final_train_metric=r["train_metric"][-1],
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
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--optimizers", nargs="+", metavar="NAME_OR_CONFIG", default=list(DEFAULT_OPTIMIZERS),
                        help="optimizer names or one JSON config file (see above); default: all (sgd, adam and "
                             "every clipping type but no_clip), as make demo runs")
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
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out}/curves.png, grad_norms.png, results.md and results.json")
    return summary


if __name__ == "__main__":
    try:
        main()
    except ImportError as error:  # the digits task's scikit-learn, imported when the task is built
        exit_if_missing_extra(error, COMMAND)
        raise
