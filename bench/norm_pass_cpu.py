"""Speed of the C++ norm pass alone (pass 1 of csrc/clipped_sgd.cpp: sums of squares and the
non-finite flag, no apply), this working tree's sources against a git revision's, in one process
(``--stage step``: the whole ClippedSGD step, both passes, momentum 0.9).

Both sources are built as two extensions (the revision's from ``git show REV:csrc/...``), then
each case is timed with the two taking turns in rounds (as bench/benchmark_clipped_sgd.py's
interleaved medians: one warm-up call, then a block of timed calls, garbage collector off), so the
machine's slow and fast moments fall on both alike.  The ratios new / old of each case's median and
fastest call are the numbers to read (on a shared machine the fastest is the steadier); a ratio
within a run is steadier than times between runs.

Usage:  python bench/norm_pass_cpu.py [--baseline REV] [--sources DIR] [--case NAME] [--numel N] [--reps R] [--rounds K]
                                     [--threads T] [--magnitude M] [--stage norms|step]
(``--sources`` a directory of the baseline's own sources gives the noise of an A/A comparison.)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from benchmark_clipped_sgd import interleaved_times  # noqa: E402
from model_shapes import CASES, numel  # noqa: E402

from torch_clip_fused.backends.cpp.build_config import vector_flags as _vector_flags  # noqa: E402

SOURCES = ("clipped_sgd.cpp", "grad_pointers.cpp")
SCOPES = {"global": 1, "unit": 4}  # torch_clip_fused.methods.SCOPE_CODES


def build(name: str, csrc: Path, build_dir: Path):
    """The extension of the sources in ``csrc`` as module ``name`` (the project's flags).  Its option
    structs are renamed after the module: pybind11 registers a C++ type once per process."""
    _, flags = _vector_flags()
    renamed = [f"-D{struct}={struct}_{name}" for struct in ("ClipOptions", "UpdateOptions")]
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name=name, sources=[str(csrc / s) for s in SOURCES], extra_include_paths=[str(csrc)],
                extra_cflags=["-O3", "-fopenmp", "-DNDEBUG"] + flags + renamed, extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir), verbose=False)


def revision_sources(rev: str, out: Path) -> Path:
    """csrc/ of git revision ``rev`` written to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:csrc"], check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:csrc/{name}"], check=True,
                              capture_output=True).stdout
        (out / name).write_bytes(text)
    return out


def _before_threshold_state(ext) -> bool:
    """Whether ``ext`` was built from sources older than the generic threshold state (a baseline
    revision's): its step takes ``bufs`` and ``history`` / ``sorted`` / ``counts``, its ClipOptions
    ``p_autoclip`` rather than ``params``."""
    return "history" in (ext.clipped_sgd_step.__doc__ or "")


def norm_step(ext, params, grads, scope: int, whole_step: bool = False):
    """One call of the norm pass alone (the functional API's "norms" stage) at ``scope``, or with
    ``whole_step`` one ClippedSGD step (momentum 0.9, level 1)."""
    n = len(params)
    old = _before_threshold_state(ext)
    clip = ext.ClipOptions(scope=scope, threshold=0, randomization=0, level=1.0, beta=0.5, clip_update=False,
                           check_finite=True, norms_needed=True, norms_given=False, apply=whole_step,
                           **(dict(p_autoclip=1.0) if old else {}))
    update = ext.UpdateOptions(rule=1, lr=1e-3, momentum=0.9) if whole_step else ext.UpdateOptions(rule=0, lr=0.0)
    moments = [torch.zeros_like(p) for p in params] if whole_step else []
    state = dict(bufs=moments, history=None, sorted=None, counts=None) if old else dict(first_moments=moments)
    step = torch.zeros((), dtype=torch.int64)
    ready = torch.zeros(n, dtype=torch.bool)
    stats = torch.zeros(4)
    skipped = torch.zeros((), dtype=torch.int64)
    norms = torch.zeros(n + 1)
    columns, offsets = list(range(n)), [0] * n

    def run():
        error = ext.clipped_sgd_step(params=params, grads=grads, columns=columns, offsets=offsets, seed=0, step=step,
                                     ready=ready, stats=stats, skipped=skipped, grad_scale=None, found_inf=None,
                                     norms=norms, clip=clip, update=update, **state)
        if error:
            raise RuntimeError(error)
        return norms

    return run


def shapes_for(case: str, limit: int):
    """The shapes of bench/model_shapes.py's ``case``, the first ones up to ``limit`` elements."""
    out, total = [], 0
    for shape in CASES[case]:
        size = numel([shape])
        if total + size > limit and out:
            break
        out.append(shape)
        total += size
    return out, total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="main", help="git revision whose csrc/ is the baseline")
    parser.add_argument("--sources", default=str(ROOT / "csrc"), help="the new sources (default: this tree's csrc/)")
    parser.add_argument("--case", default="GPT-2 small", choices=list(CASES), help="shapes (bench/model_shapes.py)")
    parser.add_argument("--numel", type=int, default=40_000_000, help="at most this many elements (the case's first tensors)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--stage", default="norms", choices=["norms", "step"])
    parser.add_argument("--magnitude", type=float, default=1.0, help="scale of the gradients (normal: 1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.gettempdir()) / "tcf_norm_pass_bench"
    old = build("tcf_norm_pass_old", revision_sources(args.baseline, work / "old_src"), work / "old_build")
    new = build("tcf_norm_pass_new", Path(args.sources), work / "new_build")
    shapes, total = shapes_for(args.case, args.numel)
    what = "norm pass alone" if args.stage == "norms" else "whole ClippedSGD step (momentum 0.9)"
    print(f"{what}, {total / 1e6:.1f}M elements in {len(shapes)} tensors ({args.case}'s first), "
          f"{torch.get_num_threads()} threads, baseline {args.baseline}, |g| ~ {args.magnitude:g}")
    print("| dtype | scope | old ms (median) | new ms (median) | new / old (median) | old ms (fastest) | "
          "new ms (fastest) | new / old (fastest) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.zeros(s, dtype=dtype) for s in shapes]
        grads = [(torch.randn(s, generator=gen) * args.magnitude).to(dtype) for s in shapes]
        for scope_name, scope in SCOPES.items():
            whole = args.stage == "step"
            steps = {"old": norm_step(old, params, grads, scope, whole), "new": norm_step(new, params, grads, scope, whole)}
            a, b = steps["old"]().clone(), steps["new"]().clone()
            if 1e-15 < args.magnitude < 1e15:  # (beyond, the baseline's norms may be wrong)
                assert torch.allclose(a, b, rtol=1e-5, atol=0), (a, b)
            times = interleaved_times(steps, torch.device("cpu"), args.reps, args.rounds)
            med = {k: statistics.median(v) for k, v in times.items()}
            low = {k: min(v) for k, v in times.items()}
            print(f"| {str(dtype)[6:]} | {scope_name} | {med['old'] * 1e3:.3f} | {med['new'] * 1e3:.3f} | "
                  f"{med['new'] / med['old']:.3f} | {low['old'] * 1e3:.3f} | {low['new'] * 1e3:.3f} | "
                  f"{low['new'] / low['old']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
