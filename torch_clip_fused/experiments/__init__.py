"""Research tools around the optimizers: comparisons (``python -m torch_clip_fused.experiments.compare``),
the demo, benchmark tasks, plots, restarts, collectors and tail-index estimates.

They need the ``experiments`` extra (``pip install torch_clip_fused[experiments]``: matplotlib, tqdm,
scikit-learn); ``import torch_clip_fused`` never imports them.
"""
