"""Clipping on real text: a small byte-level decoder-only transformer on the documentation topics of
Python's standard library (``pydoc_data.topics``, about 465 KB of English text and code that ships with
every CPython; no download).

    python -m torch_clip_fused.experiments.lm --out bench/results/lm             # the full run
    python -m torch_clip_fused.experiments.lm --quick --out demo_out/lm          # make demo's short mode

What it does, in order (every phase on the same model, data split and batch size):

1. **Corpus and split.**  The topics sorted by name, joined by blank lines, as UTF-8 bytes (vocabulary
   256); the first 90 % of the bytes train, the last 10 % validate (a fixed split).
2. **Pilot: clipping levels from measured norms.**  ``--pilot-steps`` steps of SGD (momentum 0.9, lr
   ``PILOT_LR``) from seed 0's initialisation record the gradient norms at each scope; the levels are
   their medians: the whole model's norm (``norm``, ``linear_rand_norm``, ClippedAdamW ``norm``), each
   tensor's norm (``layer_wise``), and for ``coordinate_wise`` the median over steps of the 99th
   percentile of ``|g_i|`` (a median of ``|g_i|`` itself would clip half of the coordinates at every step).
3. **Learning-rate sweep** (seed 0, ``--sweep-steps`` steps): every optimizer at every learning rate of
   its family's grid (:data:`SGD_LRS`, :data:`ADAM_LRS`); the one with the lowest final validation loss is
   kept.  A run whose training loss is not finite or exceeds twice the uniform predictor's (2 ln 256
   nats) is stopped and counted as diverged.
4. **Comparison** (seeds 1 .. ``--seeds``, ``--steps`` steps, the tuned learning rates): every optimizer
   from the same initialisation on the same batches per seed; validation loss on a fixed subset of the
   validation split along the way, on the whole split at the end; bits per byte = loss / ln 2.
5. **Gradient noise.**  Along the AdamW run of seed 1, at 10 %, 50 % and 100 % of the steps:
   ``--noise-samples`` minibatch gradients g_i at the same point; the noise is g_i - mean(g); Hill's
   tail index (top 10 %, :mod:`.tail_index`) of its norms and of its coordinates (a fixed random subset),
   against Gaussian noise with the same covariance (sum_i e_i (g_i - mean) / sqrt(N - 1), e_i standard
   normal), drawn ``GAUSSIAN_REPLICATES`` times for its spread.  A heavy tail shows as an index well below
   the Gaussian one; the same index means the noise is no heavier-tailed than a Gaussian.

Writes to ``--out``: ``results.json`` (everything, including the settings), ``results.md`` (the tables),
``curves.png`` (the original's layout: train loss, train and validation bits per byte, mean over seeds),
``lr_sweep.png`` (final validation bits per byte against the learning rate), ``grad_norms.png`` (the
gradient norms along AdamW with their tail index) and ``noise.png`` (noise norms against matched Gaussian
noise at each probe point).  ``--quick`` (make demo) skips the sweep and uses :data:`DEFAULT_LRS`.

Needs the ``experiments`` extra (``pip install "torch_clip_fused[experiments]"``); without it the command
prints that install hint and exits with status 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import exit_if_missing_extra, missing_extra

#: the command, as its usage line and its messages name it
COMMAND = "python -m torch_clip_fused.experiments.lm"

try:
    from tqdm import tqdm

    from .plots import Figure, PlotMaker, colormaps, plot_grad_norm_histogram
except ImportError as _error:
    if __name__ == "__main__":
        exit_if_missing_extra(_error, COMMAND)
    raise missing_extra(_error, "torch_clip_fused.experiments.lm") from _error

from ..optim import ClippedAdamW, ClippedSGD
from .compare import jsonable
from .tail_index import hill_estimator

LN2 = math.log(2.0)
#: a run whose training loss exceeds this (twice the uniform predictor's loss, in nats) is stopped as diverged
DIVERGED_LOSS = 2.0 * math.log(256.0)
#: learning-rate grids of the sweep, per family
SGD_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
ADAM_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
#: the pilot's learning rate (SGD, momentum 0.9)
PILOT_LR = 0.1
#: Gaussian draws per probe point, for the spread of its tail index
GAUSSIAN_REPLICATES = 50
#: coordinates of the gradient kept for the coordinate-wise tail index
NOISE_COORDINATES = 2048
#: where along the AdamW run the noise is probed (fractions of --steps)
PROBE_FRACTIONS = (0.1, 0.5, 1.0)
#: the skip rule of "ClippedAdamW norm+skip": skip when the norm's z-score against its EMAs exceeds this
SKIP_ZSCORE = 6.0


# ----------------------------------------------------------------------------------------------- data


def load_corpus() -> bytes:
    """The documentation topics of the standard library, sorted by name, joined by blank lines, as UTF-8."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")


