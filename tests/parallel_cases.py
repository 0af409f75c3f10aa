"""What the multi-process tests of parallel layouts share (tests/test_distributed_adamw.py,
test_pipeline_norm_group.py, test_tensor_parallel.py, test_several_meshes.py): seeded tensors and
gradients, the torch oracle (``clip_grad_norm_`` over the whole model + the torch optimizer) and a
counter of the collectives a step makes."""

import contextlib

import torch
import torch.distributed as dist


def seeded(shapes, seed: int, scale: float = 1.0):
    """Tensors of ``shapes`` drawn from a generator seeded with ``seed``, times ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) * scale for s in shapes]


def decay_groups(params, decay: float = 0.01):
    """decay / no-decay param groups, as the Hugging Face Trainer makes them: matrices, then vectors."""
    return [dict(params=[p for p in params if p.dim() > 1], weight_decay=decay),
            dict(params=[p for p in params if p.dim() == 1], weight_decay=0.0)]


def torch_clipped_run(start, grads_of, steps: int, kind: str, groups_of=None, max_norm: float = 1.0, **settings):
    """The oracle: the whole model in one process, ``clip_grad_norm_`` over every parameter then
    torch.optim.SGD (``kind="sgd"``, lr 0.1, momentum 0.9) or AdamW (lr 0.01), with ``settings``.
    Returns (parameters, optimizer)."""
    params = [torch.nn.Parameter(x.clone()) for x in start]
    groups = params if groups_of is None else groups_of(params)
    opt = (torch.optim.SGD(groups, **{"lr": 0.1, "momentum": 0.9, **settings}) if kind == "sgd"
           else torch.optim.AdamW(groups, **{"lr": 0.01, **settings}))
    for k in range(steps):
        for p, g in zip(params, grads_of(k)):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
    return params, opt


@contextlib.contextmanager
def counted_all_reduces():
    """A list that grows by one for every ``torch.distributed.all_reduce`` made inside the block (clear it
    between steps)."""
    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = original


def resumed_through_dcp(make, run, steps: int, path: str):
    """Two runs of ``steps`` steps: uninterrupted, and stopped at ``steps // 2``, saved with
    ``torch.distributed.checkpoint``, loaded into a fresh model (zeroed: the checkpoint must bring the
    values back) and optimizer, and continued.  ``make()`` gives (module with ``ps``, optimizer);
    ``run(module, optimizer, step numbers)``.  Returns ((m1, o1), (m3, o3)): uninterrupted, resumed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    m1, o1 = make()
    run(m1, o1, range(steps))
    m2, o2 = make()
    run(m2, o2, range(steps // 2))
    dcp.save({"model": m2.state_dict(), "optim": get_optimizer_state_dict(m2, o2)}, checkpoint_id=path)
    m3, o3 = make()
    with torch.no_grad():
        for p in m3.ps:
            p.zero_()
    state = {"model": m3.state_dict(), "optim": get_optimizer_state_dict(m3, o3)}
    dcp.load(state, checkpoint_id=path)
    m3.load_state_dict(state["model"])
    set_optimizer_state_dict(m3, o3, state["optim"])
    run(m3, o3, range(steps // 2, steps))
    return (m1, o1), (m3, o3)


def record(out: dict, key: str, run) -> None:
    """``out[key] = run()`` in a worker, or ``{"error": ...}`` naming the exception: the worker reports every
    case and the test asserts on each."""
    try:
        out[key] = run()
    except Exception as err:  # noqa: BLE001 (reported by the test)
        out[key] = dict(error=f"{type(err).__name__}: {err}")
