"""torch_clip_fused.integrations: finding the clipped optimizer behind framework wrappers, reading
its statistics with one transfer, and the Lightning / Hugging Face Trainer callbacks (real short
runs on CPU when those frameworks are installed, skipped otherwise)."""

import csv
import importlib
import os
import subprocess
import sys
import warnings

# no hub, no telemetry, no progress bars (huggingface_hub reads these at import time)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import torch_clip_fused.optim  # noqa: E402
from torch_clip_fused import ClippedAdamW, ClippedSGD, ClippedSSTM  # noqa: E402
from torch_clip_fused.integrations import (  # noqa: E402
    OuterClippingWarning,
    clip_statistics,
    find_clipped_optimizer,
    flat_statistics,
    statistics_to_floats,
    unwrap_optimizer,
)

LEVEL = 5.0  # ClippedSGD's clipping_level in the framework runs
BIG_STEP = 3  # the framework runs' batch (0-based) with a huge gradient
N_BATCHES = 6


# ----------------------------------------------------------------------------- helpers


class FakeAccelerated:
    """As accelerate's AcceleratedOptimizer: the real optimizer in ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


class FakeLightning:
    """As Lightning's LightningOptimizer: ``._optimizer``, a property, attribute delegation."""

    def __init__(self, optimizer):
        self._optimizer = optimizer

    @property
    def optimizer(self):
        return self._optimizer

    def __getattr__(self, item):
        return getattr(self._optimizer, item)


class SelfLoop:
    """A wrapper whose ``.optimizer`` points back at itself."""

    @property
    def optimizer(self):
        return self


def stepped_sgd(groups=1, **kwargs):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    param_groups = [{"params": [p]} for p in params] if groups == 2 else [{"params": params}]
    opt = ClippedSGD(param_groups, lr=0.1, momentum=0.9, clipping_level=1.0, backend="reference", seed=3, **kwargs)
    for scale in (1.0, 10.0):
        for p in params:
            p.grad = torch.randn_like(p) * scale
        opt.step()
    return opt, params


