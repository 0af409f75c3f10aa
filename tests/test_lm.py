"""The byte-level transformer experiment (torch_clip_fused.experiments.lm): its data split, model, noise
statistics and a tiny end-to-end run of the command (a few steps of a width-16 model)."""

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from torch_clip_fused.experiments import lm  # noqa: E402

TINY = ["--width", "16", "--layers", "1", "--heads", "2", "--context", "16", "--batch-size", "4",
        "--steps", "4", "--seeds", "2", "--sweep-steps", "2", "--pilot-steps", "3", "--noise-samples", "20"]


def test_the_corpus_ships_offline_and_splits_at_a_fixed_point():
    data = lm.load_corpus()
    assert len(data) > 400_000 and b"the " in data
    train, val = lm.split_corpus(data)
    assert len(train) + len(val) == len(data) and len(val) == len(data) - int(0.9 * len(data))
    assert bytes(train.to(torch.uint8).tolist()) + bytes(val.to(torch.uint8).tolist()) == data
    again_train, again_val = lm.split_corpus(lm.load_corpus())
    assert torch.equal(train, again_train) and torch.equal(val, again_val)


def test_the_model_is_causal_and_predicts_bytes():
    torch.manual_seed(0)
    model = lm.ByteTransformer(width=16, layers=2, heads=2, context=8)
    x = torch.randint(0, 256, (2, 8))
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 256
    out_x, out_y = model(x), model(y)
    assert out_x.shape == (2, 8, 256)
    assert torch.allclose(out_x[:, :5], out_y[:, :5], atol=1e-6)  # the positions before the change
    assert not torch.allclose(out_x[:, 5:], out_y[:, 5:])
    # at initialisation the loss is near the uniform predictor's ln 256
    assert abs(lm.lm_loss(model, torch.randint(0, 256, (4, 9))).item() - math.log(256)) < 0.1


def test_matched_gaussian_norms_are_those_of_the_explicit_samples():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 50, dtype=torch.float64)
    norms = lm.matched_gaussian_norms(x @ x.T, 4000, torch.Generator().manual_seed(1))
    e = torch.randn(4000, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    explicit = (e @ x / math.sqrt(5)).norm(dim=1)
    assert torch.allclose(norms, explicit)
    # E ||z||^2 = trace of the covariance x^T x / (N - 1)
    assert abs(norms.pow(2).mean().item() / (x.pow(2).sum().item() / 5) - 1) < 0.1


def test_a_diverging_run_is_stopped_and_counted():
    train, val = lm.split_corpus(lm.load_corpus())
    setup = lm.Setup(width=16, layers=1, heads=2, context=16, batch_size=4, eval_windows=4, train=train, val=val)
    sgd = lm.SPECS[lm.SPEC_NAMES.index("SGD")]
    run = lm.train_run(setup, sgd, 1e4, {}, seed=0, steps=30, eval_every=10)
    assert run["diverged_at"] is not None and run["diverged_at"] < 30 and run["final_val_bpb"] == math.inf
    calm = lm.train_run(setup, sgd, 1e-3, {}, seed=0, steps=3, eval_every=10)
    assert calm["diverged_at"] is None and 7 < calm["final_val_bpb"] < 8.1  # about log2(256) = 8 bits


def test_the_command_writes_every_result(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lm, "SGD_LRS", (0.1, 1e4))  # two learning rates per family, one of them diverges
    monkeypatch.setattr(lm, "ADAM_LRS", (1e-3, 1e3))
    out = tmp_path / "lm"
    results = lm.main(TINY + ["--out", str(out)])
    for name in ("results.json", "results.md", "curves.png", "lr_sweep.png", "grad_norms.png", "noise.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert [o["name"] for o in saved["optimizers"]] == lm.SPEC_NAMES
    assert {o["cls"] for o in saved["optimizers"]} == {"SGD", "ClippedSGD", "AdamW", "ClippedAdamW"}
    levels = saved["levels"]
    assert all(levels[k] > 0 for k in ("global", "layer", "coordinate"))
    for entry, opt in zip(saved["sweep"], saved["optimizers"]):
        grid = saved["grids"][entry["family"]]
        assert [p["lr"] for p in entry["points"]] == grid
        assert entry["points"][1]["final_val_bpb"] == math.inf and entry["best_lr"] == grid[0]
        best = min(entry["points"], key=lambda p: (p["final_val_bpb"], p["lr"]))
        assert opt["lr"] == entry["best_lr"] == best["lr"] == saved["lrs"][opt["name"]]
        assert [r["seed"] for r in opt["runs"]] == [1, 2] and all(r["lr"] == opt["lr"] for r in opt["runs"])
        spec = lm.SPECS[lm.SPEC_NAMES.index(opt["name"])]
        if spec.level is not None:  # the clipping level is the pilot's median at the method's scope
            assert opt["kwargs"]["clipping_level"] == pytest.approx(levels[spec.level], rel=1e-5)
        else:
            assert "clipping_level" not in opt["kwargs"]
    assert saved["optimizers"][-1]["kwargs"]["skip_if_zscore_above"] == lm.SKIP_ZSCORE
    # every optimizer of a seed starts from the same point on the same batches: the same first loss
    runs = {o["name"]: o["runs"] for o in saved["optimizers"]}
    assert runs["AdamW"][0]["train_loss"][0] == pytest.approx(runs["ClippedAdamW zclip"][0]["train_loss"][0], rel=1e-4)
    assert [p["step"] for p in saved["noise"]] == [1, 2, 4]  # 10 %, 50 % and 100 % of 4 steps
    for probe in saved["noise"]:
        assert probe["samples"] == 20 and len(probe["noise_norms"]) == 20
        assert probe["gaussian_norm_tail"]["p5"] <= probe["gaussian_norm_tail"]["p95"]
    assert "Gradient noise" in capsys.readouterr().out
    assert "| ClippedAdamW norm+skip |" in (out / "results.md").read_text()
    assert results["lrs"] == saved["lrs"]


def test_quick_mode_uses_the_tuned_learning_rates_without_a_sweep(tmp_path):
    results = lm.main(["--quick", "--steps", "2", "--pilot-steps", "2", "--noise-samples", "20", "--width", "16",
                       "--layers", "1", "--context", "16", "--batch-size", "4", "--optimizers", "SGD",
                       "ClippedAdamW norm", "--out", str(tmp_path)])
    assert results["sweep"] == [] and not (tmp_path / "lr_sweep.png").exists()
    assert results["lrs"] == {"SGD": lm.DEFAULT_LRS["SGD"], "ClippedAdamW norm": lm.DEFAULT_LRS["ClippedAdamW norm"]}
    assert [p["step"] for p in results["noise"]] == [2]


COMMITTED = Path(__file__).resolve().parent.parent / "bench" / "results" / "lm" / "results.json"


@pytest.mark.skipif(not COMMITTED.exists(), reason="no committed full run")
def test_quick_mode_lrs_are_the_committed_full_runs():
    committed = json.loads(COMMITTED.read_text())
    assert committed["lrs"] == lm.DEFAULT_LRS and not committed["quick"]
