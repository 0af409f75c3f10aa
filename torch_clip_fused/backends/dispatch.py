"""Backend choice: every backend is a function ``step(GroupTensors, GroupConfig) -> None``.

* ``"reference"``: pure PyTorch (torch_clip_fused.backends.reference), any device.
* ``"cpp"``:       fused C++ CPU kernels (csrc/), JIT-built with ninja on first use.
* ``"triton"``:    fused Triton kernels (torch_clip_fused.kernels), CUDA tensors, or CPU
                   tensors under ``TRITON_INTERPRET=1``.
* ``"auto"``:      triton for CUDA tensors when triton imports, cpp for CPU tensors when it
                   builds, otherwise the reference (warning once: the documented fallback).

An explicit backend that cannot run raises with the reason; ``auto`` never does.  Its warnings point
at the user's line (the first caller outside torch_clip_fused and torch), not at this package.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from .._warnings import user_stacklevel
from ..config import GroupConfig, GroupTensors
from .capabilities import Backend, cpp_backend, custom_backend, reference_backend, triton_backend

BACKENDS = ("auto", "reference", "cpp", "triton")

StepFn = Callable[[GroupTensors, GroupConfig], None]

_warned = set()
_refresh_tried = False


def validate_backend(name):
    """A backend name, or a step function ``step(GroupTensors, GroupConfig) -> None`` of one's own
    (for experiments: e.g. ``torch.compile(reference_step)``)."""
    if callable(name):
        return name
    if name not in BACKENDS:
        raise ValueError(f"Invalid backend: {name!r}; valid choices are {', '.join(map(repr, BACKENDS))}, "
                         "or a step function")
    return name


def resolve_backend(backend, foreach=None, fused=None, differentiable=False) -> str:
    """The backend to use given torch.optim.SGD's ``foreach`` / ``fused`` / ``differentiable``
    switches (see ClippedSGD's docstring); raises ValueError naming a value that cannot be met."""
    validate_backend(backend)
    if callable(backend):
        return backend
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value not in (None, True, False):
            raise ValueError(f"Invalid {name} value: {value!r}; expected None, True or False")
    if differentiable:
        raise ValueError(f"Invalid differentiable value: {differentiable!r}; the clipped optimizers' steps run "
                         "outside autograd (fused kernels), so only differentiable=False is supported")
    if foreach is False:
        raise ValueError("Invalid foreach value: False; every backend of the clipped optimizers steps a group's "
                         "tensors together (there is no per-tensor loop): use foreach=None or True")
    if fused and foreach:
        raise ValueError("Invalid foreach and fused values: fused=True and foreach=True cannot both be set "
                         "(as in torch.optim.SGD)")
    if fused is True and backend == "reference":
        raise ValueError("Invalid fused value: True with backend='reference' (the reference is not fused); "
                         "use backend='auto', 'cpp' or 'triton'")
    if fused is False:
        if backend in ("cpp", "triton"):
            raise ValueError(f"Invalid fused value: False with backend={backend!r} (a fused backend); "
                             "use backend='reference' or 'auto'")
        return "reference"
    return backend


def _warn_once(key: str, message: str) -> None:
    """Warn once per process, at the first caller outside torch_clip_fused (its experiments aside)
    and torch: the user's ``opt.step()`` line, or the framework's that called it."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())


def _cpp_fallback_message(err: Exception) -> str:
    """What is missing, what runs instead, how to fix it or silence the warning."""
    reason, fix = getattr(err, "reason", str(err)), getattr(err, "fix", "")
    return (f"torch_clip_fused: the C++ CPU backend is unavailable: {reason}; using the reference backend instead "
            "(pure PyTorch, slower steps). " + (f"To build it: {fix}; or pass" if fix else "Pass")
            + " backend='reference' to silence this warning")


def _triton_backend() -> Backend:
    """The Triton backend's record (its C++ pointer-refresh helper loaded once)."""
    record = triton_backend()  # ImportError carries the reason

    global _refresh_tried
    if not _refresh_tried:
        _refresh_tried = True
        _load_refresh_helper()
    return record


def _load_refresh_helper() -> None:
    """Build the C++ extension once for its per-step gradient-pointer refresh (group_layout.py);
    without it the refresh runs in Python: the same checks, more host time per step."""
    from .cpp import load_extension

    try:
        load_extension()
    except RuntimeError as err:
        reason, fix = getattr(err, "reason", str(err)), getattr(err, "fix", "")
        _warn_once("refresh", f"torch_clip_fused: the C++ extension is unavailable: {reason}; the Triton backend "
                              "refreshes gradient pointers in Python (more host time per step)"
                              + (f". To build it: {fix}" if fix else ""))


def _cpp_backend() -> Backend:
    from .cpp import load_extension

    load_extension()  # raises CppBuildError (a RuntimeError) with the build's reason and fix
    return cpp_backend()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_backend(name, device: torch.device) -> Backend:
    """The backend record (capabilities.py) for ``name`` (or a step function) on ``device``."""
    if callable(name):
        return custom_backend(name)
    if name == "reference":
        return reference_backend()
    if name == "triton":
        if device.type == "cpu" and not triton_interpreting():
            raise RuntimeError(
                "backend='triton' got CPU tensors: Triton kernels run on CUDA tensors, or on CPU "
                "tensors only under TRITON_INTERPRET=1 (slow, for tests); use backend='cpp' or "
                "'reference' for CPU training"
            )
        try:
            return _triton_backend()
        except ImportError as err:
            raise RuntimeError(f"backend='triton' is unavailable: {err}") from err
    if name == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpp' runs on CPU tensors only, got tensors on {device}")
        return _cpp_backend()
    if name == "auto":
        if device.type == "cuda":
            try:
                return _triton_backend()
            except ImportError as err:
                _warn_once("triton", f"torch_clip_fused: triton is unavailable ({err}); using the reference backend")
                return reference_backend()
        if device.type == "cpu":
            try:
                return _cpp_backend()
            except (ImportError, RuntimeError) as err:
                _warn_once("cpp", _cpp_fallback_message(err))
                return reference_backend()
        return reference_backend()
    raise ValueError(f"Invalid backend: {name!r}; valid choices are {', '.join(map(repr, BACKENDS))}")


def select_step(name, device: torch.device) -> StepFn:
    """The step function of ``select_backend(name, device)``."""
    return select_backend(name, device).step
