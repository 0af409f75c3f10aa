"""PyTorch's generic optimizer tests (test_optim.py, vendored) run on ClippedSGD and ClippedAdamW
through the OptimizerInfo entries of clipped_optim_db.py.  See README.md in this folder."""
