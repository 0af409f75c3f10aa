"""The reference backend is a real fallback: the number of torch operations of one step does not
grow with the number of tensors, and no step reads a device value back to the host."""

from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from torch_clip_fused import ClipMethod, ClippedSGD, clip_gradients_
from torch_clip_fused.backends.reference import step as reference

METHODS = ["norm", "layer_wise", "coordinate_wise", ClipMethod("coordinate", "constant", "quadratic"), "auto_clip",
           ClipMethod("layer", "auto", "quadratic"), "quadratic_rand_norm", "no_clip"]
SETTINGS = [
    dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True, clip_point="update"),
]
BASE_SHAPES = ((4, 3), (5,), (2, 3, 2), (0,), (1,))


def shapes(n):
    return [BASE_SHAPES[i % len(BASE_SHAPES)] for i in range(n)]


def new_grads(params, seed):
    """Fresh gradient tensors (as after zero_grad(set_to_none=True)), large enough to clip."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (3 * torch.randn(p.shape, generator=gen)).to(device=p.device, dtype=p.dtype)


def top_level_aten_ops(fn) -> Counter:
    """aten ops run by ``fn``, by name, counting only those not called from inside another aten op
    (on CPU a foreach op runs per tensor internally: those nested calls are not ours)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and not (parent is not None and parent.name.startswith("aten::")):
            ops[event.name] += 1
    return ops


def ops_of_one_step(n_tensors, method, settings):
    """(ops of the reference backend's call, ops of the whole ``opt.step()``) of a step after a
    warm-up step, on fresh gradient tensors."""
    backend = {}

    def profiled(t, cfg):  # on the last step, profiling only the backend (profilers do not nest on torch 2.11)
        if backend.get("record"):
            backend["ops"] = top_level_aten_ops(lambda: reference.reference_step(t, cfg))
        else:
            reference.reference_step(t, cfg)

    params = [torch.randn(s).requires_grad_() for s in shapes(n_tensors)]
    opt = ClippedSGD(params, lr=0.1, clipping_type=method, clipping_level=1.0, beta=0.5, seed=0,
                     backend=profiled, **settings)  # a step function as the backend: the reference's, profiled
    new_grads(params, 0)
    opt.step()  # warm-up: group state, momentum buffers, cached workspace and index tensors
    new_grads(params, 1)
    whole = top_level_aten_ops(opt.step)
    new_grads(params, 2)
    backend["record"] = True
    opt.step()
    return backend["ops"], whole


@pytest.mark.parametrize("settings", SETTINGS, ids=["grad", "update"])
@pytest.mark.parametrize("method", METHODS, ids=str)
def test_op_count_does_not_grow_with_tensor_count(method, settings):
    (few, few_step), (many, many_step) = (ops_of_one_step(n, method, settings) for n in (10, 300))
    assert sum(many.values()) > 0
    assert few == many, f"reference_step: ops that grow with the tensor count: {dict((many - few) + (few - many))}"
    assert few_step == many_step, (f"ClippedSGD.step outside the backend: ops that grow with the tensor count: "
                                   f"{dict((many_step - few_step) + (few_step - many_step))}")


def test_functional_clip_op_count_does_not_grow_with_tensor_count():
    def ops(n):
        params = [torch.randn(s).requires_grad_() for s in shapes(n)]
        state = {}
        new_grads(params, 0)
        clip_gradients_(params, "layer_wise", state=state, seed=0)
        new_grads(params, 1)
        return top_level_aten_ops(lambda: clip_gradients_(params, "layer_wise", state=state, seed=0))

    assert ops(10) == ops(300)


