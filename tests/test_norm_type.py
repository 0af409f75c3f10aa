"""norm_type (issue 21 item 3; docs/spec.md section 1; torch_clip_fused/norm_type.py): the p-norms of
``torch.nn.utils.clip_grad_norm_(norm_type=p)`` at global and layer scope, on every backend, with no host read
inside a step: ClippedSGD / ClippedAdamW against clip_grad_norm_ + torch.optim, AutoClip on p-norms against its
closed form, two param groups sharing one norm, the functional API, DTensor shards and a pipeline norm_group
(2-process gloo), skip rules, bad values, and a checkpoint resumed mid-run bit for bit."""

import copy
import math

import pytest
import torch

import torch_clip_fused as tcf
from torch_clip_fused import ClippedAdamW, ClippedSGD
from conftest import device_for
from test_optim_db import no_host_reads

#: the Triton kernels take small chunks under the interpreter: a small tensor spans several
pytestmark = pytest.mark.usefixtures("triton_small_chunks")

BACKENDS = ["reference", "cpp", "triton"]
NORM_TYPES = [1.0, 3.0, math.inf]
SHAPES = [(7, 5), (13,), (300,)]
#: one tensor over two 16,384-element chunks (the fused kernels' chunk size), so that chunks combine
BIG = [(7, 5), (13,), (16500,)]
LEVEL = 0.5


def _params(seed=0, shapes=SHAPES, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def _grads(step, shapes=SHAPES, device="cpu"):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(s, generator=g) * (1 + step)).to(device) for s in shapes]


def _shapes(backend):
    """BIG for the C++ backend (16,384-element chunks), small ones elsewhere (Triton: small chunks)."""
    return BIG if backend == "cpp" else SHAPES


def _torch_clip(params, p, scope):
    if scope == "norm":
        torch.nn.utils.clip_grad_norm_(params, LEVEL, norm_type=p)
    else:  # layer_wise: clip_grad_norm_ per tensor
        for q in params:
            torch.nn.utils.clip_grad_norm_([q], LEVEL, norm_type=p)


def _run(opt, params, steps, start=0, check_host=True, shapes=SHAPES):
    for k in range(start, start + steps):
        for q, g in zip(params, _grads(k, shapes, params[0].device)):
            q.grad = g.clone()
        if check_host:
            with no_host_reads():
                opt.step()
        else:
            opt.step()


def _assert_equals_torch(opt, ours, ref, theirs, p, method, steps, shapes=SHAPES, check_norm=False):
    """``steps`` steps of ``opt`` on ``ours`` against clip_grad_norm_(norm_type=p) + the torch optimizer ``ref``
    on ``theirs``; the parameters (and, with ``check_norm``, each step's global norm) equal torch's."""
    for k in range(steps):
        _run(opt, ours, 1, start=k, shapes=shapes)
        for q, g in zip(theirs, _grads(k, shapes, theirs[0].device)):
            q.grad = g.clone()
        total = torch.nn.utils.get_total_norm([q.grad for q in theirs], norm_type=p)
        _torch_clip(theirs, p, method)
        ref.step()
        if check_norm:
            torch.testing.assert_close(opt.statistics()[0]["norm"], total, rtol=1e-5, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", NORM_TYPES, ids=["1", "3", "inf"])
@pytest.mark.parametrize("method", ["norm", "layer_wise"])
def test_sgd_equals_clip_grad_norm(backend, p, method):
    shapes, dev = _shapes(backend), device_for(backend)
    ours, theirs = _params(shapes=shapes, device=dev), _params(shapes=shapes, device=dev)
    opt = ClippedSGD(ours, lr=0.1, momentum=0.9, clipping_type=method, clipping_level=LEVEL, norm_type=p,
                     backend=backend)
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    _assert_equals_torch(opt, ours, ref, theirs, p, method, 2, shapes, check_norm=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [3.0, math.inf], ids=["3", "inf"])
def test_adamw_equals_clip_grad_norm(backend, p):
    dev = device_for(backend)
    ours, theirs = _params(device=dev), _params(device=dev)
    opt = ClippedAdamW(ours, lr=0.01, clipping_type="norm", clipping_level=LEVEL, norm_type=p, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=0.01)
    _assert_equals_torch(opt, ours, ref, theirs, p, "norm", 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1.0, math.inf], ids=["1", "inf"])
