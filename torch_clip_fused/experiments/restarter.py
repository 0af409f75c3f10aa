"""Restarts: average the iterates since the last restart, jump there, start a fresh optimizer.

With n_k the length of restart period k (n_0 = ``first_restart_steps_cnt``) and x_1..x_n the
parameters recorded by ``add_coords`` since the last restart, ``make_restart`` does, once
n = n_k:

    x <- (1 / n) sum_i x_i,   optimizer <- a new one from the OptimizerProperties,
    n_{k+1} = int(n_k * restart_coeff)

and restarts stop once n_k exceeds ``max_steps_cnt``.  The average is kept as a running mean,
one buffer per parameter on the parameter's device (memory does not grow with n):

    m_i = m_{i-1} + (x_i - m_{i-1}) / i

Example (the original's)::

    props = OptimizerProperties(ClippedSGD, lr=5e-2, momentum=0.9, clipping_type="layer_wise", clipping_level=1)
    restarter = Restarter(optimizer_properties=props, first_restart_steps_cnt=50, restart_coeff=1.25,
                          max_steps_cnt=2000)
    optimizer = props.optimizer_class(model.parameters(), **props.optimizer_kwargs)
    for inputs, labels in loader:
        criterion(model(inputs), labels).backward()
        optimizer.step(); optimizer.zero_grad()
        restarter.add_coords(model.parameters())
        optimizer = restarter.make_restart(model, optimizer)
"""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch

from .collector import OptimizerProperties


class Restarter:
    """Restarts with iterate averaging (see the module's docstring for the schedule)."""

    def __init__(self, optimizer_properties: OptimizerProperties, first_restart_steps_cnt: int = 100,
                 restart_coeff: float = 1.5, max_steps_cnt: int = 5000) -> None:
        if isinstance(first_restart_steps_cnt, bool) or not isinstance(first_restart_steps_cnt, int) \
                or first_restart_steps_cnt < 1:
            raise ValueError(f"Invalid first_restart_steps_cnt: {first_restart_steps_cnt!r}; expected an int >= 1")
        if not restart_coeff >= 1.0:
            raise ValueError(f"Invalid restart_coeff: {restart_coeff!r}; expected restart_coeff >= 1")
        if not max_steps_cnt >= 1:
            raise ValueError(f"Invalid max_steps_cnt: {max_steps_cnt!r}; expected max_steps_cnt >= 1")
        self.optimizer_properties = optimizer_properties
        self.num_cur_restart = first_restart_steps_cnt
        self.restart_coeff = restart_coeff
        self.max_steps_cnt = max_steps_cnt
        self.recorded = 0
        self.restarts_done = 0
        self._mean: Optional[List[torch.Tensor]] = None

    @property
    def active(self) -> bool:
        """Whether restarts still happen (n_k has not exceeded max_steps_cnt)."""
        return self.num_cur_restart <= self.max_steps_cnt

    @torch.no_grad()
    def add_coords(self, coords: Iterable[torch.Tensor]) -> None:
        """Record the current parameters into the running mean of this restart period."""
        if not self.active:
            return
        coords = [c.detach() for c in coords]
        self.recorded += 1
        if self._mean is None or len(self._mean) != len(coords):
            self._mean = [c.clone() for c in coords]
            self.recorded = 1
        elif self.recorded == 1:
            torch._foreach_copy_(self._mean, coords)
        else:
            torch._foreach_lerp_(self._mean, coords, 1.0 / self.recorded)

    def get_mean_coords(self) -> List[torch.Tensor]:
        """The mean of the parameters recorded since the last restart."""
        if self._mean is None or self.recorded == 0:
            raise RuntimeError("Restarter.get_mean_coords: no coordinates recorded since the last restart")
        return self._mean

    def empty_coords(self) -> None:
        self.recorded = 0

    @torch.no_grad()
    def make_restart(self, model: torch.nn.Module, optimizer):
        """After n_k recorded steps: set the model's parameters to their mean and return a fresh
        optimizer; otherwise return ``optimizer`` unchanged."""
        if not self.active or self.recorded < self.num_cur_restart:
            return optimizer
        for param, mean in zip(model.parameters(), self.get_mean_coords()):
            param.copy_(mean)
        self.empty_coords()
        self.restarts_done += 1
        self.num_cur_restart = int(self.num_cur_restart * self.restart_coeff)
        props = self.optimizer_properties
        return props.optimizer_class(model.parameters(), **props.optimizer_kwargs)
