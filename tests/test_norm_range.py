"""Norms at both ends of the float range (docs/spec.md section 1, Arithmetic): a finite gradient is
clipped to the level whatever its magnitude, on every backend, at global, layer and unit scope.

The float32 squares of |g| below about 1e-19 underflow and those above about 1.8e19 overflow; a
norm above 3.4e38 is beyond float32 itself.  The oracle is the float64 norm of each scope piece
(the whole group, a tensor, an output unit) of the gradients as stored: with N that norm and L the
level, the clipped piece is g * L / N when N > L, so its norm is L, never 0 and never N.  A plain
SGD step with lr 1 from zero parameters writes -g' into the parameters.
"""

import math

import pytest
import torch

from torch_clip_fused import ClipMethod, ClippedSGD, clip_gradients_, clip_grads_with_norms_, get_grad_norms

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("triton_small_chunks")  # (conftest.py) tensors span several chunks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "cpp", "triton"] if DEVICE == "cpu" else ["reference", "triton"]
#: a unit of 70 elements spans two of Triton's 64-element test chunks; those of 10 share one
SHAPES = ((2, 70), (6, 10), (20,), (3, 7))
SCOPES = {"global": "norm", "layer": "layer_wise", "unit": ClipMethod("unit", "constant", "none")}
#: subnormal float32, near the smallest normal, float32 squares lost or subnormal, squares overflowing,
#: a norm beyond float32
MAGNITUDES = (1e-40, 1e-37, 1e-25, 1e-23, 1e19, 3e38)
FLOAT32_MAX = torch.finfo(torch.float32).max
#: float32: a few roundings of float32 values; bfloat16: the result is rounded to bfloat16 (Triton's
#: interpreter truncates); atol: an ulp of the smallest subnormal result
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=2.0**-148), torch.bfloat16: dict(rtol=1e-2, atol=2.0**-132)}


def range_grads(magnitude, dtype, seed=0):
    """Gradients of SHAPES with |g| in [magnitude / 2, magnitude] and random signs, in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        values = (0.5 + 0.5 * torch.rand(shape, generator=gen, dtype=torch.float64)) * magnitude
        signs = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()
        out.append((values * signs).to(dtype).to(DEVICE))
    return out


def holding(grads):
    """Zero parameters whose gradients are copies of ``grads``."""
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    set_grads(params, grads)
    return params


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def range_case(magnitude, dtype, scope):
    """(gradients of ``magnitude``, their float64 values, a level that clips every piece at ``scope``,
    zero parameters holding the gradients)."""
    grads = range_grads(magnitude, dtype)
    grads64 = [g.double() for g in grads]
    return grads, grads64, level_for(magnitude, grads64, scope), holding(grads)


def pieces(grads64, scope):
    """The scope pieces as (tensor index, row or None) keys, each with its float64 norm."""
    keys = []
    if scope == "global":
        total = math.sqrt(sum(float(g.square().sum()) for g in grads64))
        return [((None, None), total)]
    for i, g in enumerate(grads64):
        if scope == "unit" and g.dim() >= 2:
            keys += [((i, u), float(torch.linalg.vector_norm(g[u]))) for u in range(g.shape[0])]
        else:
            keys.append(((i, None), float(torch.linalg.vector_norm(g))))
    return keys


def expected_clipped(grads64, scope, level):
    """g * min(1, L / N) per scope piece, in float64."""
    out = [g.clone() for g in grads64]
    for (i, u), norm in pieces(grads64, scope):
        scale = level / norm if norm > level else 1.0
        targets = range(len(out)) if i is None else [i]
        for j in targets:
            if u is None:
                out[j] *= scale
            else:
                out[j][u] *= scale
    return out


def level_for(magnitude, grads64, scope):
    """A level that clips every piece: 0.01 for huge gradients (scales far below float32's normal
    range with a norm beyond it), half the smallest piece's norm for tiny ones."""
    if magnitude >= 1.0:
        return 0.01
    return min(norm for _, norm in pieces(grads64, scope)) / 2