def test_autoclip_on_p_norms(backend, p):
    """AutoClip's eta is the nearest-rank p_autoclip-quantile of the recorded p-norms (the current one
    included): the closed form, with torch's norms and SGD."""
    dev = device_for(backend)
    ours, theirs = _params(device=dev), _params(device=dev)
    opt = ClippedSGD(ours, lr=0.1, clipping_type="auto_clip", p_autoclip=0.5, norm_type=p, backend=backend)
    history = []
    for k in range(4):
        _run(opt, ours, 1, start=k)
        grads = _grads(k, device=dev)
        norm = torch.nn.utils.get_total_norm(grads, norm_type=p)
        history.append(norm)
        eta = sorted(history)[math.ceil(0.5 * len(history)) - 1]
        stats = opt.statistics()[0]
        torch.testing.assert_close(stats["threshold"], eta, rtol=1e-5, atol=0)
        scale = min(1.0, float(eta / norm))
        with torch.no_grad():
            for q, g in zip(theirs, grads):
                q -= 0.1 * scale * g
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [3.0, math.inf], ids=["3", "inf"])
def test_two_groups_share_one_p_norm(backend, p):
    dev = device_for(backend)
    ours, theirs = _params(device=dev), _params(device=dev)
    opt = ClippedSGD([{"params": ours[:2]}, {"params": ours[2:], "lr": 0.05}], lr=0.1, clipping_type="norm",
                     clipping_level=LEVEL, norm_type=p, backend=backend)
    ref = torch.optim.SGD([{"params": theirs[:2]}, {"params": theirs[2:], "lr": 0.05}], lr=0.1)
    _assert_equals_torch(opt, ours, ref, theirs, p, "norm", 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", NORM_TYPES, ids=["1", "3", "inf"])
def test_functional_equals_clip_grad_norm(backend, p):
    shapes, dev = _shapes(backend), device_for(backend)
    ours, theirs, halves = (_params(shapes=shapes, device=dev) for _ in range(3))
    for a, b, c, g in zip(ours, theirs, halves, _grads(0, shapes, dev)):
        a.grad, b.grad, c.grad = g.clone(), g.clone(), g.clone()
    total, per_tensor = tcf.clip_gradients_(ours, "norm", LEVEL, backend=backend, norm_type=p)
    expected = torch.nn.utils.clip_grad_norm_(theirs, LEVEL, norm_type=p)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(per_tensor, torch.stack([torch.linalg.vector_norm(g, p) for g in _grads(0, shapes, dev)]),
                               rtol=1e-5, atol=0)
    norms = tcf.get_grad_norms(halves, backend=backend, norm_type=p)  # the two halves give the same
    tcf.clip_grads_with_norms_(halves, norms, "layer_wise", LEVEL, backend=backend, norm_type=p)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    for c, g in zip(halves, _grads(0, shapes, dev)):
        q = torch.nn.Parameter(torch.zeros_like(g))
        q.grad = g.clone()
        torch.nn.utils.clip_grad_norm_([q], LEVEL, norm_type=p)
        torch.testing.assert_close(c.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_two_is_the_default_and_inf_is_a_string_too():
    runs = {}
    for key, kwargs in dict(default={}, two=dict(norm_type=2), inf=dict(norm_type=math.inf),
                            inf_str=dict(norm_type="inf")).items():
        params = _params()
        _run(ClippedSGD(params, lr=0.1, clipping_level=LEVEL, backend="cpp", **kwargs), params, 2)
        runs[key] = params
    for a, b in zip(runs["default"], runs["two"]):
        assert torch.equal(a, b)
    for a, b in zip(runs["inf"], runs["inf_str"]):
        assert torch.equal(a, b)


def test_skip_rule_takes_the_p_norm():
    params = _params()
    opt = ClippedSGD(params, lr=0.1, norm_type=math.inf, skip_if_norm_above=2.0, backend="reference")
    for q in params:
        q.grad = torch.zeros_like(q)
    params[2].grad[7] = 1.5  # inf-norm 1.5 (the 2-norm of both: above 2): taken
    params[1].grad[0] = -1.9
    before = [q.detach().clone() for q in params]
    opt.step()
    assert opt.statistics()[0]["spike_skipped"].item() == 0.0
    params[0].grad[0, 0] = 2.5  # inf-norm 2.5: skipped
    moved = [q.detach().clone() for q in params]
    opt.step()
    assert opt.statistics()[0]["spike_skipped"].item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(params, moved)) and not torch.equal(before[2], moved[2])


@pytest.mark.parametrize("value,error,match", [
    (0.5, ValueError, "norm_type value: 0.5; expected p >= 1"),
    (float("nan"), ValueError, "norm_type value: nan"),
    (-math.inf, ValueError, "norm_type value: -inf"),
    ("two", ValueError, "norm_type value: 'two'"),
    (True, TypeError, "norm_type value: True"),
    (None, TypeError, "norm_type value: None"),
])
def test_bad_values_raise_clearly(value, error, match):
    with pytest.raises(error, match=match):
        ClippedSGD(_params(), norm_type=value, backend="reference")
    with pytest.raises(error, match=match):
        tcf.clip_gradients_(_params(), norm_type=value, backend="reference")


@pytest.mark.parametrize("method", ["coordinate_wise", "agc", tcf.ClipMethod("layer", "relative")])
def test_norm_type_is_for_global_and_layer_norms_only(method):
    with pytest.raises(ValueError, match="norm_type value: 3 with clipping method"):
        ClippedSGD(_params(), clipping_type=method, norm_type=3, backend="reference")
    ClippedSGD(_params(), clipping_type=method, norm_type=2, backend="reference")  # 2 is every method's


def test_groups_sharing_a_norm_must_agree_on_norm_type():
    params = _params()
    with pytest.raises(ValueError, match="param groups 0 and 1 .* differ in norm_type: 2.0 and inf"):
        ClippedSGD([{"params": params[:1]}, {"params": params[1:], "norm_type": "inf"}], backend="reference")
    ClippedSGD([{"params": params[:1]}, {"params": params[1:], "norm_type": "inf"}], per_group_norm=True,
               backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(clipping_type="auto_clip", norm_type=3.0, momentum=0.9),
                                    dict(clipping_type="zclip", norm_type="inf", zclip_warmup=2),
                                    dict(clipping_type="linear_rand_autoclip", norm_type=1.0, beta=0.5)],
                         ids=["autoclip-3", "zclip-inf", "rand-autoclip-1"])
