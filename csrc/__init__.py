"""C++ sources of the CPU backend, JIT-built on first use."""