@pytest.mark.parametrize("method", ["layer_wise", ClipMethod("layer", "auto", "none"), "no_clip"], ids=str)
def test_mixed_group_steps_each_tensor_as_on_its_own(method):
    """float32 and float64 tensors of one group (two flat workspaces), a transposed one, an empty
    one and one without a gradient: with a per-tensor method each tensor moves as it would alone
    in its own optimizer: exactly for float32, within float32 norm rounding for float64 (alone, a
    float64 tensor is a float64 group, computed with float64 norms)."""
    gen = torch.Generator().manual_seed(4)
    values = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen).double(), torch.randn(0),
              torch.randn(3, 2, generator=gen).double().t(), torch.randn(4, generator=gen), torch.randn(6, generator=gen)]
    kwargs = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, clipping_type=method, clipping_level=1.0,
                  p_autoclip=0.5, backend="reference", seed=1)
    group = [v.clone().requires_grad_() for v in values]
    alone = [v.clone().requires_grad_() for v in values]
    opt = ClippedSGD(group, **kwargs)
    opts = [ClippedSGD([p], **kwargs) for p in alone]
    for k in range(3):
        gen = torch.Generator().manual_seed(10 + k)
        for a, b in zip(group, alone):
            grad = 3 * torch.randn(a.shape, generator=gen, dtype=a.dtype)
            a.grad, b.grad = grad.clone(), grad.clone()
        group[4].grad = alone[4].grad = None  # no gradient: not stepped
        opt.step()
        for o, p in zip(opts, alone):
            if p.grad is not None:
                o.step()
    for a, b, v in zip(group, alone, values):
        if v.dtype == torch.float64:  # alone: float64 norms; in a mixed group norms are float32 (docs/spec.md 1)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.dtype == v.dtype and a.stride() == v.stride()
    assert torch.equal(group[4], values[4])


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float32, torch.float64, torch.float64)], ids=["one", "mixed"])
def test_coordinate_draws_index_the_whole_group(dtypes):
    """A coordinate's Philox index is its place in the whole group, parameters without gradients
    included: a parameter without a gradient and one with a zero gradient (never clipped) leave
    the same draws, so the same decisions, to the others."""
    def run(middle_grad):
        gen = torch.Generator().manual_seed(2)
        params = [torch.randn(s, generator=gen, dtype=d).requires_grad_() for s, d in zip(((4, 6), (7,), (3, 5)), dtypes)]
        opt = ClippedSGD(params, lr=1.0, clipping_type=ClipMethod("coordinate", "constant", "linear"),
                         clipping_level=0.5, beta=0.3, seed=5, backend="reference")
        for k in range(2):
            new_grads(params, 30 + k)
            params[1].grad = middle_grad(params[1])
            opt.step()
        return params

    without, zero = run(lambda p: None), run(torch.zeros_like)
    for a, b in zip(without, zero):
        assert torch.equal(a, b)


class HostTransfers(TorchDispatchMode):
    """Records every operation of a step on "meta" tensors that, on CUDA, would make the host wait
    for the device or copy host data into device memory: a device value read back (``.item()``,
    ``bool()``, ``nonzero``...; on meta these also raise), a host tensor copied into a device
    tensor, a Python number written into a device tensor by indexing (``x[i] = 1.0`` is a
    host-to-device copy on CUDA; on meta it shows as ``scalar_tensor``), and a device tensor built
    from Python data (``torch.tensor([...], device=...)``, seen by wrapping ``torch.tensor``)."""

    READS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
             "aten::equal", "aten::allclose", "aten::unique", "aten::_unique2")

    def __init__(self, monkeypatch):
        super().__init__()
        self.found = []
        self.monkeypatch = monkeypatch

    def __enter__(self):
        for name in ("tensor", "as_tensor"):
            self.monkeypatch.setattr(torch, name, self._watch(getattr(torch, name), name))
        return super().__enter__()

    def __exit__(self, *exc):
        self.monkeypatch.undo()
        return super().__exit__(*exc)

    def _watch(self, original, name):
        def built_from_python_data(*args, **kwargs):
            out = original(*args, **kwargs)
            if out.device.type != "cpu":
                self.found.append(f"torch.{name}: a device tensor built from Python data")
            return out

        return built_from_python_data

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_host = [a for a in tensors if a.device.type == "cpu"]
        on_device = [a for a in tensors if a.device.type != "cpu"]
        device = kwargs.get("device", None)
        to_device = device is not None and torch.device(device).type != "cpu"
        if name in self.READS and on_device:
            self.found.append(f"{name}: a device value read by the host")
        elif name == "aten::scalar_tensor" and to_device:
            self.found.append(f"{name}: a Python number written into a device tensor")
        elif name in ("aten::copy_", "aten::_copy_from", "aten::index_put_", "aten::fill_") and on_host and on_device:
            self.found.append(f"{name} from a host tensor into a device tensor")
        elif name == "aten::_to_copy" and on_host and to_device:
            self.found.append(f"{name}: host to device")
        elif on_device and any(a.dim() > 0 for a in on_host):
            self.found.append(f"{name} with a host tensor argument")
        return func(*args, **kwargs)


