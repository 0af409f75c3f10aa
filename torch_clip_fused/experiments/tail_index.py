"""Hill's estimator of the tail index of a heavy-tailed sample.

With X_(1) >= X_(2) >= ... the sample sorted in decreasing order and k the number of upper
order statistics used:

    1 / alpha_hat = (1 / k) sum_{i=1..k} ln(X_(i) / X_(k+1))

A Pareto tail P(X > x) ~ x^(-alpha) gives alpha_hat -> alpha; a normal sample gives a large
alpha_hat (its tail is thinner than any power law).  Variance is infinite for alpha <= 2.
"""

from __future__ import annotations

import numpy as np


def hill_estimator(sample, tail_fraction: float = 0.1) -> float:
    """Tail index from the top ``tail_fraction`` of the positive values of ``sample``."""
    if not 0.0 < tail_fraction < 1.0:
        raise ValueError(f"Invalid tail_fraction: {tail_fraction!r}; expected 0 < tail_fraction < 1")
    x = np.sort(np.asarray(sample, dtype=np.float64))[::-1]
    x = x[x > 0]
    k = int(tail_fraction * len(x))
    if k < 2:
        raise ValueError(f"hill_estimator needs at least {int(np.ceil(2 / tail_fraction))} positive values, got {len(x)}")
    return float(1.0 / np.mean(np.log(x[:k] / x[k])))
