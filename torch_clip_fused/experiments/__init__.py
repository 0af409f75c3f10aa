"""Research tools around the optimizers: comparisons (``python -m torch_clip_fused.experiments.compare``),
the demo, benchmark tasks, plots, restarts, collectors and tail-index estimates.

Plots, comparisons, the demo and the digits task need the ``experiments`` extra
(``pip install "torch_clip_fused[experiments]"``: matplotlib, tqdm, scikit-learn): without it they
raise an ImportError that says so (:func:`missing_extra`), and their commands (``python -m ...``)
print that install hint alone and exit with status 1 (:func:`exit_if_missing_extra`).  Restarts,
collectors and the tail index need only torch and numpy.  ``import torch_clip_fused`` never
imports this package.
"""

EXTRA = "torch_clip_fused[experiments]"

#: the top-level modules the extra installs
EXTRA_MODULES = ("matplotlib", "tqdm", "sklearn")


def missing_extra(error: ImportError, what: str) -> ImportError:
    """The ImportError to raise when ``what`` cannot import an optional dependency (``error``):
    it names the module that is missing and the extra that installs it (and keeps its ``name``)."""
    name = getattr(error, "name", None)
    missing = repr(name.split(".")[0]) if name else f"a module it could not import ({error})"
    return ImportError(
        f'{what} needs {missing}, which is not installed: pip install "{EXTRA}" (matplotlib, tqdm, scikit-learn)',
        name=name,
    )


def exit_if_missing_extra(error: ImportError, command: str) -> None:
    """For a command (``python -m torch_clip_fused.experiments.compare``): when ``error`` is a module
    of the extra that cannot be imported, print the message of :func:`missing_extra` alone on stderr
    and exit with status 1, no traceback; any other ImportError is left to the caller to raise."""
    if (getattr(error, "name", None) or "").split(".")[0] in EXTRA_MODULES:
        raise SystemExit(str(missing_extra(error, command)))
