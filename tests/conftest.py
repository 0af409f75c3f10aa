"""Shared test helpers: small parameter lists with heavy-tailed gradients."""

import importlib.util
import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors.  The variable must
# be set before any kernel is defined (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import torch_clip_fused as tcf

ALL_TYPES = list(tcf.CLIPPING_TYPES)
SHAPES = ((7, 5), (5,), (3, 7), (1,))


def heavy_tailed(shape, gen, dtype=torch.float32):
    """Normal times a Pareto-like factor: rare huge entries, as in real training gradients."""
    return (torch.randn(shape, generator=gen) * (1 - torch.rand(shape, generator=gen)).pow(-0.6)).to(dtype)


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = heavy_tailed(p.shape, gen, p.dtype).to(p.device)


def make_params(shapes=SHAPES, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed + 10_000)
    params = [torch.randn(s, generator=gen).to(dtype=dtype, device=device).requires_grad_() for s in shapes]
    set_grads(params, seed)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield

@pytest.fixture
def triton_small_chunks(monkeypatch):
    """Small Triton launch sizes under the interpreter (slow): tensors then span several chunks
    (``pytestmark = pytest.mark.usefixtures("triton_small_chunks")`` in a test file)."""
    if importlib.util.find_spec("triton") and not torch.cuda.is_available():
        from torch_clip_fused.backends.triton import step as triton_step
        monkeypatch.setattr(triton_step, "CHUNK_SIZE", 64)
        monkeypatch.setattr(triton_step, "BLOCK_SIZE", 16)
        monkeypatch.setattr(triton_step, "REDUCE_BLOCK", 16)


#: Backends every CPU identity test runs on.
CPU_BACKENDS = ["reference", "cpp"]


def device_for(backend: str) -> str:
    """Where a test runs ``backend``: Triton on the GPU when there is one (its kernels then run
    compiled), else everything on CPU (Triton in its interpreter)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


#: Test files whose Triton cases run on CPU tensors, so only under the interpreter (CI); on a GPU
#: machine the kernels are tested compiled by the device-aware files (test_clipped_sgd_triton.py,
#: test_clipped_sgd_cuda.py, test_functional.py, test_fuzz_backends.py, test_compile.py, ...).
INTERPRETER_ONLY_TRITON = {"test_stochastic_rounding.py"}


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="Triton on CPU tensors runs only under the interpreter (no GPU)")
    for item in items:
        if item.path.name in INTERPRETER_ONLY_TRITON and "triton" in item.name:
            item.add_marker(skip)