class CountTransfers:
    """Counts the ways a tensor reaches Python: ``tolist``, ``item``, ``float``, ``int``."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("tolist", "item", "__float__", "__int__"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


# ----------------------------------------------------------------------------- always run


def test_unwrap_finds_the_clipped_optimizer_behind_wrappers():
    opt, _ = stepped_sgd()
    assert unwrap_optimizer(opt) is opt
    assert unwrap_optimizer(FakeAccelerated(opt)) is opt
    assert unwrap_optimizer(FakeLightning(opt)) is opt
    assert unwrap_optimizer(FakeLightning(FakeAccelerated(FakeLightning(opt)))) is opt
    assert find_clipped_optimizer(FakeAccelerated(FakeLightning(opt))) is opt
    sstm = ClippedSSTM([nn.Parameter(torch.ones(3))], lr=0.1, L=1.0, backend="reference", seed=0)
    assert find_clipped_optimizer(FakeAccelerated(sstm)) is sstm
    # an LR scheduler keeps its optimizer in .optimizer too
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    assert find_clipped_optimizer(sched) is opt


def test_unwrap_of_other_optimizers_and_odd_wrappers():
    sgd = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    assert unwrap_optimizer(FakeAccelerated(FakeLightning(sgd))) is sgd
    assert find_clipped_optimizer(FakeAccelerated(sgd)) is None
    loop = SelfLoop()
    assert unwrap_optimizer(loop) is loop
    assert find_clipped_optimizer(None) is None
    with pytest.raises(TypeError, match="behind FakeAccelerated") as error:
        clip_statistics(FakeAccelerated(sgd))
    assert_names_every_clipped_optimizer(str(error.value))


#: every clipped optimizer the package offers: a message that lists the supported optimizers names them all
CLIPPED_OPTIMIZERS = [name for name in torch_clip_fused.optim.__all__ if name.startswith("Clipped")]


def assert_names_every_clipped_optimizer(message):
    missing = [name for name in CLIPPED_OPTIMIZERS if name not in message]
    assert not missing, f"{missing} not named in: {message}"


def test_clipped_adamw_is_found_behind_wrappers():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4))
    opt = ClippedAdamW([p], lr=0.1, clipping_level=1.0, backend="reference", seed=0)
    p.grad = torch.randn(4) * 10
    opt.step()
    assert find_clipped_optimizer(FakeAccelerated(FakeLightning(opt))) is opt
    assert clip_statistics(FakeAccelerated(opt))[0]["step"].item() == 1


def test_the_callbacks_name_every_clipped_optimizer_when_they_find_none():
    """The warnings of both callbacks for a Trainer without a clipped optimizer list what they look for."""
    sgd = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    messages = []
    if importlib.util.find_spec("lightning") is not None:
        from torch_clip_fused.integrations.lightning import ClipStatisticsCallback as LightningCallback

        trainer = type("FakeTrainer", (), {"optimizers": [sgd], "gradient_clip_val": None})()
        with pytest.warns(UserWarning, match="it will log nothing") as caught:
            LightningCallback().on_train_start(trainer, nn.Linear(1, 1))
        messages.append(str(caught[0].message))
    if importlib.util.find_spec("transformers") is not None:
        from torch_clip_fused.integrations.huggingface import ClipStatisticsCallback as HFCallback

        state = type("FakeState", (), {"global_step": 1, "log_history": []})()
        with pytest.warns(UserWarning, match="it logs nothing") as caught:
            HFCallback().on_log(None, state, None, logs={"loss": 1.0}, optimizer=sgd)
        messages.append(str(caught[0].message))
    if not messages:
        pytest.skip("neither Lightning nor transformers is installed")
    for message in messages:
        assert_names_every_clipped_optimizer(message)


def test_clip_statistics_are_device_tensors_read_without_sync(monkeypatch):
    opt, params = stepped_sgd()
    counter = CountTransfers(monkeypatch)
    stats = clip_statistics(FakeAccelerated(opt))
    assert counter.calls == []
    assert len(stats) == 1
    assert set(stats[0]) == {"norm", "threshold", "clipped_fraction", "skipped", "skipped_steps", "spike_skipped",
                            "spike_skipped_steps", "step"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats[0].values())


def test_statistics_to_floats_is_one_transfer_and_exact(monkeypatch):
    opt, params = stepped_sgd(groups=2)
    expected = [{k: float(v) for k, v in group.items()} for group in opt.statistics()]
    counter = CountTransfers(monkeypatch)
    floats = statistics_to_floats(opt.statistics())
    assert counter.calls == ["tolist"]  # one transfer for every statistic of every group
    assert floats == expected
    assert all(type(v) is float for group in floats for v in group.values())
    assert floats[0]["step"] == 2.0 and floats[1]["step"] == 2.0
    # the last step's norm of both groups is the norm of all their gradients (before clipping): one norm
    total = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
    assert floats[0]["norm"] == pytest.approx(total, rel=1e-5) and floats[1]["norm"] == floats[0]["norm"]
    assert floats[0]["threshold"] == 1.0 and floats[0]["clipped_fraction"] == 1.0


def test_flat_statistics_keys_and_transfer_count(monkeypatch):
    one, _ = stepped_sgd()
    two, _ = stepped_sgd(groups=2)
    counter = CountTransfers(monkeypatch)
    flat1 = flat_statistics(FakeLightning(one))
    flat2 = flat_statistics(FakeAccelerated(two), prefix="opt/")
    assert counter.calls == ["tolist", "tolist"]
    assert set(flat1) == {f"clip/{k}" for k in ("norm", "threshold", "clipped_fraction", "skipped", "skipped_steps",
                                                "spike_skipped", "spike_skipped_steps", "step")}
    assert "opt/group0/norm" in flat2 and "opt/group1/step" in flat2 and len(flat2) == 16


def test_statistics_before_any_step_are_empty():
    opt = ClippedSGD([nn.Parameter(torch.ones(3))], lr=0.1, backend="reference", seed=0)
    assert statistics_to_floats(clip_statistics(opt)) == [{}]
    assert flat_statistics(opt) == {}


def test_statistics_to_floats_rejects_non_tensors():
    with pytest.raises(TypeError, match="'norm' is a float"):
        statistics_to_floats([{"norm": 1.0}])


def test_importing_the_package_imports_no_framework():
    code = (
        "import sys, torch_clip_fused, torch_clip_fused.integrations, torch_clip_fused.optimizers\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_submodules_name_the_missing_package(monkeypatch):
    for blocked in ("transformers",):
        monkeypatch.setitem(sys.modules, blocked, None)
    monkeypatch.delitem(sys.modules, "torch_clip_fused.integrations.huggingface", raising=False)
    with pytest.raises(ImportError, match="pip install transformers accelerate"):
        importlib.import_module("torch_clip_fused.integrations.huggingface")
    for blocked in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, blocked, None)
    monkeypatch.delitem(sys.modules, "torch_clip_fused.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match="pip install lightning"):
        importlib.import_module("torch_clip_fused.integrations.lightning")
    # leave no half-imported submodule behind for later tests
    sys.modules.pop("torch_clip_fused.integrations.huggingface", None)
    sys.modules.pop("torch_clip_fused.integrations.lightning", None)


# ----------------------------------------------------------------------------- shared data


def regression_batches(batch_size=4):
    """N_BATCHES batches of a linear regression; batch BIG_STEP has targets 1000x larger, so its
    gradient norm is far above LEVEL."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_BATCHES * batch_size, 4, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(N_BATCHES * batch_size, generator=gen)
    y[BIG_STEP * batch_size : (BIG_STEP + 1) * batch_size] *= 1000.0
    return x, y


