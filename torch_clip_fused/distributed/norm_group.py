"""A norm over the ranks of a pipeline: ``norm_group`` (issue 20 item 3).

With pipeline parallelism each rank's optimizer holds its own stage's parameters, and the model's
gradient norm is a sum over stages:

    ||g||^2 = sum over the ranks r of norm_group of (sum over r's groups sharing the norm, tensors i of ||g_ri||^2)

``norm_group`` (a ProcessGroup, or a 1-D DeviceMesh: the pipeline mesh) is the set of ranks whose sums
are added: after each rank's own reduction (its groups, and FSDP's mesh for DTensor groups) one SUM
all-reduce over it of two float64 numbers, the shared sum of squares and the non-finite count.  Every
rank then applies the same scale, skips the same steps and records the same norm in its threshold
state (AutoClip history, ZClip EMAs), as torchtitan's ``clip_grad_norm_(..., pp_mesh=...)`` and
Megatron-LM's model-parallel group do.  The collective is made on every step by every rank (a rank whose
stage has no gradient adds zeros), so no rank waits on another.  Layer, unit and coordinate scopes are
per tensor and take no part in the norm; but a non-finite gradient in param group i of any stage skips param
group i on every stage (its non-finite count rides in the same collective), as one process stepping the whole
model skips the whole group: every stage then needs as many param groups (decay / no-decay on each stage).
"""

from __future__ import annotations

from typing import Optional

import torch


class NormGroup:
    """A validated ``norm_group``: its ProcessGroup, kept by reference when the optimizer is copied
    (a deepcopy steps over the same ranks); an optimizer holding one cannot be pickled (a process group
    lives in its process: save ``state_dict()``)."""

    def __init__(self, process_group):
        self.process_group = process_group

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __reduce__(self):
        raise TypeError("an optimizer with a norm_group cannot be pickled (its process group lives in this "
                        "process); save optimizer.state_dict() instead")

    def device(self, fallback: Optional[torch.device] = None) -> torch.device:
        """Where its collective's tensor lives: ``fallback`` (the gradients' device) if given, else CUDA's
        current device for an NCCL group and the CPU for others."""
        if fallback is not None:
            return fallback
        import torch.distributed as dist

        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce(self, *parts: torch.Tensor, op=None):
        """The float64 vectors ``parts`` (e.g. total_sq and bad, each [1]), each summed over the group's ranks
        (``op``: another ReduceOp, MAX for the parts of the inf-norm), in one collective."""
        import torch.distributed as dist

        flat = torch.cat([p.reshape(-1) for p in parts]).to(torch.float64)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM if op is None else op, group=self.process_group)
        return tuple(flat.split([p.numel() for p in parts]))


def resolve_norm_group(norm_group, where: str) -> Optional[NormGroup]:
    """``norm_group`` checked: None, a ProcessGroup, or a 1-D DeviceMesh (its group); anything else, a mesh of
    more dimensions or torch.distributed not initialised is a clear error naming ``where``."""
    if norm_group is None:
        return None
    if isinstance(norm_group, NormGroup):
        return norm_group
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"{where}: norm_group needs torch.distributed, which this torch build lacks")
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(norm_group, (DeviceMesh, dist.ProcessGroup)):
        raise TypeError(f"{where}: Invalid norm_group value: {norm_group!r}; expected None, a ProcessGroup or a "
                        "1-D DeviceMesh")
    if not dist.is_initialized():
        raise RuntimeError(f"{where}: norm_group needs torch.distributed initialised (init_process_group)")
    if isinstance(norm_group, DeviceMesh):
        if norm_group.ndim != 1:
            raise ValueError(f"{where}: norm_group must be a ProcessGroup or a 1-D DeviceMesh (the pipeline mesh), "
                             f"got a {norm_group.ndim}-D DeviceMesh with dimensions {norm_group.mesh_dim_names}; "
                             "pass mesh[\"pp\"]")
        return NormGroup(norm_group.get_group())
    return NormGroup(norm_group)


__all__ = ["NormGroup", "resolve_norm_group"]
