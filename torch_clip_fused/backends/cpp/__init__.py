"""The C++ backend: a lazy ninja build of csrc/ (CPU kernels and the per-step pointer refresh)."""

from .loader import cpp_clip, cpp_step, load_extension, loaded_extension

__all__ = ["cpp_clip", "cpp_step", "load_extension", "loaded_extension"]
