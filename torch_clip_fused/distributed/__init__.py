"""torch.distributed support: seeds that agree across ranks (seeds.py), and param groups of DTensor
parameters (FSDP2 / HSDP) stepped on their local shards with norms reduced across ranks (dtensor.py)."""

from .seeds import SEED_LIMIT, draw_seed

__all__ = ["SEED_LIMIT", "draw_seed"]
