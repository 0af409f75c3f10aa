"""``make demo`` (torch_clip_fused.experiments.demo) on tiny runs: it compares the comparison CLI's default
optimizers (so the two cannot drift apart), prints every task's table and runs the transformer's short mode."""

import json

from torch_clip_fused.experiments import compare, demo, lm
from torch_clip_fused.methods import CLIPPING_TYPES


def test_demo_runs_the_default_optimizers_and_prints_the_tables(tmp_path, monkeypatch, capsys):
    calls = []
    real_compare = demo.compare
    monkeypatch.setattr(demo, "compare", lambda argv: calls.append(list(argv)) or real_compare(argv))
    monkeypatch.setattr(demo, "RUNS", [("digits", 2, 8), ("heavy_tail_regression", 2, 4)])
    monkeypatch.setattr(demo, "LM_ARGS", ["--quick", "--steps", "2", "--pilot-steps", "2", "--noise-samples", "20",
                                          "--width", "16", "--layers", "1", "--context", "16", "--batch-size", "4"])
    demo.main(str(tmp_path))
    assert [argv[argv.index("--task") + 1] for argv in calls] == ["digits", "heavy_tail_regression"]
    assert all("--optimizers" not in argv for argv in calls), calls  # compare's default is the demo's list
    assert compare.DEFAULT_OPTIMIZERS == ["all"]
    out = capsys.readouterr().out
    assert "# digits: 2 steps" in out and "# heavy_tail_regression: 2 steps" in out and "demo finished" in out
    assert "# Byte-level transformer on `pydoc_data.topics`: 2 steps, 1 seeds" in out
    lm_results = json.loads((tmp_path / "lm" / "results.json").read_text())
    assert lm_results["quick"] and [o["name"] for o in lm_results["optimizers"]] == lm.SPEC_NAMES
    for task in ("digits", "heavy_tail_regression"):
        summary = json.loads((tmp_path / task / "results.json").read_text())
        names = [o["name"] for o in summary["optimizers"]]
        assert names == ["SGD", "Adam"] + [t for t in CLIPPING_TYPES if t != "no_clip"] + compare.ALL_EXTRAS
        assert {o["class"] for o in summary["optimizers"]} == {"SGD", "Adam", "ClippedSGD", "ClippedAdamW"}
