"""End-to-end training benchmark: iterations of a real model with each optimizer.

One iteration = forward, cross-entropy loss, backward, optimizer step (clipping included for the
clipped contenders), then ``zero_grad(set_to_none=...)`` (True by default, as torch's default).

Contenders, each on a fresh copy of the same model (same initial weights) and the same data:
  ClippedSGD(backend=b, clipping_type="norm", clipping_level=1.0, momentum=0.9)
      for b in ("cpp", "reference") on CPU, ("triton", "reference") on CUDA,
  clip_grad_norm_(max_norm=1.0, foreach=True) + torch.optim.SGD(momentum=0.9, fused=True)
      (the baseline of the ratios; falls back to foreach=True where fused SGD is unsupported),
  SGD(fused=True) alone, no clipping (the floor: what clipping costs is the difference).

Model: torchvision's ResNet-50 when torchvision imports (CUDA: batch 64, 224x224, bf16 autocast,
channels_last), else a ResNet-like CNN defined here (basic residual blocks, 110 parameter
tensors, about 3.5M parameters, 32x32 images), small enough for a 2-core CPU.  Synthetic data:
a few random batches (fixed seed) cycled through.

Timing: after warm-up, the contenders take turns (round-robin, the starting contender rotating
from round to round) for --rounds rounds; in each turn one untimed iteration then --iters timed
iterations, with Python's garbage collector off.  On CPU each iteration is timed with
perf_counter; on CUDA with events recorded between iterations (no host sync inside a turn, as in
a real training loop) and one synchronize at the end of the turn.  Reported: the median ms per
iteration over all timed iterations, the spread of the per-round means, the median time of the
clip + step + zero_grad phase, and the ratio to clip_grad_norm_ + SGD(fused).

Plan builds per step: the Triton backend caches a multi-tensor plan; where
``torch_clip_fused.backends.triton.plan_builds()`` exists, the builds during a triton contender's timed
iterations / its timed iterations are reported, else "n/a" (always n/a on CPU: no triton there).

Usage:  python bench/benchmark_training.py [--device cpu|cuda] [--quick] [--iters N] [--rounds R]
            [--batch B] [--set-to-none true|false] [--threads T] [--out bench/results]
Output: a markdown table on stdout; JSON and markdown under --out, named by device and date
(training_cpu2_YYYY-MM-DD.md, training_gpu-<name>_YYYY-MM-DD.json, with _quick,
_set-to-none-false and _threadsN suffixes where they apply).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_clip_fused import ClippedSGD

LR, MOMENTUM, CLIP = 0.01, 0.9, 1.0
BASELINE = "clip_grad_norm_ + SGD(fused)"
FLOOR = "SGD(fused), no clipping"


# ---------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-34-like layout of basic blocks (3, 4, 6, 3) at widths w, 2w, 4w, 8w, a stride-2 stem:
    110 parameter tensors (conv weights, batch-norm weights and biases, a linear layer)."""

    def __init__(self, width: int = 24, blocks=(3, 4, 6, 3), classes: int = 100):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(choice: str, seed: int = 0):
    """(model, name, classes).  choice: auto | resnet50 | cnn."""
    torch.manual_seed(seed)
    if choice in ("auto", "resnet50"):
        try:
            import torchvision
        except Exception:  # not installed, or built for another torch (RuntimeError on import)
            if choice == "resnet50":
                raise
        else:
            return torchvision.models.resnet50(weights=None), f"torchvision {torchvision.__version__} resnet50", 1000
    model = SmallResNet()
    return model, "SmallResNet (defined in this benchmark; torchvision not importable)", 100


def defaults_for(device, model_name: str, quick: bool) -> dict:
    """batch, image size, warm-up, iterations per turn, rounds."""
    resnet50 = "resnet50" in model_name
    if device.type == "cuda":
        cfg = dict(batch=64, image=224 if resnet50 else 128, warmup=5, iters=10, rounds=9)
    else:
        cfg = dict(batch=4, image=64, warmup=3, iters=5, rounds=7) if resnet50 else \
            dict(batch=32, image=32, warmup=3, iters=10, rounds=15)
    if quick:
        cfg.update(warmup=2, iters=5, rounds=3)
    return cfg


