"""Every ```python block of README.md runs as written.

Convention:

* Every block fenced ```python runs; nothing is skipped.  A block that is not meant to run (shell
  commands, outputs, layouts) takes another fence (```bash, ```text or a bare ```).
* A signature is written as a valid call that spells out every argument with its default, the
  keyword-only ones after a ``# keyword-only:`` comment line; it runs (on the ``params``
  placeholder) and :func:`test_signature_blocks_match_the_signatures` checks it against the real
  signature, so the README cannot drift from the code.
* ``torch`` is imported, as in any training script; every other name a block uses is imported by
  the block or is one of the placeholders of :func:`placeholders` (``model``, ``train_loader``,
  ``criterion``, ``EPOCHS``, ``params``, ``optimizer``, ``opt``, ``step``, ``loss``, ``adamw``,
  ``train_dataset``), made small.  Each block runs in its own namespace.
* Blocks that need more than one process, a GPU, a long run or a framework run in the bounded way
  they allow, chosen from what the block contains (:data:`ADAPTERS`): ``torchrun`` blocks under
  a 1-process gloo group on the CPU (the environment torchrun sets, then the group is destroyed);
  a Lightning Trainer with ``max_epochs=1``, 2 batches, on the CPU, after checking that the block
  itself bounds its run with ``max_epochs``; accelerate's ``Accelerator`` on the CPU (as ``cpu=True``);
  ``torch.compile`` with the ``eager`` backend (inductor's C++ code generation takes 16-60 s on
  2 shared cores; tests/test_compile.py compiles with inductor); the Hugging Face Trainer on a
  16-example dataset (6 steps).  Files the blocks write go to a temporary directory.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import os
import re
import socket
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import torch_clip_fused  # noqa: E402
import torch_clip_fused.integrations  # noqa: E402
from torch_clip_fused.integrations import OuterClippingWarning  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    """(first line number, heading above it, source) of every ```python block of the README."""
    blocks, heading, source, start = [], "", None, 0
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if source is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            elif line.strip() == "```python":
                source, start = [], number + 1
        elif line.strip() == "```":
            blocks.append((start, heading, "\n".join(source) + "\n"))
            source = None
        else:
            source.append(line)
    assert source is None, f"README.md: the ```python block at line {start} is not closed"
    return blocks


BLOCKS = python_blocks()


def block_id(block):
    start, heading, _ = block
    return f"line{start}-" + re.sub(r"\W+", "_", heading).strip("_")


# ----------------------------------------------------------------------------- placeholders


class Net(nn.Module):
    """The ``model`` placeholder: blocks of layers (``model.blocks``, as the FSDP2 block shards them);
    ``model(x)`` gives the prediction, ``model(x=..., labels=...)`` a dict with the loss, as the
    Hugging Face Trainer calls a model."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 1)])

    def forward(self, x, labels=None):
        for block in self.blocks:
            x = block(x)
        if labels is None:
            return x
        return {"loss": nn.functional.mse_loss(x, labels), "logits": x}


def placeholders() -> dict:
    """A fresh namespace with ``torch`` and every placeholder the README's blocks use."""
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    criterion = nn.MSELoss()
    optimizer = torch_clip_fused.ClippedSGD(model.parameters(), lr=0.01, clipping_level=1.0)
    criterion(model(x), y).backward()
    optimizer.step()  # a stepped optimizer: its statistics() are filled
    return {
        "__name__": "__readme__",
        "torch": torch,
        "model": model,
        "criterion": criterion,
        "train_loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8),
        "train_dataset": [{"x": x[i], "labels": y[i]} for i in range(16)],
        "EPOCHS": 2,
        "params": list(model.parameters()),
        "threshold_settings": {"zclip_warmup": 10},  # the signature blocks' **threshold_settings
        "optimizer": optimizer,
        "opt": torch_clip_fused.ClippedSGD(model.parameters(), lr=0.01, momentum=0.9),
        "step": 0,
        "loss": criterion(model(x), y),
        "adamw": torch.optim.AdamW(model.parameters(), lr=1e-3),
    }


# ----------------------------------------------------------------------------- bounded runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_process_group(monkeypatch, namespace, tmp_path):
    """What ``torchrun --nproc_per_node=1`` sets; the block's process group is destroyed afterwards."""
    import torch.distributed as dist

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    try:
        yield
        assert dist.is_initialized(), "a torchrun block is expected to start its process group"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def bounded_lightning(monkeypatch, namespace, tmp_path):
    """The block's Trainer runs 1 epoch of 2 batches on the CPU, without logger or checkpoints; the
    block must bound its own run with ``max_epochs`` (Lightning's default is 1000 epochs)."""
    pl = pytest.importorskip("lightning.pytorch")
    made = []

    class BoundedTrainer(pl.Trainer):
        def __init__(self, *args, **kwargs):
            made.append(dict(kwargs))
            kwargs.update(max_epochs=1, limit_train_batches=2, accelerator="cpu", devices=1, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=str(tmp_path))
            super().__init__(*args, **kwargs)
            namespace["__trainer__"] = self

    monkeypatch.setattr(pl, "Trainer", BoundedTrainer)
    yield
    assert made, "the Lightning block made no Trainer"
    for kwargs in made:
        assert kwargs.get("max_epochs") is not None, f"the README's Trainer has no max_epochs: {kwargs}"
    assert namespace["__trainer__"].global_step == 2


