"""torch_clip_fused: clipped SGD and AdamW for heavy-tailed gradients, fused on CPU and GPU."""

from .functional import clip_gradients_, clip_grads_with_norms_, get_grad_norms
from .optim import ClippedAdamW, ClippedSGD
from .optim import ClippedSSTM, get_optimal_L
from .config import STAT_NAMES, ClipPoint, NonFinite
from .methods import ALIASES, CLIPPING_TYPES, ClipMethod, Randomization, Scope, Threshold, parse_method

import torch as _torch

# state_dicts hold ClipMethod values in param groups: let torch.load(weights_only=True) read them
_torch.serialization.add_safe_globals([ClipMethod])

__version__ = "0.1.0"

__all__ = [
    "ALIASES", "CLIPPING_TYPES", "ClipMethod", "ClipPoint", "ClippedAdamW", "ClippedSGD", "ClippedSSTM", "get_optimal_L", "NonFinite", "Randomization",
    "STAT_NAMES", "Scope", "Threshold", "clip_gradients_", "clip_grads_with_norms_", "get_grad_norms", "parse_method",
]
