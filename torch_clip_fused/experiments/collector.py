"""Build several optimizers on identical copies of one model, for comparisons (the original's API).

Example::

    collector = OptimizersCollector(ModelProperties(MyNet, hidden=128), [
        OptimizerProperties(ClippedSGD, lr=5e-2, momentum=0.9, clipping_type="norm", clipping_level=1.0),
        OptimizerProperties(torch.optim.Adam, lr=1e-3),
    ])
    nets, opts, names = collector.get_nets(), collector.get_optimizer_objects(), collector.get_names_optimizers()
"""

from __future__ import annotations

from typing import List, Optional

import torch


class OptimizerProperties:
    """An optimizer class (or factory) and the keyword arguments to build it with."""

    def __init__(self, optimizer_class, **kwargs):
        self.optimizer_class = optimizer_class
        self.optimizer_kwargs = kwargs

    def make(self, params):
        return self.optimizer_class(params, **self.optimizer_kwargs)


class ModelProperties:
    """A model class (or factory) and the keyword arguments to build it with."""

    def __init__(self, model_class, **kwargs):
        self.model = model_class
        self.model_kwargs = kwargs

    def get_model(self) -> torch.nn.Module:
        return self.model(**self.model_kwargs)


class RestartProperties:
    """A restarter class and its schedule (see torch_clip_fused.experiments.restarter.Restarter)."""

    def __init__(self, restart_class, first_restart_steps_cnt=100, restart_coeff=1.5, max_steps_cnt=5000):
        self.restart_class = restart_class
        self.first_restart_steps_cnt = first_restart_steps_cnt
        self.restart_coeff = restart_coeff
        self.max_steps_cnt = max_steps_cnt

    def get_kwargs(self) -> dict:
        return {"first_restart_steps_cnt": self.first_restart_steps_cnt, "restart_coeff": self.restart_coeff,
                "max_steps_cnt": self.max_steps_cnt}


class OptimizersCollector:
    """One model per optimizer, every model built after ``torch.manual_seed(start_point_random_seed)``
    so that all start from the same point; torch's seed is then set to ``history_random_seed``."""

    def __init__(self, model_properties: ModelProperties, optimizers_properties: List[OptimizerProperties],
                 start_point_random_seed: int = 42, history_random_seed: int = 42, **kwargs):
        self.optimizers_properties = list(optimizers_properties)
        count = len(self.optimizers_properties)
        self.bs_muls = list(kwargs.get("bs_muls", kwargs.get("bs_mul", [1] * count)))
        self.lr_decays = list(kwargs.get("lr_decays", [1] * count))
        for name, values in (("bs_muls", self.bs_muls), ("lr_decays", self.lr_decays)):
            if len(values) != count:
                raise ValueError(f"Invalid {name}: {len(values)} values for {count} optimizers")
        self.nets = []
        for _ in range(count):
            torch.manual_seed(start_point_random_seed)
            net = model_properties.get_model()
            net.zero_grad()
            net.train()
            self.nets.append(net)
        torch.manual_seed(history_random_seed)
        self.opts = [props.make(net.parameters()) for props, net in zip(self.optimizers_properties, self.nets)]
        self.opt_names = [self._name(i, props) for i, props in enumerate(self.optimizers_properties)]

    @staticmethod
    def _name(index: int, props: OptimizerProperties) -> str:
        args = ", ".join(f"{k}={v}" for k, v in props.optimizer_kwargs.items())
        return f"{index + 1}) {getattr(props.optimizer_class, '__name__', str(props.optimizer_class))};  {args}"

    def get_names_optimizers(self) -> List[str]:
        return self.opt_names

    def init_optimizers_objects(self) -> None:
        self.opts = [props.make(net.parameters()) for props, net in zip(self.optimizers_properties, self.nets)]

    def get_optimizer_objects(self):
        return self.opts

    def get_nets(self) -> List[torch.nn.Module]:
        return self.nets


class OptimizersCollectorWithRestarts(OptimizersCollector):
    """An OptimizersCollector with one restarter per optimizer (None where its RestartProperties is None)."""

    def __init__(self, model_properties: ModelProperties, optimizers_properties: List[OptimizerProperties],
                 restart_properties: List[Optional[RestartProperties]], start_point_random_seed: int = 42,
                 history_random_seed: int = 42, **kwargs):
        super().__init__(model_properties, optimizers_properties, start_point_random_seed, history_random_seed,
                         **kwargs)
        if len(restart_properties) != len(self.optimizers_properties):
            raise ValueError(f"Invalid restart_properties: {len(restart_properties)} for "
                             f"{len(self.optimizers_properties)} optimizers")
        self.restart_properties = list(restart_properties)
        self.restarters = [rp.restart_class(op, **rp.get_kwargs()) if rp else None
                           for rp, op in zip(self.restart_properties, self.optimizers_properties)]

    def get_restarters(self):
        return self.restarters