def true_grad_norm(module):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in module.parameters() if p.grad is not None])).item()


# ----------------------------------------------------------------------------- Lightning


def lightning_run(tmp_path, gradient_clip_val, every_n_steps=1, logger=True):
    pl = pytest.importorskip("lightning.pytorch")
    from torch_clip_fused.integrations.lightning import ClipStatisticsCallback

    x, y = regression_batches()

    class Regressor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return nn.functional.mse_loss(self.linear(xb).squeeze(-1), yb)

        def configure_optimizers(self):
            return ClippedSGD(self.parameters(), lr=1e-3, clipping_level=LEVEL, backend="reference", seed=0)

    class TrueNorms(pl.Callback):
        """The gradient norm right before the optimizer step (after Lightning's own clipping)."""

        def __init__(self):
            self.norms = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.norms.append(true_grad_norm(pl_module))

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=False)
    stats_cb, norms_cb = ClipStatisticsCallback(every_n_steps=every_n_steps), TrueNorms()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=gradient_clip_val,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=pl.loggers.CSVLogger(tmp_path, name="run") if logger else False,
        callbacks=[stats_cb, norms_cb],
        default_root_dir=tmp_path,
    )
    module = Regressor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    outer = [w for w in caught if issubclass(w.category, OuterClippingWarning)]
    return trainer, module, stats_cb, norms_cb, outer


def test_lightning_logs_statistics_and_sees_the_true_norm(tmp_path):
    trainer, module, cb, norms, outer = lightning_run(tmp_path, gradient_clip_val=None, every_n_steps=1)
    assert outer == []
    assert [r["step"] for r in cb.history] == list(range(1, N_BATCHES + 1))
    logged = [r["clip/norm"] for r in cb.history]
    assert logged == pytest.approx(norms.norms, rel=1e-5)  # ClippedSGD saw the unclipped gradients
    big = cb.history[BIG_STEP]
    assert big["clip/norm"] > 100 * LEVEL and big["clip/threshold"] == LEVEL and big["clip/clipped_fraction"] == 1.0
    assert cb.history[-1]["clip/step"] == N_BATCHES
    # written to the logger at every step, whatever the Trainer's log_every_n_steps (50)
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv"), newline="") as f:
        metrics = list(csv.DictReader(f))
    rows = [r for r in metrics if r.get("clip/norm")]
    assert [int(r["step"]) for r in rows] == list(range(1, N_BATCHES + 1))
    assert float(rows[BIG_STEP]["clip/norm"]) == pytest.approx(big["clip/norm"], rel=1e-6)