def split_corpus(data: bytes, val_fraction: float = 0.1):
    """(train, validation) as uint8 tensors: the first ``1 - val_fraction`` of the bytes, then the rest."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:cut], tokens[cut:]


def windows(tokens: torch.Tensor, starts: torch.Tensor, context: int) -> torch.Tensor:
    """[len(starts), context + 1] windows of ``tokens`` (inputs and next-byte targets)."""
    return tokens[starts.unsqueeze(1) + torch.arange(context + 1)]


# ---------------------------------------------------------------------------------------------- model


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head attention, then a 4x GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attended)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteTransformer(nn.Module):
    """Decoder-only byte-level language model: byte and learned position embeddings, ``layers`` blocks, a
    final layer norm and a linear head to 256 logits.  GPT-2's initialisation (normal, std 0.02; zero biases)."""

    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.embed, self.position = nn.Embedding(256, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, 256)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.position.weight[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross entropy (nats) of ``batch`` [B, T + 1]."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, chunk: int = 64) -> float:
    """Mean next-byte loss (nats) over the windows ``data`` [N, T + 1], every prediction weighted alike."""
    model.eval()
    total = sum(lm_loss(model, data[i:i + chunk]).item() * len(data[i:i + chunk]) for i in range(0, len(data), chunk))
    model.train()
    return total / len(data)


# ----------------------------------------------------------------------------------------- optimizers


@dataclass
class Spec:
    """One compared optimizer: ``family`` picks the lr grid ("sgd" or "adam"); ``level`` names the pilot's
    level it takes as ``clipping_level`` (None: none)."""

    name: str
    cls: type
    family: str
    kwargs: dict = field(default_factory=dict)
    level: Optional[str] = None

    def make(self, params, lr: float, levels: Dict[str, float], seed: int):
        kwargs = dict(self.kwargs, lr=lr)
        if self.level is not None:
            kwargs["clipping_level"] = levels[self.level]
        if self.cls in (ClippedSGD, ClippedAdamW):
            kwargs["seed"] = seed
        return self.cls(params, **kwargs), kwargs


SPECS = [
    Spec("SGD", torch.optim.SGD, "sgd", dict(momentum=0.9)),
    Spec("ClippedSGD norm", ClippedSGD, "sgd", dict(momentum=0.9, clipping_type="norm"), "global"),
    Spec("ClippedSGD layer_wise", ClippedSGD, "sgd", dict(momentum=0.9, clipping_type="layer_wise"), "layer"),
    Spec("ClippedSGD coordinate_wise", ClippedSGD, "sgd", dict(momentum=0.9, clipping_type="coordinate_wise"),
         "coordinate"),
    Spec("ClippedSGD auto_clip", ClippedSGD, "sgd", dict(momentum=0.9, clipping_type="auto_clip")),
    Spec("ClippedSGD linear_rand_norm", ClippedSGD, "sgd", dict(momentum=0.9, clipping_type="linear_rand_norm"),
         "global"),
    Spec("AdamW", torch.optim.AdamW, "adam", dict(weight_decay=0.01)),
    Spec("ClippedAdamW norm", ClippedAdamW, "adam", dict(weight_decay=0.01, clipping_type="norm"), "global"),
    Spec("ClippedAdamW zclip", ClippedAdamW, "adam", dict(weight_decay=0.01, clipping_type="zclip")),
    Spec("ClippedAdamW norm+skip", ClippedAdamW, "adam",
         dict(weight_decay=0.01, clipping_type="norm", skip_if_zscore_above=SKIP_ZSCORE), "global"),
]
SPEC_NAMES = [s.name for s in SPECS]

#: the learning rates of --quick (no sweep): the full run's tuned ones (bench/results/lm/results.json)
DEFAULT_LRS = {
    "SGD": 0.03, "ClippedSGD norm": 0.03, "ClippedSGD layer_wise": 0.3, "ClippedSGD coordinate_wise": 0.1,
    "ClippedSGD auto_clip": 0.03, "ClippedSGD linear_rand_norm": 0.03,
    "AdamW": 1e-3, "ClippedAdamW norm": 1e-3, "ClippedAdamW zclip": 1e-3, "ClippedAdamW norm+skip": 1e-3,
}


# ------------------------------------------------------------------------------------------- training


@dataclass
class Setup:
    """The model's and the data's settings, shared by every phase."""

    width: int = 128
    layers: int = 2
    heads: int = 4
    context: int = 64
    batch_size: int = 16
    eval_windows: int = 64  # windows of the fixed train and validation subsets of the curves
    train: torch.Tensor = None
    val: torch.Tensor = None

    def model(self, seed: int) -> ByteTransformer:
        torch.manual_seed(seed)
        return ByteTransformer(self.width, self.layers, self.heads, self.context)

    def batches(self, seed: int, steps: int) -> torch.Tensor:
        """[steps, batch] window starts in the train split, a function of the seed alone."""
        gen = torch.Generator().manual_seed(10_000 + seed)
        return torch.randint(0, len(self.train) - self.context - 1, (steps, self.batch_size), generator=gen)

    def subset(self, tokens: torch.Tensor, count: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return windows(tokens, torch.randint(0, len(tokens) - self.context - 1, (count,), generator=gen), self.context)

    def full_val(self) -> torch.Tensor:
        """The whole validation split in non-overlapping windows."""
        return windows(self.val, torch.arange(0, len(self.val) - self.context - 1, self.context), self.context)


def global_norm(model: nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def train_run(setup: Setup, spec: Spec, lr: float, levels, seed: int, steps: int, eval_every: int,
              progress=None, final_eval: Optional[torch.Tensor] = None, checkpoints: Sequence[int] = (),
              curves: bool = True) -> dict:
    """One optimizer from seed ``seed``'s initialisation on seed ``seed``'s batches; returns its record."""
    model = setup.model(seed)
    opt, kwargs = spec.make(model.parameters(), lr, levels, seed)
    starts = setup.batches(seed, steps)
    train_sub, val_sub = setup.subset(setup.train, setup.eval_windows, 1), setup.subset(setup.val, setup.eval_windows, 2)
    run = dict(name=spec.name, cls=type(opt).__name__, kwargs=jsonable(kwargs), lr=lr, seed=seed, eval_steps=[],
               train_loss=[], train_bpb=[], val_bpb=[], grad_norms=[], diverged_at=None)
    clipped, window_losses, saved = [], [], {}
    if 0 in checkpoints:
        saved[0] = copy.deepcopy(model.state_dict())
    seconds = 0.0
    for k in range(steps):
        batch = windows(setup.train, starts[k], setup.context)
        start = time.perf_counter()
        opt.zero_grad()
        loss = lm_loss(model, batch)
        loss.backward()
        run["grad_norms"].append(global_norm(model))
        opt.step()
        seconds += time.perf_counter() - start
        if hasattr(opt, "statistics"):
            clipped.append(opt.statistics()[0]["clipped_fraction"].item())
        value = loss.item()
        window_losses.append(value)
        if progress is not None:
            progress.update(1)
        if not math.isfinite(value) or value > DIVERGED_LOSS:
            run["diverged_at"] = k + 1
            if progress is not None:
                progress.update(steps - k - 1)
            break
        if k + 1 in checkpoints:
            saved[k + 1] = copy.deepcopy(model.state_dict())
        if curves and ((k + 1) % eval_every == 0 or k + 1 == steps):
            run["eval_steps"].append(k + 1)
            run["train_loss"].append(float(np.mean(window_losses)) / LN2)
            run["train_bpb"].append(evaluate(model, train_sub) / LN2)
            run["val_bpb"].append(evaluate(model, val_sub) / LN2)
            window_losses = []
    run["steps_done"] = len(run["grad_norms"])
    run["ms_per_step"] = 1e3 * seconds / max(1, run["steps_done"])
    run["mean_clipped_fraction"] = float(np.mean(clipped)) if clipped else None
    run["spike_skipped_steps"] = (int(opt.statistics()[0]["spike_skipped_steps"].item())
                                  if hasattr(opt, "statistics") else None)
    if run["diverged_at"] is None:
        data = final_eval if final_eval is not None else val_sub
        run["final_val_loss"] = evaluate(model, data)
    else:
        run["final_val_loss"] = float("inf")
    run["final_val_bpb"] = run["final_val_loss"] / LN2
    run["checkpoints"] = saved
    return run


def pilot_levels(setup: Setup, steps: int, progress=None) -> dict:
    """Clipping levels from the gradient norms of ``steps`` SGD steps (momentum 0.9, lr PILOT_LR), seed 0."""
    model = setup.model(0)
    opt = torch.optim.SGD(model.parameters(), lr=PILOT_LR, momentum=0.9)
    starts = setup.batches(0, steps)
    global_norms, layer_norms, coord_q99 = [], [], []
    for k in range(steps):
        opt.zero_grad()
        lm_loss(model, windows(setup.train, starts[k], setup.context)).backward()
        grads = [p.grad for p in model.parameters()]
        norms = torch.stack([g.norm() for g in grads])
        global_norms.append(torch.linalg.vector_norm(norms).item())
        layer_norms += norms.tolist()
        coord_q99.append(torch.quantile(torch.cat([g.flatten() for g in grads]).abs(), 0.99).item())
        opt.step()
        if progress is not None:
            progress.update(1)
    return {"global": float(np.median(global_norms)), "layer": float(np.median(layer_norms)),
                "coordinate": float(np.median(coord_q99)), "pilot_steps": steps, "pilot_lr": PILOT_LR,
                "pilot_global_norm_quantiles": quantiles(global_norms)}


def quantiles(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return {}
    return {f"q{int(q * 100)}": float(np.quantile(values, q)) for q in (0.0, 0.1, 0.5, 0.9, 0.99, 1.0)}


# ---------------------------------------------------------------------------------------------- noise


def matched_gaussian_norms(gram: torch.Tensor, draws: int, gen: torch.Generator) -> torch.Tensor:
    """Norms of ``draws`` samples of N(0, S), S = X^T X / (N - 1) the covariance of the N noise vectors
    X [N, D] with Gram matrix ``gram`` = X X^T: a sample is z = e^T X / sqrt(N - 1), e ~ N(0, I_N), so
    ||z||^2 = e^T gram e / (N - 1)."""
    n = gram.shape[0]
    e = torch.randn(draws, n, generator=gen, dtype=gram.dtype)
    return ((e @ gram) * e).sum(1).clamp_min(0).div(n - 1).sqrt()


def tail(values) -> float:
    try:
        return hill_estimator(np.asarray(values, dtype=np.float64), 0.1)
    except ValueError:
        return float("nan")


def noise_probe(setup: Setup, state: dict, samples: int, seed: int = 0, progress=None) -> dict:
    """Tail indices of the minibatch gradient noise at the parameters ``state`` against matched Gaussian noise."""
    model = setup.model(0)
    model.load_state_dict(state)
    gen = torch.Generator().manual_seed(20_000 + seed)
    starts = torch.randint(0, len(setup.train) - setup.context - 1, (samples, setup.batch_size), generator=gen)
    grads = []
    for i in range(samples):
        model.zero_grad()
        lm_loss(model, windows(setup.train, starts[i], setup.context)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
        if progress is not None:
            progress.update(1)
    g = torch.stack(grads)
    del grads
    noise = g - g.mean(0)
    mean_norm = g.mean(0).norm().item()
    del g
    norms = noise.norm(dim=1)
    gram = noise @ noise.T
    coords = torch.randperm(noise.shape[1], generator=gen)[:NOISE_COORDINATES]
    sub = noise[:, coords]
    gauss_norm_tails, gauss_coord_tails, gauss_ratio = [], [], []
    for _ in range(GAUSSIAN_REPLICATES):
        gn = matched_gaussian_norms(gram, samples, gen)
        gauss_norm_tails.append(tail(gn.numpy()))
        gauss_ratio.append((gn.max() / gn.median()).item())
        e = torch.randn(samples, samples, generator=gen, dtype=sub.dtype)
        gauss_coord_tails.append(tail((e @ sub / math.sqrt(samples - 1)).abs().flatten().numpy()))
    norms_np = norms.numpy()
    last_gauss = matched_gaussian_norms(gram, samples, gen).numpy()

    def spread(values):
        values = np.asarray(values)
        return dict(mean=float(np.mean(values)), p5=float(np.quantile(values, 0.05)),
                    p95=float(np.quantile(values, 0.95)))

    return dict(
        samples=samples, mean_gradient_norm=mean_norm, noise_norm_median=float(np.median(norms_np)),
        noise_norm_tail=tail(norms_np),
        gaussian_norm_tail=spread(gauss_norm_tails),
        noise_max_over_median=float(norms_np.max() / np.median(norms_np)), gaussian_max_over_median=spread(gauss_ratio),
        noise_coordinate_tail=tail(sub.abs().flatten().numpy()), gaussian_coordinate_tail=spread(gauss_coord_tails),
        coordinates=len(coords), noise_norms=norms_np.tolist(), gaussian_norms=last_gauss.tolist(),
    )


# ------------------------------------------------------------------------------------------- outputs


def _fmt(x, digits: int = 3) -> str:
    return "diverged" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def summarize(runs: List[dict]) -> dict:
    finals = np.array([r["final_val_bpb"] for r in runs])
    finite = finals[np.isfinite(finals)]
    out = dict(seeds=[r["seed"] for r in runs], final_val_bpb=finals.tolist(), diverged=int((~np.isfinite(finals)).sum()))
    if len(finite):
        out.update(mean=float(finite.mean()), std=float(finite.std(ddof=1)) if len(finite) > 1 else 0.0,
                   min=float(finite.min()), max=float(finite.max()))
    fractions = [r["mean_clipped_fraction"] for r in runs if r["mean_clipped_fraction"] is not None]
    out["mean_clipped_fraction"] = float(np.mean(fractions)) if fractions else None
    skipped = [r["spike_skipped_steps"] for r in runs if r["spike_skipped_steps"] is not None]
    out["spike_skipped_steps"] = skipped or None
    out["ms_per_step"] = float(np.mean([r["ms_per_step"] for r in runs]))
    return out


def plot_curves(results: dict, path: Path) -> None:
    names = [o["name"] for o in results["optimizers"]]
    runs = {o["name"]: o["runs"] for o in results["optimizers"]}

    def mean_curve(name, key):
        curves = [r[key] for r in runs[name] if r["diverged_at"] is None]
        if not curves:
            return [float("nan")]
        n = min(len(c) for c in curves)
        return np.mean([c[:n] for c in curves], axis=0).tolist()

    steps = next((r["eval_steps"] for o in results["optimizers"] for r in o["runs"] if r["diverged_at"] is None), None)
    title = (f"byte-level transformer on pydoc topics: {results['steps']} steps, batch {results['setup']['batch_size']}, "
             f"mean of {len(results['seeds'])} seeds (tuned lr each)")
    PlotMaker(title, names, metric_name="bits per byte", loss_name="(bits per byte, minibatches)").draw_plot(
        [mean_curve(n, "train_loss") for n in names], [mean_curve(n, "train_bpb") for n in names],
        [mean_curve(n, "val_bpb") for n in names], path=str(path), steps=steps)


def plot_sweep(results: dict, path: Path) -> None:
    fig = Figure(figsize=(14, 5))
    fig.suptitle(f"learning-rate sweep: final validation bits per byte after {results['sweep_steps']} steps "
                 "(seed 0; x = diverged)", fontsize=14)
    for i, family in enumerate(("sgd", "adam")):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.set_prop_cycle(color=colormaps["tab10"].colors)
        for entry in results["sweep"]:
            if entry["family"] != family:
                continue
            lrs = [p["lr"] for p in entry["points"]]
            values = [p["final_val_bpb"] for p in entry["points"]]
            line, = ax.plot(lrs, [v if math.isfinite(v) else np.nan for v in values], "o-", label=entry["name"])
            bad = [lr for lr, v in zip(lrs, values) if not math.isfinite(v)]
            ax.plot(bad, [8.0] * len(bad), "x", color=line.get_color(), markersize=10)
        ax.axhline(8.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("validation bits per byte")
        ax.set_title("SGD family (momentum 0.9)" if family == "sgd" else "AdamW family")
        ax.grid()
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def plot_noise(probes: List[dict], path: Path) -> None:
    fig = Figure(figsize=(5 * len(probes), 4.5))
    for i, probe in enumerate(probes):
        ax = fig.add_subplot(1, len(probes), i + 1)
        ax.hist(probe["noise_norms"], bins=30, density=True, alpha=0.6, label=f"minibatch noise (Hill {probe['noise_norm_tail']:.1f})")
        ax.hist(probe["gaussian_norms"], bins=30, density=True, alpha=0.5,
                label=f"Gaussian, same covariance (Hill {probe['gaussian_norm_tail']['mean']:.1f})")
        ax.set_title(f"step {probe['step']} of AdamW: ||g_i - mean g||")
        ax.set_xlabel("noise norm")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def write_markdown(results: dict, path: Path) -> None:
    s = results["setup"]
    lv = results["levels"]
    lines = [
        f"# Byte-level transformer on `pydoc_data.topics`: {results['steps']} steps, {len(results['seeds'])} seeds",
        "",
        f"Model: {s['layers']} layers, width {s['width']}, {s['heads']} heads, context {s['context']} bytes, "
        f"{s['parameters']} parameters; batch {s['batch_size']}; corpus {s['train_bytes']} train / {s['val_bytes']} "
        f"validation bytes (last 10 %). Final numbers: validation bits per byte on the whole validation split. "
        f"Wall time {results['wall_seconds']:.0f} s ({results['machine']}).",
        "",
        f"Clipping levels, medians of {lv['pilot_steps']} pilot steps of SGD (lr {lv['pilot_lr']}): whole-model norm "
        f"{lv['global']:.3g}, tensor norm {lv['layer']:.3g}, coordinate (99th percentile of |g_i|) {lv['coordinate']:.3g}.",
        "",
        "## Gradient noise: Hill tail index (top 10 %), minibatch noise against Gaussian noise of the same covariance",
        "",
        "| AdamW step | samples | noise norms | Gaussian (mean, 5-95 %) | noise coordinates | Gaussian coordinates | "
        "max/median noise norm | Gaussian max/median |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in results["noise"]:
        g, gc, gr = p["gaussian_norm_tail"], p["gaussian_coordinate_tail"], p["gaussian_max_over_median"]
        lines.append(f"| {p['step']} | {p['samples']} | {p['noise_norm_tail']:.1f} | "
                     f"{g['mean']:.1f} ({g['p5']:.1f}-{g['p95']:.1f}) | {p['noise_coordinate_tail']:.2f} | "
                     f"{gc['mean']:.2f} ({gc['p5']:.2f}-{gc['p95']:.2f}) | {p['noise_max_over_median']:.2f} | "
                     f"{gr['mean']:.2f} ({gr['p5']:.2f}-{gr['p95']:.2f}) |")
    lines += ["", f"Gradient norms along AdamW (seed {results['seeds'][0]}): Hill tail index "
                  f"{results['grad_norm_tail_index']:.2f}.", ""]
    if results["sweep"]:
        lrs_sgd, lrs_adam = results["grids"]["sgd"], results["grids"]["adam"]
        lines += [f"## Learning-rate sweep (seed 0, {results['sweep_steps']} steps): final validation bits per byte "
                  "on a fixed subset", "",
                  "| optimizer | " + " | ".join(f"lr {x:g}" for x in lrs_sgd) + " |",
                  "|---|" + "---:|" * len(lrs_sgd)]
        for e in results["sweep"]:
            if e["family"] == "sgd":
                lines.append(f"| {e['name']} | " + " | ".join(_fmt(p["final_val_bpb"]) for p in e["points"]) + " |")
        lines += ["", "| optimizer | " + " | ".join(f"lr {x:g}" for x in lrs_adam) + " |",
                  "|---|" + "---:|" * len(lrs_adam)]
        for e in results["sweep"]:
            if e["family"] == "adam":
                lines.append(f"| {e['name']} | " + " | ".join(_fmt(p["final_val_bpb"]) for p in e["points"]) + " |")
        lines.append("")
    lines += [f"## Comparison at the tuned learning rates (seeds {', '.join(map(str, results['seeds']))}, "
              f"{results['steps']} steps)", "",
              "| optimizer | lr | validation bits per byte, mean ± sd | min - max | diverged | mean clipped fraction | "
              "spike-skipped steps | ms/step |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for o in results["optimizers"]:
        m = o["summary"]
        sd = f"{m['std']:.3f}" if len(m["seeds"]) - m["diverged"] > 1 else "n/a"
        mean = f"{m['mean']:.3f} ± {sd}" if "mean" in m else "diverged"
        spread = f"{m['min']:.3f} - {m['max']:.3f}" if "mean" in m else ""
        frac = "" if m["mean_clipped_fraction"] is None else f"{m['mean_clipped_fraction']:.3f}"
        skipped = "" if m["spike_skipped_steps"] is None else ", ".join(map(str, m["spike_skipped_steps"]))
        lines.append(f"| {o['name']} | {o['lr']:g} | {mean} | {spread} | {m['diverged']} | {frac} | {skipped} | "
                     f"{m['ms_per_step']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ main


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="make demo's short mode: 40 steps, 1 seed, no sweep "
                        "(DEFAULT_LRS), 20 pilot steps, 48 noise samples at the end only")
    parser.add_argument("--steps", type=_positive_int, default=None, help="steps per compared run (default 200)")
    parser.add_argument("--seeds", type=_positive_int, default=None, help="seeds of the comparison (1..N; default 3)")
    parser.add_argument("--sweep-steps", type=int, default=None, help="steps per sweep run; 0: no sweep (default 100)")
    parser.add_argument("--pilot-steps", type=_positive_int, default=None, help="default 50")
    parser.add_argument("--noise-samples", type=_positive_int, default=None, help="gradients per probe (default 160)")
    parser.add_argument("--eval-every", type=_positive_int, default=None, help="default steps // 10")
    parser.add_argument("--optimizers", nargs="+", choices=SPEC_NAMES, default=None, metavar="NAME",
                        help="a subset of: " + ", ".join(SPEC_NAMES))
    parser.add_argument("--width", type=_positive_int, default=128)
    parser.add_argument("--layers", type=_positive_int, default=2)
    parser.add_argument("--heads", type=_positive_int, default=4)
    parser.add_argument("--context", type=_positive_int, default=64)
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    parser.add_argument("--threads", type=_positive_int, default=1, help="torch.set_num_threads (default 1)")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    quick = dict(steps=40, seeds=1, sweep_steps=0, pilot_steps=20, noise_samples=48)
    full = dict(steps=200, seeds=3, sweep_steps=100, pilot_steps=50, noise_samples=160)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    train, val = split_corpus(load_corpus())
    setup = Setup(width=args.width, layers=args.layers, heads=args.heads, context=args.context,
                  batch_size=args.batch_size, train=train, val=val)
    specs = [s for s in SPECS if args.optimizers is None or s.name in args.optimizers]
    seeds = list(range(1, args.seeds + 1))
    eval_every = args.eval_every or max(1, args.steps // 10)
    probe_steps = sorted({max(1, round(f * args.steps)) for f in ((1.0,) if args.quick else PROBE_FRACTIONS)})
    probe_spec = next((s for s in specs if s.family == "adam"), specs[0])
    grids = {"sgd": list(SGD_LRS), "adam": list(ADAM_LRS)}
    total = (args.pilot_steps + (args.sweep_steps * sum(len(grids[s.family]) for s in specs) if args.sweep_steps else 0)
             + args.steps * len(specs) * len(seeds) + args.noise_samples * len(probe_steps))
    progress = tqdm(total=total, desc="lm", unit="step", file=sys.stderr)

    levels = pilot_levels(setup, args.pilot_steps, progress)
    sweep, lrs = [], {}
    if args.sweep_steps:
        for spec in specs:
            points = []
            for lr in grids[spec.family]:
                progress.set_postfix_str(f"sweep {spec.name} lr {lr:g}")
                r = train_run(setup, spec, lr, levels, 0, args.sweep_steps, args.sweep_steps, progress, curves=False)
                points.append(dict(lr=lr, final_val_bpb=r["final_val_bpb"], diverged_at=r["diverged_at"],
                                   mean_clipped_fraction=r["mean_clipped_fraction"]))
            best = min(points, key=lambda p: (p["final_val_bpb"], p["lr"]))
            lrs[spec.name] = best["lr"]
            sweep.append(dict(name=spec.name, family=spec.family, points=points, best_lr=best["lr"]))
    else:
        lrs = {s.name: DEFAULT_LRS[s.name] for s in specs}

    full_val = setup.full_val()
    optimizers, probe_states, probe_run = [], {}, None
    for spec in specs:
        runs = []
        for seed in seeds:
            progress.set_postfix_str(f"{spec.name} seed {seed}")
            probing = spec is probe_spec and seed == seeds[0]
            r = train_run(setup, spec, lrs[spec.name], levels, seed, args.steps, eval_every, progress,
                          final_eval=full_val, checkpoints=probe_steps if probing else ())
            if probing:
                probe_states, probe_run = r["checkpoints"], r
            del r["checkpoints"]
            r["grad_norm_quantiles"] = quantiles(r["grad_norms"])
            runs.append(r)
        optimizers.append(dict(name=spec.name, cls=runs[0]["cls"], kwargs=runs[0]["kwargs"], family=spec.family,
                               lr=lrs[spec.name], summary=summarize(runs), runs=runs))

    noise = []
    for step in probe_steps:
        if step not in probe_states:  # the probed run diverged before this step
            continue
        progress.set_postfix_str(f"noise at step {step}")
        noise.append(dict(step=step, **noise_probe(setup, probe_states[step], args.noise_samples, seed=step, progress=progress)))
    progress.close()

    args.out.mkdir(parents=True, exist_ok=True)
    tail_index = plot_grad_norm_histogram(probe_run["grad_norms"], str(args.out / "grad_norms.png"),
                                          title=f"byte-level transformer, gradient norms along {probe_spec.name} "
                                                f"(seed {seeds[0]}, lr {lrs[probe_spec.name]:g})")
    for o in optimizers:
        for r in o["runs"]:
            if r is not probe_run:
                del r["grad_norms"]
    results = dict(
        command=" ".join([COMMAND] + (list(argv) if argv is not None else sys.argv[1:])),
        corpus="pydoc_data.topics (sorted by topic, joined by blank lines, UTF-8 bytes)",
        setup=dict(width=args.width, layers=args.layers, heads=args.heads, context=args.context,
                   batch_size=args.batch_size, eval_windows=setup.eval_windows, train_bytes=len(train),
                   val_bytes=len(val), full_val_windows=len(full_val),
                   parameters=sum(p.numel() for p in setup.model(0).parameters())),
        steps=args.steps, seeds=seeds, sweep_steps=args.sweep_steps, pilot_steps=args.pilot_steps,
        grids=grids, levels=levels, lrs=lrs, skip_zscore=SKIP_ZSCORE, diverged_loss_nats=DIVERGED_LOSS,
        quick=args.quick, sweep=sweep, optimizers=optimizers, noise=noise, noise_along=probe_spec.name,
        grad_norm_tail_index=tail_index, threads=args.threads,
        machine=f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        wall_seconds=time.perf_counter() - wall,
    )
    plot_curves(results, args.out / "curves.png")
    if sweep:
        plot_sweep(results, args.out / "lr_sweep.png")
    if noise:
        plot_noise(noise, args.out / "noise.png")
    write_markdown(results, args.out / "results.md")
    (args.out / "results.json").write_text(json.dumps(jsonable_results(results), indent=1, allow_nan=True))
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out}/results.md, results.json, curves.png, grad_norms.png"
          + (", lr_sweep.png" if sweep else "") + (", noise.png" if noise else "")
          + f" in {results['wall_seconds']:.0f} s")
    return results


def jsonable_results(results: dict) -> dict:
    """``results`` with floats rounded to 6 significant digits (a smaller file)."""

    def walk(value):
        if isinstance(value, float):
            return float(f"{value:.6g}") if math.isfinite(value) else value
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        return value

    return walk(jsonable(results))


if __name__ == "__main__":
    main()
