"""Per-tensor telemetry (issue 21 item 4, torch_clip_fused/tensor_stats.py): ``optimizer.tensor_statistics()``
on every backend against torch and the closed forms, without a host read inside step(); shared norms,
skipped steps, names, checkpoints, and the one-transfer top-k read-back of the integrations."""

import io

import pytest
import torch

from conftest import make_params, set_grads
from test_integrations import CountTransfers
from test_optim_db import no_host_reads
from torch_clip_fused import ClippedAdamW, ClippedSGD
from torch_clip_fused.integrations import flat_statistics

BACKENDS = ("reference", "cpp", "triton")
OPTIMIZERS = {"sgd": lambda params, **kw: ClippedSGD(params, lr=0.1, momentum=0.9, **kw),
              "adamw": lambda params, **kw: ClippedAdamW(params, lr=0.01, **kw)}
#: (clipping_type, clipping_level): each clips some tensors (units, elements) of the test gradients, not all
METHODS = (("norm", 6.0), ("layer_wise", 2.0), ("coordinate_wise", 1.5), ("agc", 2.0))
AGC_EPS = 1e-3  # the default agc_eps


def torch_norms(grads):
    return torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])


def closed_form_scales(method: str, level: float, grads, params) -> torch.Tensor:
    """Each tensor's scale (global / layer) or fraction clipped (unit / coordinate), from the definitions."""
    norms = torch_norms(grads)
    if method == "norm":
        return torch.clamp(level / norms.square().sum().sqrt(), max=1.0).expand(len(grads))
    if method == "layer_wise":
        return torch.clamp(level / norms, max=1.0)
    if method == "coordinate_wise":
        return torch.stack([(g.abs() > level).double().mean() for g in grads])
    fractions = []  # agc: unit scope, eta_u = level * max(||w_u||, eps)
    for g, p in zip(grads, params):
        g2, p2 = (g, p.detach()) if g.dim() >= 2 else (g.reshape(1, -1), p.detach().reshape(1, -1))
        unit_g = torch.linalg.vector_norm(g2.double(), dim=tuple(range(1, g2.dim())))
        unit_w = torch.linalg.vector_norm(p2.double(), dim=tuple(range(1, p2.dim())))
        fractions.append((unit_g > level * unit_w.clamp(min=AGC_EPS)).double().mean())
    return torch.stack(fractions)


def stepped(opt):
    with no_host_reads():
        opt.step()
        return opt.tensor_statistics()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("method,level", METHODS)
