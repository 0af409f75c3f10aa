"""Threshold policies as plug-ins (torch_clip_fused/thresholds/): the registry is complete and
consistent, and a policy defined in one place (settings, state, reference) is validated, kept,
checkpointed and stepped by the optimizers with no other code knowing it."""

import ast
import math
import re

import pytest
import torch

from torch_clip_fused import ClippedSGD
from torch_clip_fused import thresholds
from torch_clip_fused.checks import bounded
from torch_clip_fused.methods import Threshold
from torch_clip_fused.thresholds import (KERNEL_PARAMS, POLICIES, SETTINGS, Setting, StateLayout, ThresholdInputs,
                                         ThresholdPolicy)


def test_every_threshold_has_one_policy_with_valid_defaults():
    assert set(POLICIES) == set(Threshold)
    names = [s.name for p in POLICIES.values() for s in p.settings]
    assert len(names) == len(set(names)), "two policies claim one setting"
    for p in POLICIES.values():
        for s in p.settings:
            assert s.parse(s.default) == s.default
        assert set(p.shared_settings) <= {s.name for s in p.settings}
    cfg_clip = ClippedSGD([torch.nn.Parameter(torch.ones(1))], clipping_type="zclip")._configs[0][1].clip
    for p in POLICIES.values():
        assert len(p.kernel_params(cfg_clip)) <= KERNEL_PARAMS


def test_unknown_threshold_setting_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'zclip_alfa'"):
        ClippedSGD([torch.nn.Parameter(torch.ones(1))], zclip_alfa=0.9)


# A toy stateful policy, defined here only: eta = level / (1 + k), k the steps recorded in the column,
# and the column's last recorded norm kept in its values.


def _toy_reference(x: ThresholdInputs) -> torch.Tensor:
    state = x.state
    k = state.counts[x.columns]
    record = x.ok & torch.isfinite(x.norms)
    state.values[0, x.columns] = torch.where(record, x.norms.to(state.values.dtype), state.values[0, x.columns])
    state.counts[x.columns] = k + record.to(k.dtype)
    return x.clip.level * x.clip.toy_factor / (1.0 + k.to(x.norms.dtype))


TOY = ThresholdPolicy(
    Threshold.CONSTANT, _toy_reference,
    settings=(Setting("toy_factor", 1.0, lambda v: bounded(v, "toy_factor", lambda f: f > 0, "toy_factor > 0"), ""),),
    state=StateLayout("clip_toy", "clip_toy_count", rows=lambda clip: 1, fill=math.nan, fixed_rows=1),
)


@pytest.fixture
def toy_policy(monkeypatch):
    monkeypatch.setitem(POLICIES, Threshold.CONSTANT, TOY)
    monkeypatch.setitem(SETTINGS, "toy_factor", TOY.settings[0])
    monkeypatch.setattr("torch_clip_fused.state._STATE_LAYOUTS",
                        tuple(p.state for p in POLICIES.values() if p.state is not None))


def test_a_policy_defined_in_one_place_is_validated_kept_and_stepped(toy_policy):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    opt = ClippedSGD([w], lr=1.0, clipping_type="norm", clipping_level=2.0, backend="reference", toy_factor=0.5)
    grads = [torch.randn(5) * 10 for _ in range(3)]
    expected = w.detach().clone()
    for k, g in enumerate(grads):
        w.grad = g.clone()
        opt.step()
        eta = 2.0 * 0.5 / (1 + k)  # the closed form of the toy threshold
        expected -= g * min(1.0, eta / g.norm().item())
    assert torch.allclose(w.detach(), expected, rtol=1e-6, atol=1e-6)
    state = opt.param_groups[0]["clip_state"]
    assert state["clip_toy_count_global"].tolist() == [3]
    assert state["clip_toy_global"][0, 0].item() == pytest.approx(grads[-1].norm().item())

    with pytest.raises(ValueError, match=r"Invalid toy_factor value: -1.0; expected toy_factor > 0"):
        ClippedSGD([w], clipping_type="norm", backend="reference", toy_factor=-1.0)

    saved = opt.state_dict()
    saved["param_groups"][0]["clip_state"]["clip_toy_global"] = torch.zeros(2, 1)
    fresh = ClippedSGD([w], lr=1.0, clipping_type="norm", clipping_level=2.0, backend="reference", toy_factor=0.5)
    with pytest.raises(ValueError, match=r"'clip_toy_global' has shape \(2, 1\), expected \(1, 1\)"):
        fresh.load_state_dict(saved)


def test_the_registry_is_what_the_optimizers_read():
    assert thresholds.policy(Threshold.ZSCORE) is POLICIES[Threshold.ZSCORE]
    opt = ClippedSGD([torch.nn.Parameter(torch.ones(2))], clipping_type="adagc", adagc_warmup=7)
    group = opt.param_groups[0]
    assert {s.name for s in SETTINGS.values()} <= set(group)  # every policy's setting is a param-group setting
    assert group["adagc_warmup"] == 7 and group["zclip_warmup"] == 25


def test_the_readme_lists_every_threshold_setting_with_its_default():
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    block = readme[readme.index("ClippedSGD(params, lr=1e-3"):readme.index("**threshold_settings)")]
    for name, setting in SETTINGS.items():
        written = re.search(rf"\b{name}=([^,\s)]+)", block)
        assert written and ast.literal_eval(written.group(1)) == setting.default, \
            f"README's ClippedSGD signature lacks {name}={setting.default!r}"
