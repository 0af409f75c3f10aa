"""OptimizerInfo entries that run PyTorch's generic optimizer tests (test_optim.py, vendored next to
this file) on ClippedSGD and ClippedAdamW.

Each entry is built from torch's own entry for SGD or AdamW (torch/testing/_internal/
common_optimizers.py): its ``optim_inputs_func``, scheduler inputs, error inputs, flags and skips /
tolerance decorators are reused, so the clipped optimizer meets exactly the configurations torch
checks its own optimizer with.  The clipping is set so that it never changes a gradient, which
makes torch's expectations (loss goes down, state_dict round trips, hooks, ...) apply unchanged:

* ``noclip``: ``clipping_type="no_clip"``;
* ``norm1e30``: ``clipping_type="norm", clipping_level=1e30`` (the scale min(1, 1e30 / ||g||) is 1:
  the norm pass, the threshold state and the scaling all run, and do nothing);

each on ``backend="auto"`` (the C++ backend on CPU tensors) and ``backend="reference"``: 2 optimizers x
2 clippings x 2 backends = 8 entries, named ``Clipped<Opt>_<clipping>_<backend>``.

torch's tests construct optimizers as ``optim_cls(params, **kwargs)`` and sometimes with no kwargs
at all, so each entry's ``optim_cls`` is a subclass that only supplies those settings as defaults
(a test's own kwargs win) and maps torch's implementation switches onto ours:

* ``foreach``: the library has no per-tensor loop; ``foreach=False`` is refused by design (README,
  "foreach, fused, differentiable").  torch's tests set it to force their "forloop" path, so the
  subclass drops ``foreach=False`` and the entry's backend runs instead (test_foreach_matches_forloop
  then compares two runs of the same backend: it checks that the state is what torch's tools can
  compare);
* ``fused`` (``backend="auto"`` entries only): ``fused=False`` is the reference backend, ``fused=True``
  the C++ one, so test_fused_matches_forloop compares C++ against the reference;
* ``differentiable=True`` is refused by design (steps run outside autograd) and is not listed.

By-design differences (complex parameters, sparse gradients, fused=True on meta tensors) are
expected failures here, each with its reason (``_BY_DESIGN``); error inputs whose expected error
differs by design are translated and those that do not apply are left out (``_error_inputs``).
Known library defects are expected failures naming the finding that fixes them (``KNOWN_DEFECTS``):
when the fix lands the test passes, unittest reports an "unexpected success" (a failure), and the
line is removed.  README.md in this folder lists them all.
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from torch.testing._internal.common_methods_invocations import DecorateInfo
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
)
from torch.testing._internal.common_optimizers import optim_db as torch_optim_db

from torch_clip_fused import ClippedAdamW, ClippedSGD

CLIPPINGS = {
    "noclip": dict(clipping_type="no_clip"),
    "norm1e30": dict(clipping_type="norm", clipping_level=1e30),
}
BACKENDS = ("auto", "reference")

TEST_CLASS = "TestOptimRenewed"

#: Tests that fail by design: {test name: (the exception the test ends with, reason)}.
_BY_DESIGN = {
    "test_complex": (ValueError, "by design: complex parameters are refused at construction"),
    "test_complex_2d": (ValueError, "by design: complex parameters are refused at construction"),
    "test_rosenbrock_sparse": (RuntimeError, "by design: sparse gradients are refused at step()"),
    "test_fused_error_on_params_on_meta": (
        AssertionError,
        "by design: fused=True selects backend 'auto' (README, 'foreach, fused, differentiable'), which "
        "steps meta tensors with the reference backend instead of raising torch's '`fused=True` requires "
        "all the params to be floating point Tensors'"),
}

#: Library defects these tests found, as strict xfails (a pass fails, "XPASS(strict)"): {test name:
#: (the exception the test ends with, reason, applies)}, ``applies`` a predicate on (optimizer name,
#: clipping, backend).  Remove a line when its fix lands.
KNOWN_DEFECTS: dict = {
}

#: torch's error inputs that do not apply: torch refuses them for a limit of its own foreach
#: implementation, which the clipped optimizers do not have; they accept these settings and step as
#: torch.optim.AdamW does with the float values (tests/test_optim_db.py: test_tensor_lr_steps_as_its_value,
#: test_tensor_betas_step_as_their_values).
_NOT_APPLICABLE_ERRORS = (
    "lr as a Tensor is not supported for capturable=False and foreach=True",
    "betas must be either both floats or both Tensors",
    r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True",
)


def _configured(base: type, clipping: str, backend: str) -> type:
    """A subclass of ``base`` whose constructor defaults to this entry's clipping and backend.

    Module-level (registered in globals() below) so that pickling an optimizer finds its class."""
    fixed = dict(CLIPPINGS[clipping], backend=backend)
    name = f"{base.__name__}_{clipping}_{backend}"

    def __init__(self, params, *args, **kwargs):
        if kwargs.get("foreach") is False:  # torch's "forloop" switch: no such implementation here
            kwargs["foreach"] = None
        base.__init__(self, params, *args, **{**fixed, **kwargs})

    cls = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                               "__doc__": f"{base.__name__} with {fixed} as defaults (torch's generic tests)."})
    globals()[name] = cls
    return cls


def _error_inputs(torch_info: OptimizerInfo):
    """torch's error inputs for SGD / AdamW, less those that do not apply (_NOT_APPLICABLE_ERRORS),
    with the expected error translated where the library differs by design: a duplicate parameter in
    a group raises ValueError where torch only warns (it would be stepped twice)."""

    def func(device, dtype):
        out = []
        for err in torch_info.optim_error_inputs_func(device=device, dtype=dtype):
            inp = err.optimizer_error_input
            if err.error_regex in _NOT_APPLICABLE_ERRORS:
                continue
            if err.error_type is UserWarning and "duplicate parameters" in err.error_regex:
                err = ErrorOptimizerInput(
                    OptimizerInput(params=inp.params, kwargs=inp.kwargs, desc=inp.desc + " (ours: raises)"),
                    error_on=OptimizerErrorEnum.CONSTRUCTION_ERROR,
                    error_type=ValueError,
                    error_regex=r"parameter 1 of param group 0 is the same tensor as parameter 0",
                )
            out.append(err)
        return out

    return func


def _inputs(torch_info: OptimizerInfo):
    """torch's inputs for SGD / AdamW (a fresh list per call: tests edit the kwargs in place)."""

    def func(device, dtype=None):
        return [OptimizerInput(params=i.params, kwargs=deepcopy(i.kwargs), desc=i.desc)
                for i in torch_info.optim_inputs_func(device=device, dtype=dtype)]

    return func