def float32_norm(norm):
    """What a float32 statistic holds for the float64 norm: +inf beyond float32's range."""
    return torch.tensor(norm, dtype=torch.float64).float()


def cases():
    return list(_cases())


def _cases():
    for magnitude in MAGNITUDES:
        for dtype in (torch.float32, torch.bfloat16):
            if dtype == torch.bfloat16 and magnitude < 1e-30:
                continue  # clipped values would be bfloat16 subnormals: 1 to 7 bits (and Triton's interpreter
                # converts float32 subnormals to bfloat16 wrongly)
            yield pytest.param(magnitude, dtype, id=f"{magnitude:g}-{str(dtype)[6:]}")


def assert_clipped(result, grads64, scope, level, dtype):
    """``result`` (float64 tensors) is the gradient clipped per scope piece, and each clipped piece's norm is L."""
    tol = TOLERANCE[dtype]
    for got, want in zip(result, expected_clipped(grads64, scope, level)):
        torch.testing.assert_close(got, want, **tol)
    for (i, u), norm in pieces(result, scope):
        assert norm == pytest.approx(level, rel=tol["rtol"]), (i, u)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude,dtype", cases())
def test_step_clips_to_the_level(backend, scope, magnitude, dtype):
    _, grads64, level, params = range_case(magnitude, dtype, scope)
    opt = ClippedSGD(params, lr=1.0, clipping_type=SCOPES[scope], clipping_level=level, backend=backend)
    opt.step()
    assert_clipped([-p.detach().double() for p in params], grads64, scope, level, dtype)
    stats = opt.statistics()[0]
    total = pieces(grads64, "global")[0][1]
    torch.testing.assert_close(stats["norm"].cpu(), float32_norm(total), rtol=1e-5, atol=2.0**-149)
    assert stats["clipped_fraction"].item() == 1.0
    assert stats["skipped_steps"].item() == 0


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude,dtype", [c for c in cases() if c.values[1] == torch.float32])
def test_clip_gradients_clips_to_the_level(backend, scope, magnitude, dtype):
    _, grads64, level, params = range_case(magnitude, dtype, scope)
    total, per_tensor = clip_gradients_(params, SCOPES[scope], level, backend=backend)
    assert_clipped([p.grad.double() for p in params], grads64, scope, level, dtype)
    norms64 = [float(torch.linalg.vector_norm(g)) for g in grads64]
    torch.testing.assert_close(per_tensor.cpu(), torch.stack([float32_norm(n) for n in norms64]), rtol=1e-5,
                               atol=2.0**-149)
    torch.testing.assert_close(total.cpu(), float32_norm(pieces(grads64, "global")[0][1]), rtol=1e-5, atol=2.0**-149)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_below_float32_normal_range_from_a_finite_norm(backend, scope):
    """Norms within float32's range (about 1e38) clipped to a small level: the scale L / N (about 1e-44)
    is below float32's normal range, so it is taken in float64 and applied as two float32 factors,
    never as a float32 subnormal of a few bits (docs/spec.md section 1)."""
    _, grads64, _, params = range_case(1e37, torch.float32, scope)
    assert all(norm < FLOAT32_MAX for _, norm in pieces(grads64, "global"))
    level = 1e-6
    opt = ClippedSGD(params, lr=1.0, clipping_type=SCOPES[scope], clipping_level=level, backend=backend)
    opt.step()
    assert_clipped([-p.detach().double() for p in params], grads64, scope, level, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [m for m in MAGNITUDES if m < FLOAT32_MAX / 1e3])
def test_two_stages_clip_to_the_level(backend, magnitude):
    """get_grad_norms then clip_grads_with_norms_, where the norms fit in float32."""
    grads, grads64, level, params = range_case(magnitude, torch.float32, "layer")
    norms = get_grad_norms(params, backend=backend)
    for scope in ("layer", "global"):
        set_grads(params, grads)
        clip_grads_with_norms_(params, norms, SCOPES[scope], level, backend=backend)
        assert_clipped([p.grad.double() for p in params], grads64, scope, level, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [1e-25, 3e38])
