"""The comparison CLI writes valid outputs on a tiny run, and bad arguments are usage errors."""

import json
import struct
import subprocess
import sys

import pytest

from torch_clip_fused.experiments.compare import main
from torch_clip_fused.experiments.tail_index import hill_estimator


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("task", ["digits", "heavy_tail_regression"])
def test_tiny_run_writes_valid_outputs(tmp_path, task):
    main(["--task", task, "--optimizers", "sgd", "norm", "sstm:coordinate_wise", "--steps", "12",
          "--batch-size", "8", "--out", str(tmp_path)])
    for name in ("curves.png", "grad_norms.png"):
        width, height = _png_size(tmp_path / name)
        assert width > 100 and height > 100
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [o["name"] for o in summary["optimizers"]] == ["SGD", "norm", "sstm:coordinate_wise"]
    assert all(o["ms_per_step"] > 0 for o in summary["optimizers"])
    table = (tmp_path / "results.md").read_text()
    assert "| norm |" in table and "Hill tail index" in table


def test_config_file(tmp_path):
    config = tmp_path / "opts.json"
    config.write_text(json.dumps([{"name": "mine", "class": "ClippedSGD",
                                   "kwargs": {"lr": 0.05, "clipping_type": "auto_clip", "seed": 1}}]))
    summary = main(["--task", "digits", "--optimizers", str(config), "--steps", "5", "--out", str(tmp_path / "o")])
    assert summary["optimizers"][0]["name"] == "mine"


BAD = [
    (["--task", "mnist", "--optimizers", "sgd", "--steps", "5", "--out", "x"], r"invalid choice: 'mnist'"),
    (["--task", "digits", "--optimizers", "sgdd", "--steps", "5", "--out", "x"], r"unknown optimizer 'sgdd'"),
    (["--task", "digits", "--optimizers", "sgd", "--steps", "0", "--out", "x"], r"expected a positive integer, got 0"),
    (["--task", "digits", "--optimizers", "missing.json", "--steps", "5", "--out", "x"], r"cannot read optimizer config"),
    (["--task", "digits", "--steps", "5", "--out", "x"], r"the following arguments are required: --optimizers"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_arguments_are_usage_errors(argv, message):
    proc = subprocess.run([sys.executable, "-m", "torch_clip_fused.experiments.compare", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr
    assert __import__("re").search(message, proc.stderr), proc.stderr


def test_hill_estimator_recovers_a_pareto_tail():
    import numpy as np

    rng = np.random.default_rng(0)
    sample = rng.pareto(1.5, 200_000) + 1.0  # P(X > x) = x^-1.5
    assert hill_estimator(sample, 0.05) == pytest.approx(1.5, rel=0.05)
    assert hill_estimator(np.abs(rng.normal(size=200_000)), 0.05) > 3.0
