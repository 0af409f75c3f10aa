"""Every invalid argument raises a clear error naming the value, before anything is modified."""

import pytest
import torch

from torch_clip_fused import ClippedAdamW, ClippedSGD
from conftest import make_params

GOOD = dict(lr=0.1)

BAD_KWARGS = [
    (dict(lr=-0.1), ValueError, r"Invalid learning rate: -0.1"),
    (dict(lr="fast"), TypeError, r"Invalid learning rate value: 'fast'"),
    (dict(momentum=-0.5), ValueError, r"Invalid momentum value: -0.5"),
    (dict(weight_decay=-1.0), ValueError, r"Invalid weight_decay value: -1.0"),
    (dict(nesterov=True), ValueError, r"nesterov momentum requires momentum > 0.*momentum=0"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, r"dampening=0.1"),
    (dict(clipping_type="nrom"), ValueError, r"Invalid clipping_type: 'nrom'; valid names are no_clip, norm,"),
    (dict(clipping_level=-1.0), ValueError, r"Invalid clipping_level value: -1.0"),
    (dict(clipping_level=float("nan")), ValueError, r"Invalid clipping_level value: nan"),
    (dict(beta=0.0), ValueError, r"Invalid beta value: 0.0; expected 0 < beta < 1"),
    (dict(beta=1.0), ValueError, r"Invalid beta value: 1.0"),
    (dict(beta=1.5, clipping_type="linear_rand_norm"), ValueError, r"Invalid beta value: 1.5"),
    (dict(p_autoclip=0.0), ValueError, r"Invalid p_autoclip value: 0.0; expected 0 < p_autoclip <= 1"),
    (dict(p_autoclip=1.01), ValueError, r"Invalid p_autoclip value: 1.01"),
    (dict(autoclip_history=0), ValueError, r"Invalid autoclip_history value: 0"),
    (dict(clip_point="weights"), ValueError, r"Invalid clip_point value: 'weights'; valid choices are 'grad', 'update'"),
    (dict(nonfinite="ignore"), ValueError, r"Invalid nonfinite value: 'ignore'; valid choices are 'skip', 'raise', 'apply'"),
    (dict(backend="cuda"), ValueError, r"Invalid backend: 'cuda'; valid choices are 'auto', 'reference', 'cpp', 'triton', or a step function"),
    (dict(seed=-1), ValueError, r"Invalid seed value: -1"),
    (dict(seed=2**32), ValueError, r"Invalid seed value: 4294967296"),
    (dict(seed=1.5), ValueError, r"Invalid seed value: 1.5"),
    (dict(foreach=False), ValueError, r"Invalid foreach value: False; .*no per-tensor loop"),
    (dict(foreach="yes"), ValueError, r"Invalid foreach value: 'yes'"),
    (dict(fused=True, foreach=True), ValueError, r"fused=True and foreach=True cannot both be set"),
    (dict(fused=True, backend="reference"), ValueError, r"Invalid fused value: True with backend='reference'"),
    (dict(fused=False, backend="cpp"), ValueError, r"Invalid fused value: False with backend='cpp'"),
    (dict(differentiable=True), ValueError, r"Invalid differentiable value: True"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_KWARGS, ids=[str(k) for k, _, _ in BAD_KWARGS])
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        ClippedSGD(make_params(), **{**GOOD, **kwargs})


def test_bad_param_group_setting_is_rejected_and_not_added():
    opt = ClippedSGD(make_params(), lr=0.1)
    with pytest.raises(ValueError, match=r"Invalid clipping_type: 'bogus'"):
        opt.add_param_group({"params": make_params(seed=1), "clipping_type": "bogus"})
    assert len(opt.param_groups) == 1


def test_setting_changed_to_bad_value_raises_before_any_group_moves():
    first, second = make_params(seed=0), make_params(seed=1)
    opt = ClippedSGD([{"params": first}, {"params": second}], lr=0.1)
    opt.param_groups[1]["beta"] = 2.0
    before = [p.detach().clone() for p in first + second]
    with pytest.raises(ValueError, match=r"Invalid beta value: 2.0"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, first + second))


def _sparse_grad():
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.zeros(4).to_sparse()
    return [p]


def _complex_param():
    p = torch.zeros(4, dtype=torch.complex64, requires_grad=True)
    return [p]