def _xfail(test: str, raises: type, reason: str) -> DecorateInfo:
    return DecorateInfo(pytest.mark.xfail(raises=raises, reason=reason, strict=True), TEST_CLASS, test)


def _decorators(name: str, clipping: str, backend: str, torch_info: OptimizerInfo):
    decorators = list(torch_info.decorators)  # torch's own skips and tolerance overrides
    decorators += [_xfail(test, raises, reason) for test, (raises, reason) in _BY_DESIGN.items()]
    decorators += [_xfail(test, raises, reason) for test, (raises, reason, applies) in KNOWN_DEFECTS.items()
                   if applies(name.split("_")[0], clipping, backend)]
    return tuple(decorators)


def _entry(base: type, torch_cls: type, clipping: str, backend: str) -> OptimizerInfo:
    torch_info = next(info for info in torch_optim_db if info.optim_cls is torch_cls)
    cls = _configured(base, clipping, backend)
    impls = ("foreach", "fused") if backend == "auto" else ("foreach",)
    return OptimizerInfo(
        cls,
        optim_inputs_func=_inputs(torch_info),
        scheduler_inputs=torch_info.scheduler_inputs,
        supported_impls=impls,
        not_og_supported_flags=torch_info.not_og_supported_flags,
        supports_sparse=torch_info.supports_sparse,
        has_capturable_arg=torch_info.has_capturable_arg,
        metadata_for_sparse=torch_info.metadata_for_sparse,
        supports_complex=torch_info.supports_complex,
        decorators=_decorators(cls.__name__, clipping, backend, torch_info),
        optim_error_inputs_func=_error_inputs(torch_info),
        supports_fused_on=("cpu",) if backend == "auto" else (),
    )


optim_db = [
    _entry(base, torch_cls, clipping, backend)
    for base, torch_cls in ((ClippedSGD, torch.optim.SGD), (ClippedAdamW, torch.optim.AdamW))
    for clipping in CLIPPINGS
    for backend in BACKENDS
]
