"""The C++ CPU backend against the reference: every method, three dtypes, SGD variants, odd and
empty tensors and tensors spanning several chunks; masks bit-identical; build errors clear."""

import warnings

import pytest
import torch

from torch_clip_fused import ClippedSGD
from torch_clip_fused.backends import dispatch as backends
from torch_clip_fused.backends.cpp import build as cpp_build
from torch_clip_fused.backends.cpp import loader as cpp_backend
from torch_clip_fused.backends.reference.philox import philox_key, philox_uniform
from backend_checks import (METHODS, SGD, assert_channels_last_same_as_reference, assert_non_dense_is_a_clear_error,
                            assert_same_as_reference, coordinate_mask)
from conftest import make_params

SHAPES = ((7, 5), (0,), (5,), (3, 7001), (1,), (40_000,))  # 40,000 > one 16,384-element chunk
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS, ids=str)
def test_every_method_and_dtype_equals_reference(method, dtype):
    assert_same_as_reference("cpp", method, dtype, SHAPES, **SGD[0])


@pytest.mark.parametrize("sgd", SGD[1:], ids=str)
@pytest.mark.parametrize("method", ["norm", "coordinate_wise", "layer_wise", "quadratic_rand_autoclip"])
def test_sgd_variants_equal_reference(method, sgd):
    assert_same_as_reference("cpp", method, torch.float32, SHAPES, **sgd)


@pytest.mark.parametrize("method", ["layer_wise", "coordinate_wise", "auto_clip"])
def test_clip_point_update_equals_reference(method):
    assert_same_as_reference("cpp", method, torch.float32, SHAPES, clip_point="update", momentum=0.9)


@pytest.mark.parametrize("randomization", ["none", "linear", "quadratic"])
def test_coordinate_masks_are_bit_identical(randomization):
    ref = coordinate_mask("reference", SHAPES, randomization=randomization)
    assert ref.any() and not ref.all()
    assert torch.equal(coordinate_mask("cpp", SHAPES, randomization=randomization), ref)


def test_philox_equals_reference():
    ext = cpp_backend.load_extension()
    for seed, step, index in [(0, 0, 0), (7, 3, 12345), (2**32 - 1, 2**31 - 1, 2**40 + 3)]:
        key = philox_key(seed, step)
        expected = philox_uniform(torch.tensor(key), torch.tensor([index])).item()
        assert ext.philox_uniform(key, index) == expected


def test_deterministic_across_thread_counts():
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            params = make_params(shapes=SHAPES)
            ClippedSGD(params, lr=0.1, momentum=0.9, clipping_type="auto_clip", backend="cpp").step()
            results.append(torch.cat([p.detach().flatten() for p in params]))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])


def test_auto_picks_cpp_on_cpu():
    assert backends.select_step("auto", torch.device("cpu")) is cpp_backend.cpp_step


def test_failed_build_is_a_clear_error_and_auto_falls_back_once(monkeypatch):
    monkeypatch.setattr(cpp_build, "_module", None)
    monkeypatch.setattr(cpp_build, "_error", cpp_build.CppBuildError("ninja not found", "`pip install ninja`"))
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.raises(RuntimeError, match=r"could not be built: ninja not found; to build it: `pip install ninja`"):
        ClippedSGD(make_params(), lr=0.1, backend="cpp").step()
    opt = ClippedSGD(make_params(), lr=0.1, backend="auto")
    with pytest.warns(RuntimeWarning, match=r"C\+\+ CPU backend is unavailable: ninja not found; using the reference"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # warned once only


def test_channels_last_parameters_equal_reference():
    assert_channels_last_same_as_reference("cpp")


def test_non_dense_parameter_is_a_clear_error():
    assert_non_dense_is_a_clear_error("cpp")