def test_lightning_every_n_steps(tmp_path):
    _, _, cb, _, outer = lightning_run(tmp_path, gradient_clip_val=0, every_n_steps=2, logger=False)
    assert outer == []  # gradient_clip_val=0 disables Lightning's clipping
    assert [r["step"] for r in cb.history] == [2, 4, 6]


def test_lightning_warns_when_its_own_clipping_runs_first(tmp_path):
    _, _, cb, norms, outer = lightning_run(tmp_path, gradient_clip_val=1.0, every_n_steps=1, logger=False)
    assert len(outer) == 1
    message = str(outer[0].message)
    assert "gradient_clip_val=1.0" in message and "ClippedSGD" in message and "gradient_clip_val=None" in message
    # what the warning is about: ClippedSGD only ever sees norms <= 1, never its own level 5
    assert max(r["clip/norm"] for r in cb.history) <= 1.0 + 1e-5
    assert all(r["clip/clipped_fraction"] == 0.0 for r in cb.history)


def test_lightning_callback_rejects_bad_arguments():
    pytest.importorskip("lightning.pytorch")
    from torch_clip_fused.integrations.lightning import ClipStatisticsCallback

    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="every_n_steps"):
            ClipStatisticsCallback(every_n_steps=bad)
    assert ClipStatisticsCallback().state_key == "ClipStatisticsCallback"


# ----------------------------------------------------------------------------- Hugging Face Trainer