@pytest.mark.parametrize(
    "make,error,message",
    [
        (_sparse_grad, RuntimeError, r"sparse gradients \(param group 0, parameter 0\)"),
        (_complex_param, ValueError, r"complex parameters.*complex64"),
    ],
)
def test_unsupported_tensors(make, error, message):
    with pytest.raises(error, match=message):
        opt = ClippedSGD(make(), lr=0.1)
        opt.step()


def test_mixed_devices_in_a_group_are_rejected():
    meta = torch.zeros(3, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match=r"several devices \(\['cpu', 'meta'\]\)"):
        ClippedSGD([torch.zeros(3, requires_grad=True), meta], lr=0.1)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    opt = ClippedSGD(make_params(), lr=0.1, backend="triton")
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
        opt.step()


def test_torch_sgd_implementation_switches_are_accepted():
    """torch.optim.SGD's remaining arguments, so that ClippedSGD is a drop-in replacement."""
    params = make_params()
    assert ClippedSGD(params).defaults["lr"] == torch.optim.SGD(params).defaults["lr"]
    assert ClippedSGD(params, lr=0.1, fused=False).backend == "reference"  # the foreach implementation
    assert ClippedSGD(params, lr=0.1, foreach=True, differentiable=False).backend == "auto"
    assert ClippedSGD(params, lr=0.1, fused=True, backend="cpp").backend == "cpp"


# Every boolean setting is a real bool (torch.optim would take any truthy value: "no" would maximize);
# the error names the setting and the value, and the param group where there is one to name (a
# constructor argument is the default of every group).
BAD_FLAGS = [
    (ClippedSGD, dict(maximize="yes"), r"Invalid maximize value: 'yes'; expected True or False"),
    (ClippedSGD, dict(maximize=1), r"Invalid maximize value: 1; expected True or False"),
    (ClippedSGD, dict(nesterov="no", momentum=0.9), r"Invalid nesterov value: 'no'; expected True or False"),
    (ClippedSGD, dict(nesterov=None, momentum=0.9), r"Invalid nesterov value: None; expected True or False"),
    (ClippedSGD, dict(stochastic_rounding=1), r"Invalid stochastic_rounding value: 1; expected True or False"),
    (ClippedSGD, dict(differentiable=0), r"Invalid differentiable value: 0; expected True or False"),
    (ClippedSGD, dict(foreach=1), r"Invalid foreach value: 1; expected None, True or False"),
    (ClippedSGD, dict(fused=0), r"Invalid fused value: 0; expected None, True or False"),
    (ClippedAdamW, dict(amsgrad="no"), r"Invalid amsgrad value: 'no'; expected True or False"),
    (ClippedAdamW, dict(maximize=0), r"Invalid maximize value: 0; expected True or False"),
    (ClippedAdamW, dict(capturable=1), r"Invalid capturable value: 1; expected True or False"),
    (ClippedAdamW, dict(foreach=1), r"Invalid foreach value: 1; expected None, True or False"),
]


@pytest.mark.parametrize("optimizer,kwargs,message", BAD_FLAGS, ids=[f"{o.__name__}-{k}" for o, k, _ in BAD_FLAGS])
def test_boolean_settings_must_be_bools(optimizer, kwargs, message):
    with pytest.raises(TypeError, match=message):
        optimizer(make_params(), **{**GOOD, **kwargs})


def test_bad_boolean_in_added_group_names_the_group_and_is_not_added():
    opt = ClippedSGD(make_params(), lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match=r"param group 1: Invalid maximize value: 'yes'; expected True or False"):
        opt.add_param_group({"params": make_params(seed=1), "maximize": "yes"})
    assert len(opt.param_groups) == 1


def test_boolean_changed_to_bad_value_raises_before_any_group_moves():
    first, second = make_params(seed=0), make_params(seed=1)
    opt = ClippedSGD([{"params": first}, {"params": second}], lr=0.1, momentum=0.9)
    opt.param_groups[1]["nesterov"] = "false"
    before = [p.detach().clone() for p in first + second]
    with pytest.raises(TypeError, match=r"param group 1: Invalid nesterov value: 'false'"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, first + second))


def test_bad_boolean_in_loaded_state_dict_names_the_group_and_changes_nothing():
    opt = ClippedSGD([{"params": make_params(seed=0)}, {"params": make_params(seed=1)}], lr=0.1)
    saved = opt.state_dict()
    saved["param_groups"][1]["maximize"] = "True"
    with pytest.raises(TypeError, match=r"param group 1: Invalid maximize value: 'True'"):
        opt.load_state_dict(saved)
    assert opt.param_groups[1]["maximize"] is False
