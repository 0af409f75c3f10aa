"""Figures: the original's loss/metric layout, and a histogram of gradient norms with its tail.

``PlotMaker(title, names).draw_plot(train_losses, train_metric, val_metric)`` draws, as the
original did, the train loss on the left (two rows high) and the train and validation metric
on the right, one line per optimizer.  ``plot_grad_norm_histogram`` shows how heavy the tail of
the recorded gradient norms is: the histogram, the normal with the same mean and standard
deviation for contrast, and Hill's tail index.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from . import missing_extra
from .tail_index import hill_estimator

try:
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # figures without pyplot: the user's matplotlib backend is left alone
except ImportError as _error:
    raise missing_extra(_error, "torch_clip_fused.experiments.plots") from _error


class PlotMaker:
    font_dict = {"fontsize": 14}

    def __init__(self, main_title: str, names_optimizers: Sequence[str], metric_name: str = "accuracy",
                 loss_name: str = ""):
        self.main_title = main_title
        self.names_optimizers = list(names_optimizers)
        self.metric_name = metric_name
        self.loss_name = loss_name

    def draw_plot(self, train_losses, train_acc, val_acc, path: Optional[str] = None, steps=None):
        """Each argument: one history (list of numbers) per optimizer; ``steps``: the step number of
        each history entry (default 0, 1, ...).  Saves to ``path`` when given; returns the figure."""
        fig = Figure(figsize=(20, 8))
        fig.suptitle(self.main_title, fontsize=20)
        grid = fig.add_gridspec(2, 5)
        ax1 = fig.add_subplot(grid[:, 0:3])
        ax2 = fig.add_subplot(grid[0, 3:5])
        ax3 = fig.add_subplot(grid[1, 3:5])
        ax1.set_title(f"Train loss {self.loss_name}", fontdict=self.font_dict)
        ax2.set_title(f"Train {self.metric_name}", fontdict=self.font_dict)
        ax3.set_title(f"Valid {self.metric_name}", fontdict=self.font_dict)
        for ax, histories in zip((ax1, ax2, ax3), (train_losses, train_acc, val_acc)):
            ax.set_prop_cycle(color=colormaps["tab20"].colors)
            for name, history in zip(self.names_optimizers, histories):
                xs = list(range(len(history))) if steps is None else list(steps)[: len(history)]
                ax.plot(xs, history, label=name, alpha=0.7)
            ax.grid()
            ax.set_xlabel("step")
        ax1.set_yscale("log")
        ax1.legend(fontsize=8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=80)
        return fig


def plot_grad_norm_histogram(norms, path: str, title: str = "gradient norms", tail_fraction: float = 0.1):
    """Histogram of recorded gradient norms, a fitted normal and Hill's tail index; returns the index."""
    values = np.asarray(norms, dtype=np.float64)
    values = values[np.isfinite(values)]
    try:
        alpha = hill_estimator(values, tail_fraction)
    except ValueError:  # too few norms for a tail estimate
        alpha = float("nan")
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    ax.hist(values, bins=60, density=True, alpha=0.6, label=f"{len(values)} recorded norms")
    mu, sigma = values.mean(), values.std()
    xs = np.linspace(values.min(), values.max(), 400)
    if sigma > 0:
        ax.plot(xs, np.exp(-0.5 * ((xs - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi)), "r-",
                label=f"normal fit (mean {mu:.3g}, sd {sigma:.3g})")
    ax.set_title(f"{title}\nHill tail index {alpha:.2f} (top {tail_fraction:.0%} of norms; smaller = heavier tail)")
    ax.set_xlabel("||g||")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return alpha