def test_norms_and_scales_are_torchs_and_the_closed_form(backend, optimizer, method, level):
    params = make_params()
    grads = [p.grad.clone() for p in params]
    opt = OPTIMIZERS[optimizer](params, clipping_type=method, clipping_level=level, backend=backend, seed=0)
    before = [p.detach().clone() for p in params]
    stats = stepped(opt)[0]
    assert stats["names"] == ["0", "1", "2", "3"]
    assert stats["norm"].dtype == torch.float32 and stats["norm"].shape == (len(params),)
    torch.testing.assert_close(stats["norm"].double(), torch_norms(grads), rtol=2e-6, atol=0)
    expected = closed_form_scales(method, level, grads, before)
    assert ((expected > 0) & (expected < 1)).any()  # something clipped, not everything: the case means something
    exact = method in ("coordinate_wise", "agc")  # counts: the same on every backend
    torch.testing.assert_close(stats["scale"].double(), expected, rtol=0 if exact else 2e-6, atol=1e-7 if exact else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", (1.0, 3.0, float("inf")))
@pytest.mark.parametrize("method", ("norm", "layer_wise"))
def test_norms_and_scales_with_another_norm_type(backend, norm_type, method):
    """With ``norm_type`` p the per-tensor norms are ||g_i||_p (torch's vector_norm) and the scales
    min(1, level / ||g||_p) (global: over every tensor, as clip_grad_norm_(norm_type=p)) or per tensor."""
    params = make_params()
    grads = [p.grad.clone() for p in params]
    opt = ClippedSGD(params, lr=0.1, clipping_type=method, clipping_level=1.0, norm_type=norm_type, backend=backend)
    stats = stepped(opt)[0]
    norms = torch.stack([torch.linalg.vector_norm(g.double(), norm_type) for g in grads])
    total = torch.linalg.vector_norm(norms, norm_type)
    scales = torch.clamp(1.0 / (total if method == "norm" else norms), max=1.0).expand(len(grads))
    torch.testing.assert_close(stats["norm"].double(), norms, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats["scale"].double(), scales, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_norm_shared_by_two_groups(backend):
    """The lead and the follower (optim/shared_norm.py): each its own norms, both the one shared scale."""
    params = make_params()
    grads = [p.grad.clone() for p in params]
    level = 6.0
    opt = ClippedSGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.2}], lr=0.1, clipping_type="norm",
                     clipping_level=level, backend=backend, seed=0)
    assert opt.shared_norm_groups() == [0, 1]
    lead, follower = stepped(opt)
    norms = torch_norms(grads)
    scale = torch.clamp(level / norms.square().sum().sqrt(), max=1.0)
    assert scale < 1
    torch.testing.assert_close(torch.cat([lead["norm"], follower["norm"]]).double(), norms, rtol=2e-6, atol=0)
    torch.testing.assert_close(torch.cat([lead["scale"], follower["scale"]]).double(), scale.expand(4), rtol=2e-6,
                               atol=0)
    assert torch.equal(follower["scale"], lead["scale"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ("norm", "coordinate_wise"))
def test_a_skipped_step_reports_its_norms_and_applies_nothing(backend, method):
    params = make_params()
    params[2].grad[0, 0] = float("nan")
    grads = [p.grad.clone() for p in params]
    opt = ClippedSGD(params, lr=0.1, clipping_type=method, clipping_level=0.5, backend=backend, seed=0)
    stats = stepped(opt)[0]
    assert opt.statistics()[0]["skipped"] == 1.0
    norms = stats["norm"].double()
    assert torch.isnan(norms[2])
    keep = [0, 1, 3]
    torch.testing.assert_close(norms[keep], torch_norms(grads)[keep], rtol=2e-6, atol=0)
    assert stats["scale"].tolist() == ([1.0] * 4 if method == "norm" else [0.0] * 4)


def test_names_come_from_named_parameters_and_a_parameter_without_gradient_is_nan():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = ClippedSGD(model.named_parameters(), lr=0.1, clipping_type="layer_wise", clipping_level=0.1,
                     backend="reference")
    model(torch.randn(5, 3)).square().sum().backward()
    model[1].bias.grad = None
    stats = stepped(opt)[0]
    assert stats["names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert torch.isnan(stats["norm"][3]) and torch.isnan(stats["scale"][3])
    expected = torch_norms([p.grad for p in list(model.parameters())[:3]])
    torch.testing.assert_close(stats["norm"][:3].double(), expected, rtol=2e-6, atol=0)


def train(opt, params, first, last):
    for k in range(first, last):
        set_grads(params, 50 + k)
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_taken_mid_run_resumes_bit_identically(backend):
    settings = dict(lr=0.01, clipping_type="auto_clip", p_autoclip=0.5, backend=backend, seed=7)
    straight = make_params()
    opt = ClippedAdamW(straight, **settings)
    train(opt, straight, 0, 4)

    first = make_params()
    opt1 = ClippedAdamW(first, **settings)
    train(opt1, first, 0, 2)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert "clip_tensor_stats" in saved["opt"]["param_groups"][0]["clip_state"]
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = ClippedAdamW(resumed, **settings)
    opt2.load_state_dict(saved["opt"])
    assert torch.equal(opt2.tensor_statistics()[0]["norm"], opt1.tensor_statistics()[0]["norm"])
    train(opt2, resumed, 2, 4)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    for key in ("norm", "scale"):
        assert torch.equal(opt.tensor_statistics()[0][key], opt2.tensor_statistics()[0][key])


def test_checkpoints_without_the_key_load_and_a_wrong_one_is_named():
    params = make_params()
    opt = ClippedSGD(params, lr=0.1, backend="reference")
    opt.step()
    saved = opt.state_dict()
    del saved["param_groups"][0]["clip_state"]["clip_tensor_stats"]  # saved before per-tensor statistics
    opt.load_state_dict(saved)
    assert opt.tensor_statistics() == [{}]
    opt.step()
    assert opt.tensor_statistics()[0]["norm"].shape == (4,)
    saved = opt.state_dict()
    saved["param_groups"][0]["clip_state"]["clip_tensor_stats"] = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"param group 0: state key 'clip_tensor_stats' has shape \(2, 3\), "
                                         r"expected \(2, 4\)"):
        opt.load_state_dict(saved)


def test_top_k_and_all_tensor_norms_come_with_the_statistics_in_one_transfer(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = ClippedSGD([{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=0.1,
                     clipping_type="layer_wise", clipping_level=0.1, backend="reference")
    model(torch.randn(5, 3)).square().sum().backward()
    norms = {f"group{g}/{i}": torch.linalg.vector_norm(p.grad).item()
             for g, layer in enumerate(model) for i, p in enumerate(layer.parameters())}
    opt.step()
    counter = CountTransfers(monkeypatch)
    record = flat_statistics(opt, top_k_tensor_norms=2)
    assert counter.calls == ["tolist"]
    top = sorted(norms, key=norms.get, reverse=True)[:2]
    assert sorted(k for k in record if k.startswith("clip/tensor_norm/")) == sorted(f"clip/tensor_norm/{n}" for n in top)
    for name in top:
        assert record[f"clip/tensor_norm/{name}"] == pytest.approx(norms[name], rel=1e-6)
        assert record[f"clip/tensor_scale/{name}"] == pytest.approx(min(1.0, 0.1 / norms[name]), rel=1e-6)
    assert record["clip/group0/norm"] > 0  # the group statistics in the same transfer
    counter.calls.clear()
    record = flat_statistics(opt, all_tensor_norms=True)
    assert counter.calls == ["tolist"]
    assert {k for k in record if k.startswith("clip/tensor_norm/")} == {f"clip/tensor_norm/{n}" for n in norms}
    with pytest.raises(ValueError, match="top_k_tensor_norms must be an int >= 0"):
        flat_statistics(opt, top_k_tensor_norms=-1)
