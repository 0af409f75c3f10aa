"""AutoClip's sorted history (issue 10.10): exact nearest-rank thresholds from a history kept
sorted by insertion, in every backend, with no sort inside a step.

Oracle: Python's ``sorted`` of the norms recorded so far (the newest ``autoclip_history`` of them),
the ceil(p n)-th smallest (Seetharaman et al., 2020)."""

import copy
import math
import random

import pytest
import torch

from torch_clip_fused import ClipMethod, ClippedSGD
from torch_clip_fused.thresholds.autoclip import record_and_threshold, sorted_from_ring
from backend_checks import legacy_checkpoint
from conftest import device_for, make_params, set_grads

BACKENDS = ["reference", "cpp", "triton"]


def nearest_rank(values, p):
    ordered = sorted(values)
    k = min(max(math.ceil(p * len(ordered)), 1), len(ordered))
    return ordered[k - 1]


@pytest.mark.parametrize("capacity", [1, 3, 8])
def test_reference_record_matches_sorted_oracle(capacity):
    rnd = random.Random(capacity)
    columns, p = 3, 0.6
    ring = torch.zeros(capacity, columns)
    count = torch.zeros(columns, dtype=torch.int64)
    rows = sorted_from_ring(ring, count)
    seen = [[] for _ in range(columns)]
    for _ in range(40):
        norms = torch.tensor([rnd.choice([1.0, 2.0, 2.0, rnd.uniform(0, 5)]) for _ in range(columns)])
        record = torch.tensor([rnd.random() < 0.8 for _ in range(columns)])
        eta = record_and_threshold(ring, rows, count, torch.arange(columns), norms, record, p)
        for c in range(columns):
            if record[c]:
                seen[c].append(float(norms[c]))
            kept = seen[c][-capacity:]
            assert eta[c].item() == (nearest_rank(kept, p) if kept else norms[c].item())
        assert torch.equal(rows, sorted_from_ring(ring, count))  # the rows stay the sorted ring


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,history", [("auto_clip", None), ("auto_clip", 4),
                                            (ClipMethod("layer", "auto"), None), (ClipMethod("layer", "auto"), 3)],
                         ids=["global-uncapped", "global-cap4", "layer-uncapped", "layer-cap3"])
def test_thresholds_equal_nearest_rank_over_a_run(backend, method, history):
    params = make_params(device=device_for(backend))
    p_auto = 0.7
    opt = ClippedSGD(params, lr=1e-3, clipping_type=method, p_autoclip=p_auto, autoclip_history=history,
                     backend=backend)
    layer = isinstance(method, ClipMethod)
    seen = [[] for _ in params] if layer else [[]]
    for step in range(70):  # past the initial 64 rows of an uncapped history: it grows once
        set_grads(params, 500 + step)
        norms = [torch.linalg.vector_norm(p.grad).item() for p in params]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])).item()
        opt.step()
        if layer:
            for c, n in enumerate(norms):
                seen[c].append(torch.tensor(n, dtype=torch.float32).item())
            expected = sum(nearest_rank(s[-history:] if history else s, p_auto) for s in seen) / len(seen)
        else:
            seen[0].append(opt.statistics()[0]["norm"].item())
            expected = nearest_rank(seen[0][-history:] if history else seen[0], p_auto)
            assert seen[0][-1] == pytest.approx(total, rel=1e-5)
        assert opt.statistics()[0]["threshold"].item() == pytest.approx(expected, rel=1e-6), step
    gstate = opt.param_groups[0]["clip_state"]
    scope = "layer" if layer else "global"
    assert torch.equal(gstate[f"clip_sorted_{scope}"],
                       sorted_from_ring(gstate[f"clip_history_{scope}"], gstate[f"clip_count_{scope}"]))


def test_reference_step_does_not_sort(monkeypatch):
    """The quantile is read from the sorted rows: no sort of the history inside a step."""
    params = make_params()
    opt = ClippedSGD(params, lr=1e-3, clipping_type="auto_clip", backend="reference")
    opt.step()

    def no_sort(*args, **kwargs):
        raise AssertionError("a sort inside step()")

    monkeypatch.setattr(torch, "sort", no_sort)
    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    for k in range(3):
        set_grads(params, 40 + k)
        opt.step()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_checkpoint_sorted_rows_are_rebuilt(backend):
    """A checkpoint without the sorted rows (an older format, which kept the group state in the first
    parameter's state) or with corrupt ones (in the param group or, in the older layout, in the first
    parameter's state) resumes exactly."""
    params = make_params()
    opt = ClippedSGD(params, lr=1e-3, clipping_type="auto_clip", autoclip_history=5, backend=backend)
    for k in range(8):
        set_grads(params, 60 + k)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    old_format = legacy_checkpoint(saved)
    del old_format["state"][0]["clip_sorted_global"]
    corrupt = copy.deepcopy(saved)
    corrupt["param_groups"][0]["clip_state"]["clip_sorted_global"].fill_(7.0)
    corrupt_old_layout = legacy_checkpoint(saved)
    corrupt_old_layout["state"][0]["clip_sorted_global"].fill_(7.0)
    results = []
    for state in (saved, old_format, corrupt, corrupt_old_layout):
        fresh = make_params()
        for q, p in zip(fresh, params):
            q.data.copy_(p.data)
        resumed = ClippedSGD(fresh, lr=1e-3, clipping_type="auto_clip", autoclip_history=5, backend=backend)
        resumed.load_state_dict(copy.deepcopy(state))
        for k in range(4):
            set_grads(fresh, 90 + k)
            resumed.step()
        results.append(torch.cat([q.detach().flatten() for q in fresh]))
    assert all(torch.equal(results[0], other) for other in results[1:])
