"""GPU bandwidth benchmark of one ClippedSGD step, with the norm pass and the apply pass timed apart.

For each case (one tensor of N elements; GPT-2 medium's 292 tensors), dtype (fp32; bf16 with a bf16
momentum buffer) and method, the Triton step is timed back to back between CUDA events (median of
``--reps`` steps, after warm-up), and the torch composite ``clip_grad_norm_(foreach=True)`` +
``SGD(fused=True)`` beside it.  The two passes are timed from the profiler's kernel records
(``clip_norm_kernel``, ``clip_apply_kernel``: device time per step).

Bandwidth bound of a step: the norm pass reads g (n * b bytes), the apply pass reads g, p, m and
writes p, m (5 * n * b): 6 * n * b bytes, b the element size.  "% of copy" divides the achieved
rate by a device-to-device copy's (bytes read + written) measured in the same run.

Usage:  python bench/benchmark_passes_cuda.py [--numel N] [--reps R] [--methods a,b] [--out DIR]
Output: a markdown table on stdout; JSON and markdown under --out (passes_gpu-<name>_<date>.*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import CASES  # noqa: E402

from torch_clip_fused import ClippedSGD  # noqa: E402

METHODS = ["norm", "layer_wise", "coordinate_wise", "quadratic_rand_autoclip", "linear_rand_norm"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def event_median(fn, reps: int, warmup: int = 3) -> float:
    """Median ms of ``fn`` over ``reps`` back-to-back calls between CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
    events[0].record()
    for i in range(reps):
        fn()
        events[i + 1].record()
    torch.cuda.synchronize()
    return statistics.median(events[i].elapsed_time(events[i + 1]) for i in range(reps))


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read + written."""
    src = torch.empty(2**28, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = event_median(lambda: dst.copy_(src), 20)
    return 2 * src.numel() * 4 / ms / 1e6


def kernel_ms(fn, steps: int) -> dict:
    """Device ms per step of each Triton kernel of ours, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        name = evt.key
        for kernel in ("clip_norm_kernel", "clip_apply_kernel"):
            if name.startswith(kernel):
                total = getattr(evt, "device_time_total", None)
                if total is None:
                    total = evt.cuda_time_total
                out[kernel] = out.get(kernel, 0.0) + total / 1e3 / steps
    return out


def make(shapes, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, device="cuda", generator=gen, dtype=torch.float32).to(dtype).requires_grad_()
        g = torch.randn(s, device="cuda", generator=gen, dtype=torch.float32)
        g.mul_(torch.rand(s, device="cuda", generator=gen).add_(1e-3).pow_(-0.6))  # heavy tail
        p.grad = g.to(dtype)
        params.append(p)
    return params


def run_case(case, shapes, dtype_name, methods, reps, copy_gbps, extra=None):
    dtype = DTYPES[dtype_name]
    n = sum(torch.Size(s).numel() for s in shapes)
    bound_bytes = 6 * n * torch.empty((), dtype=dtype).element_size()
    rows = []
    params = make(shapes, dtype)
    torch_opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, fused=True)

    def torch_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        torch_opt.step()

    torch_ms = event_median(torch_step, reps)
    del torch_opt
    for method in methods:
        for p in params:
            p.grad.copy_(p.grad)  # same gradients for every method
        opt = ClippedSGD(params, lr=1e-4, momentum=0.9, clipping_type=method, clipping_level=1.0,
                         autoclip_history=1000, backend="triton", **(extra or {}))
        ms = event_median(opt.step, reps)
        passes = kernel_ms(opt.step, min(reps, 10))
        gbps = bound_bytes / ms / 1e6
        row = dict(case=case, dtype=dtype_name, method=method, numel=n, tensors=len(shapes), ms=ms,
                   norm_pass_ms=passes.get("clip_norm_kernel"), apply_pass_ms=passes.get("clip_apply_kernel"),
                   torch_ms=torch_ms, gbps=gbps, pct_copy=100 * gbps / copy_gbps, **(extra or {}))
        for key, nbytes in (("norm_pass_ms", bound_bytes // 6), ("apply_pass_ms", 5 * bound_bytes // 6)):
            if row[key]:
                row[key.replace("_ms", "_pct_copy")] = 100 * nbytes / row[key] / 1e6 / copy_gbps
        rows.append(row)
        print(json.dumps(row), flush=True)
        del opt
    del params
    torch.cuda.empty_cache()
    return rows


def table(rows) -> str:
    lines = ["| case | dtype | method | ours ms | torch ms | torch / ours | % of copy | norm pass ms (% copy) "
             "| apply pass ms (% copy) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def cell(k):
            v = r.get(f"{k}_pass_ms")
            return f"{v:.3f} ({r[f'{k}_pass_pct_copy']:.0f}%)" if v else "-"
        lines.append(f"| {r['case']} | {r['dtype']}{' SR' if r.get('stochastic_rounding') else ''} | {r['method']} | "
                     f"{r['ms']:.3f} | {r['torch_ms']:.3f} | {r['torch_ms'] / r['ms']:.2f}x | {r['pct_copy']:.0f}% | "
                     f"{cell('norm')} | {cell('apply')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=1_000_000_000)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--stochastic-rounding", action="store_true", help="also bf16 with stochastic_rounding=True")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows = []
    cases = {f"1 tensor of {args.numel:,}": [(args.numel,)], "GPT-2 medium (292 tensors)": CASES["GPT-2 medium"]}
    for case, shapes in cases.items():
        for dtype_name in args.dtypes.split(","):
            rows += run_case(case, shapes, dtype_name, methods, args.reps, copy_gbps)
            if args.stochastic_rounding and dtype_name != "fp32":
                rows += run_case(case, shapes, dtype_name, methods[:1], args.reps, copy_gbps,
                                 extra=dict(stochastic_rounding=True))
    name = torch.cuda.get_device_name().replace(" ", "_")
    stem = f"passes_gpu-{name}_{datetime.date.today().isoformat()}{args.tag}"
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, copy_gbps=copy_gbps)
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = f"# ClippedSGD passes on {meta['gpu']}\n\n{json.dumps(meta)}\n\n{table(rows)}\n"
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
