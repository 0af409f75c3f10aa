"""The original's ``torch_clip.utils`` names that users import."""

from .optim import get_optimal_L
from .experiments.tail_index import hill_estimator

__all__ = ["get_optimal_L", "hill_estimator"]
