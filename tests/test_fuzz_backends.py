"""Property-based differential test (hypothesis): reference vs cpp vs triton on random shapes,
dtypes, methods and settings make the same clip decisions and values within tolerance.  Bounded
to a few seconds in CI (few examples, tiny tensors, Triton's interpreter with small chunks)."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("triton")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from torch_clip_fused import ClipMethod, ClippedSGD  # noqa: E402
from torch_clip_fused.backends.triton import step as triton_glue  # noqa: E402
from backend_checks import TOLERANCE  # noqa: E402
from conftest import heavy_tailed  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["cpp", "triton"] if DEVICE == "cpu" else ["triton"]

METHODS = st.one_of(
    st.sampled_from(["no_clip", "norm", "layer_wise", "coordinate_wise", "auto_clip", "linear_rand_norm",
                     "quadratic_rand_autoclip"]),
    st.builds(ClipMethod, st.sampled_from(["global", "layer"]), st.sampled_from(["constant", "auto"]),
              st.sampled_from(["none", "linear", "quadratic"])),
    st.builds(ClipMethod, st.just("coordinate"), st.just("constant"), st.sampled_from(["none", "linear"])),
)
SHAPES = st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4)
SETTINGS = st.fixed_dictionaries(dict(
    momentum=st.sampled_from([0.0, 0.9]), weight_decay=st.sampled_from([0.0, 0.01]),
    clipping_level=st.sampled_from([0.05, 0.5, 3.0]), beta=st.sampled_from([0.3, 0.85]),
    p_autoclip=st.sampled_from([0.3, 0.75, 1.0]), clip_point=st.sampled_from(["grad", "update"]),
    maximize=st.booleans(),
))


def _run(backend, method, shapes, dtype, kwargs, seed, steps=3):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype=dtype, device=DEVICE).requires_grad_() for s in shapes]
    opt = ClippedSGD(params, lr=0.05, clipping_type=method, seed=seed, backend=backend, **kwargs)
    fractions = []
    for _ in range(steps):
        for p in params:
            p.grad = heavy_tailed(p.shape, gen, dtype).to(DEVICE)
        opt.step()
        fractions.append(opt.statistics()[0]["clipped_fraction"].item())
    return params, fractions


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(method=METHODS, shapes=SHAPES, dtype=st.sampled_from([torch.float32, torch.bfloat16]), kwargs=SETTINGS,
       seed=st.integers(0, 2**31))
def test_backends_agree_with_the_reference(monkeypatch, method, shapes, dtype, kwargs, seed):
    if DEVICE == "cpu":
        monkeypatch.setattr(triton_glue, "CHUNK_SIZE", 32)
        monkeypatch.setattr(triton_glue, "BLOCK_SIZE", 16)
        monkeypatch.setattr(triton_glue, "REDUCE_BLOCK", 16)
    reference, ref_fractions = _run("reference", method, shapes, dtype, kwargs, seed)
    for backend in BACKENDS:
        params, fractions = _run(backend, method, shapes, dtype, kwargs, seed)
        assert fractions == ref_fractions, backend  # the same clip decisions, step by step
        for a, b in zip(reference, params):
            torch.testing.assert_close(b, a, **TOLERANCE[dtype])
