"""The functional API's ``state`` dict is a checkpoint (issue 18 item 13): ``torch.save(state)`` holds
the clipping state only (step count, seed, AutoClip history, ZClip / AdaGC state, statistics), not
the cached layout of the tensors (which held every parameter), so it is small, loads with
``torch.load(weights_only=True)``, and a run resumed from it is bit-identical to an uninterrupted
one.  Oracle: the uninterrupted run itself (and the model's own size)."""

import copy
import gc
import io
import weakref

import pytest
import torch

from torch_clip_fused import ClipMethod, clip_gradients_, clip_grads_with_norms_, get_grad_norms
from conftest import device_for, heavy_tailed

BACKENDS = ["reference", "cpp", "triton"]
METHODS = {
    "autoclip": ("quadratic_rand_autoclip", dict(beta=0.5, p_autoclip=0.5)),
    "layer_autoclip": (ClipMethod("layer", "auto", "linear"), dict(beta=0.5, p_autoclip=0.5, autoclip_history=4)),
    "zclip": ("zclip", dict(zclip_warmup=2)),
    "adagc": ("adagc", dict(clipping_level=5.0, adagc_warmup=2)),
    "coordinate": (ClipMethod("coordinate", "constant", "quadratic"), dict(clipping_level=0.5, beta=0.5)),
}
SHAPES = ((7, 5), (5,), (3, 7), (1,))


def _serialized(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def _set_grads(params, step):
    gen = torch.Generator().manual_seed(300 + step)
    for p in params:
        p.grad = (heavy_tailed(p.shape, gen) * (1 + step)).to(p.device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_state_is_small_and_loads_weights_only(backend):
    device = device_for(backend)
    params = [torch.zeros(s, device=device, requires_grad=True) for s in ((512, 512), (512,))]  # 1.05 MB
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    state = {}
    for k in range(2):
        _set_grads(params, k)
        clip_gradients_(params, "quadratic_rand_autoclip", state=state, seed=11, backend=backend)
    saved = _serialized(state)
    assert len(saved) < 0.1 * model_bytes, f"{len(saved)} bytes saved for a {model_bytes}-byte model"
    loaded = _load(saved)
    assert loaded["clip_seed"] == 11 and int(loaded["clip_step"]) == 2
    assert torch.equal(loaded["clip_history_global"], state["clip_history_global"].cpu())
    assert len(_serialized(copy.deepcopy(state))) < 0.1 * model_bytes  # a copy holds no parameter either


def _run(method, settings, backend, steps, state, seed, halves=False):
    """``steps`` calls on fresh tensors of the same values; returns what each call gave."""
    device = device_for(backend)
    out = []
    for k in steps:
        params = [torch.zeros(s, device=device, requires_grad=True) for s in SHAPES]
        _set_grads(params, k)
        if halves:
            norms = get_grad_norms(params, backend=backend, state=state)
            clip_grads_with_norms_(params, norms, method, seed=seed, state=state, backend=backend, **settings)
        else:
            norms = clip_gradients_(params, method, seed=seed, state=state, backend=backend, **settings)
        out.append([*norms, *(p.grad for p in params), state["clip_stats"].clone()])
    return out


@pytest.mark.parametrize("backend,name", [(b, m) for b in BACKENDS for m in METHODS
                                          if b != "triton" or m in ("autoclip", "coordinate")])
def test_resumed_from_weights_only_load_is_bit_identical(backend, name):
    method, settings = METHODS[name]
    torch.manual_seed(5)
    uninterrupted = _run(method, settings, backend, range(6), {}, seed=None)  # the seed drawn, then kept
    torch.manual_seed(5)
    first = {}
    _run(method, settings, backend, range(3), first, seed=None)
    resumed_state = _load(_serialized(first))
    torch.manual_seed(999)  # the resumed run depends on the saved seed only
    resumed = _run(method, settings, backend, range(3, 6), resumed_state, seed=None)
    for k, (a, b) in enumerate(zip(uninterrupted[3:], resumed)):
        for x, y in zip(a, b):
            assert torch.equal(x, y) or (x.isnan().all() and y.isnan().all()), f"call {k + 3}: {x} != {y}"
    assert int(resumed_state["clip_step"]) == 6


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_resumed_halves_are_bit_identical(backend):
    method, settings = METHODS["autoclip"]
    uninterrupted = _run(method, settings, backend, range(4), {}, seed=3, halves=True)
    first = {}
    _run(method, settings, backend, range(2), first, seed=3, halves=True)
    resumed = _run(method, settings, backend, range(2, 4), _load(_serialized(first)), seed=3, halves=True)
    for a, b in zip(uninterrupted[2:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_loaded_state_is_checked_before_use():
    """A corrupt state (a negative AutoClip count) is a clear error naming the key, not an
    out-of-bounds kernel access."""
    state = {}
    _run("auto_clip", {}, "reference", range(2), state, seed=1)
    bad = _load(_serialized(state))
    bad["clip_count_global"] = torch.tensor([-3])
    with pytest.raises(ValueError, match="clip_count_global"):
        _run("auto_clip", {}, "cpp", range(2, 3), bad, seed=1)


def test_cached_layout_goes_with_its_state():
    """The layout kept beside a state dict (it holds the parameters) is freed with the dict."""
    params = [torch.zeros(s, requires_grad=True) for s in SHAPES]
    _set_grads(params, 0)
    state = {}
    clip_gradients_(params, "auto_clip", state=state, seed=1, backend="reference")
    alive = weakref.ref(params[0])
    del params, state
    gc.collect()
    assert alive() is None


def test_state_keeps_only_clipping_state():
    """Every value in the dict is a tensor, a number or a bool: nothing that holds the tensors."""
    state = {}
    _run("auto_clip", {}, "reference", range(2), state, seed=1)
    for key, value in state.items():
        assert isinstance(value, (torch.Tensor, int, float, bool)), (key, type(value))