def test_checkpoint_resumes_bit_identically(backend, kwargs):
    dev = device_for(backend)
    straight = _params(device=dev)
    opt = ClippedSGD(straight, lr=0.1, seed=7, backend=backend, **kwargs)
    _run(opt, straight, 3, check_host=False)
    resumed = _params(device=dev)
    first = ClippedSGD(resumed, lr=0.1, seed=7, backend=backend, **kwargs)
    _run(first, resumed, 2, check_host=False)
    saved = copy.deepcopy(first.state_dict())
    assert saved["param_groups"][0]["norm_type"] == first.param_groups[0]["norm_type"]
    again = ClippedSGD(resumed, lr=0.1, seed=99, backend=backend, **kwargs)
    again.load_state_dict(saved)
    _run(again, resumed, 1, start=2)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    assert torch.equal(opt.statistics()[0]["threshold"], again.statistics()[0]["threshold"])


# --------------------------------------------------------------------------------------------
# 2 processes (gloo): DTensor shards (the parts reduced by SUM, or MAX for inf) and a pipeline norm_group
# --------------------------------------------------------------------------------------------

DIST_SHAPES = [(7, 5), (13,), (300,)]
#: (backend, method, p) of the DTensor cases and (backend, p) of the pipeline's: each backend with a SUM and a MAX
DIST_CASES = [("reference", "norm", 3.0), ("reference", "norm", math.inf), ("reference", "layer_wise", math.inf),
              ("cpp", "norm", 3.0), ("cpp", "layer_wise", math.inf), ("triton", "norm", math.inf)]
