"""Benchmark of one ClippedSGD step (SGD with momentum 0.9) for every clipping type.

Contenders, timed in the same run on the same tensors:
  ours/auto, ours/cpp (CPU), ours/triton (CUDA), ours/reference,
  torch composite: clip_grad_norm_(foreach=True) | per-tensor clip_grad_norm_ | clip_grad_value_
                   followed by SGD(fused=True) (torch has no AutoClip or randomized clipping: those
                   types are timed against clip_grad_norm_, their cheapest torch equivalent),
  torch.compile of the reference step (compile time reported apart),
  torch-clip 0.0.6 (the original).
A bandwidth probe (read, copy, triad, in-place update) gives the bound: each step must move
(1 + 5) x numel x 4 bytes (norm pass reads g; apply reads g, p, m and writes p, m).

Usage:  python bench/benchmark_clipped_sgd.py [--quick] [--device cpu|cuda] [--out bench/results]
Output: a markdown table on stdout, JSON and a PNG chart under --out, named by machine and date.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import CASES, numel  # noqa: E402

from torch_clip_fused import CLIPPING_TYPES, ClippedSGD  # noqa: E402
from torch_clip_fused.backends.reference import reference_step  # noqa: E402

TYPES = list(CLIPPING_TYPES)
LR, MOMENTUM = 1e-3, 0.9


# ---------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, reps: int, warmup: int = 2) -> float:
    """Median seconds of one call of ``fn``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth_probe(device, n: int) -> dict:
    """GB/s of read (sum), copy, triad (a = b + s c) and in-place update (a += s b, the access
    pattern of an optimizer step: no write-allocate traffic) over n float32 elements."""
    a, b, c = (torch.rand(n, device=device) for _ in range(3))
    out = {}
    for name, fn, streams in [
        ("read", lambda: b.sum(), 1),
        ("copy", lambda: a.copy_(b), 2),
        ("triad", lambda: torch.add(b, c, alpha=0.5, out=a), 3),
        ("update", lambda: a.add_(b, alpha=0.5), 3),
    ]:
        out[name] = streams * n * 4 / median_time(fn, device, reps=10) / 1e9
    return out


# ---------------------------------------------------------------- contenders
def make_tensors(shapes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen).to(device).requires_grad_()
        p.grad = (torch.randn(s, generator=gen) * (1 - torch.rand(s, generator=gen)).pow(-0.6)).to(device)
        params.append(p)
    return params


def ours(backend):
    def build(params, kind):
        opt = ClippedSGD(params, lr=LR, momentum=MOMENTUM, clipping_type=kind, clipping_level=1.0,
                         autoclip_history=1000, seed=0, backend=backend)

        def step():
            opt.step()
        step.skipped = lambda: opt.statistics()[0]["skipped_steps"].item()  # a skipped step would time nothing
        return step
    return build


_compiled = {}


def compiled_reference(params, kind):
    """ClippedSGD whose backend is the step function torch.compile(reference_step)."""
    fn = _compiled.setdefault("step", torch.compile(reference_step))
    opt = ClippedSGD(params, lr=LR, momentum=MOMENTUM, clipping_type=kind, clipping_level=1.0,
                     autoclip_history=1000, seed=0, backend=fn)
    return opt.step


def torch_composite(params, kind):
    sgd = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, fused=True)
    if kind == "no_clip":
        return sgd.step
    if kind == "layer_wise":
        def step():
            for p in params:
                torch.nn.utils.clip_grad_norm_([p], 1.0)
            sgd.step()
    elif kind == "coordinate_wise":
        def step():
            torch.nn.utils.clip_grad_value_(params, 1.0, foreach=True)
            sgd.step()
    else:
        def step():
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            sgd.step()
    return step


def torch_clip_006(params, kind):
    from torch_clip.optimizers import ClippedSGD as OriginalClippedSGD

    opt = OriginalClippedSGD(params, lr=LR, momentum=MOMENTUM, clipping_type=kind, clipping_level=1.0, beta=0.85,
                             p_autoclip=0.75)

    def step():
        with contextlib.redirect_stdout(io.StringIO()):  # its AutoClip prints 'Here!'
            opt.step()
    return step


