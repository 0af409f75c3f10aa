"""ClippedSSTM against a direct implementation of its recurrences on a small quadratic."""

import pytest
import torch

from torch_clip_fused import ClippedSSTM, get_optimal_L

A = torch.diag(torch.tensor([1.0, 4.0, 9.0]))
X0 = torch.tensor([3.0, -2.0, 1.0])


def direct_sstm(steps, lr, L, B, nu=1.0, noise=None):
    """y^0 = z^0 = x^0, A_0 = 0; alpha_{k+1} = (k+1)^(2nu/(1+nu)) / (2aL); x, z, y as in the paper."""
    a = 1.0 / lr
    y, z, a_k = X0.clone(), X0.clone(), 0.0
    xs = []
    for k in range(steps):
        alpha = (k + 1) ** (2 * nu / (1 + nu)) / (2 * a * L)
        a_next = a_k + alpha
        x = (a_k * y + alpha * z) / a_next
        xs.append(x)
        g = A @ x + (noise[k] if noise is not None else 0)
        lam = B / alpha
        g = g * min(1.0, lam / g.norm().item())
        z = z - alpha * g
        y = (a_k * y + alpha * z) / a_next
        a_k = a_next
    return xs


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_sstm_follows_its_recurrences(backend):
    steps, lr, L, B = 8, 0.5, 9.0, 1.0
    noise = [torch.randn(3) * 5 for _ in range(steps)]
    expected = direct_sstm(steps, lr, L, B, noise=noise)
    x = X0.clone().requires_grad_()
    opt = ClippedSSTM([x], lr=lr, L=L, clipping_type="norm", clipping_level=B, backend=backend)
    clipped = []
    for k in range(steps):
        torch.testing.assert_close(x.detach(), expected[k])  # the gradient is taken at x^{k+1}
        opt.zero_grad()
        loss = 0.5 * x @ A @ x + noise[k] @ x
        loss.backward()
        # the step's statistics from closed forms: ||g|| at x^{k+1}, lambda = B / alpha_{k+1},
        # and the global method clips exactly when ||g|| > lambda
        norm = (A @ expected[k] + noise[k]).norm().item()
        lam = B / ((k + 1) / (2 * (1 / lr) * L))
        opt.step()
        stats = opt.statistics()[0]
        assert stats["norm"].item() == pytest.approx(norm, rel=1e-5)
        assert stats["threshold"].item() == pytest.approx(lam, rel=1e-6)
        assert stats["clipped_fraction"].item() == (1.0 if norm > lam else 0.0)
        clipped.append(norm > lam)
    assert any(clipped) and not all(clipped)  # both outcomes occur: the fraction check can fail either way


def test_step_returns_the_closure_loss():
    x = X0.clone().requires_grad_()
    opt = ClippedSSTM([x], lr=0.5, L=9.0)

    def closure():
        opt.zero_grad()
        loss = 0.5 * x @ A @ x
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() == pytest.approx(0.5 * (X0 @ A @ X0).item())


def test_sstm_converges_on_the_quadratic():
    x = X0.clone().requires_grad_()
    opt = ClippedSSTM([x], lr=1.0, L=9.0, clipping_type="norm", clipping_level=10.0)
    for _ in range(200):
        opt.zero_grad()
        (0.5 * x @ A @ x).backward()
        opt.step()
    assert x.detach().norm() < 1e-2


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=0.0, L=1.0), r"Invalid learning rate: 0.0"),
    (dict(lr=0.1, L=-1.0), r"Invalid Lipschitz constant L: -1.0"),
    (dict(lr=0.1, L=1.0, nu=2.0), r"Invalid nu: 2.0"),
    (dict(lr=0.1, L=1.0, a_k_ratio_upper_bound=0.0), r"Invalid a_k_ratio_upper_bound: 0.0"),
    (dict(lr=0.1, L=1.0, clipping_iter_start=0), r"Invalid clipping_iter_start: 0"),
    (dict(lr=0.1, L=1.0, clipping_type="bad"), r"Invalid clipping_type: 'bad'"),
])
def test_bad_sstm_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClippedSSTM([X0.clone().requires_grad_()], **kwargs)


def test_get_optimal_L_on_a_quadratic():
    x = X0.clone().requires_grad_()
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(X0.clone())
    model.forward = lambda inputs: 0.5 * model.x @ A @ model.x
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = [(None, None)] * 6
    L, history = get_optimal_L(model, opt, lambda out, labels: out, loader)
    # for a quadratic, ||A dx|| / ||dx|| lies between the extreme eigenvalues
    assert all(1.0 - 1e-5 <= h <= 9.0 + 1e-5 for h in history) and len(history) == 5
    assert L == pytest.approx(2 * sum(history) / len(history))
    del x


@pytest.mark.parametrize("kind", ["no_clip", "norm", "linear_rand_norm", "quadratic_rand_norm", "layer_wise",
                                  "coordinate_wise", "auto_clip", "linear_rand_autoclip", "quadratic_rand_autoclip"])
def test_every_clipping_type_descends_on_the_quadratic(kind):
    x = X0.clone().requires_grad_()
    opt = ClippedSSTM([x], lr=1.0, L=9.0, clipping_type=kind, clipping_level=5.0, seed=0)
    start = 0.5 * (X0 @ A @ X0).item()
    for _ in range(60):
        opt.zero_grad()
        loss = 0.5 * x @ A @ x
        loss.backward()
        opt.step()
    assert (0.5 * x @ A @ x).item() < 0.05 * start
