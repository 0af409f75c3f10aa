"""Triton kernels of torch_clip_fused (installed as torch_clip_fused.kernels)."""
