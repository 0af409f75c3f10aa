"""The comparison CLI writes valid outputs on a tiny run, and bad arguments are usage errors."""

import json
import re
import struct
import subprocess
import sys
import types

import pytest
import torch

from torch_clip_fused import ClipMethod, ClippedSGD, ClippedSSTM
from torch_clip_fused.experiments.collector import OptimizerProperties
from torch_clip_fused.experiments import compare
from torch_clip_fused.experiments.compare import main, resolve_optimizers, train_all, write_results
from torch_clip_fused.experiments.tail_index import hill_estimator
from torch_clip_fused.experiments.tasks import TASKS
from torch_clip_fused.methods import CLIPPING_TYPES

EVERY_CLIPPING_TYPE = [t for t in CLIPPING_TYPES if t != "no_clip"]  # no_clip equals SGD step for step


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
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_arguments_are_usage_errors(argv, message):
    proc = subprocess.run([sys.executable, "-m", "torch_clip_fused.experiments.compare", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr
    assert re.search(message, proc.stderr), proc.stderr


def test_optimizers_default_to_sgd_adam_and_every_clipping_type(tmp_path):
    # what `make demo` runs; no_clip is left out (it equals SGD step for step); then ZClip, AGC and ClippedAdamW
    summary = main(["--task", "heavy_tail_regression", "--steps", "2", "--batch-size", "4", "--out", str(tmp_path)])
    extras = ["zclip", "agc", "adamw:no_clip", "adamw:norm", "adamw:zclip"]
    assert [o["name"] for o in summary["optimizers"]] == ["SGD", "Adam"] + EVERY_CLIPPING_TYPE + extras
    classes = {o["name"]: o["class"] for o in summary["optimizers"]}
    assert classes["adamw:zclip"] == "ClippedAdamW" and classes["zclip"] == "ClippedSGD"


def test_help_documents_the_default_optimizers():
    proc = subprocess.run([sys.executable, "-m", "torch_clip_fused.experiments.compare", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    help_text = " ".join(proc.stdout.split())
    assert "default: all" in help_text, proc.stdout


TRIPLE = {"scope": "layer", "threshold": "auto", "randomization": "quadratic"}


def test_config_accepts_a_clip_method_triple(tmp_path):
    config = tmp_path / "opts.json"
    config.write_text(json.dumps([
        {"name": "layer auto quadratic", "class": "ClippedSGD", "kwargs": {"lr": 0.05, "clipping_type": TRIPLE, "seed": 1}},
        {"name": "sstm coordinate", "class": "ClippedSSTM",
         "kwargs": {"lr": 0.05, "L": 10.0, "clipping_type": {"scope": "coordinate"}, "seed": 1}},
        {"name": "no clip", "class": "ClippedSGD", "kwargs": {"lr": 0.05, "clipping_type": {"scope": None}}},
    ]))
    optimizers = resolve_optimizers([str(config)], TASKS["digits"](0), 0)
    assert [p.optimizer_kwargs["clipping_type"] for _, p in optimizers] == [
        ClipMethod("layer", "auto", "quadratic"), ClipMethod("coordinate"), ClipMethod(None)]
    summary = main(["--task", "digits", "--optimizers", str(config), "--steps", "3", "--out", str(tmp_path / "o")])
    assert [o["name"] for o in summary["optimizers"]] == ["layer auto quadratic", "sstm coordinate", "no clip"]


BAD_TRIPLES = [
    ({"scope": "diagonal"}, r"Invalid clipping scope: 'diagonal'"),
    ({"scope": "coordinate", "threshold": "auto"}, r"threshold 'auto' cannot be combined with scope 'coordinate'"),
    ({"scope": "layer", "treshold": "auto"}, r"unknown key 'treshold'"),
    ({"threshold": "auto"}, r"needs a 'scope'"),
    (["layer", "auto", "none"], r"clipping_type \['layer', 'auto', 'none'\]"),
]


@pytest.mark.parametrize("triple,message", BAD_TRIPLES)
def test_config_bad_clip_method_triple_is_a_usage_error(tmp_path, capsys, triple, message):
    config = tmp_path / "opts.json"
    config.write_text(json.dumps([{"class": "ClippedSGD", "kwargs": {"lr": 0.05, "clipping_type": triple}}]))
    with pytest.raises(SystemExit) as exit_info:
        main(["--task", "digits", "--optimizers", str(config), "--steps", "3", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "usage:" in stderr and "optimizer config entry 0" in stderr, stderr
    assert re.search(message, stderr), stderr


def test_results_json_records_each_optimizers_class_and_kwargs(tmp_path):
    summary = main(["--task", "digits", "--optimizers", "sgd", "adam", "norm", "sstm:layer_wise", "--steps", "2",
                    "--out", str(tmp_path), "--seed", "3"])
    recorded = json.loads((tmp_path / "results.json").read_text())
    assert recorded["optimizers"] == summary["optimizers"]  # JSON values already in the returned summary
    entries = {o["name"]: o for o in recorded["optimizers"]}
    assert entries["SGD"]["class"] == "SGD" and entries["SGD"]["module"] == torch.optim.SGD.__module__
    assert entries["SGD"]["kwargs"] == {"lr": 0.05, "momentum": 0.9}
    assert entries["Adam"]["class"] == "Adam" and entries["Adam"]["kwargs"] == {"lr": 1e-3}
    assert entries["norm"]["class"] == "ClippedSGD" and entries["norm"]["module"] == ClippedSGD.__module__
    assert entries["norm"]["kwargs"] == {"lr": 0.05, "momentum": 0.9, "clipping_type": "norm", "seed": 3}
    assert entries["sstm:layer_wise"]["class"] == "ClippedSSTM"
    assert entries["sstm:layer_wise"]["module"] == ClippedSSTM.__module__
    assert entries["sstm:layer_wise"]["kwargs"]["clipping_type"] == "layer_wise"
    # the entries are a valid config file: the same optimizers again
    config = tmp_path / "again.json"
    config.write_text(json.dumps(recorded["optimizers"]))
    again = main(["--task", "digits", "--optimizers", str(config), "--steps", "2", "--out", str(tmp_path / "again"),
                  "--seed", "3"])
    assert [(o["name"], o["class"], o["kwargs"]) for o in again["optimizers"]] == \
           [(o["name"], o["class"], o["kwargs"]) for o in recorded["optimizers"]]


def test_results_json_records_clip_methods_as_triples_and_tensors_as_floats(tmp_path):
    task = TASKS["heavy_tail_regression"](0)
    optimizers = [("tensor lr", OptimizerProperties(ClippedSGD, lr=torch.tensor(0.25), momentum=0.9,
                                                    clipping_type=ClipMethod("layer", "auto", "quadratic"), seed=0))]
    runs = train_all(task, optimizers, steps=2, batch_size=4, seed=0, eval_every=2)
    write_results(task, runs, tmp_path, steps=2, batch_size=4, seed=0)
    entry = json.loads((tmp_path / "results.json").read_text())["optimizers"][0]
    assert entry["class"] == "ClippedSGD"
    assert entry["kwargs"] == {"lr": 0.25, "momentum": 0.9, "clipping_type": TRIPLE, "seed": 0}


def _spied(cls, tag, events, instances):
    """A factory for ``cls`` whose optimizers log (tag, instance number) to ``events`` on every step."""

    def make(params, **kwargs):
        opt = cls(params, **kwargs)
        number = len(instances)
        instances.append(opt)
        step = opt.step
        opt.step = lambda *args, **kw: events.append((tag, number)) or step(*args, **kw)
        return opt

    return make


def test_optimizers_are_warmed_up_and_the_extension_loaded_before_any_timed_step(monkeypatch):
    """Nothing one-off (the C++ build, a first step) lands in the timed steps: no timing is measured here,
    only the order of events (the clock is a counter)."""
    from torch_clip_fused.backends.cpp import build as loader, load_extension

    events, instances = [], []
    built = load_extension()
    monkeypatch.setattr(loader, "_module", None)  # as in a fresh process: the first fused step loads the extension
    monkeypatch.setattr(loader, "_jit_build", lambda: events.append("load extension") or built)
    ticks = iter(range(10**9))
    # the comparison's own clock only (the extension's build may time itself too)
    clock = types.SimpleNamespace(perf_counter=lambda: events.append("clock") or float(next(ticks)))
    monkeypatch.setattr(compare, "time", clock)
    tags = ["SGD", "Adam", "norm", "sstm:auto_clip"]
    classes = [torch.optim.SGD, torch.optim.Adam, ClippedSGD, ClippedSSTM]
    kwargs = [dict(lr=0.01, momentum=0.9), dict(lr=0.01), dict(lr=0.01, clipping_type="norm", seed=0),
              dict(lr=0.01, L=10.0, clipping_type="auto_clip", seed=0)]
    optimizers = [(tag, OptimizerProperties(_spied(cls, tag, events, instances), **kw))
                  for tag, cls, kw in zip(tags, classes, kwargs)]
    steps = 3
    runs = train_all(TASKS["heavy_tail_regression"](0), optimizers, steps=steps, batch_size=4, seed=0, eval_every=3)
    assert [r["name"] for r in runs] == tags
    first_clock = events.index("clock")
    assert "load extension" in events[:first_clock], events
    warm_up_steps = [e for e in events[:first_clock] if isinstance(e, tuple)]
    timed_steps = [e for e in events[first_clock:] if isinstance(e, tuple)]
    assert sorted(tag for tag, _ in warm_up_steps) == sorted(tags), events
    # the warm-up steps ran on throwaway optimizers: each timed optimizer took exactly `steps` steps
    assert sorted(set(timed_steps)) == sorted(set(zip(tags, range(len(tags))))), events
    assert all(timed_steps.count(e) == steps for e in set(timed_steps)), events
    assert not {n for _, n in warm_up_steps} & {n for _, n in timed_steps}


def test_hill_estimator_recovers_a_pareto_tail():
    import numpy as np

    rng = np.random.default_rng(0)
    sample = rng.pareto(1.5, 200_000) + 1.0  # P(X > x) = x^-1.5
    assert hill_estimator(sample, 0.05) == pytest.approx(1.5, rel=0.05)
    assert hill_estimator(np.abs(rng.normal(size=200_000)), 0.05) > 3.0


def test_the_command_prints_the_results_table(tmp_path):
    """``python -m torch_clip_fused.experiments.compare`` prints the table it writes to results.md, as make demo
    does: a user of the command sees the results without opening a file."""
    proc = subprocess.run([sys.executable, "-m", "torch_clip_fused.experiments.compare", "--task", "heavy_tail_regression",
                           "--optimizers", "sgd", "norm", "--steps", "3", "--batch-size", "4", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "results.md").read_text()
    assert "| SGD |" in table and "| norm |" in table
    assert table.strip() in proc.stdout, proc.stdout


#: Runs a module as ``python -m`` would, with modules of the experiments extra unimportable, as on a machine
#: where they are not installed (None in sys.modules, as tests/test_imports.py does it).
WITHOUT_EXTRAS = """
import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None
sys.argv = [{module!r}, *{argv!r}]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""

EXTRAS = ("matplotlib", "tqdm", "sklearn")


@pytest.mark.parametrize("module,argv,blocked", [
    ("torch_clip_fused.experiments.compare", ["--help"], EXTRAS),
    ("torch_clip_fused.experiments.compare", ["--task", "heavy_tail_regression", "--steps", "2", "--out", "x"], EXTRAS),
    # scikit-learn alone missing: the digits task imports it when it is built
    ("torch_clip_fused.experiments.compare", ["--task", "digits", "--steps", "2", "--out", "x"], ("sklearn",)),
    ("torch_clip_fused.experiments.demo", [], EXTRAS),
])
def test_without_the_extra_the_command_prints_the_install_hint_alone(module, argv, blocked):
    code = WITHOUT_EXTRAS.format(module=module, argv=argv, blocked=blocked)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert 'pip install "torch_clip_fused[experiments]"' in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr  # the hint alone, on one line
    assert proc.stdout == ""


def test_only_a_missing_extra_becomes_the_install_hint():
    from torch_clip_fused.experiments import exit_if_missing_extra

    with pytest.raises(SystemExit) as exit_info:
        exit_if_missing_extra(ModuleNotFoundError("No module named 'sklearn.datasets'", name="sklearn.datasets"), "cmd")
    assert str(exit_info.value.code) == ("cmd needs 'sklearn', which is not installed: "
                                         'pip install "torch_clip_fused[experiments]" (matplotlib, tqdm, scikit-learn)')
    # anything else is a bug to show with its traceback: the caller raises it
    assert exit_if_missing_extra(ImportError("cannot import name 'x' from 'torch_clip_fused'", name="torch_clip_fused"),
                                 "cmd") is None
