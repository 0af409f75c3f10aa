"""A user's training step wrapped in torch.compile runs, equals eager, and does not recompile from
one step to the next, for every backend (Triton under the interpreter without CUDA).

``ClippedSGD.step`` is one clean graph break (``torch.compiler.disable``): dynamo compiles the
forward and backward around it and runs the step eagerly."""

import copy

import pytest
import torch
import torch.nn.functional as F

from torch_clip_fused import ClippedAdamW, ClippedSGD
from conftest import heavy_tailed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "cpp", "triton"] if DEVICE == "cpu" else ["reference", "triton"]
STEPS = 5
#: the optimizers under test and their update settings
OPTIMIZERS = {"ClippedSGD": (ClippedSGD, dict(momentum=0.9)), "ClippedAdamW": (ClippedAdamW, dict(weight_decay=0.01))}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DEVICE)


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(heavy_tailed((4, 6), gen).to(DEVICE), torch.randn(4, 3, generator=gen).to(DEVICE)) for _ in range(STEPS)]


def _train(model, opt, step_fn):
    losses = []
    for x, y in _batches():
        losses.append(step_fn(model, opt, x, y).detach())
    return losses


def _step(model, opt, x, y):
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["norm", "quadratic_rand_autoclip"])
def test_compiled_training_step_equals_eager(backend, method, compiler, optimizer):
    if compiler == "inductor" and (backend != "reference" or method != "norm" or optimizer != "ClippedSGD"):
        pytest.skip("inductor's code generation is slow on CPU: one combination checks it")
    if backend == "triton" and DEVICE == "cpu":
        pytest.importorskip("triton")
    torch._dynamo.reset()
    cls, update = OPTIMIZERS[optimizer]
    kwargs = dict(lr=0.05, clipping_type=method, clipping_level=0.5, beta=0.5, seed=3, backend=backend, **update)
    eager_model = _model()
    compiled_model = copy.deepcopy(eager_model)
    eager_losses = _train(eager_model, cls(eager_model.parameters(), **kwargs), _step)

    compiled_opt = cls(compiled_model.parameters(), **kwargs)
    compiled = torch.compile(_step, backend=compiler)
    compiled_losses = _train(compiled_model, compiled_opt, lambda *a: compiled(*a))
    for a, b in zip(eager_losses, compiled_losses):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    stats = compiled_opt.statistics()[0]
    assert stats["step"].item() == STEPS and torch.isfinite(stats["norm"])


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_does_not_recompile(backend, optimizer):
    if backend == "triton" and DEVICE == "cpu":
        pytest.importorskip("triton")
    torch._dynamo.reset()
    model = _model()
    cls, update = OPTIMIZERS[optimizer]
    opt = cls(model.parameters(), lr=torch.tensor(0.05, device=DEVICE), clipping_type="auto_clip", backend=backend,
              **update)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(_step, backend=counting_backend)
    batches = _batches()
    compiled(model, opt, *batches[0])
    compiled(model, opt, *batches[1])
    after_warmup = len(graphs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k, (x, y) in enumerate(batches[2:]):
            opt.param_groups[0]["lr"].fill_(0.05 / (k + 2))  # a scheduler changing a tensor lr
            compiled(model, opt, x, y)
    assert len(graphs) == after_warmup
    assert opt.statistics()[0]["step"].item() == STEPS
