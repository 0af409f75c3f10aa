"""Triton kernels of torch_clip_fused (installed as torch_clip_fused.kernels), one file per stage:
``clip_norms`` (norms, then the scale stage of ``clip_scales`` in its last program), ``clip_apply``
(scales, update and the finish), ``sgd_math`` (shared element-wise pieces), ``adamw_math`` (the
AdamW epilogue) and ``columns`` (the plan's table columns).  The plan and the launches are in
``torch_clip_fused.backends.triton``.
"""
