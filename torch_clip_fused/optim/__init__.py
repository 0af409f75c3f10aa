"""The clipped optimizers: :class:`ClippedSGD`, :class:`ClippedAdamW`, :class:`ClippedSSTM` and their shared base."""

from .adamw import ClippedAdamW
from .sgd import ClippedSGD
from .sstm import ClippedSSTM, get_optimal_L

__all__ = ["ClippedAdamW", "ClippedSGD", "ClippedSSTM", "get_optimal_L"]
