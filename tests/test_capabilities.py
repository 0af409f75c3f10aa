"""Backends as data (issue 19 item 5; torch_clip_fused/backends/capabilities.py): what each backend
takes is a record the optimizers read, so a step function given as ``backend`` is taken on what it
declares (nothing about memory layout), never recognised by its name."""

import pytest
import torch

from torch_clip_fused import ClippedSGD
from torch_clip_fused.backends import select_backend
from torch_clip_fused.backends.reference import reference_step


def test_each_backend_declares_what_its_kernels_take():
    cpu = torch.device("cpu")
    reference, cpp = select_backend("reference", cpu), select_backend("cpp", cpu)
    assert (reference.name, reference.walks_memory) == ("reference", False)
    assert (cpp.name, cpp.walks_memory, "cpu" in cpp.devices) == ("cpp", True, True)
    assert torch.float64 in cpp.kernel_dtypes
    pytest.importorskip("triton")
    triton = select_backend("triton", cpu)  # CPU tensors under the test suite's TRITON_INTERPRET=1
    assert triton.walks_memory and torch.float64 not in triton.kernel_dtypes  # float64 groups: the reference
    assert select_backend("auto", cpu) is cpp


def strided_parameter():
    p = torch.nn.Parameter(torch.randn(6, 8)[:, ::2])  # not dense in memory
    p.grad = torch.randn(6, 4)
    return p


def test_a_step_function_named_like_a_fused_one_is_taken_on_what_it_declares():
    """A user's step function called ``cpp_step`` walks no memory itself (it is the reference here):
    a strided parameter is fine, where the C++ backend refuses it with a clear error."""
    calls = []

    def cpp_step(t, cfg):
        calls.append(1)
        reference_step(t, cfg)

    p = strided_parameter()
    ClippedSGD([p], lr=0.1, backend=cpp_step).step()
    assert calls == [1]
    with pytest.raises(RuntimeError, match=r"backend='cpp': parameter 0 of param group 0 .* is not dense in memory"):
        ClippedSGD([strided_parameter()], lr=0.1, backend="cpp").step()