@pytest.mark.parametrize("settings", SETTINGS, ids=["grad", "update"])
@pytest.mark.parametrize("method", METHODS, ids=str)
def test_step_never_syncs_with_the_host(method, settings, monkeypatch):
    """Every device value of a step on "meta" tensors is unknown: reading one raises, and a copy
    from host memory into them shows up in the dispatch trace."""
    params = [torch.empty(s, device="meta").requires_grad_() for s in shapes(12)]
    opt = ClippedSGD(params, lr=0.1, clipping_type=method, clipping_level=1.0, beta=0.5, seed=0,
                     backend="reference", **settings)
    new_grads(params, 0)
    opt.step()  # warm-up: state and cached index tensors may be built here
    new_grads(params, 1)
    with HostTransfers(monkeypatch) as transfers:
        opt.step()
        opt.step()
    assert transfers.found == []


def test_detector_sees_host_reads_and_writes(monkeypatch):
    """The check above can fail: each pattern the issue names is caught, host-only work is not."""
    x = torch.zeros(4, device="meta")
    with HostTransfers(monkeypatch) as transfers:
        x[1] = float("inf")
        torch.tensor([1, 2], device="meta")
        x.add_(torch.ones(4))
        x.copy_(torch.ones(4))
        with pytest.raises(RuntimeError):
            x.sum().item()
        with pytest.raises(RuntimeError):
            bool(x.sum() > 0)
        x.mul_(torch.tensor(2.0))  # a host scalar is a kernel argument: fine
        float(torch.tensor(2.0))  # a host value read on the host: fine
    assert len(transfers.found) == 6, transfers.found
    assert torch.tensor is not None and torch.tensor([1]).device.type == "cpu"  # unwrapped again


@pytest.mark.parametrize("method", ["layer_wise", ClipMethod("coordinate", "constant", "quadratic"), "auto_clip"], ids=str)
def test_functional_clip_never_syncs_with_the_host(method, monkeypatch):
    params = [torch.empty(s, device="meta").requires_grad_() for s in shapes(12)]
    state = {}
    new_grads(params, 0)
    clip_gradients_(params, method, state=state, seed=0)
    new_grads(params, 1)
    with HostTransfers(monkeypatch) as transfers:
        clip_gradients_(params, method, state=state, seed=0)
    assert transfers.found == []


@pytest.mark.parametrize("settings", SETTINGS, ids=["grad", "update"])
@pytest.mark.parametrize("method", ["norm", "quadratic_rand_autoclip", "zclip"])
def test_a_step_of_groups_sharing_one_norm_never_syncs_with_the_host(method, settings, monkeypatch):
    """Two param groups sharing one norm (optim/shared_norm.py): the norm stage, the reduction, the lead's
    decision and the followers' given norms all stay on the device ("meta" tensors)."""
    params = [torch.empty(s, device="meta").requires_grad_() for s in shapes(12)]
    opt = ClippedSGD([dict(params=params[:6]), dict(params=params[6:], lr=0.05)], lr=0.1, clipping_type=method,
                     clipping_level=1.0, beta=0.5, seed=0, backend="reference", **settings)
    new_grads(params, 0)
    opt.step()
    new_grads(params, 1)
    with HostTransfers(monkeypatch) as transfers:
        opt.step()
        opt.step()
    assert transfers.found == []
