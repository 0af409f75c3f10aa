"""What the C++ extension's binary depends on: its sources, its compiler flags, and the torch and
Python it is built for.

Shared by the JIT build (build.py) and the ahead-of-time build of ``TORCH_CLIP_FUSED_BUILD_CPP=1``
(setup.py, which loads this file by its path without importing torch_clip_fused), so that both
compile alike and record the same identity.  Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from pathlib import Path

#: the environment variable that makes setup.py compile the extension into the package
BUILD_ENV = "TORCH_CLIP_FUSED_BUILD_CPP"
#: the module that the ahead-of-time build produces
PREBUILT_MODULE = "torch_clip_fused._C_cpu"
SOURCES = ("clipped_sgd.cpp", "grad_pointers.cpp")
BASE_CFLAGS = ("-O3", "-fopenmp", "-DNDEBUG")
LDFLAGS = ("-fopenmp",)


def vector_flags() -> tuple[str, list]:
    """This machine's vector unit: the build happens on the machine that runs it."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    if " avx2" in cpuinfo and " fma" in cpuinfo:
        return "avx2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return "default", []


def python_tag() -> str:
    return sys.implementation.cache_tag or f"py{sys.version_info[0]}{sys.version_info[1]}"


def source_hash(csrc: Path) -> str:
    """SHA-256 of the C++ sources and headers (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(csrc).iterdir() if p.suffix in (".cpp", ".h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def identity(torch, csrc: Path) -> dict:
    """Everything that changes the binary (JSON-serializable): a build made for another identity is
    never loaded."""
    tag, flags = vector_flags()
    return {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", ""),
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "python": python_tag(),
        "platform": sysconfig.get_platform(),
        "cpu": tag,
        "cflags": list(BASE_CFLAGS) + flags,
        "ldflags": list(LDFLAGS),
        "sources": source_hash(csrc),
    }


def folder_name(ident: dict) -> str:
    """The build folder's name: readable (CPU tag, torch, Python) and unique (a hash of all of it)."""
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    name = f"torch_clip_fused_cpu_{ident['cpu']}-torch{ident['torch']}-{ident['python']}-{key}"
    return "".join(c if c.isalnum() or c in "._+-" else "_" for c in name)


def module_name(ident: dict) -> str:
    """The JIT-built module's name (the same in every folder: one is loaded per process)."""
    return f"torch_clip_fused_cpu_{ident['cpu']}"
