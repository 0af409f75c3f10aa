"""The comparison tasks: data, model, loss, metric and per-optimizer default settings.

* ``digits``: scikit-learn's bundled 8x8 digits (no download), an MLP 64-128-10, cross
  entropy, accuracy.
* ``heavy_tail_regression``: y = X w* + noise with Student-t noise of 1.5 degrees of freedom
  (infinite variance, so the stochastic gradients are heavy-tailed), a linear model, squared
  error, and R^2 against the noiseless targets X w* (how well w* is recovered).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch


@dataclass
class Task:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    make_model: Callable[[], torch.nn.Module]
    loss: Callable
    metric: Callable  # (model, x, y) -> float
    metric_name: str
    lrs: Dict[str, float]  # default lr per optimizer family: sgd, adam, sstm


def _accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def digits(seed: int = 0) -> Task:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        from . import missing_extra

        raise missing_extra(error, "the digits task") from error

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return Task(
        name="digits", x_train=x[perm[:cut]], y_train=y[perm[:cut]], x_val=x[perm[cut:]], y_val=y[perm[cut:]],
        make_model=lambda: torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)),
        loss=torch.nn.functional.cross_entropy, metric=_accuracy, metric_name="accuracy",
        lrs={"sgd": 0.05, "adam": 1e-3, "sstm": 0.05},
    )


class _NoiselessTargets:
    """R^2 of the model's predictions against X w* (the noise-free targets)."""

    def __init__(self, w_star: torch.Tensor):
        self.w_star = w_star

    def __call__(self, model, x, y) -> float:
        target = x @ self.w_star
        residual = (model(x).squeeze(-1) - target).pow(2).sum()
        return (1.0 - residual / (target - target.mean()).pow(2).sum()).item()


def heavy_tail_regression(seed: int = 0, dim: int = 20, n_train: int = 2000, n_val: int = 500,
                          df: float = 1.5) -> Task:
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(dim, generator=gen)
    x = torch.randn(n_train + n_val, dim, generator=gen)
    with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
        torch.manual_seed(seed)
        noise = torch.distributions.StudentT(df).sample((n_train + n_val,))
    y = x @ w_star + noise
    return Task(
        name="heavy_tail_regression", x_train=x[:n_train], y_train=y[:n_train], x_val=x[n_train:], y_val=y[n_train:],
        make_model=lambda: torch.nn.Linear(dim, 1),
        loss=lambda out, target: torch.nn.functional.mse_loss(out.squeeze(-1), target),
        metric=_NoiselessTargets(w_star), metric_name="R^2 vs noiseless targets",
        lrs={"sgd": 0.01, "adam": 0.05, "sstm": 0.01},
    )


TASKS = {"digits": digits, "heavy_tail_regression": heavy_tail_regression}
