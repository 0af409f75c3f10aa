"""ClippedSSTM: clipped Stochastic Similar Triangles Method.

Gorbunov, Danilova, Gasnikov, "Stochastic Optimization with Heavy-Tailed Noise via
Accelerated Gradient Clipping", NeurIPS 2020.  With a = 1 / lr, L the Lipschitz constant,
nu in [0, 1] the smoothness and B the clipping level, starting from y^0 = z^0 = x^0, A_0 = 0:

    alpha_{k+1} = (k + 1)^(2 nu / (1 + nu)) / (2 a L)        A_{k+1} = A_k + alpha_{k+1}
    x^{k+1} = (A_k y^k + alpha_{k+1} z^k) / A_{k+1}          (the parameters hold x^{k+1})
    z^{k+1} = z^k - alpha_{k+1} clip(grad f(x^{k+1}, xi^k), lambda_{k+1}),   lambda_{k+1} = B / alpha_{k+1}
    y^{k+1} = (A_k y^k + alpha_{k+1} z^{k+1}) / A_{k+1}

``a_k_ratio_upper_bound < 1`` caps A_k / A_{k+1} (A_k is lowered to keep the ratio), as the
original did.  Every clipping method applies to the z step; for AutoClip methods the
threshold is the quantile of recorded norms and B is not used.  Unlike torch-clip 0.0.6,
the first gradient is used (x^1 = x^0) and ``step()`` returns the loss like every torch
optimizer.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .base import ClippedOptimizer
from ..config import GroupConfig


def _check_sstm_settings(group: dict) -> None:
    """ClippedSSTM's own param-group settings; raises ValueError / TypeError naming the bad value."""
    lr, L, nu, bound = (group[k] for k in ("lr", "L", "nu", "a_k_ratio_upper_bound"))
    for name, value in (("learning rate", lr), ("Lipschitz constant L", L), ("nu", nu),
                        ("a_k_ratio_upper_bound", bound)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Invalid {name} value: {value!r}; expected a number")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"Invalid learning rate: {lr!r}; ClippedSSTM needs a finite lr > 0 (a = 1 / lr)")
    if not (math.isfinite(L) and L > 0):
        raise ValueError(f"Invalid Lipschitz constant L: {L!r}; expected a finite L > 0")
    if not 0.0 <= nu <= 1.0:
        raise ValueError(f"Invalid nu: {nu!r}; expected 0 <= nu <= 1")
    if not 0.0 < bound <= 1.0:
        raise ValueError(f"Invalid a_k_ratio_upper_bound: {bound!r}; expected a value in (0, 1]")


def _alpha(k: int, a: float, L: float, nu: float) -> float:
    return (k + 1) ** (2 * nu / (1 + nu)) / (2 * a * L)


class ClippedSSTM(ClippedOptimizer):
    r"""Clipped Stochastic Similar Triangles Method (Gorbunov, Danilova, Gasnikov, NeurIPS 2020).

    The clipping is that of :class:`ClippedSGD` (docs/spec.md sections 1-2): the z step is one
    clipped SGD step (docs/spec.md section 3) with lr alpha_{k+1}, threshold B / alpha_{k+1}, no
    momentum and no weight decay.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : a = 1 / \text{lr}, \: L, \: \nu \in [0, 1], \:
                B \text{ (clipping\_level)}, \: \rho \text{ (a\_k\_ratio\_upper\_bound)},         \\
            &\hspace{13mm} x^0 \text{ (params)}, \: f(x) \text{ (objective)}, \:
                \text{clip}(g, \lambda) \text{ (the method, threshold } \lambda)                \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &y^0 \leftarrow x^0, \: z^0 \leftarrow x^0, \: A_0 \leftarrow 0                      \\
            &\textbf{for} \: k=0 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}\alpha_{k+1} \leftarrow (k + 1)^{2\nu / (1 + \nu)} / (2 a L)            \\
            &\hspace{5mm}\textbf{if} \: \rho < 1 \: \textbf{and} \:
                A_k > \alpha_{k+1} / (1 - \rho)                                                  \\
            &\hspace{10mm} A_k \leftarrow \alpha_{k+1} \rho / (1 - \rho)
                \text{ (so that } A_k / A_{k+1} = \rho)                                          \\
            &\hspace{5mm}A_{k+1} \leftarrow A_k + \alpha_{k+1}                                   \\
            &\hspace{5mm}x^{k+1} \leftarrow (A_k y^k + \alpha_{k+1} z^k) / A_{k+1}
                \text{ (the parameters hold } x^{k+1})                                           \\
            &\hspace{5mm}g \leftarrow \nabla f(x^{k+1}, \xi^k)                                   \\
            &\hspace{5mm}\lambda_{k+1} \leftarrow B / \alpha_{k+1}
                \text{ (auto thresholds: the AutoClip quantile instead)}                         \\
            &\hspace{5mm}z^{k+1} \leftarrow z^k - \alpha_{k+1} \, \text{clip}(g, \lambda_{k+1})  \\
            &\hspace{5mm}y^{k+1} \leftarrow (A_k y^k + \alpha_{k+1} z^{k+1}) / A_{k+1}           \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\[-1.ex]
            &\bf{return} \:  y^{k+1}                                                             \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\[-1.ex]
       \end{aligned}

    One :meth:`step` takes the gradients at the current parameters (x^{k+1}), computes z^{k+1} and
    y^{k+1}, and writes x^{k+2} into the parameters for the next backward pass; x^1 = x^0, so the
    first gradient is used (torch-clip 0.0.6 dropped it).  ``step()`` returns the closure's loss.

    The positional order of the arguments is the original's (params, lr, L, clipping_type,
    clipping_level, beta, nu, a_k_ratio_upper_bound, clipping_iter_start).

    Args:
        params: parameters or param groups.
        lr: the stepsize parameter of the paper's ``a`` inverted (a = 1 / lr).
        L: Lipschitz constant of the gradient (see :func:`get_optimal_L`).
        clipping_type, clipping_level, beta, p_autoclip, autoclip_history, nonfinite, seed,
        backend: as :class:`ClippedSGD`; ``clipping_level`` is B, so the threshold at step k is
        ``B / alpha_k``.
        nu: smoothness in [0, 1].
        a_k_ratio_upper_bound: maximum A_k / A_{k+1}, in (0, 1].
        clipping_iter_start: with nu > 0 and ``clipping_type="norm"``, choose B so that clipping
            starts at this iteration: B = (k + 1)^(2 nu / (1 + nu)) / (2 a L).

    Example (alpha_1 = 1 / (2 a L) = 0.5, so the threshold is B / alpha_1 = 2)::

        >>> import torch
        >>> from torch_clip_fused import ClippedSSTM
        >>> x = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> opt = ClippedSSTM([x], lr=1.0, L=1.0, clipping_level=1.0, backend="reference")
        >>> x.grad = torch.tensor([3.0, 4.0])  # norm 5, clipped to norm 2: [1.2, 1.6]
        >>> opt.step()
        >>> x.detach()  # z^1 = x^0 - 0.5 * [1.2, 1.6], and x^2 = y^1 = z^1
        tensor([0.4000, 1.2000])
    """

    def __init__(
        self,
        params,
        lr,
        L,
        clipping_type="norm",
        clipping_level: Optional[float] = None,
        beta: float = 0.85,
        nu: float = 1.0,
        a_k_ratio_upper_bound: float = 1.0,
        clipping_iter_start: Optional[int] = None,
        p_autoclip: float = 0.75,
        autoclip_history: Optional[int] = None,
        nonfinite: str = "skip",
        seed: Optional[int] = None,
        backend: str = "auto",
    ):
        _check_sstm_settings(dict(lr=lr, L=L, nu=nu, a_k_ratio_upper_bound=a_k_ratio_upper_bound))
        if clipping_iter_start is not None:
            if isinstance(clipping_iter_start, bool) or not isinstance(clipping_iter_start, int) or clipping_iter_start <= 0:
                raise ValueError(f"Invalid clipping_iter_start: {clipping_iter_start!r}; expected a positive int")
            if nu > 0 and clipping_type == "norm":
                clipping_level = _alpha(clipping_iter_start, 1.0 / lr, L, nu)
        defaults = dict(
            lr=lr, L=L, nu=nu, a_k_ratio_upper_bound=a_k_ratio_upper_bound, clipping_type=clipping_type,
            clipping_level=clipping_level, beta=beta, p_autoclip=p_autoclip, autoclip_history=autoclip_history,
            nonfinite=nonfinite, differentiable=False,
        )
        super().__init__(params, defaults, seed, backend)

    def _group_config(self, group: dict, lr: float = 1.0, level: Optional[float] = None) -> GroupConfig:
        """The clipped z step as an SGD step: lr alpha_{k+1}, threshold lambda_{k+1}, no momentum.
        Validates the group's own settings too (lr, L, nu, a_k_ratio_upper_bound), as for every
        param group: at construction, add_param_group, load_state_dict and before each step."""
        _check_sstm_settings(group)
        return GroupConfig.from_group(dict(
            lr=lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
            clipping_type=group["clipping_type"],
            clipping_level=group["clipping_level"] if level is None else level,
            beta=group["beta"], p_autoclip=group["p_autoclip"], autoclip_history=group["autoclip_history"],
            clip_point="grad", nonfinite=group["nonfinite"],
        ))

    def _coefficients(self, group: dict, st: dict):
        """(A_k, alpha_{k+1}, A_{k+1}) for the group's current k, with the ratio cap."""
        a, L, nu = 1.0 / group["lr"], group["L"], group["nu"]
        alpha = _alpha(st["sstm_k"], a, L, nu)
        a_k = st["sstm_A"]
        bound = group["a_k_ratio_upper_bound"]
        if bound < 1.0:
            factor = 1.0 / (1.0 - bound)
            if a_k > factor * alpha:
                a_k = (factor - 1.0) * alpha
        return a_k, alpha, a_k + alpha

    @torch._disable_dynamo  # torch.compiler.disable, imported lazily (as torch.optim does)
    @torch.no_grad()
    def step(self, closure=None):
        """One step: the gradients are those at x^{k+1} (the current parameters).  Returns the
        closure's loss, if any."""
        loss = self._evaluate(closure)
        for i, (group, (_, layout)) in enumerate(zip(self.param_groups, self._prepare())):
            params = layout.params
            if not params:
                continue
            st = self.state[group["params"][0]]
            if "sstm_k" not in st:
                st["sstm_k"], st["sstm_A"] = 0, 0.0
            for p in params:
                ps = self.state[p]
                if "sstm_y" not in ps:
                    ps["sstm_y"] = p.detach().clone()
                    ps["sstm_z"] = p.detach().clone()
            y = [self.state[p]["sstm_y"] for p in params]
            z = [self.state[p]["sstm_z"] for p in params]
            a_k, alpha, a_next = self._coefficients(group, st)
            level = self._group_config(group).clip.level
            cfg = self._group_config(group, lr=alpha, level=level / alpha)
            self._clipped_step(i, group, cfg, layout, z, cache_key="sstm_z")  # z^{k+1}
            torch._foreach_mul_(y, a_k / a_next)
            torch._foreach_add_(y, z, alpha=alpha / a_next)  # y^{k+1}
            st["sstm_k"] += 1
            st["sstm_A"] = a_next
            a_k, alpha, a_next = self._coefficients(group, st)
            for p, yi, zi in zip(params, y, z):  # x^{k+2}
                p.copy_(yi * (a_k / a_next) + zi * (alpha / a_next))
        return loss


def get_optimal_L(model, optimizer, criterion, train_loader, epochs: int = 1):
    """Estimate L for ClippedSSTM as twice the mean of ||g_{k+1} - g_k|| / ||x_{k+1} - x_k||
    over consecutive steps of ``optimizer`` on ``train_loader``; returns (L, history).

    The model and loader are used as they are (no device moves); ``optimizer`` is stepped."""
    params = [p for p in model.parameters() if p.requires_grad]
    previous = None
    history = []
    for _ in range(epochs):
        for inputs, labels in train_loader:
            optimizer.zero_grad()
            criterion(model(inputs), labels).backward()
            current = ([p.detach().clone() for p in params], [p.grad.detach().clone() for p in params])
            if previous is not None:
                dg = torch.stack([torch.linalg.vector_norm(a - b) for a, b in zip(current[1], previous[1])]).norm()
                dx = torch.stack([torch.linalg.vector_norm(a - b) for a, b in zip(current[0], previous[0])]).norm()
                if dx > 0:
                    history.append((dg / dx).item())
            previous = current
            optimizer.step()
    if not history:
        raise ValueError("get_optimal_L needs at least two batches with different parameters")
    return 2.0 * sum(history) / len(history), history