class TinyRegressor(nn.Module):
    """A plain torch module the Trainer accepts: keyword inputs, returns a dict with the loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.linear(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def hf_run(tmp_path, max_grad_norm, every_n_steps=None, logging_steps=2, attach=False, create=False, evaluate=False):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from torch_clip_fused.integrations.huggingface import ClipStatisticsCallback

    x, y = regression_batches()
    dataset = [{"x": x[i], "labels": y[i]} for i in range(len(y))]
    extra = {} if max_grad_norm == "default" else {"max_grad_norm": max_grad_norm}
    if evaluate:
        extra.update(eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=8)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        logging_steps=logging_steps,
        lr_scheduler_type="constant",
        learning_rate=1e-3,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
        **extra,
    )
    model = TinyRegressor()
    kwargs = dict(lr=1e-3, clipping_level=LEVEL, backend="reference", seed=0)
    if create:
        optim = dict(optimizer_cls_and_kwargs=(ClippedSGD, kwargs))
    else:
        optim = dict(optimizers=(ClippedSGD(model.parameters(), **kwargs), None))

    class TrueNorms(transformers.TrainerCallback):
        def __init__(self):
            self.norms, self.logs = [], []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            self.norms.append(true_grad_norm(model))

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs))  # what a later callback (a reporter, the printer) receives

    norms = TrueNorms()
    callbacks = [norms]
    cb = None
    if not attach:
        cb = ClipStatisticsCallback(every_n_steps=every_n_steps)
        callbacks.insert(0, cb)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset[:8] if evaluate else None,
        data_collator=transformers.default_data_collator,
        callbacks=callbacks,
        **optim,
    )
    if attach:
        cb = ClipStatisticsCallback.attach(trainer, every_n_steps=every_n_steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    outer = [w for w in caught if issubclass(w.category, OuterClippingWarning)]
    return trainer, cb, norms, outer


def test_hf_trainer_logs_statistics_and_sees_the_true_norm(tmp_path):
    trainer, cb, norms, outer = hf_run(tmp_path, max_grad_norm=0, every_n_steps=None, logging_steps=1)
    assert outer == []
    # the Trainer wraps the optimizer: statistics() is not reachable on it, clip_statistics is
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert not hasattr(trainer.optimizer, "statistics")
    assert clip_statistics(trainer.optimizer)[0]["step"].item() == N_BATCHES
    assert [r["step"] for r in cb.history] == list(range(1, N_BATCHES + 1))
    assert [r["clip/norm"] for r in cb.history] == pytest.approx(norms.norms, rel=1e-5)
    big = max(cb.history, key=lambda r: r["clip/norm"])  # the Trainer shuffles: the big batch's step
    assert big["clip/norm"] > 100 * LEVEL and big["clip/threshold"] == LEVEL and big["clip/clipped_fraction"] == 1.0
    # in the Trainer's own log entries, next to its loss and its (unclipped) grad_norm
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == list(range(1, N_BATCHES + 1))
    for h in train_logs:
        assert h["clip/norm"] == pytest.approx(h["grad_norm"], rel=1e-5)
        assert h["clip/step"] == h["step"]
    # callbacks after ours receive them in the logs dict
    assert [log["clip/norm"] for log in norms.logs if "loss" in log] == [h["clip/norm"] for h in train_logs]


def test_hf_trainer_every_n_steps(tmp_path):
    trainer, cb, _, outer = hf_run(tmp_path, max_grad_norm=0, every_n_steps=2, logging_steps=5, evaluate=True)
    assert outer == []
    assert [r["step"] for r in cb.history] == [2, 4, 6]
    with_stats = [h["step"] for h in trainer.state.log_history if "clip/norm" in h]
    assert with_stats == [2, 4, 6]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [3, 6] and not any("clip/norm" in h for h in evals)
    assert not any("clip/norm" in h for h in trainer.state.log_history if "train_loss" in h)


def test_hf_trainer_warns_when_its_default_clipping_runs_first(tmp_path):
    trainer, cb, norms, outer = hf_run(tmp_path, max_grad_norm="default", logging_steps=1)
    assert trainer.args.max_grad_norm == 1.0
    assert len(outer) == 1
    message = str(outer[0].message)
    assert "max_grad_norm=1.0" in message and "ClippedSGD" in message and "max_grad_norm=0" in message
    assert max(r["clip/norm"] for r in cb.history) <= 1.0 + 1e-5  # inert: HF clipped to 1 first
    assert max(norms.norms) <= 1.0 + 1e-5


def test_hf_trainer_attach_finds_an_optimizer_the_trainer_created(tmp_path):
    transformers = pytest.importorskip("transformers")
    trainer, cb, norms, outer = hf_run(tmp_path, max_grad_norm=0.5, logging_steps=3, attach=True, create=True)
    assert len(outer) == 1 and "max_grad_norm=0.5" in str(outer[0].message)
    handler = trainer.callback_handler.callbacks
    assert isinstance(handler[0], transformers.DefaultFlowCallback) and handler[1] is cb
    assert [r["step"] for r in cb.history] == [3, 6]
    opt = find_clipped_optimizer(trainer.optimizer)
    assert isinstance(opt, ClippedSGD)
    # the Trainer makes two param groups (weight decay / none): one key set per group
    assert len(opt.param_groups) == 2
    assert all(f"clip/group{g}/{k}" in r for r in cb.history for g in (0, 1) for k in ("norm", "threshold", "step"))
    key = "clip/group0/norm"
    assert [log[key] for log in norms.logs if key in log] == [r[key] for r in cb.history]


def test_hf_callback_rejects_bad_arguments():
    pytest.importorskip("transformers")
    from torch_clip_fused.integrations.huggingface import ClipStatisticsCallback

    for bad in (0, -3, 1.5, False):
        with pytest.raises(ValueError, match="every_n_steps"):
            ClipStatisticsCallback(every_n_steps=bad)


def stepped_named_model(top_norm_layer=1):
    """A two-layer model stepped once by a ClippedSGD given its named parameters, and its gradients' norms
    by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = ClippedSGD(model.named_parameters(), lr=0.1, clipping_type="layer_wise", clipping_level=0.1,
                     backend="reference")
    model(torch.randn(5, 3)).square().sum().backward()
    norms = {name: torch.linalg.vector_norm(p.grad).item() for name, p in model.named_parameters()}
    opt.step()
    return opt, norms