PIPELINE_CASES = [("reference", 3.0), ("reference", math.inf), ("cpp", math.inf), ("triton", 3.0)]


def _max_error(ours, theirs) -> float:
    return max(float((a - b).abs().max() / b.abs().max().clamp(min=1.0)) for a, b in zip(ours, theirs))


def _dist_worker(rank, tmp):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from parallel_cases import record
    from test_distributed import _finish, _init

    _init(rank, tmp)
    mesh = init_device_mesh("cpu", (2,))
    out = {}
    for backend, method, p in DIST_CASES:
        def sharded_case(backend=backend, method=method, p=p):
            full, theirs = _params(shapes=DIST_SHAPES), _params(shapes=DIST_SHAPES)
            ours = [torch.nn.Parameter(distribute_tensor(x.detach().clone(), mesh, [Shard(0)])) for x in full]
            opt = ClippedSGD(ours, lr=0.1, clipping_type=method, clipping_level=LEVEL, norm_type=p, backend=backend)
            ref = torch.optim.SGD(theirs, lr=0.1)
            for k in range(2):
                for q, r, g in zip(ours, theirs, _grads(k, DIST_SHAPES)):
                    q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                    r.grad = g.clone()
                opt.step()
                _torch_clip(theirs, p, method)
                ref.step()
            return _max_error([q.full_tensor() for q in ours], theirs)

        record(out, f"dtensor/{backend}/{method}/{p}", sharded_case)
    for backend, p in PIPELINE_CASES:  # a pipeline: rank 0 holds the first two tensors, rank 1 the third
        def pipeline_case(backend=backend, p=p):
            mine = slice(0, 2) if rank == 0 else slice(2, 3)
            ours, theirs = _params(shapes=DIST_SHAPES)[mine], _params(shapes=DIST_SHAPES)
            fours = _params(shapes=DIST_SHAPES)[mine]
            opt = ClippedSGD(ours, lr=0.1, clipping_level=LEVEL, norm_type=p, norm_group=dist.group.WORLD,
                             backend=backend)
            ref = torch.optim.SGD(theirs, lr=0.1)
            for k in range(2):
                grads = _grads(k, DIST_SHAPES)
                for q, f, g in zip(ours, fours, grads[mine]):
                    q.grad, f.grad = g.clone(), g.clone()
                for r, g in zip(theirs, grads):
                    r.grad = g.clone()
                opt.step()
                tcf.clip_gradients_(fours, "norm", LEVEL, backend=backend, norm_group=dist.group.WORLD,
                                    norm_type=p)
                total = torch.nn.utils.clip_grad_norm_(theirs, LEVEL, norm_type=p)
                ref.step()
            return max(_max_error(ours, theirs[mine]), _max_error([f.grad for f in fours],
                                                                   [r.grad for r in theirs[mine]]),
                       abs(float(opt.statistics()[0]["norm"]) - float(total)) / float(total))

        record(out, f"pipeline/{backend}/{p}", pipeline_case)
    _finish(rank, tmp, out)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_dtensor_and_pipeline_equal_clip_grad_norm():
    from test_distributed import _spawn

    for rank, out in enumerate(_spawn(_dist_worker)):
        assert len(out) == len(DIST_CASES) + len(PIPELINE_CASES), out
        for case, error in out.items():
            assert isinstance(error, float) and error < 1e-5, (rank, case, error)
