"""Building and loading the C++ extension (csrc/): a lazy JIT build with ninja on first use.

The extension is built on first use with ``torch.utils.cpp_extension.load`` (one line is
printed while it builds; later runs reuse the cached build in ``TORCH_EXTENSIONS_DIR``).
A failed build is remembered and re-raised with its reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

_SOURCES = ("clipped_sgd.cpp", "grad_pointers.cpp")
_module = None
_error = None


def _csrc_dir() -> Path:
    spec = importlib.util.find_spec("torch_clip_fused.csrc")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the C++ sources (torch_clip_fused.csrc) are not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _vector_flags():
    """Build for this machine's vector unit (the build happens on the machine that runs it)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    if " avx2" in cpuinfo and " fma" in cpuinfo:
        return "avx2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return "default", []


def load_extension():
    """The compiled module; builds it on first call, raises RuntimeError with the reason if it cannot."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise RuntimeError(f"the C++ backend could not be built: {_error}")
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
        csrc = _csrc_dir()
        tag, flags = _vector_flags()
        name = f"torch_clip_fused_cpu_{tag}"
        build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions")) / name
        build_dir.mkdir(parents=True, exist_ok=True)
        if not (build_dir / f"{name}.so").exists():
            print("torch_clip_fused: building the C++ extension (once, about a minute)...", file=sys.stderr, flush=True)
        _module = load(
            name=name,
            sources=[str(csrc / s) for s in _SOURCES],
            extra_include_paths=[str(csrc)],
            extra_cflags=["-O3", "-fopenmp", "-DNDEBUG"] + flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as err:  # kept, re-raised with its reason on every later use
        _error = f"{type(err).__name__}: {err}"
        raise RuntimeError(f"the C++ backend could not be built: {_error}") from err
    return _module


def loaded_extension():
    """The module if it is already built and loaded, else None (never starts a build)."""
    return _module