# ---------------------------------------------------------------- contenders
def probe_torch_kwargs(device) -> tuple:
    """(clip kwargs, SGD kwargs, notes): foreach clip and fused SGD where this torch runs them
    on this device, else the fallbacks (said in the notes)."""
    notes = []
    p = torch.zeros(4, device=device, requires_grad=True)
    p.grad = torch.ones(4, device=device)
    clip_kw = dict(foreach=True)
    try:
        torch.nn.utils.clip_grad_norm_([p], CLIP, **clip_kw)
    except (RuntimeError, TypeError, ValueError) as err:
        clip_kw = dict(foreach=None)
        notes.append(f"clip_grad_norm_(foreach=True) is not supported on {device.type} ({err}); "
                     "ran foreach=None (torch's default choice)")
    sgd_kw = dict(fused=True)
    try:
        torch.optim.SGD([p], lr=LR, momentum=MOMENTUM, **sgd_kw).step()
    except (RuntimeError, TypeError, ValueError) as err:
        sgd_kw = dict(foreach=True)
        notes.append(f"SGD(fused=True) is not supported on {device.type} in torch {torch.__version__} "
                     f"({err}); ran SGD(foreach=True) in its place")
    return clip_kw, sgd_kw, notes


def contender_specs(device) -> dict:
    """name -> (kind, backend or None)."""
    backends = ("cpp", "reference") if device.type == "cpu" else ("triton", "reference")
    specs = {f"ClippedSGD({b})": ("clipped", b) for b in backends}
    specs[BASELINE] = ("torch_clip", None)
    specs[FLOOR] = ("torch_plain", None)
    return specs


class Contender:
    """A model copy, its optimizer and its iteration function."""

    def __init__(self, name, kind, backend, base_model, batches, device, amp, channels_last, set_to_none,
                 clip_kw, sgd_kw):
        self.name, self.kind, self.backend = name, kind, backend
        model = copy.deepcopy(base_model)
        model = model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if kind == "clipped":
            self.opt = ClippedSGD(self.params, lr=LR, momentum=MOMENTUM, clipping_type="norm", clipping_level=CLIP,
                                  seed=0, backend=backend)
        else:
            self.opt = torch.optim.SGD(self.params, lr=LR, momentum=MOMENTUM, **sgd_kw)
        self.clip = kind == "torch_clip"
        self.clip_kw = clip_kw
        self.batches = batches
        self.device = device
        self.amp = amp
        self.set_to_none = set_to_none
        self.count = 0
        self.last_loss = None
        self.iter_ms, self.step_ms, self.round_ms, self.builds, self.timed = [], [], [], 0, 0

    def forward_backward(self):
        x, y = self.batches[self.count % len(self.batches)]
        self.count += 1
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.last_loss = loss.detach()

    def step(self):
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, CLIP, **self.clip_kw)
        self.opt.step()
        self.opt.zero_grad(set_to_none=self.set_to_none)

    def iteration(self):
        self.forward_backward()
        self.step()

    def skipped_steps(self):
        if self.kind != "clipped":
            return 0
        return int(sum(s["skipped_steps"].item() for s in self.opt.statistics()))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_turn(c: Contender, iters: int, plan_builds) -> None:
    """One untimed iteration, then ``iters`` timed ones (garbage collector off)."""
    device = c.device
    c.iteration()
    _sync(device)
    gc.collect()
    builds0 = plan_builds() if plan_builds else 0
    gc.disable()
    try:
        if device.type == "cuda":
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(2 * iters + 1)]
            wall0 = time.perf_counter()
            marks[0].record()
            for i in range(iters):
                c.forward_backward()
                marks[2 * i + 1].record()
                c.step()
                marks[2 * i + 2].record()
            torch.cuda.synchronize()
            wall = time.perf_counter() - wall0
            c.iter_ms += [marks[2 * i].elapsed_time(marks[2 * i + 2]) for i in range(iters)]
            c.step_ms += [marks[2 * i + 1].elapsed_time(marks[2 * i + 2]) for i in range(iters)]
        else:
            wall0 = time.perf_counter()
            for _ in range(iters):
                t0 = time.perf_counter()
                c.forward_backward()
                t1 = time.perf_counter()
                c.step()
                t2 = time.perf_counter()
                c.iter_ms.append((t2 - t0) * 1e3)
                c.step_ms.append((t2 - t1) * 1e3)
            wall = time.perf_counter() - wall0
    finally:
        gc.enable()
    c.round_ms.append(wall * 1e3 / iters)
    c.builds += (plan_builds() - builds0) if plan_builds else 0
    c.timed += iters


def plan_builds_counter(specs: dict):
    """torch_clip_fused.backends.triton.plan_builds where a triton contender runs, else None."""
    if not any(backend == "triton" for _, backend in specs.values()):
        return None
    try:
        from torch_clip_fused.backends.triton import plan_builds
    except ImportError:  # no triton: the triton contender will report its own error
        return None
    return plan_builds


# ---------------------------------------------------------------- run
def machine_info(device) -> dict:
    info = dict(host=socket.gethostname(), platform=platform.platform(), cpu_count=os.cpu_count(),
                threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                device=device.type)
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
    else:
        info["device_name"] = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    info["device_name"] = line.split(":", 1)[1].strip()
                    break
    return info


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "n/a"


