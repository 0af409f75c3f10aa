"""Checks of the harness itself: the vendored torch tests can run, and each OptimizerInfo entry of
clipped_optim_db.py gives the clipped optimizer exactly the configurations torch gives SGD / AdamW."""

import importlib.util

import pytest
import torch


def test_torch_testing_internals_are_importable():
    """torch.testing._internal needs expecttest; without it test_optim.py is not collected at all
    (conftest.py), which this skip makes visible."""
    if importlib.util.find_spec("expecttest") is None:
        pytest.skip("expecttest is not installed (requirements-dev.txt): tests/torch_optim/test_optim.py, "
                    "PyTorch's generic optimizer tests, was not collected")


@pytest.fixture(scope="module")
def dbs():
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_optimizers import optim_db as torch_db

    from torch_optim.clipped_optim_db import optim_db

    return optim_db, {info.optim_cls: info for info in torch_db}


def test_one_entry_per_optimizer_clipping_and_backend(dbs):
    optim_db, _ = dbs
    assert sorted(info.name for info in optim_db) == sorted(
        f"{opt}_{clipping}_{backend}" for opt in ("ClippedSGD", "ClippedAdamW")
        for clipping in ("noclip", "norm1e30") for backend in ("auto", "reference"))


def test_entries_use_torchs_inputs_and_a_never_binding_clipping(dbs):
    """Each entry's inputs are torch's for SGD / AdamW (same descriptions and kwargs), and its class
    only adds the clipping and the backend as defaults."""
    optim_db, torch_db = dbs
    from torch_clip_fused import ClippedAdamW, ClippedSGD

    for info in optim_db:
        base = ClippedSGD if issubclass(info.optim_cls, ClippedSGD) else ClippedAdamW
        torch_info = torch_db[torch.optim.SGD if base is ClippedSGD else torch.optim.AdamW]
        for dtype in (torch.float32, torch.float64):
            ours = info.optim_inputs_func(device="cpu", dtype=dtype)
            theirs = torch_info.optim_inputs_func(device="cpu", dtype=dtype)
            assert [i.desc for i in ours] == [i.desc for i in theirs]
            for a, b in zip(ours, theirs):
                assert a.kwargs.keys() == b.kwargs.keys()
                for key in a.kwargs:
                    value = a.kwargs[key]
                    assert (torch.equal(value, b.kwargs[key]) if isinstance(value, torch.Tensor)
                            else value == b.kwargs[key]), (info.name, a.desc, key)
        p = torch.nn.Parameter(torch.ones(3))
        opt = info.optim_cls([p], foreach=False)  # torch's "forloop" switch is dropped
        group = opt.param_groups[0]
        assert type(opt).__mro__[1] is base and group["foreach"] is None
        assert opt.backend == info.name.rsplit("_", 1)[1]
        clipping = info.name.split("_")[1]
        expected = {"noclip": ("no_clip", None), "norm1e30": ("norm", 1e30)}[clipping]
        assert (group["clipping_type"], group["clipping_level"]) == expected
