"""Benchmark of one ClippedAdamW step against torch's clip + AdamW, on the same tensors in one run.

Contenders, per clipping type (``norm``: global norm clipping; ``no_clip``; ``agc``):
  ours/auto (C++ on CPU, Triton on CUDA), ours/reference,
  torch: clip_grad_norm_(foreach=True) + AdamW(foreach=True), the same + AdamW(fused=True), and
         torch.compile of clip_grad_norm_ + AdamW(foreach=True).step (compile time reported apart);
         for ``agc`` the clip is timm's adaptive_clip_grad (per tensor), for ``no_clip`` AdamW alone.
The bound: a clipped AdamW step moves 32 bytes per float32 parameter (the norm pass reads g; the
apply pass reads g, p, m, v and writes p, m, v); the table gives each contender's GB/s over those
32 bytes, its share of the machine's copy bandwidth, and the speed-up of ours over each torch one.

Usage:  python bench/benchmark_adamw.py [--quick] [--device cpu|cuda] [--no-compile] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_clipped_sgd import _sync, bandwidth_probe, interleaved_medians, machine_info, make_tensors  # noqa: E402
from model_shapes import CASES, numel  # noqa: E402

from torch_clip_fused import ClippedAdamW  # noqa: E402

LR = 1e-3
KINDS = ("norm", "no_clip", "agc")


def ours(backend):
    def build(params, kind):
        opt = ClippedAdamW(params, lr=LR, clipping_type=kind, clipping_level=1.0 if kind == "norm" else None,
                           seed=0, backend=backend)

        def step():
            opt.step()
        step.skipped = lambda: opt.statistics()[0]["skipped_steps"].item()
        return step
    return build


def _unitwise_norm(x):
    return x.norm(2.0) if x.ndim <= 1 else x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)


def timm_agc(params, clip_factor=0.01, eps=1e-3):
    """timm.utils.agc.adaptive_clip_grad: per tensor, per output unit."""
    for p in params:
        max_norm = _unitwise_norm(p.detach()).clamp_(min=eps).mul_(clip_factor)
        grad_norm = _unitwise_norm(p.grad)
        clipped = p.grad * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.copy_(torch.where(grad_norm < max_norm, p.grad, clipped))


def _clip(kind):
    if kind == "norm":
        return lambda params: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    if kind == "agc":
        return timm_agc
    return lambda params: None


def torch_adamw(**switches):
    def build(params, kind):
        opt = torch.optim.AdamW(params, lr=LR, **switches)
        clip = _clip(kind)

        def step():
            clip(params)
            opt.step()
        return step
    return build


def torch_compiled(params, kind):
    opt = torch.optim.AdamW(params, lr=LR, foreach=True)
    clip = _clip(kind)

    @torch.compile
    def step():
        clip(params)
        opt.step()
    return step


def contenders(device, compile_too: bool) -> dict:
    out = {"ours/auto": ours("auto"), "ours/reference": ours("reference"),
           "clip + AdamW(foreach)": torch_adamw(foreach=True), "clip + AdamW(fused)": torch_adamw(fused=True)}
    if compile_too:
        out["torch.compile(clip + AdamW(foreach))"] = torch_compiled
    return out


def run(device, quick: bool, compile_too: bool) -> dict:
    probe = bandwidth_probe(device, 32_000_000 if quick else 64_000_000)
    cases = ["small (0.5M params, 130 tensors)", "ResNet-50"] + ([] if device.type == "cpu" else ["GPT-2 medium"])
    reps = 10 if quick else 30
    results, compile_seconds = [], {}
    for case in cases:
        shapes = CASES[case]
        n = numel(shapes)
        for kind in KINDS:
            steps = {}
            for name, build in contenders(device, compile_too).items():
                params = make_tensors(shapes, device)  # every contender its own copy: AdamW state differs
                try:
                    step = build(params, kind)
                    start = time.perf_counter()
                    step()  # builds the C++ extension / compiles, outside the timing
                    _sync(device)
                    if name.startswith("torch.compile"):
                        compile_seconds[f"{case} / {kind}"] = time.perf_counter() - start
                    steps[name] = step
                except Exception as err:  # reported, not fatal
                    results.append(dict(case=case, type=kind, contender=name,
                                        error=f"{type(err).__name__}: {err}"[:200]))
            medians = interleaved_medians(steps, device, reps)
            for name, seconds in medians.items():
                moved = (28 if kind == "no_clip" else 32) * n
                results.append(dict(case=case, type=kind, contender=name, numel=n, tensors=len(shapes),
                                    median_ms=seconds * 1e3, gbps=moved / seconds / 1e9,
                                    fraction_of_copy=moved / seconds / 1e9 / probe["copy"]))
            print(f"{case} / {kind}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in medians.items()),
                  file=sys.stderr, flush=True)
    return dict(machine=machine_info(device), date=datetime.date.today().isoformat(), quick=quick,
                probe_gbps=probe, compile_seconds=compile_seconds, results=results)


def table(report: dict) -> str:
    lines = [f"# ClippedAdamW vs clip + torch.optim.AdamW ({report['machine']['device']}, "
             f"torch {report['machine']['torch']}, {report['machine']['threads']} threads, {report['date']})", "",
             f"Copy bandwidth {report['probe_gbps']['copy']:.1f} GB/s.  ms = median of one step; "
             "x = that contender's time / ours/auto's (above 1: ours is faster); % = bytes moved "
             "(32 per parameter, 28 without clipping) / time / copy bandwidth (torch's copy_ of 64M floats: a "
             "step that streams several tensors at once can exceed it on a CPU).", "",
             "| case | type | contender | ms | % of copy | ours/auto speed-up |", "|---|---|---|---:|---:|---:|"]
    by_key = {}
    for r in report["results"]:
        by_key.setdefault((r["case"], r["type"]), []).append(r)
    for (case, kind), rows in by_key.items():
        base = next((r["median_ms"] for r in rows if r["contender"] == "ours/auto" and "median_ms" in r), None)
        for r in rows:
            if "error" in r:
                lines.append(f"| {case} | {kind} | {r['contender']} | error: {r['error']} | | |")
                continue
            speed = f"{r['median_ms'] / base:.2f}x" if base else ""
            lines.append(f"| {case} | {kind} | {r['contender']} | {r['median_ms']:.3f} | "
                         f"{100 * r['fraction_of_copy']:.0f}% | {speed} |")
    if report["compile_seconds"]:
        lines += ["", "torch.compile time of the first step (s): " +
                  ", ".join(f"{k} {v:.1f}" for k, v in report["compile_seconds"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contender")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    report = run(device, args.quick, not args.no_compile)
    text = table(report)
    print(text)
    where = "cpu" + str(torch.get_num_threads()) if device.type == "cpu" else "gpu-" + torch.cuda.get_device_name().replace(" ", "_")
    stem = f"adamw_{where}_{report['date']}{'_quick' if args.quick else ''}{args.tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
