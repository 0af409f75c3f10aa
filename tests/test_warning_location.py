"""Where the package's warnings point (torch_clip_fused/_warnings.py, used by the backend choice, the
optimizers and the accelerate guard): the first frame outside torch_clip_fused and torch, that is the
user's line; the package's experiments count as user code.  Oracle: the line each test calls from."""

import sys
import textwrap
import warnings

import torch

from torch_clip_fused import ClippedSGD
from torch_clip_fused._warnings import user_stacklevel


def _function(module: str, filename: str, source: str, **names):
    """``f`` defined by ``source`` as if in ``module`` (its frames carry that module name) and ``filename``."""
    scope = {"__name__": module, **names}
    exec(compile(textwrap.dedent(source), filename, "exec"), scope)
    return scope["f"]


def _where(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    (warning,) = caught
    return warning.filename, warning.lineno


WARNS = _function("torch_clip_fused.probe", "<package>", """
    def f(packages):
        warnings.warn("probe", RuntimeWarning, stacklevel=user_stacklevel(packages))
    """, warnings=warnings, user_stacklevel=user_stacklevel)
THROUGH_TORCH = _function("torch.probe", "<torch>", """
    def f(packages):
        WARNS(packages)
    """, WARNS=WARNS)
FROM_EXPERIMENTS = _function("torch_clip_fused.experiments.probe", "<experiments>", """
    def f(packages):
        THROUGH_TORCH(packages)
    """, THROUGH_TORCH=THROUGH_TORCH)


def test_the_package_and_torch_are_skipped_up_to_the_callers_line():
    assert _where(lambda: THROUGH_TORCH(("torch_clip_fused", "torch"))) == (__file__, sys._getframe().f_lineno)


def test_the_experiments_are_user_code():
    assert _where(lambda: FROM_EXPERIMENTS(("torch_clip_fused", "torch"))) == ("<experiments>", 3)


def test_only_the_packages_given_are_skipped():
    assert _where(lambda: THROUGH_TORCH(("torch_clip_fused", "accelerate"))) == ("<torch>", 3)


def test_auto_falling_back_for_a_strided_parameter_warns_at_the_step_line():
    p = torch.nn.Parameter(torch.randn(6, 8)[:, ::2])  # not dense in memory: the reference steps it
    p.grad = torch.randn(6, 4)
    opt = ClippedSGD([p], lr=0.1, backend="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(); line = sys._getframe().f_lineno  # noqa: E702  (the warning's expected line)
    dense = [w for w in caught if "stepped with the reference backend" in str(w.message)]
    assert len(dense) == 1, [str(w.message) for w in caught]
    assert (dense[0].filename, dense[0].lineno) == (__file__, line)
