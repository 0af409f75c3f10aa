"""torch.compile(fullgraph=True) over a function that calls a clipped optimizer's step() fails with an
error that names torch_clip_fused and says what works; without fullgraph the step is one clean graph
break and runs eagerly (tests/test_compile.py checks results and recompiles)."""

import pytest
import torch
import torch.nn.functional as F

from torch_clip_fused import ClippedAdamW, ClippedSGD, ClippedSSTM

OPTIMIZERS = {
    "ClippedSGD": lambda params: ClippedSGD(params, lr=0.1, momentum=0.9, backend="reference"),
    "ClippedAdamW": lambda params: ClippedAdamW(params, lr=0.1, backend="reference"),
    "ClippedSSTM": lambda params: ClippedSSTM(params, lr=0.1, L=1.0, backend="reference"),
}


def _model_with_grads():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    F.mse_loss(model(torch.randn(3, 4)), torch.zeros(3, 2)).backward()
    return model


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("how", ["function", "bound method"])
def test_fullgraph_error_names_the_library_and_the_fix(name, how):
    torch._dynamo.reset()
    model = _model_with_grads()
    opt = OPTIMIZERS[name](model.parameters())
    before = [p.detach().clone() for p in model.parameters()]

    def train_step():
        opt.step()

    fn = train_step if how == "function" else opt.step
    with pytest.raises(torch._dynamo.exc.Unsupported) as info:
        torch.compile(fn, fullgraph=True, backend="eager")()
    message = str(info.value)
    assert f"torch_clip_fused: {name}.step() runs eagerly" in message
    assert "torch.compile(fullgraph=True)" in message
    assert "call opt.step() outside the compiled function" in message
    assert "without fullgraph=True" in message and "one graph break" in message
    assert "Please file an issue" not in message
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # nothing stepped


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_without_fullgraph_the_step_is_one_graph_break_and_runs_eagerly(name):
    torch._dynamo.reset()
    model = _model_with_grads()
    reference = _model_with_grads()
    opt, ref_opt = OPTIMIZERS[name](model.parameters()), OPTIMIZERS[name](reference.parameters())

    def train_step(x):
        y = x * 2  # traced before the break
        opt.step()
        return y + 1  # and after it

    explanation = torch._dynamo.explain(train_step)(torch.ones(2))
    ref_opt.step()
    assert explanation.graph_count == 2 and explanation.graph_break_count == 1
    assert f"{name}.step() runs eagerly" in str(explanation.break_reasons[0].reason)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_eager_step_keeps_the_step_as_it_was():
    """The decorated step keeps its name, docstring and signature, and steps as before outside compile."""
    import inspect

    assert ClippedSGD.step.__name__ == "step" and "One step for every param group" in ClippedSGD.step.__doc__
    assert list(inspect.signature(ClippedAdamW.step).parameters) == ["self", "closure"]
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = ClippedSGD([p], lr=0.1, clipping_type="norm", clipping_level=1.0, backend="reference")
    p.grad = torch.tensor([3.0, 4.0])
    assert opt.step(lambda: torch.tensor(7.0)) == 7.0
    torch.testing.assert_close(p.detach(), torch.tensor([0.94, 1.92]))

