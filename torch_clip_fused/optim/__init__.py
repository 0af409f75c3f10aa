"""The clipped optimizers: :class:`ClippedSGD`, :class:`ClippedSSTM` and their shared base."""

from .sgd import ClippedSGD
from .sstm import ClippedSSTM, get_optimal_L

__all__ = ["ClippedSGD", "ClippedSSTM", "get_optimal_L"]
