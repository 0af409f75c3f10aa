"""Import isolation: the core package works without any optional dependency, and never imports one.

Each check runs in a fresh interpreter (``subprocess``), so nothing this test session has already
imported can hide a missing guard.  The optional dependencies are made unimportable before anything
else is imported, as on a machine where they are not installed: ``import`` of any of them (or of a
submodule) raises ModuleNotFoundError, and ``importlib.util.find_spec`` returns None for them.

That is done with ``sys.modules[name] = None``, not with a meta-path finder that raises: torch
probes optional modules with ``importlib.util.find_spec`` (torch._dynamo's trace rules look for
sklearn, among others) and expects None for a missing one, so a raising finder breaks
``import torch._dynamo`` (which the first optimizer step imports); and a finder that returns None
cannot hide a module that the finders after it find.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

#: every optional dependency of torch_clip_fused (setup.py extras and the integrations' frameworks)
OPTIONAL = ("matplotlib", "tqdm", "sklearn", "triton", "ninja", "lightning", "pytorch_lightning", "transformers",
            "accelerate")

#: the experiments extra (setup.py ``extras_require["experiments"]``)
EXPERIMENTS_EXTRA = "torch_clip_fused[experiments]"

BLOCKER = """
import sys

BLOCKED = set({blocked!r})
for name in BLOCKED:  # None in sys.modules: `import name` raises ModuleNotFoundError, find_spec gives None
    sys.modules[name] = None
"""

# Runs every check and prints one JSON report, so that one interpreter start (about 2 s of
# `import torch`) serves all the tests below.
CHECKS = """
import json, traceback, warnings

report = {}

def check(name, fn):
    try:
        report[name] = {"ok": True, "value": fn()}
    except BaseException as error:
        report[name] = {"ok": False, "type": type(error).__name__, "message": str(error),
                        "traceback": traceback.format_exc()}

def core():
    import torch_clip_fused
    return loaded_optional()

def loaded_optional():  # the optional modules really loaded (the blocked names map to None)
    return sorted(m for m, module in sys.modules.items() if m.split(".")[0] in BLOCKED and module is not None)

def import_module(name):
    return lambda: __import__(name) and None

def reference_step():
    import torch
    from torch_clip_fused import ClippedSGD
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = ClippedSGD([p], lr=0.1, clipping_type="norm", clipping_level=1.0, backend="reference")
    p.grad = torch.tensor([3.0, 4.0])
    opt.step()
    return p.detach().tolist()

