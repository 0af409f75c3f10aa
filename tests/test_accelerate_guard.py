"""accelerate's ``accelerator.clip_grad_norm_`` before a clipped optimizer's step() is silent double
clipping: a RuntimeWarning, once per optimizer, pointing at the user's line; none without the clip
call, with clipping_type="no_clip", or for an optimizer whose parameters were not clipped."""

import inspect
import warnings

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

from torch_clip_fused import ClippedAdamW, ClippedSGD  # noqa: E402
from torch_clip_fused.integrations.accelerate import DoubleClippingWarning, install_accelerate_guard  # noqa: E402


@pytest.fixture
def accelerator():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    install_accelerate_guard()  # the optimizers install it themselves (test_the_optimizers_install_the_guard)
    yield accelerate.Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _train(accelerator, make_optimizer, steps=3, clip=True, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model, opt = accelerator.prepare(model, make_optimizer(model.parameters()))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            if clip:
                accelerator.clip_grad_norm_(model.parameters(), 0.5)  # the line the warning points at
            opt.step()
            opt.zero_grad()
    return [w for w in caught if issubclass(w.category, DoubleClippingWarning)], model


CLIP_LINE = next(i for i, line in enumerate(inspect.getsource(_train).splitlines(), _train.__code__.co_firstlineno)
                 if "accelerator.clip_grad_norm_(model.parameters()" in line)


@pytest.mark.parametrize("cls", [ClippedSGD, ClippedAdamW])
def test_clip_grad_norm_before_a_clipping_step_warns_once_at_the_users_line(accelerator, cls):
    caught, _ = _train(accelerator, lambda params: cls(params, lr=0.01, clipping_type="norm", backend="reference"))
    assert len(caught) == 1
    warning = caught[0]
    assert issubclass(warning.category, RuntimeWarning)
    assert warning.filename == __file__ and warning.lineno == CLIP_LINE
    text = str(warning.message)
    assert "accelerator.clip_grad_norm_() clipped the gradients (to max_norm=0.5)" in text
    assert f"{cls.__name__}(clipping_type='norm'" in text
    assert "Drop accelerator.clip_grad_norm_()" in text and "clipping_type='no_clip'" in text


def test_no_warning_without_the_clip_call(accelerator):
    caught, _ = _train(accelerator, lambda params: ClippedSGD(params, lr=0.01, backend="reference"), clip=False)
    assert caught == []


def test_no_warning_with_no_clip(accelerator):
    caught, _ = _train(accelerator, lambda params: ClippedSGD(params, lr=0.01, clipping_type="no_clip",
                                                              backend="reference"))
    assert caught == []


def test_no_warning_for_a_plain_torch_optimizer(accelerator):
    caught, _ = _train(accelerator, lambda params: torch.optim.SGD(params, lr=0.01))
    assert caught == []


def test_clip_grad_norm_keeps_its_result_and_signature(accelerator):
    """The wrapped method clips as before, returns the same total norm and keeps its signature."""
    install_accelerate_guard()
    assert install_accelerate_guard()  # idempotent
    method = accelerate.Accelerator.clip_grad_norm_
    assert getattr(method, "_torch_clip_fused_guard", False)
    assert list(inspect.signature(method).parameters) == ["self", "parameters", "max_norm", "norm_type"]
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m(torch.full((5, 3), 3.0)).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(list(b.parameters()), 0.1)
    got = accelerator.clip_grad_norm_(a.parameters(), max_norm=0.1)  # a generator, and max_norm by keyword
    torch.testing.assert_close(got, expected)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_unrelated_parameters_do_not_warn(accelerator):
    """clip_grad_norm_ over another model's parameters does not touch the clipped optimizer's."""
    torch.manual_seed(0)
    model, other = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    model, other, opt = accelerator.prepare(model, other, ClippedSGD(model.parameters(), lr=0.01, backend="reference"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (model(torch.randn(4, 3)).sum() + other(torch.randn(4, 3)).sum()).backward()
        accelerator.clip_grad_norm_(other.parameters(), 0.5)
        opt.step()
    assert not [w for w in caught if issubclass(w.category, DoubleClippingWarning)]


def test_measuring_the_norm_with_max_norm_inf_does_not_warn(accelerator):
    """The HF Trainer with max_grad_norm=0 calls clip_grad_norm_(..., inf) to log the norm: nothing clipped."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    model, opt = accelerator.prepare(model, ClippedSGD(model.parameters(), lr=0.01, backend="reference"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(4, 3)).sum().backward()
        accelerator.clip_grad_norm_(model.parameters(), float("inf"))
        accelerator.clip_grad_norm_(model.parameters(), max_norm=torch.tensor(float("inf")))
    assert not [w for w in caught if issubclass(w.category, DoubleClippingWarning)]


def test_the_optimizers_install_the_guard(monkeypatch):
    """A clipped optimizer made (or stepped) after accelerate is imported installs the guard."""
    from torch_clip_fused.integrations import accelerate as guard

    original = inspect.unwrap(accelerate.Accelerator.clip_grad_norm_)
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", original)
    monkeypatch.setattr(guard, "_installed", False)
    p = torch.nn.Parameter(torch.ones(2))
    opt = ClippedSGD([p], lr=0.1, backend="reference")
    assert getattr(accelerate.Accelerator.clip_grad_norm_, "_torch_clip_fused_guard", False)
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", original)  # as if accelerate came later
    monkeypatch.setattr(guard, "_installed", False)
    p.grad = torch.ones(2)
    opt.step()
    assert getattr(accelerate.Accelerator.clip_grad_norm_, "_torch_clip_fused_guard", False)


def test_an_optimizer_already_warned_about_is_not_warned_again(accelerator):
    """The HF callback warns about max_grad_norm itself (mark_warned): one warning, not two."""
    from torch_clip_fused.integrations.accelerate import mark_warned

    def make(params):
        opt = ClippedSGD(params, lr=0.01, backend="reference")
        mark_warned(opt)
        return opt

    caught, _ = _train(accelerator, make)
    assert caught == []
