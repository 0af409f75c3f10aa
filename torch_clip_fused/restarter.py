"""The original's import path ``torch_clip_fused.restarter``: see :mod:`torch_clip_fused.experiments.restarter`."""

from .experiments.restarter import Restarter

__all__ = ['Restarter']