def auto_step():
    import torch
    from torch_clip_fused import ClippedSGD
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = ClippedSGD([p], lr=0.1, momentum=0.9, clipping_type="layer_wise", clipping_level=1.0, backend="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            p.grad = torch.tensor([3.0, 4.0])
            opt.step()
    return {"params": p.detach().tolist(), "warnings": [str(w.message) for w in caught]}

check("core", core)
for name in ("torch_clip_fused.optimizers", "torch_clip_fused.utils", "torch_clip_fused.restarter",
             "torch_clip_fused.optimizers_collector", "torch_clip_fused.integrations",
             "torch_clip_fused.plot_maker", "torch_clip_fused.experiments.plots",
             "torch_clip_fused.experiments.compare", "torch_clip_fused.experiments.demo",
             "torch_clip_fused.integrations.huggingface", "torch_clip_fused.integrations.lightning"):
    check(name, import_module(name))
check("digits", lambda: __import__("torch_clip_fused.experiments.tasks", fromlist=["digits"]).digits() and None)
check("reference_step", reference_step)
check("auto_step", auto_step)
check("imported", loaded_optional)
print("REPORT" + json.dumps(report))
"""


def _run(code: str, env=None) -> dict:
    """Run ``code`` in a fresh interpreter; return the JSON it printed after ``REPORT``."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"the subprocess failed:\n{result.stdout}\n{result.stderr}"
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


def _path_without_ninja() -> str:
    """PATH without the directories holding a ``ninja`` executable: blocking the ``ninja`` Python
    module does not hide the binary torch's C++ build runs, so the C++ backend could still build."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and not os.access(os.path.join(d, "ninja"), os.X_OK))


@pytest.fixture(scope="module")
def without_optional(tmp_path_factory):
    """The report of CHECKS with every optional dependency unimportable (and no ninja binary, no C++
    compiler, an empty extension cache: a cached build would load without them)."""
    env = dict(os.environ, PATH=_path_without_ninja(), CXX="/nonexistent/c++",
               TORCH_EXTENSIONS_DIR=str(tmp_path_factory.mktemp("torch_extensions")))
    env.pop("TRITON_INTERPRET", None)  # CPU tensors with backend="auto" must not need Triton
    code = BLOCKER.format(blocked=OPTIONAL) + textwrap.dedent(CHECKS)
    return _run(code, env)


def _ok(report: dict, name: str):
    entry = report[name]
    assert entry["ok"], f"{name}: {entry['type']}: {entry['message']}\n{entry['traceback']}"
    return entry["value"]


def test_core_imports_without_optional_dependencies(without_optional):
    assert _ok(without_optional, "core") == []


@pytest.mark.parametrize("module", ["torch_clip_fused.optimizers", "torch_clip_fused.utils",
                                    "torch_clip_fused.restarter", "torch_clip_fused.optimizers_collector",
                                    "torch_clip_fused.integrations"])
def test_original_import_paths_need_no_extra(without_optional, module):
    """The original's import paths (and the integrations' helpers) need torch and numpy only."""
    _ok(without_optional, module)


@pytest.mark.parametrize("module", ["torch_clip_fused.plot_maker", "torch_clip_fused.experiments.plots",
                                    "torch_clip_fused.experiments.compare", "torch_clip_fused.experiments.demo",
                                    "digits"])
def test_experiments_name_their_extra(without_optional, module):
    """Plots, comparisons, the demo and the digits task need matplotlib / tqdm / scikit-learn: without
    them they fail with an ImportError that names the extra to install."""
    entry = without_optional[module]
    assert not entry["ok"], f"{module} worked without the experiments extra"
    assert entry["type"] in ("ImportError", "ModuleNotFoundError"), entry["traceback"]
    assert EXPERIMENTS_EXTRA in entry["message"], entry["message"]


@pytest.mark.parametrize("module,install", [("torch_clip_fused.integrations.huggingface", "pip install transformers"),
                                            ("torch_clip_fused.integrations.lightning", "pip install lightning")])
def test_integrations_name_their_framework(without_optional, module, install):
    entry = without_optional[module]
    assert not entry["ok"], f"{module} worked without its framework"
    assert entry["type"] in ("ImportError", "ModuleNotFoundError"), entry["traceback"]
    assert install in entry["message"], entry["message"]


def test_reference_step_without_optional_dependencies(without_optional):
    assert _ok(without_optional, "reference_step") == pytest.approx([0.94, 1.92])


def test_auto_backend_on_cpu_without_triton_or_ninja(without_optional):
    """backend="auto" on CPU tensors: the C++ backend cannot build (no ninja), Triton cannot import,
    and the step falls back to the reference with one warning."""
    value = _ok(without_optional, "auto_step")
    # layer_wise, level 1, lr 0.1, momentum 0.9: g' = [0.6, 0.8]; m1 = g', m2 = 1.9 g'
    assert value["params"] == pytest.approx([1.0 - 0.1 * 2.9 * 0.6, 2.0 - 0.1 * 2.9 * 0.8])
    assert any("using the reference backend" in message for message in value["warnings"]), value["warnings"]
    assert not any("triton" in message.lower() for message in value["warnings"]), value["warnings"]


def test_nothing_optional_was_imported(without_optional):
    assert _ok(without_optional, "imported") == []


HEAVY = ("matplotlib", "tqdm", "sklearn", "triton", "lightning", "pytorch_lightning", "transformers", "accelerate")


def test_import_loads_no_optional_module():
    """With every optional dependency installed (the dev environment), ``import torch_clip_fused``
    and the original import paths import none of them.

    ``import torch`` itself imports tqdm when it is installed (torch.hub does), so the check is on
    the modules added after ``import torch``; matplotlib and scikit-learn must not be loaded at all."""
    code = textwrap.dedent(f"""
        import json, sys
        import torch
        before = set(sys.modules)
        import torch_clip_fused
        import torch_clip_fused.optimizers, torch_clip_fused.utils, torch_clip_fused.restarter
        import torch_clip_fused.optimizers_collector, torch_clip_fused.integrations
        added = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in {HEAVY!r})
        loaded = sorted(m for m in ("matplotlib", "sklearn") if m in sys.modules)
        print("REPORT" + json.dumps({{"added": added, "loaded": loaded}}))
    """)
    report = _run(code)
    assert report["added"] == [], f"importing torch_clip_fused imported {report['added']}"
    assert report["loaded"] == [], f"matplotlib / scikit-learn loaded: {report['loaded']}"


def test_setup_lists_every_subpackage():
    """An installed copy holds only the packages setup.py names: a new subpackage left out of the
    list imports from the source tree and fails once installed."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    call = next(node for node in ast.walk(ast.parse((root / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    listed = set(ast.literal_eval(next(k.value for k in call.keywords if k.arg == "packages")))
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "torch_clip_fused").rglob("__init__.py")}
    found |= {"torch_clip_fused.kernels", "torch_clip_fused.csrc"}  # mapped from kernels/ and csrc/
    assert found <= listed, f"missing from setup.py packages: {sorted(found - listed)}"
