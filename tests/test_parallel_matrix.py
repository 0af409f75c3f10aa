"""Issue 20's test matrix: every parallel layout x clipping method x optimizer x backend, on CPU with gloo.

Layouts (``LAYOUTS``: processes, tensors, where each lives on each rank, param groups):

* ``tp_shard0``: tensor parallelism on a 2-rank mesh, column-parallel ``Shard(0)`` weights and biases (one
  split unevenly), a replicated vector;
* ``tp_shard1``: the same with row-parallel ``Shard(1)`` weights and replicated biases;
* ``fsdp2_tp``: FSDP2 x TP on a 2x2 (dp, tp) mesh, 4 processes (FSDP2's strided shard over a column-parallel
  weight, ``[Shard(0), Shard(1)]`` over a row-parallel one, a bias replicated over tp);
* ``pipeline``: a 2-stage pipeline, each rank holding one stage's plain tensors, ``norm_group`` the pipeline's
  mesh;
* ``experts``: dense layers sharded over all 4 ranks (FSDP), stacked experts on an expert-parallel mesh of 2
  ranks of their own (replicated over the other 2), a plain tensor; one param group per mesh.

Each cell (method x optimizer x backend) runs the distributed optimizer and the same optimizer on the whole
model in one process, with the same seed and gradients, for ``STEPS`` steps; in step ``NAN_STEP`` one
element of the gradient, held by one rank only, is NaN.  A cell checks:

* parameters (gathered with ``full_tensor()``) equal the one-process run's: bit for bit on the reference
  backend, to float32 rounding on the fused ones; for ``norm`` also torch's ``clip_grad_norm_`` + the torch
  optimizer (with the NaN step skipped, as GradScaler skips it), the independent oracle;
* every group's statistics (norm, threshold, clipped fraction, skipped, counts) equal the one-process run's
  in every step (on the pipeline, for the layer and coordinate scopes, which ``norm_group`` leaves per stage:
  those of one process stepping the stage's own tensors);
* the NaN step: on every rank, each tensor moves exactly where it moves in the one-process run (the NaN's
  group, or every shared-norm group, skips on every rank), and the NaN was on one rank only;
* the collectives of each step: ``dist.all_reduce`` calls, one per reduction domain;
* a ``torch.distributed.checkpoint`` save after ``STEPS // 2`` steps, loaded into a fresh model and optimizer,
  resumes bit-identically (parameters, optimizer state, statistics).

The whole matrix (6 methods x 2 optimizers x 3 backends x 5 layouts, one spawn per layout) runs with
``TCF_SLOW=1``; by default a few cells per layout run on the reference backend (the NaN skip and checkpoint
resume that the layout's other tests lack, and method / optimizer pairs they do not step)."""

import json
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel_cases import counted_all_reduces, seeded

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

METHODS = ("norm", "layer_wise", "coordinate_wise", "linear_rand_norm", "auto_clip", "zclip")
KINDS = ("sgd", "adamw")
BACKENDS = ("reference", "cpp", "triton")
STEPS = 4
NAN_STEP = 1
SCALES = (0.1, 1.0, 5.0, 0.3)  # unclipped, (NaN), clipped, clipped

#: the default run: reference backend, cells no other test file steps on that layout
DEFAULT_CELLS = {
    "tp_shard0": [("adamw", "coordinate_wise"), ("sgd", "zclip")],
    "tp_shard1": [("adamw", "layer_wise"), ("adamw", "auto_clip")],
    "fsdp2_tp": [("sgd", "linear_rand_norm"), ("adamw", "zclip")],
    "pipeline": [("adamw", "linear_rand_norm"), ("sgd", "zclip"), ("adamw", "coordinate_wise")],
    "experts": [("sgd", "coordinate_wise"), ("adamw", "auto_clip")],
}


