"""Packaging.  By default nothing is compiled here (the C++ extension is JIT-built on first use).

``TORCH_CLIP_FUSED_BUILD_CPP=1`` compiles the C++ extension now, into the package as
``torch_clip_fused._C_cpu`` (as DeepSpeed's ``DS_BUILD_OPS``), against the torch already installed:
pip must then see that torch (``pip install --no-build-isolation ...``).  The flags are the JIT
build's (torch_clip_fused/backends/cpp/build_config.py, for this machine's CPU), and a build record
beside the module (``<module file>.json``) lets the package use it only under the torch, Python, CPU
flags and sources it was built for (otherwise it says so and JIT-builds on first use).
"""

import json
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _build_config():
    """torch_clip_fused/backends/cpp/build_config.py, loaded by its path (standard library only: the
    package itself, which imports torch, is not imported here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tcf_build_config",
                                                  ROOT / "torch_clip_fused" / "backends" / "cpp" / "build_config.py")
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    return config


def _build_cpp_requested(config) -> bool:
    value = os.environ.get(config.BUILD_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"Invalid {config.BUILD_ENV} value: {value!r}; expected 1 (compile the C++ "
                         "extension now) or 0 / unset (compile it on first use)")
    return value == "1"


def _cpp_extension(config):
    """``(ext_modules, cmdclass)`` that compile csrc/ into torch_clip_fused._C_cpu with the JIT build's
    flags, and write its build record."""
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as err:
        raise SystemExit(f"{config.BUILD_ENV}=1 compiles the C++ extension against the installed torch, "
                         f"which this build cannot import ({err}): install torch first, then run pip with "
                         "--no-build-isolation") from err
    ident = config.identity(torch, ROOT / "csrc")
    # -g0: no debug information (Python's own CFLAGS ask for it: an 18 MB module instead of 0.5 MB, and a
    # slower build); the code is the JIT build's
    extension = CppExtension(config.PREBUILT_MODULE, sources=[f"csrc/{name}" for name in config.SOURCES],
                             include_dirs=[str(ROOT / "csrc")], extra_compile_args=list(ident["cflags"]) + ["-g0"],
                             extra_link_args=list(ident["ldflags"]))

    class BuildWithRecord(BuildExtension):
        def run(self):
            super().run()
            for ext in self.extensions:  # beside the module in build/ (a wheel) and, --inplace or -e, in the tree
                built = os.path.join(self.build_lib, self.get_ext_filename(self.get_ext_fullname(ext.name)))
                for path in {built, self.get_ext_fullpath(ext.name)}:
                    Path(f"{path}.json").write_text(json.dumps(ident, indent=1) + "\n")

    return [extension], {"build_ext": BuildWithRecord}


_config = _build_config()
ext_modules, cmdclass = _cpp_extension(_config) if _build_cpp_requested(_config) else ([], {})

setup(
    name="torch_clip_fused",
    version="0.1.0",
    description="Clipped SGD for heavy-tailed gradients: fused Triton (GPU) and C++ (CPU) kernels, "
    "with a pure-PyTorch reference",
    packages=[
        "torch_clip_fused",
        "torch_clip_fused.backends",
        "torch_clip_fused.backends.cpp",
        "torch_clip_fused.backends.reference",
        "torch_clip_fused.backends.triton",
        "torch_clip_fused.distributed",
        "torch_clip_fused.experiments",
        "torch_clip_fused.integrations",
        "torch_clip_fused.kernels",
        "torch_clip_fused.optim",
        "torch_clip_fused.skips",
        "torch_clip_fused.thresholds",
        "torch_clip_fused.csrc",
    ],
    package_dir={"torch_clip_fused.kernels": "kernels", "torch_clip_fused.csrc": "csrc"},
    package_data={"torch_clip_fused.csrc": ["*.cpp", "*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    # torch >= 2.11: the oldest torch the code has run on (the GPU machine's 2.11; CI pins 2.13)
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "triton": ["triton"],
        "cpp": ["ninja"],
        "experiments": ["matplotlib", "tqdm", "scikit-learn"],
        "dev": ["pytest", "ninja", "matplotlib", "tqdm", "scikit-learn", "torch-clip==0.0.6", "zclip==1.0.0",
                "pytorch-optimizer==4.1.0"],
    },
)
