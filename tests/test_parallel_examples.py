"""The torchrun examples of tensor, pipeline, expert and FSDP2 x TP parallelism run on CPU with gloo (2 and 4
processes) and check, inside, that every rank clipped with the whole model's norm (computed apart with
torch)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(processes: int, script: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc_per_node={processes}", str(ROOT / "examples" / script), *args],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_pipeline_example_clips_every_stage_with_the_whole_models_norm():
    out = _torchrun(2, "pipeline_train.py", "--steps", "8")
    assert "every stage clipped with the whole model's norm" in out


def test_moe_example_clips_experts_and_dense_layers_with_one_norm():
    out = _torchrun(2, "moe_train.py", "--steps", "5")
    assert "every rank clipped with the whole model's norm" in out


@pytest.mark.parametrize("processes,dp", [(2, "1"), (4, "2")], ids=["tp", "fsdp2_x_tp"])
def test_tensor_parallel_example_clips_with_the_whole_models_norm(processes, dp):
    out = _torchrun(processes, "tp_fsdp2_train.py", "--dp", dp, "--steps", "6")
    assert "every rank clipped with the whole model's norm" in out
