"""Research tools around the optimizers: comparisons (``python -m torch_clip_fused.experiments.compare``),
the demo, benchmark tasks, plots, restarts, collectors and tail-index estimates.

Plots, comparisons, the demo and the digits task need the ``experiments`` extra
(``pip install 'torch_clip_fused[experiments]'``: matplotlib, tqdm, scikit-learn): without it they
raise an ImportError that says so (:func:`missing_extra`).  Restarts, collectors and the tail index
need only torch and numpy.  ``import torch_clip_fused`` never imports this package.
"""

EXTRA = "torch_clip_fused[experiments]"


def missing_extra(error: ImportError, what: str) -> ImportError:
    """The ImportError to raise when ``what`` cannot import an optional dependency (``error``):
    it names the module that is missing and the extra that installs it."""
    name = getattr(error, "name", None)
    missing = repr(name.split(".")[0]) if name else f"a module it could not import ({error})"
    return ImportError(
        f"{what} needs {missing}, which is not installed: pip install '{EXTRA}' (matplotlib, tqdm, scikit-learn)",
        name=name,
    )
