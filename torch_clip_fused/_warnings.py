"""Where this package's warnings point: at the user's line, not at the package's own code.

``warnings.warn(..., stacklevel=user_stacklevel())`` attributes a warning to the first frame, walking
out from the caller, whose module is outside the given packages (by default this package and torch:
optimizer hooks, ``no_grad``, ``torch._disable_dynamo`` sit between the user's ``opt.step()`` and a
warning given inside it).  The package's experiments (``torch_clip_fused.experiments``) use the
optimizers as a user does: their lines count as the user's.
"""

from __future__ import annotations

import sys

#: the packages whose frames a warning skips by default
INTERNAL_PACKAGES = ("torch_clip_fused", "torch")
_USER_CODE = "torch_clip_fused.experiments"


def _is_internal(module: str, packages) -> bool:
    if module == _USER_CODE or module.startswith(_USER_CODE + "."):
        return False
    return module.split(".")[0] in packages


def user_stacklevel(packages=INTERNAL_PACKAGES) -> int:
    """The ``stacklevel`` with which ``warnings.warn``, called by the caller of this function, points at
    the first frame whose module is outside ``packages`` (top-level package names); 1 (the caller's
    own line) when there is none."""
    frame, level = sys._getframe(1), 1  # stacklevel 1: the line that calls warnings.warn
    while frame is not None and _is_internal(frame.f_globals.get("__name__", ""), packages):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1


__all__ = ["INTERNAL_PACKAGES", "user_stacklevel"]