# ---------------------------------------------------------------- plan
def plan(device, quick: bool):
    """(case, shapes, types, contenders, reps) rows of the run."""
    cpu = device.type == "cpu"
    contenders = {"ours/auto": ours("auto"), "ours/reference": ours("reference"),
                  "torch composite": torch_composite, "torch.compile(reference)": compiled_reference,
                  "torch-clip 0.0.6": torch_clip_006}
    if cpu:
        contenders["ours/cpp"] = ours("cpp")
    else:
        contenders["ours/triton"] = ours("triton")
    huge = [(50_000_000,)] if cpu else [(1_000_000_000,)]
    cases = dict(CASES)
    cases["one huge tensor"] = huge
    if not cpu:
        cases = {k: cases[k] for k in ("ResNet-50", "BERT-base", "GPT-2 medium", "one huge tensor")}
    if quick:
        keep = ["small (0.5M params, 130 tensors)", "tiny tensors (1000 x 64)", "ResNet-50"] if cpu else ["ResNet-50"]
        cases = {k: cases[k] for k in keep}
    rows = []
    for case, shapes in cases.items():
        n = numel(shapes)
        big = n > 60_000_000
        reps = 5 if big else (7 if quick else 21)
        types = ["norm", "layer_wise", "coordinate_wise", "linear_rand_norm", "auto_clip"] if quick else TYPES
        for kind in types:
            for name, build in contenders.items():
                if name == "torch.compile(reference)":
                    small_case = case.startswith("small") or (case == "ResNet-50" and not quick)
                    if not small_case or (quick and kind != "norm") or (case == "ResNet-50" and kind not in
                                                                          ("norm", "layer_wise", "coordinate_wise")):
                        continue
                if name == "torch-clip 0.0.6" and (big or n > 30_000_000 and quick):
                    continue
                if name == "ours/reference" and big and kind not in ("norm", "coordinate_wise"):
                    continue
                rows.append((case, shapes, kind, name, build, reps))
    return rows


def bytes_per_step(n: int) -> int:
    return 6 * n * 4


def print_ratio_rows(case: str, n_params: int, steps: dict, base: str, device, reps: int, rounds: int) -> None:
    """One markdown row per contender of ``steps`` (name -> step function) on ``case``: the median ms per step
    of ``interleaved_times`` and its ratio to contender ``base``'s, all from one run."""
    times = interleaved_times(steps, device, reps, rounds)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name, ms in medians.items():
        print(f"| {case} ({n_params / 1e6:.1f}M) | {name} | {ms:.3f} | {ms / medians[base]:.2f}x |")


