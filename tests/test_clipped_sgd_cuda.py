"""CUDA-only properties of the Triton backend: no host sync inside step(), and CUDA-graph
capture and replay equal to eager steps, for ClippedSGD and ClippedAdamW.  Skipped without CUDA (CI has none); the rest of the
Triton suite runs on the GPU automatically when one exists."""

import pytest
import torch

from torch_clip_fused import ClipMethod, ClippedAdamW, ClippedSGD
from conftest import make_params, set_grads

pytest.importorskip("triton")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SHAPES = ((64, 33), (0,), (1000,), (3, 70000), (1,))
METHODS = ["norm", "layer_wise", "coordinate_wise", "quadratic_rand_autoclip", ClipMethod("layer", "auto", "linear"),
           ClipMethod("coordinate", "constant", "quadratic"), "agc", ClipMethod("unit", "relative", "linear")]
#: the optimizers and their update settings (SGD with momentum; AdamW with weight decay and amsgrad)
OPTIMIZERS = {"sgd": (ClippedSGD, dict(momentum=0.9)), "adamw": (ClippedAdamW, dict(weight_decay=0.01, amsgrad=True))}


@cuda
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("method", METHODS + ["no_clip"], ids=str)
def test_step_never_syncs(method, backend, optimizer):
    params = make_params(shapes=SHAPES, device="cuda")
    cls, update = OPTIMIZERS[optimizer]
    opt = cls(params, lr=0.1, clipping_type=method, autoclip_history=16, backend=backend, **update)
    opt.step()  # first step creates state and the chunk table
    new_grads = []
    for k in range(3):  # made before the check: copying the test's CPU-drawn gradients to the GPU syncs
        set_grads(params, 90 + k)
        new_grads.append([p.grad for p in params])
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for grads in new_grads:  # new gradient tensors, as after zero_grad(set_to_none=True)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in params])).all()


@cuda
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("method", METHODS, ids=str)
def test_cuda_graph_replay_matches_eager(method, optimizer):
    cls, update = OPTIMIZERS[optimizer]
    update = dict(momentum=0.9, nesterov=True, weight_decay=0.01) if optimizer == "sgd" else update
    kwargs = dict(clipping_type=method, clipping_level=None if method == "agc" else 3.0, beta=0.5,
                  autoclip_history=8, seed=5, backend="triton", **update)
    eager = make_params(shapes=SHAPES, device="cuda")
    graphed = make_params(shapes=SHAPES, device="cuda")
    eager_opt = cls(eager, lr=0.05, **kwargs)
    graph_opt = cls(graphed, lr=torch.tensor(0.05, device="cuda"), **kwargs)
    grads = []
    for k in range(6):
        set_grads(eager, 60 + k)
        grads.append([p.grad.clone() for p in eager])
        eager_opt.step()
    static = [p.grad for p in make_params(shapes=SHAPES, device="cuda")]
    for p, g in zip(graphed, static):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for g, new in zip(static, grads[0]):
            g.copy_(new)
        graph_opt.step()  # warm-up: state, chunk table, compilation
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    for k in range(1, 6):
        for g, new in zip(static, grads[k]):
            g.copy_(new)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert graph_opt.statistics()[0]["step"].item() == 6
