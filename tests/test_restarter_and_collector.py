"""Restarts average the recorded iterates with constant memory, on schedule; collected models
start identical."""

import pytest
import torch

from torch_clip_fused import ClippedSGD
from torch_clip_fused.experiments.collector import (ModelProperties, OptimizerProperties, OptimizersCollector,
                                                   OptimizersCollectorWithRestarts, RestartProperties)
from torch_clip_fused.experiments.restarter import Restarter


def props():
    return OptimizerProperties(ClippedSGD, lr=0.1, momentum=0.9, clipping_type="layer_wise", clipping_level=1.0)


def test_restart_sets_parameters_to_the_mean_of_recorded_iterates():
    model = torch.nn.Linear(3, 2)
    restarter = Restarter(props(), first_restart_steps_cnt=4, restart_coeff=2.0, max_steps_cnt=100)
    opt = props().make(model.parameters())
    recorded = []
    for k in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        recorded.append([p.detach().clone() for p in model.parameters()])
        restarter.add_coords(model.parameters())
        new_opt = restarter.make_restart(model, opt)
        if k < 3:
            assert new_opt is opt
    assert new_opt is not opt and isinstance(new_opt, ClippedSGD)
    assert new_opt.param_groups[0]["clipping_type"] == "layer_wise"
    for i, p in enumerate(model.parameters()):
        expected = torch.stack([r[i] for r in recorded]).mean(0)
        torch.testing.assert_close(p.detach(), expected)


def test_memory_does_not_grow_with_recorded_steps():
    model = torch.nn.Linear(50, 50)
    restarter = Restarter(props(), first_restart_steps_cnt=10_000, max_steps_cnt=100_000)
    restarter.add_coords(model.parameters())
    buffers = restarter.get_mean_coords()
    pointers = [b.data_ptr() for b in buffers]
    for _ in range(200):
        restarter.add_coords(model.parameters())
    assert restarter.get_mean_coords() is buffers
    assert [b.data_ptr() for b in buffers] == pointers
    assert len(buffers) == len(list(model.parameters()))
    assert all(b.device == p.device for b, p in zip(buffers, model.parameters()))


def test_restart_schedule():
    model = torch.nn.Linear(2, 1)
    restarter = Restarter(props(), first_restart_steps_cnt=3, restart_coeff=1.5, max_steps_cnt=10)
    opt = props().make(model.parameters())
    restarts = []
    for step in range(1, 60):
        restarter.add_coords(model.parameters())
        new = restarter.make_restart(model, opt)
        if new is not opt:
            restarts.append(step)
            opt = new
    # periods 3, int(4.5) = 4, 6, 9; then n = 13 > 10 and restarts stop
    assert restarts == [3, 7, 13, 22]
    assert not restarter.active


@pytest.mark.parametrize("kwargs,message", [
    (dict(first_restart_steps_cnt=0), r"first_restart_steps_cnt: 0"),
    (dict(restart_coeff=0.5), r"restart_coeff: 0.5"),
    (dict(max_steps_cnt=0), r"max_steps_cnt: 0"),
])
def test_bad_restarter_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Restarter(props(), **kwargs)


def test_collector_models_start_identical_and_optimizers_match():
    properties = [props(), OptimizerProperties(torch.optim.Adam, lr=1e-3), OptimizerProperties(torch.optim.SGD, lr=0.1)]
    collector = OptimizersCollector(ModelProperties(torch.nn.Linear, in_features=4, out_features=3), properties,
                                    start_point_random_seed=7)
    nets = collector.get_nets()
    for net in nets[1:]:
        for a, b in zip(nets[0].parameters(), net.parameters()):
            assert torch.equal(a, b) and a is not b
    opts = collector.get_optimizer_objects()
    assert [type(o) for o in opts] == [ClippedSGD, torch.optim.Adam, torch.optim.SGD]
    assert all(o.param_groups[0]["params"][0] is next(n.parameters()) for o, n in zip(opts, nets))
    assert collector.get_names_optimizers()[1] == "2) Adam;  lr=0.001"


def test_collector_with_restarts():
    collector = OptimizersCollectorWithRestarts(
        ModelProperties(torch.nn.Linear, in_features=2, out_features=1), [props(), props()],
        [RestartProperties(Restarter, first_restart_steps_cnt=5), None])
    first, second = collector.get_restarters()
    assert isinstance(first, Restarter) and first.num_cur_restart == 5 and second is None