def run(args) -> dict:
    device = torch.device(args.device)
    load_before = load_average()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    base, model_name, classes = build_model(args.model)
    cfg = defaults_for(device, model_name, args.quick)
    for key in ("batch", "iters", "rounds", "warmup", "image"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    amp = device.type == "cuda" and not args.no_amp
    channels_last = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    gen = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(args.batches):
        x = torch.randn(cfg["batch"], 3, cfg["image"], cfg["image"], generator=gen)
        y = torch.randint(0, classes, (cfg["batch"],), generator=gen)
        x = x.to(device, memory_format=torch.channels_last) if channels_last else x.to(device)
        batches.append((x, y.to(device)))

    clip_kw, sgd_kw, notes = probe_torch_kwargs(device)
    specs = contender_specs(device)
    plan_builds = plan_builds_counter(specs)
    contenders, errors = [], {}
    for name, (kind, backend) in specs.items():
        try:
            c = Contender(name, kind, backend, base, batches, device, amp, channels_last, args.set_to_none,
                          clip_kw, sgd_kw)
            t0 = time.perf_counter()
            for _ in range(cfg["warmup"]):  # first use: JIT build (cpp), kernel compile (triton), cudnn autotune
                c.iteration()
            _sync(device)
            c.warmup_s = time.perf_counter() - t0
            contenders.append(c)
        except Exception as err:  # a backend that does not run here is reported, not fatal
            errors[name] = f"{type(err).__name__}: {err}"[:300]
            print(f"[{name}] does not run here: {errors[name]}", file=sys.stderr)
    if not contenders:
        raise SystemExit("no contender runs on this device")

    t_start = time.perf_counter()
    for r in range(cfg["rounds"]):
        order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
        for c in order:
            timed_turn(c, cfg["iters"], plan_builds if c.backend == "triton" else None)
        print(f"round {r + 1}/{cfg['rounds']} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)

    results = []
    for c in contenders:
        loss = c.last_loss.float().item()
        results.append(dict(
            contender=c.name, backend=c.backend,
            median_ms=statistics.median(c.iter_ms),
            round_mean_ms=c.round_ms,
            step_phase_median_ms=statistics.median(c.step_ms),
            iter_ms=c.iter_ms,
            warmup_s=c.warmup_s,
            timed_iterations=c.timed,
            plan_builds=c.builds if (plan_builds and c.backend == "triton") else None,
            plan_builds_per_step=c.builds / c.timed if (plan_builds and c.backend == "triton") else None,
            skipped_steps=c.skipped_steps(),
            last_loss=loss if math.isfinite(loss) else str(loss),
        ))
    for name, err in errors.items():
        results.append(dict(contender=name, error=err))
    base_ms = next((r["median_ms"] for r in results if r["contender"] == BASELINE and "error" not in r), None)
    floor_ms = next((r["median_ms"] for r in results if r["contender"] == FLOOR and "error" not in r), None)
    for r in results:
        if "error" not in r:
            r["ratio_to_baseline"] = r["median_ms"] / base_ms if base_ms else None
            r["over_floor_ms"] = r["median_ms"] - floor_ms if floor_ms else None
    n_params = sum(p.numel() for p in base.parameters())
    n_tensors = sum(1 for _ in base.parameters())
    if plan_builds is None and device.type == "cuda":
        notes.append("plan builds: torch_clip_fused.kernels.plan_builds() is not available (n/a)")
    machine = machine_info(device)
    machine["load_average_before_after"] = [load_before, load_average()]
    return dict(
        machine=machine, date=datetime.date.today().isoformat(), quick=args.quick,
        command="python " + " ".join([sys.argv[0]] + sys.argv[1:]),
        config=dict(model=model_name, parameters=n_params, parameter_tensors=n_tensors, batch=cfg["batch"],
                    image=cfg["image"], classes=classes, data_batches=args.batches,
                    dtype="bfloat16 autocast (float32 parameters)" if amp else "float32",
                    memory_format="channels_last" if channels_last else "contiguous",
                    set_to_none=args.set_to_none, warmup_iterations=cfg["warmup"],
                    iterations_per_round=cfg["iters"], rounds=cfg["rounds"], lr=LR, momentum=MOMENTUM,
                    clipping_level=CLIP, clip_kwargs=clip_kw, sgd_kwargs=sgd_kw,
                    plan_builds_counter=plan_builds is not None),
        notes=notes, results=results)


# ---------------------------------------------------------------- report
def table(report: dict) -> str:
    lines = ["| contender | ms / iteration (median) | round means, min-max | clip+step+zero_grad ms (median) "
             f"| time vs {BASELINE} | ms over SGD alone | plan builds / step | iterations > 1.5x median |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['contender']} | does not run: {r['error'][:120]} | | | | | | |")
            continue
        ratio = f"{r['ratio_to_baseline']:.3f}x" if r.get("ratio_to_baseline") else "-"
        over = f"{r['over_floor_ms']:+.2f}" if r.get("over_floor_ms") is not None else "-"
        builds = f"{r['plan_builds_per_step']:.2f} ({r['plan_builds']}/{r['timed_iterations']})" \
            if r["plan_builds_per_step"] is not None else "n/a"
        lines.append(f"| {r['contender']} | {r['median_ms']:.2f} | {min(r['round_mean_ms']):.2f}-"
                     f"{max(r['round_mean_ms']):.2f} | {r['step_phase_median_ms']:.2f} | {ratio} | {over} | {builds} | "
                     f"{sum(t > 1.5 * r['median_ms'] for t in r['iter_ms'])} of {len(r['iter_ms'])} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    m, c = report["machine"], report["config"]
    out = [f"# Training benchmark, {m['device']} ({m['device_name']}), {report['date']}", "",
           f"`{report['command']}`", "",
           f"- torch {m['torch']}, python {m['python']}, {m['cpu_count']} CPUs, {m['threads']} torch threads, "
           f"host {m['host']}, load average (1, 5, 15 min) before / after the run: "
           f"{' / '.join(m['load_average_before_after'])}",
           f"- model: {c['model']}, {c['parameters'] / 1e6:.2f}M parameters in {c['parameter_tensors']} tensors; "
           f"batch {c['batch']}, {c['image']}x{c['image']} synthetic images ({c['data_batches']} batches cycled), "
           f"{c['classes']} classes, cross-entropy",
           f"- dtype: {c['dtype']}, {c['memory_format']}; zero_grad(set_to_none={c['set_to_none']})",
           f"- SGD lr {c['lr']}, momentum {c['momentum']}; clipping: norm, level {c['clipping_level']}; "
           f"torch clip kwargs {c['clip_kwargs']}, SGD kwargs {c['sgd_kwargs']}",
           f"- timing: {c['warmup_iterations']} warm-up iterations each, then {c['rounds']} round-robin rounds of "
           f"1 untimed + {c['iterations_per_round']} timed iterations per contender "
           f"({c['rounds'] * c['iterations_per_round']} timed iterations each), gc off while timing; "
           "median over all timed iterations",
           "", table(report), "",
           f"Ratios: contender's median ms / {BASELINE}'s (below 1 = faster). \"ms over SGD alone\": median "
           "minus the no-clipping fused SGD's median. The clip+step+zero_grad column times that phase of "
           "each iteration alone. The last column counts the timed iterations slower than 1.5x the median "
           "(on a shared machine: those disturbed by other work; the median holds while they are under half)."]
    notes = list(report["notes"])
    for r in report["results"]:
        if r.get("skipped_steps"):
            notes.append(f"{r['contender']}: {r['skipped_steps']} steps were skipped as non-finite "
                         "(those steps did less work)")
        if "error" not in r and isinstance(r.get("last_loss"), str):
            notes.append(f"{r['contender']}: the loss became {r['last_loss']}")
    if m["device"] == "cpu":
        notes.append("plan builds are n/a on CPU: the triton backend (the one with a multi-tensor plan) "
                     "does not run there")
        notes.append("shared CPU machine: timings are noisy; the round-robin order and medians spread the "
                     "noise over all contenders alike, the round-means range shows how much there was")
    if notes:
        out += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def str2bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError("expected true or false")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and iterations (under a minute on CPU)")
    parser.add_argument("--iters", type=int, help="timed iterations per contender per round")
    parser.add_argument("--rounds", type=int, help="round-robin rounds")
    parser.add_argument("--warmup", type=int, help="warm-up iterations per contender before the rounds")
    parser.add_argument("--batch", type=int, help="batch size")
    parser.add_argument("--image", type=int, help="image side in pixels")
    parser.add_argument("--batches", type=int, default=4, help="distinct synthetic batches cycled through")
    parser.add_argument("--set-to-none", type=str2bool, default=True, metavar="true|false",
                        help="zero_grad(set_to_none=...) (default true)")
    parser.add_argument("--model", default="auto", choices=["auto", "resnet50", "cnn"],
                        help="auto: torchvision resnet50 when importable, else the CNN defined here")
    parser.add_argument("--no-amp", action="store_true", help="CUDA: float32 instead of bf16 autocast")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    report = run(args)
    m = report["machine"]
    tag = "gpu-" + m["device_name"].replace(" ", "_") if m["device"] == "cuda" else f"cpu{m['cpu_count']}"
    stem = (f"training_{tag}_{report['date']}" + ("_quick" if args.quick else "")
            + ("" if args.set_to_none else "_set-to-none-false") + (f"_threads{args.threads}" if args.threads else ""))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out_dir / f"{stem}.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