def test_lightning_logs_the_largest_tensor_norms_in_its_one_transfer(monkeypatch):
    pytest.importorskip("lightning.pytorch")
    from types import SimpleNamespace

    from torch_clip_fused.integrations.lightning import ClipStatisticsCallback

    opt, norms = stepped_named_model()
    logged = []
    logger = SimpleNamespace(log_metrics=lambda record, step: logged.append((step, record)))
    trainer = SimpleNamespace(global_step=1, optimizers=[opt], loggers=[logger])
    cb = ClipStatisticsCallback(every_n_steps=1, top_k_tensor_norms=2)
    counter = CountTransfers(monkeypatch)
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert counter.calls == ["tolist"]  # the statistics and the top-2 norms together
    top = sorted(norms, key=norms.get, reverse=True)[:2]
    record = logged[0][1]
    assert {k for k in record if "tensor_norm/" in k} == {f"clip/tensor_norm/{name}" for name in top}
    assert record[f"clip/tensor_norm/{top[0]}"] == pytest.approx(norms[top[0]], rel=1e-6)
    assert "clip/norm" in record and cb.history[0]["step"] == 1
    cb = ClipStatisticsCallback(every_n_steps=1, all_tensor_norms=True)
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert {k for k in cb.history[0] if "tensor_scale/" in k} == {f"clip/tensor_scale/{name}" for name in norms}
    with pytest.raises(ValueError, match="top_k_tensor_norms"):
        ClipStatisticsCallback(top_k_tensor_norms=-2)


def test_hf_logs_the_largest_tensor_norms_in_its_one_transfer(monkeypatch):
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from torch_clip_fused.integrations.huggingface import ClipStatisticsCallback

    opt, norms = stepped_named_model()
    cb = ClipStatisticsCallback(top_k_tensor_norms=1, optimizer=opt)
    state = SimpleNamespace(global_step=3, log_history=[])
    logs = {"loss": 1.0}
    counter = CountTransfers(monkeypatch)
    cb.on_log(SimpleNamespace(max_grad_norm=0), state, None, logs=logs)
    assert counter.calls == ["tolist"]
    top = max(norms, key=norms.get)
    assert logs[f"clip/tensor_norm/{top}"] == pytest.approx(norms[top], rel=1e-6)
    assert [k for k in logs if "tensor_norm/" in k] == [f"clip/tensor_norm/{top}"]
    with pytest.raises(TypeError, match="all_tensor_norms"):
        ClipStatisticsCallback(all_tensor_norms="yes")


def hf_train_params(tmp_path, optimizer_cls, kwargs, max_grad_norm):
    """The parameters after one epoch of the Hugging Face Trainer with the optimizer it creates from
    ``optimizer_cls`` (its two param groups: weight decay 0.1 / none) and ``max_grad_norm``."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    x, y = regression_batches()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, lr_scheduler_type="constant",
        learning_rate=1e-2, weight_decay=0.1, max_grad_norm=max_grad_norm, report_to="none", disable_tqdm=True,
        save_strategy="no", use_cpu=True, remove_unused_columns=False, dataloader_num_workers=0, seed=0)
    model = TinyRegressor()
    trainer = transformers.Trainer(model=model, args=args,
                                   train_dataset=[{"x": x[i], "labels": y[i]} for i in range(len(y))],
                                   data_collator=transformers.default_data_collator,
                                   optimizer_cls_and_kwargs=(optimizer_cls, dict(lr=1e-2, **kwargs)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    groups = find_clipped_optimizer(trainer.optimizer) or trainer.optimizer.optimizer
    assert len(groups.param_groups) == 2 and {g["weight_decay"] for g in groups.param_groups} == {0.1, 0.0}
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_hf_trainer_two_groups_clip_as_its_own_max_grad_norm(tmp_path, backend):
    """Issue 19: the Trainer's two param groups (decay / no decay) with ClippedAdamW(clipping_type="norm")
    and max_grad_norm=0 train as torch's AdamW with the Trainer's own clip_grad_norm_ over the model (one
    norm over both groups); a norm per group (per_group_norm=True) does not."""
    from torch_clip_fused import ClippedAdamW

    expected = hf_train_params(tmp_path / "torch", torch.optim.AdamW, {}, max_grad_norm=LEVEL)
    ours = hf_train_params(tmp_path / "ours", ClippedAdamW, dict(clipping_level=LEVEL, backend=backend), 0)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    per_group = hf_train_params(tmp_path / "per_group", ClippedAdamW,
                                dict(clipping_level=LEVEL, backend=backend, per_group_norm=True), 0)
    assert max(float((a - b).abs().max()) for a, b in zip(per_group, expected)) > 1e-4
