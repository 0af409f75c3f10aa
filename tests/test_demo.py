"""``make demo`` (torch_clip_fused.experiments.demo) on tiny runs: it compares the comparison CLI's default
optimizers (so the two cannot drift apart) and prints every task's table."""

import json

from torch_clip_fused.experiments import compare, demo
from torch_clip_fused.methods import CLIPPING_TYPES


def test_demo_runs_the_default_optimizers_and_prints_the_tables(tmp_path, monkeypatch, capsys):
    calls = []
    real_compare = demo.compare
    monkeypatch.setattr(demo, "compare", lambda argv: calls.append(list(argv)) or real_compare(argv))
    monkeypatch.setattr(demo, "RUNS", [("digits", 2, 8), ("heavy_tail_regression", 2, 4)])
    demo.main(str(tmp_path))
    assert [argv[argv.index("--task") + 1] for argv in calls] == ["digits", "heavy_tail_regression"]
    assert all("--optimizers" not in argv for argv in calls), calls  # compare's default is the demo's list
    assert compare.DEFAULT_OPTIMIZERS == ["all"]
    out = capsys.readouterr().out
    assert "# digits: 2 steps" in out and "# heavy_tail_regression: 2 steps" in out and "demo finished" in out
    for task in ("digits", "heavy_tail_regression"):
        summary = json.loads((tmp_path / task / "results.json").read_text())
        names = [o["name"] for o in summary["optimizers"]]
        assert names == ["SGD", "Adam"] + [t for t in CLIPPING_TYPES if t != "no_clip"] + compare.ALL_EXTRAS
        assert {o["class"] for o in summary["optimizers"]} == {"SGD", "Adam", "ClippedSGD", "ClippedAdamW"}