def _placements(name, rank):
    """(processes, shapes, where each tensor lives on ``rank``: None absent, "plain", or (mesh, placements),
    param groups as lists of tensor indices with their weight decay, norm_group, index of the NaN tensor,
    collectives per step, mesh dims) of layout ``name``; call inside the process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if name in ("tp_shard0", "tp_shard1"):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        if name == "tp_shard0":  # column-parallel: weights and biases cut on dim 0, (5, 3) unevenly
            shapes = [(6, 4), (6,), (5, 3), (4,)]
            where = [(mesh, [Shard(0)]), (mesh, [Shard(0)]), (mesh, [Shard(0)]), (mesh, [Replicate()])]
        else:  # row-parallel: weights cut on dim 1, (3, 5) unevenly, biases replicated
            shapes = [(4, 6), (4,), (3, 5), (3,)]
            where = [(mesh, [Shard(1)]), (mesh, [Replicate()]), (mesh, [Shard(1)]), (mesh, [Replicate()])]
        return dict(shapes=shapes, where=where, groups=_decay(shapes, range(4)), norm_group=None, nan=0, calls=1)
    if name == "fsdp2_tp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        shapes = [(8, 4), (8,), (4, 6), (4,)]
        where = [(mesh, [_StridedShard(0, split_factor=2), Shard(0)]),  # FSDP2 over a column-parallel weight
                 (mesh, [_StridedShard(0, split_factor=2), Shard(0)]),  # and its bias
                 (mesh, [Shard(0), Shard(1)]),  # FSDP2 over a row-parallel weight
                 (mesh, [Shard(0), Replicate()])]  # its bias, replicated over tp
        return dict(shapes=shapes, where=where, groups=_decay(shapes, range(4)), norm_group=None, nan=2, calls=1)
    if name == "pipeline":
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
        shapes = [(6, 5), (6,), (4, 6), (4,), (3, 4), (3,)]
        stage = [[0, 1, 2], [3, 4, 5]][rank]
        where = ["plain" if i in stage else None for i in range(len(shapes))]
        return dict(shapes=shapes, where=where, groups=_decay(shapes, range(6)), norm_group=mesh, nan=4, calls=1)
    if name == "experts":
        dense = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
        ep = init_device_mesh("cpu", (2, 2), mesh_dim_names=("edp", "ep"))["ep"]  # 2 ranks: {0, 1} or {2, 3}
        shapes = [(8, 4), (8,), (4, 3, 2), (4, 3), (5,)]
        where = [(dense, [Shard(0)]), (dense, [Shard(0)]), (ep, [Shard(0)]), (ep, [Shard(0)]), "plain"]
        groups = [([0, 1], 0.01), ([2, 3], 0.02), ([4], 0.0)]  # one group per mesh (coordinate scope needs it)
        return dict(shapes=shapes, where=where, groups=groups, norm_group=None, nan=0, calls=2)
    raise ValueError(name)


LAYOUTS = {"tp_shard0": 2, "tp_shard1": 2, "fsdp2_tp": 4, "pipeline": 2, "experts": 4}


def _decay(shapes, indices):
    """decay / no-decay groups (matrices, then vectors), as lists of tensor indices."""
    return [([i for i in indices if len(shapes[i]) > 1], 0.01), ([i for i in indices if len(shapes[i]) == 1], 0.0)]


def _grads(shapes, k, nan):
    grads = seeded(shapes, 70 + k, SCALES[k])
    if k == NAN_STEP:
        grads[nan].view(-1)[-1] = float("nan")  # the last element: one rank holds it
    return grads


def _start(shapes):
    return seeded(shapes, 0)


def _full(x):
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def _make(kind, params, groups, method, backend, norm_group=None):
    """The optimizer over ``params`` (a dict: tensor index -> parameter) in ``groups`` (tensor indices, weight
    decay); groups with none of the parameters are left out (a pipeline stage's)."""
    from torch_clip_fused import ClippedAdamW, ClippedSGD

    param_groups = [dict(params=[params[i] for i in idx if i in params], weight_decay=wd) for idx, wd in groups]
    param_groups = [g for g in param_groups if g["params"]]
    extra = dict(norm_group=norm_group, per_group_norm=False) if norm_group is not None else {}
    settings = dict(clipping_type=method, clipping_level=None, backend=backend, seed=2, zclip_warmup=1, beta=0.1,
                    **extra)
    if kind == "sgd":
        return ClippedSGD(param_groups, lr=0.1, momentum=0.9, **settings)
    return ClippedAdamW(param_groups, lr=0.01, **settings)


def _module(values):
    """A module whose parameters are named by their index in the whole model (``ps.t3``): a pipeline stage's
    checkpoint keys are its own."""
    module = torch.nn.Module()
    module.ps = torch.nn.ParameterDict({f"t{i}": torch.nn.Parameter(x) for i, x in values.items()})
    return module


def _params(module):
    return {int(key[1:]): p for key, p in module.ps.items()}


def _stats(opt):
    return [{key: float(value) for key, value in group.items()} for group in opt.statistics()]


def _stats_equal(a, b, exact):
    for ga, gb in zip(a, b):
        if ga.keys() != gb.keys():
            return False
        for key in ga:
            x, y = ga[key], gb[key]
            same = x == y or (math.isnan(x) and math.isnan(y))
            if not same and (exact or key in ("skipped", "skipped_steps", "step")
                             or abs(x - y) > 1e-5 * max(abs(x), abs(y))):
                return False
    return len(a) == len(b)


def _state_tensors(opt, params):
    return {(i, key): _full(value) for i, p in params.items() for key, value in opt.state[p].items()
            if isinstance(value, torch.Tensor)}


def _torch_oracle(L, kind):
    """clip_grad_norm_ over the whole model + the torch optimizer with the same groups; a step with a non-finite
    gradient is not taken (as GradScaler skips it)."""
    shapes = L["shapes"]
    params = [torch.nn.Parameter(x.clone()) for x in _start(shapes)]
    groups = [dict(params=[params[i] for i in idx], weight_decay=wd) for idx, wd in L["groups"]]
    opt = (torch.optim.SGD(groups, lr=0.1, momentum=0.9) if kind == "sgd" else torch.optim.AdamW(groups, lr=0.01))
    for k in range(STEPS):
        for p, g in zip(params, _grads(shapes, k, L["nan"])):
            p.grad = g.clone()
        if all(bool(torch.isfinite(p.grad).all()) for p in params):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    return params


def _cell(L, rank, kind, method, backend, calls, path):
    """One cell on this rank: a dict of named checks (True: passed) and what they saw."""
    from torch.distributed.tensor import distribute_tensor

    from torch_clip_fused.methods import Scope, parse_method

    shapes, where = L["shapes"], L["where"]
    mine = [i for i, w in enumerate(where) if w is not None]

    def place(x, w):
        return x.clone() if w == "plain" else distribute_tensor(x.clone(), *w)

    def make_distributed():
        module = _module({i: place(_start(shapes)[i], where[i]) for i in mine})
        return module, _make(kind, _params(module), L["groups"], method, backend, L["norm_group"])

    def set_grads(params, k):
        grads = _grads(shapes, k, L["nan"])
        for i, p in params.items():
            p.grad = place(grads[i], where[i])

    single = {i: torch.nn.Parameter(x.clone()) for i, x in enumerate(_start(shapes))}
    o1 = _make(kind, single, L["groups"], method, backend)
    own = None  # the pipeline's layer and coordinate scopes: statistics are the stage's own
    if L["norm_group"] is not None and parse_method(method).scope is not Scope.GLOBAL:
        own_params = {i: torch.nn.Parameter(_start(shapes)[i].clone()) for i in mine}
        own = (own_params, _make(kind, own_params, L["groups"], method, backend))
    module, o2 = make_distributed()
    distributed = _params(module)
    exact = backend == "reference"
    per_step, stats_ok, moved_ok, stats_seen = [], True, None, []
    for k in range(STEPS):
        set_grads(distributed, k)
        grads = _grads(shapes, k, L["nan"])
        for i, p in single.items():
            p.grad = grads[i].clone()
        before = {i: _full(p.detach()).clone() for i, p in distributed.items()}
        before1 = {i: p.detach().clone() for i, p in single.items()}
        if k == NAN_STEP:  # how many ranks hold the NaN
            holds = torch.tensor([float(any(bool(torch.isnan(_local(p.grad)).any()) for p in distributed.values()))])
            dist.all_reduce(holds)
        calls.clear()
        o2.step()
        per_step.append(len(calls))
        o1.step()
        expected = _stats(o1)
        if own is not None:
            if k == NAN_STEP and L["nan"] not in mine:  # the NaN's group skips on this stage too: so does its run's
                grads = [g.clone() for g in grads]
                group = next(idx for idx, _ in L["groups"] if L["nan"] in idx)
                grads[next(i for i in group if i in mine)].view(-1)[-1] = float("nan")
            for i, p in own[0].items():
                p.grad = grads[i].clone()
            own[1].step()
            expected = _stats(own[1])
        found = _stats(o2)
        stats_seen.append((found, expected))
        stats_ok = stats_ok and _stats_equal(found, expected, exact)
        if k == NAN_STEP:
            moved = {i: not torch.equal(before[i], _full(p.detach())) for i, p in distributed.items()}
            moved1 = {i: not torch.equal(before1[i], single[i].detach()) for i in mine}
            skipped_somewhere = not all(moved1.values()) and not moved1.get(L["nan"], False)
            moved_ok = moved == moved1 and (skipped_somewhere or L["nan"] not in mine)
            nan_ranks = int(holds)
    gathered = {i: _full(p.detach()) for i, p in distributed.items()}
    checks = dict(
        equal=all(torch.equal(gathered[i], single[i].detach()) for i in mine) if exact else
        all(torch.allclose(gathered[i], single[i].detach(), rtol=1e-5, atol=1e-7) for i in mine),
        statistics=stats_ok,
        nan_skip=moved_ok and nan_ranks == 1,
        collectives=per_step == [L["calls"]] * STEPS,
    )
    if method == "norm":
        oracle = _torch_oracle(L, kind)
        checks["torch_oracle"] = all(torch.allclose(gathered[i], oracle[i].detach(), rtol=1e-5, atol=1e-6)
                                     for i in mine)
    checks["dcp_resume"] = _resume(make_distributed, set_grads, module, o2, path, L["norm_group"] is not None)
    info = dict(per_step=per_step, nan_ranks=nan_ranks,
                diff=max(float((gathered[i] - single[i].detach()).abs().max()) for i in mine),
                stats=None if stats_ok else stats_seen)
    return dict(checks=checks, info=info)


def _local(x):
    return x.to_local() if hasattr(x, "to_local") else x


def _resume(make, set_grads, m1, o1, path, flatten):
    """Stopped after STEPS // 2 steps, saved with torch.distributed.checkpoint, loaded into a fresh (zeroed)
    model and optimizer, continued: bit-identical to the uninterrupted ``m1``, ``o1`` (parameters, optimizer
    state, statistics)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    # a pipeline stage's param groups are not the other stage's: keyed by parameter name (as torchtitan saves
    # them), not by group index, where DCP would keep one rank's group state for every rank
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)

    m2, o2 = make()
    for k in range(STEPS // 2):
        set_grads(_params(m2), k)
        o2.step()
        o2.zero_grad()
    dcp.save({"model": m2.state_dict(), "optim": get_optimizer_state_dict(m2, o2, options=options)}, checkpoint_id=path)
    m3, o3 = make()
    with torch.no_grad():
        for p in m3.ps.values():
            p.zero_()
    state = {"model": m3.state_dict(), "optim": get_optimizer_state_dict(m3, o3, options=options)}
    dcp.load(state, checkpoint_id=path)
    m3.load_state_dict(state["model"])
    set_optimizer_state_dict(m3, o3, state["optim"], options=options)
    for k in range(STEPS // 2, STEPS):
        set_grads(_params(m3), k)
        o3.step()
    p1, p3 = _params(m1), _params(m3)
    same = all(torch.equal(_full(p1[i].detach()), _full(p3[i].detach())) for i in p1)
    s1, s3 = _state_tensors(o1, p1), _state_tensors(o3, p3)
    same = same and s1.keys() == s3.keys() and all(torch.equal(s1[key], s3[key]) for key in s1)
    return same and _stats(o1) == _stats(o3)


def _worker(rank, tmp, world, jobs):
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=world)
    out = {}
    with counted_all_reduces() as calls:
        for name, cells in jobs:
            L = _placements(name, rank)
            for kind, method, backend in cells:
                key = f"{name}/{backend}/{kind}/{method}"
                try:
                    out[key] = _cell(L, rank, kind, method, backend, calls, os.path.join(tmp, f"ckpt-{len(out)}"))
                except (Exception, CheckpointException) as err:  # noqa: BLE001 (reported by the test)
                    out[key] = dict(error=f"{type(err).__name__}: {err}"[:2000])
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
    os._exit(0)  # as tests/test_distributed.py's _finish: no interpreter teardown (gloo / Triton threads)


def _run(jobs):
    """Spawn the processes of ``jobs`` ((layout name, cells: (kind, method, backend)), layouts of one size), run
    every cell in them, assert every check."""
    world = LAYOUTS[jobs[0][0]]
    assert all(LAYOUTS[name] == world for name, _ in jobs)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # CPU workers: Triton in its interpreter, on a GPU machine too
    try:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_worker, args=(tmp, world, jobs), nprocs=world, join=True, start_method="spawn")
            ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    failures = []
    cells = sum(len(c) for _, c in jobs)
    for r, found in enumerate(ranks):
        assert len(found) == cells, f"rank {r}: {len(found)} cells of {cells}"
        for key, result in found.items():
            if "error" in result:
                failures.append(f"rank {r} {key}: {result['error']}")
                continue
            bad = [check for check, ok in result["checks"].items() if not ok]
            if bad:
                failures.append(f"rank {r} {key}: {bad} {result['info']}")
    assert not failures, f"{len(failures)} failing:\n" + "\n".join(failures[:20])


@pytest.mark.skipif(os.environ.get("TCF_SLOW") != "1", reason="the whole matrix (180 cells, minutes): set TCF_SLOW=1")
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parallel_matrix(name):
    """Every cell of one layout, in one spawn."""
    _run([(name, [(kind, method, backend) for backend in BACKENDS for kind in KINDS for method in METHODS])])


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_layouts_nan_skip_and_resume(world):
    """The default run's share of the matrix: the reference backend, cells that the layout's other tests do not
    step, each with its NaN-on-one-rank skip, collective count and checkpoint resume; the layouts of ``world``
    processes in one spawn."""
    _run([(name, [(kind, method, "reference") for kind, method in DEFAULT_CELLS[name]])
          for name, processes in LAYOUTS.items() if processes == world])