def test_update_direction_clips_to_the_level(backend, magnitude):
    """clip_point="update" takes the norms of the update direction (here, without momentum or weight
    decay, the gradient itself) through its own branch of the norm pass."""
    _, grads64, level, params = range_case(magnitude, torch.float32, "global")
    opt = ClippedSGD(params, lr=1.0, clipping_type="norm", clipping_level=level, clip_point="update", backend=backend)
    opt.step()
    assert_clipped([-p.detach().double() for p in params], grads64, "global", level, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_norms_between_the_stages(backend):
    """Every backend writes float64 norms into a float64 norms tensor (finite past float32's range) and
    clips with float64 norms given (docs/spec.md section 7, item 3: what the functional API needs)."""
    from torch_clip_fused.functional import _config, _run

    grads, grads64, _, params = range_case(3e38, torch.float32, "layer")
    norms = torch.empty(len(params) + 1, dtype=torch.float64, device=DEVICE)
    _run(params, _config("no_clip", None, 0.85, 0.75, None), {}, None, backend, "norms", norms)
    want = [float(torch.linalg.vector_norm(g)) for g in grads64] + [pieces(grads64, "global")[0][1]]
    torch.testing.assert_close(norms.cpu(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    for scope in ("layer", "global"):
        set_grads(params, grads)
        _run(params, _config(SCOPES[scope], 0.01, 0.85, 0.75, None), {}, 0, backend, "clip", norms.clone())
        assert_clipped([p.grad.double() for p in params], grads64, scope, 0.01, torch.float32)


@pytest.mark.xfail(strict=True, reason="docs/spec.md section 7, item 3: get_grad_norms / clip_grads_with_norms_ carry "
                                      "float32 norms, +inf past float32's range (torch_clip_fused/functional.py)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_stages_clip_norms_past_float32(backend):
    _, grads64, _, params = range_case(3e38, torch.float32, "layer")
    norms = get_grad_norms(params, backend=backend)
    clip_grads_with_norms_(params, norms, "layer_wise", 0.01, backend=backend)
    assert_clipped([p.grad.double() for p in params], grads64, "layer", 0.01, torch.float32)


#: (method, magnitudes of its steps): an exploding gradient in the warm-up (first step) and after it
#: (AutoClip's first step takes the step's own norm as the threshold: nothing to clip by design)
EXPLODING = [("zclip", (3e38,)), ("zclip", (1.0, 3e38)), ("adagc", (3e38,)), ("adagc", (1.0, 3e38)),
             (ClipMethod("global", "auto", "none"), (1.0, 3e38)), ("agc", (3e38,))]


@pytest.mark.parametrize("method,magnitudes", EXPLODING, ids=lambda x: getattr(x, "name", str(x)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_stateful_and_relative_thresholds_never_zero_an_exploding_gradient(backend, method, magnitudes):
    """Steps of ``magnitudes``; the last one's norm is beyond float32: it is clipped (every element
    moves, finitely, far less than the gradient) and not skipped."""
    params = [torch.ones(s, device=DEVICE, requires_grad=True) for s in SHAPES]
    opt = ClippedSGD(params, lr=1.0, clipping_type=method, clipping_level=1.0, backend=backend, zclip_warmup=1,
                     adagc_warmup=1)
    for k, magnitude in enumerate(magnitudes):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, range_grads(magnitude, torch.float32, seed=k)):
            p.grad = g
        opt.step()
    moves = torch.cat([(p.detach() - b).double().flatten() for p, b in zip(params, before)])
    assert torch.isfinite(moves).all() and (moves != 0).all()
    assert float(torch.linalg.vector_norm(moves)) < 1e6
    assert opt.statistics()[0]["skipped_steps"].item() == 0
