"""One Philox seed for every rank of a distributed run.

``seed=None`` draws the 32-bit seed from torch's default generator.  Ranks often seed their
generators differently (data augmentation, dropout), and a randomized clipping method whose ranks
draw different seeds makes different decisions on the same all-reduced gradients: DDP replicas
drift apart.  So, when ``torch.distributed`` is initialised with more than one rank, every rank
takes rank 0's draw: one broadcast, at construction (or at the first call of the functional
clip), never inside a step.  Every rank must construct the optimizer, as DDP and FSDP require
anyway.  An explicit seed is used as given.
"""

from __future__ import annotations

import torch

SEED_LIMIT = 2**32


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def draw_seed() -> int:
    """A seed in [0, 2**32) from torch's default generator; rank 0's on every rank of an
    initialised process group."""
    seed = int(torch.randint(0, SEED_LIMIT, (), dtype=torch.int64))
    if _distributed():
        import torch.distributed as dist

        box = [seed]
        dist.broadcast_object_list(box, src=0)  # picks the device the process group's backend needs
        seed = int(box[0])
    return seed


__all__ = ["SEED_LIMIT", "draw_seed"]
