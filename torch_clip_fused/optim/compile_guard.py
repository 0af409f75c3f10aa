"""``eager_step``: the clipped optimizers' ``step()`` under ``torch.compile``.

A step runs eagerly (fused kernels or the reference's foreach ops, no host sync) and is never traced.
Under ``torch.compile`` without ``fullgraph=True`` a call to it is one clean graph break: dynamo
compiles the code around it and runs the step as it is, so a compiled training step does not
recompile from one step to the next.  Under ``fullgraph=True`` a graph break is an error; dynamo's own
text for it ("Attempted to call function marked as skipped ... Please file an issue to PyTorch")
says nothing of what to do, so the step carries its own message, which dynamo puts in the error
(and in the graph-break reason that ``torch._dynamo.explain`` reports).

How: ``torch._disable_dynamo`` (what torch.optim's own steps use) wraps the step without importing
``torch._dynamo`` (seconds) until the first call, in a file that dynamo never traces; the two
attributes below are those ``torch._dynamo.disable(fn, reason=...)`` sets, which dynamo reads when
it meets the call: it does not inline the function and reports ``_torchdynamo_disable_msg`` as the
reason.  Nothing changes outside torch.compile: the step is called as it was.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def fullgraph_message(qualname: str) -> str:
    """What the error of ``torch.compile(fullgraph=True)`` over ``qualname`` (``ClippedSGD.step``) says."""
    return (f"torch_clip_fused: {qualname}() runs eagerly (fused kernels, no host sync) and cannot be traced, "
            "so torch.compile(fullgraph=True) cannot include it. Compile the model or the loss computation "
            "(torch.compile(model), or a compiled function that computes the loss) and call opt.step() outside "
            "the compiled function; torch.compile without fullgraph=True also works: there the step is one "
            "graph break and runs eagerly.")


def eager_step(fn: F) -> F:
    """Decorate an optimizer's ``step``: it runs eagerly, never traced by dynamo (one graph break under
    ``torch.compile``), and ``torch.compile(fullgraph=True)`` over it fails with
    :func:`fullgraph_message` instead of dynamo's generic skip message.  Name, docstring and
    signature (``__wrapped__``) are ``fn``'s."""
    wrapped = torch._disable_dynamo(fn)  # torch.compiler.disable, importing torch._dynamo at the first call
    wrapped._torchdynamo_disable = True
    wrapped._torchdynamo_disable_msg = fullgraph_message(fn.__qualname__)
    return wrapped


__all__ = ["eager_step", "fullgraph_message"]
