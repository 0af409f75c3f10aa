"""Inputs that once corrupted a model or crashed a step (issue 10): each test failed before its fix."""

import copy

import pytest
import torch

from torch_clip_fused import ClippedSGD, clip_gradients_
from conftest import make_params, set_grads

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = ["cpp", "triton"] if DEVICE == "cpu" else ["triton"]


def test_duplicate_parameter_in_a_group_is_rejected():
    p, q = make_params(shapes=((3,), (2,)))
    with pytest.raises(ValueError, match=r"parameter 2 of param group 0 is the same tensor as parameter 0"):
        ClippedSGD([p, q, p], lr=0.1)
    opt = ClippedSGD([q], lr=0.1)
    with pytest.raises(ValueError, match=r"parameter 1 of param group 1 is the same tensor as parameter 0"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_infinite_parameter_without_weight_decay_keeps_momentum_finite(backend):
    """weight_decay=0 adds nothing: an inf parameter stays inf and its momentum finite, as torch's."""
    ours, theirs = make_params(shapes=((4,), (3,)), device=DEVICE), make_params(shapes=((4,), (3,)), device=DEVICE)
    for ps in (ours, theirs):
        with torch.no_grad():
            ps[0][1] = float("inf")
    opt = ClippedSGD(ours, lr=0.1, momentum=0.9, clipping_type="no_clip", backend=backend)
    sgd = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    for k in range(2):
        set_grads(ours, k)
        set_grads(theirs, k)
        opt.step()
        sgd.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(opt.state[a]["momentum_buffer"], sgd.state[b]["momentum_buffer"])
    assert torch.isfinite(opt.state[ours[0]]["momentum_buffer"]).all()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_checkpoint_without_the_host_step_count_loads(backend):
    params = make_params()
    opt = ClippedSGD(params, lr=0.1, clipping_type="auto_clip", seed=1, backend=backend)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        state.pop("clip_steps", None)  # a checkpoint written before the key existed
    again = ClippedSGD(make_params(), lr=0.1, clipping_type="auto_clip", seed=1, backend=backend)
    again.load_state_dict(saved)
    again.step()
    assert again.statistics()[0]["step"].item() == 2


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_functional_state_reused_with_other_parameters_is_a_clear_error(backend):
    state = {}
    clip_gradients_(make_params(shapes=((3,), (4,)), device=DEVICE), "layer_wise", state=state, backend=backend)
    with pytest.raises(ValueError, match=r"state was used with 2 parameters, now 3"):
        clip_gradients_(make_params(shapes=((3,), (4,), (5,)), device=DEVICE), "auto_clip", state=state,
                        backend=backend)
