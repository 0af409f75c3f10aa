"""The C++ backend: a lazy ninja build of csrc/ (build.py) and the CPU step functions (loader.py)."""

from .build import load_extension, loaded_extension
from .loader import cpp_clip, cpp_step

__all__ = ["cpp_clip", "cpp_step", "load_extension", "loaded_extension"]
