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

from .compile_guard import eager_step
from .base import GROUP_STATE, ClippedOptimizer
from .param_state import fitted_state, where
from ..backends.reference import all_finite
from ..config import STAT_NAMES, GroupConfig, NonFinite


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


def _add_scaled(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x + weight * y with a 0-d device weight: the rounding of ``x.add(y, alpha=weight)`` (one
    fused multiply-add) for float32 and float64; reduced-precision tensors are computed in float32
    and rounded once."""
    if x.dtype in (torch.float32, torch.float64):
        return torch.addcmul(x, y, weight)
    return torch.addcmul(x.float(), y.float(), weight).to(x.dtype)


def _check_saved_sstm_state(saved: dict, index: int) -> None:
    """A checkpoint's k and A_k (ints / floats of the former format, or 0-d tensors); raises
    ValueError before anything is loaded.  Reads the values once (load time, not step())."""
    for key, kind in (("sstm_k", "an int >= 0"), ("sstm_A", "a finite float >= 0")):
        if key not in saved:
            continue
        value = saved[key]
        if isinstance(value, torch.Tensor):
            good = value.numel() == 1 and (not value.is_complex()) and (
                not value.is_floating_point() if key == "sstm_k" else True)
            number = value.reshape(()).item() if good else None
        else:
            good = not isinstance(value, bool) and isinstance(value, (int, float) if key == "sstm_A" else int)
            number = value if good else None
        if not good or not (math.isfinite(number) and number >= 0):
            raise ValueError(f"Invalid checkpoint: param group {index}: state key {key!r} is {value!r}, expected {kind}")


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

    _param_state_keys = ("sstm_y", "sstm_z")

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
        cfg = GroupConfig.from_group(dict(
            lr=lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
            clipping_type=group["clipping_type"],
            clipping_level=group["clipping_level"] if level is None else level,
            beta=group["beta"], p_autoclip=group["p_autoclip"], autoclip_history=group["autoclip_history"],
            clip_point="grad", nonfinite=group["nonfinite"],
        ))
        if cfg.clip.policy.needs_weights:
            raise ValueError(f"Invalid clipping_type value: {cfg.clip.method.name!r}; ClippedSSTM clips the gradient "
                             "of its z sequence, which is not the model's weights, so the relative threshold (AGC) "
                             "has no weights to be relative to; use ClippedSGD or ClippedAdamW for it")
        return cfg

    def _coefficients(self, group: dict, a_k: torch.Tensor, alpha: torch.Tensor):
        """(A_k, alpha_{k+1}, A_{k+1}) from A_k and alpha_{k+1} (float64 device tensors), with the
        ratio cap; the same float64 operations as the paper's scalar recurrence."""
        bound = group["a_k_ratio_upper_bound"]
        if bound < 1.0:
            factor = 1.0 / (1.0 - bound)
            a_k = torch.where(a_k > factor * alpha, (factor - 1.0) * alpha, a_k)
        return a_k, alpha, a_k + alpha

    @staticmethod
    def _alpha_on_device(k: torch.Tensor, group: dict, k_host: int, alpha_host: float) -> torch.Tensor:
        """alpha_{k+1} for the device count k (float64 []): ``alpha_host`` (the host's value for
        k_host, the number of step() calls) where k == k_host, so that a run without skipped steps
        uses exactly the host's floats; otherwise computed on the device."""
        a, L, nu = 1.0 / group["lr"], group["L"], group["nu"]
        exponent = 2 * nu / (1 + nu)
        base = (k + 1).to(torch.float64)
        power = base if exponent == 1.0 else torch.ones_like(base) if exponent == 0.0 else base.pow(exponent)
        return torch.where(k == k_host, alpha_host, power / (2 * a * L))

    def _sstm_state(self, st: dict, device) -> None:
        """The group's k (int64 []) and A_k (float64 []) on the device; a Python int / float (a
        checkpoint of the former format, an unpickled optimizer) becomes a tensor here."""
        k, a_k = st.get("sstm_k"), st.get("sstm_A")
        if not isinstance(k, torch.Tensor) or k.dtype != torch.int64 or k.device != device:
            k = 0 if k is None else k
            st["sstm_k"] = (k.to(device=device, dtype=torch.int64) if isinstance(k, torch.Tensor)
                            else torch.tensor(int(k), dtype=torch.int64, device=device))
        if not isinstance(a_k, torch.Tensor) or a_k.dtype != torch.float64 or a_k.device != device:
            a_k = 0.0 if a_k is None else a_k
            st["sstm_A"] = (a_k.to(device=device, dtype=torch.float64) if isinstance(a_k, torch.Tensor)
                            else torch.tensor(float(a_k), dtype=torch.float64, device=device))

    def _z_step(self, index: int, group: dict, layout, z, alpha_host: float, ratio: torch.Tensor) -> None:
        """z^{k+1} = z^k - alpha clip(g, B / alpha) with the backend's clipped SGD step, alpha =
        alpha_host / ratio known only on the device (ratio is exactly 1 in a run without skipped
        steps).  The backends take the lr and the threshold as host floats (alpha_host and
        B / alpha_host); the device part enters as:

        * constant thresholds and no clipping: the gradient divided by ``ratio`` (as a GradScaler's
          scale: g' = g / ratio), so that ||g'|| > B / alpha_host exactly when ||g|| > B / alpha and
          alpha_host s g' = alpha s g; the norm and threshold statistics are scaled back;
        * AutoClip: the threshold does not depend on alpha, but the recorded norms must be those of
          g: z is multiplied by ``ratio`` before the step and divided after it, so that
          (ratio z - alpha_host s g) / ratio = z - alpha s g.  Where the step will be skipped
          (checked on the device first) the ratio is 1, so a skipped step leaves z as it was.
        """
        level = self._group_config(group).clip.level
        cfg = self._group_config(group, lr=alpha_host, level=level / alpha_host)
        device = layout.device
        ratio32 = ratio.to(torch.float32)
        if cfg.clip.policy.stateful:  # the recorded norms (AutoClip, ZClip) must be those of g
            ok = None
            if cfg.nonfinite is not NonFinite.APPLY:
                ok = all_finite([p.grad for p in layout.params])
            found_inf = getattr(self, "found_inf", None)
            if found_inf is not None:
                no_inf = ~(found_inf.to(device) != 0).any()
                ok = no_inf if ok is None else ok & no_inf
            factor = ratio32 if ok is None else torch.where(ok, ratio32, 1.0)
            torch._foreach_mul_(z, factor)
            self._clipped_step(index, group, cfg, layout, z, cache_key="sstm_z")
            torch._foreach_div_(z, factor)
            return
        scale = getattr(self, "grad_scale", None)
        had_scale = "grad_scale" in self.__dict__
        self.grad_scale = ratio32 if scale is None else scale.to(device) * ratio32
        try:
            self._clipped_step(index, group, cfg, layout, z, cache_key="sstm_z")
        finally:
            if had_scale:
                self.grad_scale = scale
            else:
                del self.grad_scale
        stats = group[GROUP_STATE]["clip_stats"]
        stats[:2].mul_(ratio32)  # the norm of g and the threshold B / alpha

    @eager_step  # one clean graph break under torch.compile; fullgraph=True says what works
    @torch.no_grad()
    def step(self, closure=None):
        """One step: the gradients are those at x^{k+1} (the current parameters).  Returns the
        closure's loss, if any.

        A skipped step (non-finite gradient with ``nonfinite="skip"``, a GradScaler's found_inf)
        leaves the parameters, y, z, k and A_k as they were; only the step and skip counters and
        the statistics move.  Whether the step is skipped is known on the device only: k and A_k
        are device tensors and every update of them, of y and of the parameters is a
        ``where(ok, new, old)``; nothing is read back to the host."""
        loss = self._evaluate(closure)
        work = []
        for i, (group, (_, layout)) in enumerate(zip(self.param_groups, self._prepare())):
            if layout.params:  # every group's y and z are checked before any group moves
                st = self._group_state(i, group, layout.device)
                self._sstm_state(st, layout.device)
                work.append((i, group, layout, st, *self._sequences(i, group, layout)))
        for i, group, layout, st, y, z in work:
            params = layout.params
            k, big_a = st["sstm_k"], st["sstm_A"]
            # the host's k: the number of step() calls so far (k itself without skipped steps)
            k_host = st["clip_steps"]
            a, L, nu = 1.0 / group["lr"], group["L"], group["nu"]
            alpha_host = _alpha(k_host, a, L, nu)
            alpha = self._alpha_on_device(k, group, k_host, alpha_host)
            a_k, alpha, a_next = self._coefficients(group, big_a, alpha)
            self._z_step(i, group, layout, z, alpha_host, alpha_host / alpha)  # z^{k+1}
            ok = st["clip_stats"][STAT_NAMES.index("skipped")] == 0
            w_y, w_z = a_k / a_next, alpha / a_next
            for yi, zi in zip(y, z):  # y^{k+1} = (A_k y^k + alpha z^{k+1}) / A_{k+1}; y where z = y (exact)
                torch.where(ok & (zi != yi), _add_scaled(yi * w_y, zi, w_z), yi, out=yi)
            k_next = k + ok.to(torch.int64)
            a_new = torch.where(ok, a_next, big_a)  # A_{k+1}
            alpha_host = _alpha(k_host + 1, a, L, nu)
            alpha = self._alpha_on_device(k_next, group, k_host + 1, alpha_host)
            a_k, alpha, a_next = self._coefficients(group, a_new, alpha)
            w_y, w_z = a_k / a_next, alpha / a_next
            for p, yi, zi in zip(params, y, z):  # x^{k+2}; y where z = y (y w_y + y w_z rounds away from y)
                p.copy_(torch.where(ok, torch.where(zi == yi, yi, yi * w_y + zi * w_z), p))
            k.copy_(k_next)
            big_a.copy_(a_new)
        return loss

    def _sequences(self, index: int, group: dict, layout):
        """The y and z tensors of the layout's parameters (x itself where missing: y^0 = z^0 = x^0),
        cast and laid out as their parameter where that changed; a RuntimeError naming the parameter
        for one of another shape.  Stored only once every one of them fits."""
        y, z = [], []
        for column, p in zip(layout.columns, layout.params):
            st, place = self.state[p], where(index, group, column)
            for key, out in (("sstm_y", y), ("sstm_z", z)):
                buf = st.get(key)
                out.append(p.detach().clone() if buf is None else fitted_state(p, buf, key, place))
        for p, yi, zi in zip(layout.params, y, z):
            st = self.state[p]
            for key, buf in (("sstm_y", yi), ("sstm_z", zi)):
                if st.get(key) is not buf:
                    st[key] = buf
        previous = layout.backend_cache.get("sstm_z_tensors")
        if previous is not None and (len(previous) != len(z) or any(a is not b for a, b in zip(previous, z))):
            layout.backend_cache.pop("sstm_z", None)  # a backend's cache (the Triton plan) holds the old z
        layout.backend_cache["sstm_z_tensors"] = z
        return y, z

    def load_state_dict(self, state_dict: dict) -> None:
        """As :meth:`ClippedOptimizer.load_state_dict`; k and A_k keep their dtypes (int64,
        float64), and a checkpoint of the former format (Python int and float) is converted."""
        for index, group in enumerate(state_dict["param_groups"]):
            _check_saved_sstm_state(self._saved_group_state(state_dict, group), index)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if group["params"] and GROUP_STATE in group:
                self._sstm_state(group[GROUP_STATE], group["params"][0].device)


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