def interleaved_times(steps: dict, device, reps: int, rounds: int = 3) -> dict:
    """Seconds of each timed call of each step function.  The contenders take turns in ``rounds``
    rounds, each turn one warm-up step then a block of reps / rounds timed steps, so that the machine's
    slow and fast moments fall on every contender alike while each is timed warm (as in a training
    loop that steps every iteration).  As timeit does, Python's garbage collector is off while
    steps are timed, so that one contender's garbage is not collected on another's clock."""
    times = {name: [] for name in steps}
    per_turn = max(1, -(-reps // rounds))
    for _ in range(rounds):
        for name, step in steps.items():
            step()
            _sync(device)
            gc.collect()
            gc.disable()
            try:
                for _ in range(per_turn):
                    start = time.perf_counter()
                    step()
                    _sync(device)
                    times[name].append(time.perf_counter() - start)
            finally:
                gc.enable()
    return times


def interleaved_medians(steps: dict, device, reps: int, rounds: int = 3) -> dict:
    """Median seconds of each step function (:func:`interleaved_times`)."""
    return {name: statistics.median(t) for name, t in interleaved_times(steps, device, reps, rounds).items()}


def run(device, quick: bool, out_dir: Path) -> dict:
    probe = bandwidth_probe(device, 64_000_000 if quick else 128_000_000)
    rows = plan(device, quick)
    groups = {}
    for case, shapes, kind, name, build, reps in rows:
        groups.setdefault((case, kind), (shapes, reps, {}))[2][name] = build
    results, compile_times = [], {}
    tensors_for = {}
    for (case, kind), (shapes, reps, builders) in tqdm(groups.items(), desc="benchmark", unit="case x type",
                                                        file=sys.stderr):
        if case not in tensors_for:
            tensors_for.clear()
            tensors_for[case] = make_tensors(shapes, device)
        params = tensors_for[case]
        steps = {}
        for name, build in builders.items():
            try:
                step = build(params, kind)
                if name == "torch.compile(reference)":
                    start = time.perf_counter()
                    step()
                    _sync(device)
                    compile_times[f"{case} / {kind}"] = time.perf_counter() - start
                steps[name] = step
            except Exception as err:  # a contender that cannot run this case is reported, not fatal
                results.append(dict(case=case, type=kind, contender=name, error=f"{type(err).__name__}: {err}"[:200]))
        medians = interleaved_medians(steps, device, reps)
        n = numel(shapes)
        for name, seconds in medians.items():
            if getattr(steps[name], "skipped", lambda: 0)():
                results.append(dict(case=case, type=kind, contender=name,
                                    error="steps were skipped as non-finite: the timing is void"))
                continue
            gbps = bytes_per_step(n) / seconds / 1e9
            results.append(dict(case=case, type=kind, contender=name, tensors=len(shapes), numel=n,
                                median_ms=seconds * 1e3, gbps=gbps, fraction_of_copy=gbps / probe["copy"],
                                fraction_of_best=gbps / max(probe.values())))
    return dict(machine=machine_info(device), date=datetime.date.today().isoformat(), quick=quick,
                probe_gbps=probe, compile_seconds=compile_times, results=results)


def machine_info(device) -> dict:
    info = dict(host=socket.gethostname(), platform=platform.platform(), cpu_count=os.cpu_count(),
                threads=torch.get_num_threads(), torch=torch.__version__, device=str(device))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---------------------------------------------------------------- report
def ratio_table(report: dict) -> str:
    """Per case and type: our time and the ratios of every contender's time to ours."""
    ours_name = "ours/cpp" if report["machine"]["device"] == "cpu" else "ours/triton"
    by_key = {(r["case"], r["type"], r["contender"]): r for r in report["results"] if "error" not in r}
    contenders = ["torch composite", "torch.compile(reference)", "torch-clip 0.0.6", "ours/reference"]
    lines = [f"| case | type | {ours_name} ms | GB/s | % of copy | % of best probe | "
             + " | ".join(f"{c} / ours" for c in contenders) + " |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(contenders)]
    cases = list(dict.fromkeys(r["case"] for r in report["results"]))
    for case in cases:
        for kind in TYPES:
            mine = by_key.get((case, kind, ours_name))
            if mine is None:
                continue
            cells = []
            for c in contenders:
                other = by_key.get((case, kind, c))
                cells.append(f"{other['median_ms'] / mine['median_ms']:.2f}x" if other else "-")
            lines.append(f"| {case} | {kind} | {mine['median_ms']:.3f} | {mine['gbps']:.1f} | "
                         f"{100 * mine['fraction_of_copy']:.0f}% | {100 * mine['fraction_of_best']:.0f}% | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "error" not in r and r["type"] == "norm"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / max(len(contenders), 1)
    for j, c in enumerate(contenders):
        xs, ys = [], []
        for i, case in enumerate(cases):
            for r in rows:
                if r["case"] == case and r["contender"] == c:
                    xs.append(i + j * width)
                    ys.append(r["median_ms"])
        ax.bar(xs, ys, width=width, label=c)
    ax.set_yscale("log")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, rotation=15, fontsize=8)
    ax.set_ylabel("median step time, ms (log)")
    ax.set_title(f"ClippedSGD step, clipping_type='norm', momentum 0.9 — {report['machine']['device']}, "
                 f"copy bandwidth {report['probe_gbps']['copy']:.1f} GB/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a run under two minutes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = run(device, args.quick, out_dir)
    tag = "gpu-" + report["machine"]["gpu"].replace(" ", "_") if device.type == "cuda" else f"cpu{os.cpu_count()}"
    stem = f"clipped_sgd_{tag}_{report['date']}{'_quick' if args.quick else ''}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    chart(report, out_dir / f"{stem}.png")
    print(f"\nmachine: {report['machine']}")
    print("bandwidth probe (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["probe_gbps"].items()))
    print("torch.compile time (s): " + ", ".join(f"{k}: {v:.0f}" for k, v in report["compile_seconds"].items()))
    print()
    print(ratio_table(report))
    errors = [r for r in report["results"] if "error" in r]
    for r in errors:
        print(f"- {r['case']} / {r['type']} / {r['contender']}: {r['error']}")
    print(f"\nwrote {out_dir / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