@contextlib.contextmanager
def cpu_accelerator(monkeypatch, namespace, tmp_path):
    """accelerate's ``Accelerator`` as with ``cpu=True`` (through accelerate's own ACCELERATE_USE_CPU:
    the class itself is left alone); its process-wide state is reset afterwards."""
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    try:
        yield
        # the prepared optimizer stepped: every batch of every epoch went through ours
        inner = torch_clip_fused.integrations.find_clipped_optimizer(namespace["optimizer"])
        assert type(namespace["optimizer"]).__name__ == "AcceleratedOptimizer" and inner is not None
        assert inner.statistics()[0]["step"].item() == namespace["EPOCHS"] * len(namespace["train_loader"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@contextlib.contextmanager
def eager_compile(monkeypatch, namespace, tmp_path):
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, **dict(kwargs, backend="eager")))
    try:
        yield
    finally:
        torch._dynamo.reset()


@contextlib.contextmanager
def hf_trainer(monkeypatch, namespace, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    try:
        yield
        # 16 examples, batches of 8, the Trainer's default 3 epochs
        assert namespace["trainer"].state.global_step == 6
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


#: (what marks a block, how it runs) for the blocks that cannot simply run
ADAPTERS = [
    ("init_process_group(", one_process_group),
    ("import lightning", bounded_lightning),
    ("from accelerate import", cpu_accelerator),
    ("torch.compile(", eager_compile),
    ("from transformers import", hf_trainer),
]


@pytest.mark.parametrize("block", BLOCKS, ids=[block_id(b) for b in BLOCKS])
def test_readme_python_block_runs(block, monkeypatch, tmp_path):
    start, heading, source = block
    code = compile(source, f"README.md:{start}", "exec")  # a SyntaxError names the README's line
    namespace = placeholders()
    monkeypatch.chdir(tmp_path)  # out/, lightning_logs/... of the blocks
    with contextlib.ExitStack() as stack:
        for marker, adapter in ADAPTERS:
            if marker in source:
                stack.enter_context(adapter(monkeypatch, namespace, tmp_path))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the frameworks' own notices (no GPU, few workers...) are let by
            exec(code, namespace)
    # the callbacks' OuterClippingWarning, the accelerate guard's DoubleClippingWarning
    ours = [str(w.message) for w in caught
            if issubclass(w.category, OuterClippingWarning) or w.category.__name__ == "DoubleClippingWarning"]
    assert not ours, f"README.md:{start}: the block makes the gradients clipped before the optimizer: {ours}"


def test_the_readme_has_the_blocks_this_file_adapts_to():
    """Every adapter above is used by some block (a block rewritten without it would run unbounded
    here or not at all), and at least one block per framework section exists."""
    sources = [source for _, _, source in BLOCKS]
    for marker, adapter in ADAPTERS:
        assert any(marker in s for s in sources), f"no README block contains {marker!r} ({adapter.__name__})"


# ----------------------------------------------------------------------------- signatures


def signature_calls():
    """(block start line, call node, source) of every block that is a signature: a lone call (after
    imports) whose arguments include ``# keyword-only:``."""
    out = []
    for start, _, source in BLOCKS:
        if "# keyword-only:" not in source:
            continue
        body = [node for node in ast.parse(source).body if not isinstance(node, (ast.Import, ast.ImportFrom))]
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Call), \
            f"README.md:{start}: a signature block is one call"
        out.append((start, body[0].value, source))
    return out


SIGNATURES = signature_calls()


def test_there_are_signature_blocks():
    assert {call.func.id for _, call, _ in SIGNATURES} >= {"ClippedSGD", "ClippedAdamW"}


@pytest.mark.parametrize("start,call,source", SIGNATURES, ids=[f"line{s}-{c.func.id}" for s, c, _ in SIGNATURES])
def test_signature_blocks_match_the_signatures(start, call, source):
    cls = getattr(torch_clip_fused, call.func.id)
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    assert [ast.unparse(arg) for arg in call.args] == [parameters[0].name]  # params, given positionally
    written = [(kw.arg, ast.literal_eval(kw.value)) if kw.arg is not None else ("**" + ast.unparse(kw.value), None)
               for kw in call.keywords]
    real = [(p.name, p.default) if p.kind is not inspect.Parameter.VAR_KEYWORD else ("**" + p.name, None)
            for p in parameters[1:]]
    assert written == real, f"README.md:{start}: the {cls.__name__} signature differs from the code"
    # the keyword-only arguments are those after the marker line
    marker_line = next(i for i, line in enumerate(source.splitlines(), 1) if "# keyword-only:" in line)
    after_marker = [kw.arg for kw in call.keywords if kw.lineno > marker_line and kw.arg is not None]
    assert after_marker == [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
