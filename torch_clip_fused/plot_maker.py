"""The original's import path ``torch_clip_fused.plot_maker``: see :mod:`torch_clip_fused.experiments.plots`."""

from .experiments.plots import PlotMaker, plot_grad_norm_histogram

__all__ = ['PlotMaker', 'plot_grad_norm_histogram']
