"""Backends: every backend is a function ``step(GroupTensors, GroupConfig) -> None`` that runs the
same three stages (norms, scales, apply) on one param group (docs/spec.md section 6).

* ``reference/``  the readable pure-PyTorch oracle and fallback (any device);
* ``cpp/``        the loader of the fused C++ CPU kernels (csrc/);
* ``triton/``     the multi-tensor plan and launch glue of the Triton kernels (kernels/);
* ``dispatch``    the choice between them, as a ``capabilities.Backend`` record (its step, its functional
  stages, the dtypes and layouts its kernels take); ``layout`` and ``group_layout`` the memory layouts the
  fused kernels accept and the per-group tensors kept between steps.
"""

from .capabilities import Backend
from .dispatch import BACKENDS, resolve_backend, select_backend, select_step, triton_interpreting, validate_backend

__all__ = ["BACKENDS", "Backend", "resolve_backend", "select_backend", "select_step", "triton_interpreting",
           "validate_backend"]
