"""torch.distributed support: seeds that agree across ranks."""

from .seeds import SEED_LIMIT, draw_seed

__all__ = ["SEED_LIMIT", "draw_seed"]
