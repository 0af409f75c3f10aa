"""The original's import path ``torch_clip_fused.optimizers_collector``: see :mod:`torch_clip_fused.experiments.collector`."""

from .experiments.collector import ModelProperties, OptimizerProperties, OptimizersCollector, OptimizersCollectorWithRestarts, RestartProperties

__all__ = ['ModelProperties', 'OptimizerProperties', 'OptimizersCollector', 'OptimizersCollectorWithRestarts', 'RestartProperties']
