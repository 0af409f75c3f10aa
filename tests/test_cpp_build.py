"""The C++ extension's build (torch_clip_fused/backends/cpp/build.py): a build folder per binary, a
stale lock cleared and a live build waited for (both said once), a first-use message with the time
taken and a silent cached load, the missing-toolchain warning (one warning, at the user's line), the
prebuilt module of ``TORCH_CLIP_FUSED_BUILD_CPP=1`` used only when it was built for this process.

The subprocess checks do not compile: the child replaces torch's compile step with a copy of the
extension this test session built (``_FAKE_COMPILE``), so that the real ``torch.utils.cpp_extension``
load, its lock file and the real module import run in seconds.  The ahead-of-time build itself
compiles (minutes): it runs only with ``TCF_SLOW=1``.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from torch_clip_fused import ClippedSGD
from torch_clip_fused.backends import dispatch as backends
from torch_clip_fused.backends.cpp import build as cpp_build
from torch_clip_fused.backends.cpp import build_config
from conftest import make_params

ROOT = Path(__file__).resolve().parents[1]

# torch's compile step, replaced in a child process by a copy of an already built extension
_FAKE_COMPILE = """
import os, shutil, torch.utils.cpp_extension as cpp_extension

def _copy_built(name, build_directory, **kwargs):
    target = os.path.join(build_directory, name + ".so")
    if not os.path.exists(target):
        shutil.copy({built!r}, target)
        print("COMPILED", flush=True)

cpp_extension._write_ninja_file_and_build_library = _copy_built
"""


@pytest.fixture(scope="module")
def built_so():
    """The extension's shared library, as this session built or loaded it."""
    return cpp_build.load_extension().__file__


def _child(code, extensions_dir, built=None, env=None, cwd=None, timeout=120):
    """Run ``code`` in a fresh interpreter with its own TORCH_EXTENSIONS_DIR (and the fake compile step
    when ``built`` is given); returns the CompletedProcess."""
    prefix = textwrap.dedent(_FAKE_COMPILE.format(built=built)) if built else ""
    child_env = dict(os.environ if env is None else env, TORCH_EXTENSIONS_DIR=str(extensions_dir))
    return subprocess.run([sys.executable, "-c", prefix + textwrap.dedent(code)], capture_output=True, text=True,
                          env=child_env, cwd=cwd, timeout=timeout)


LOAD = """
from torch_clip_fused.backends.cpp import load_extension, loaded_extension
module = load_extension()
assert loaded_extension() is module
print("LOADED", module.__file__, flush=True)
"""


def _build_directory_for(extensions_dir, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions_dir))
    return cpp_build.build_directory()


def test_build_folder_is_keyed_by_torch_python_sources_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    base = cpp_build.build_directory()
    assert base.parent == tmp_path / "ext"
    assert cpp_build.build_directory() == base  # the same inputs, the same folder
    assert torch.__version__ in base.name and sys.implementation.cache_tag in base.name  # readable

    folders = {}
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "2.11.0")
        folders["torch version"] = cpp_build.build_directory()
    with monkeypatch.context() as m:
        m.setattr(torch.version, "git_version", "0" * 40)  # a source build of the same version
        folders["torch commit"] = cpp_build.build_directory()
    with monkeypatch.context() as m:
        m.setattr(build_config, "python_tag", lambda: "cpython-399")
        folders["python"] = cpp_build.build_directory()
    with monkeypatch.context() as m:
        csrc = tmp_path / "csrc"
        shutil.copytree(cpp_build.csrc_dir(), csrc)
        header = csrc / "layout.h"
        header.write_text(header.read_text() + "\n// one more line\n")
        m.setattr(cpp_build, "csrc_dir", lambda: csrc)
        folders["a header"] = cpp_build.build_directory()
    with monkeypatch.context() as m:
        m.setattr(build_config, "BASE_CFLAGS", build_config.BASE_CFLAGS + ("-O2",))
        folders["a flag"] = cpp_build.build_directory()
    with monkeypatch.context() as m:
        m.setattr(build_config, "vector_flags", lambda: ("default", []))
        folders["the vector unit"] = cpp_build.build_directory()
    assert len(set(folders.values()) | {base}) == len(folders) + 1, folders


def test_stale_lock_is_cleared_the_first_build_says_what_and_how_long_a_cached_load_is_silent(
        built_so, tmp_path, monkeypatch):
    build_dir = _build_directory_for(tmp_path / "ext", monkeypatch)
    build_dir.mkdir(parents=True)
    (build_dir / "lock").write_text("")  # torch's lock file, left by a build killed mid-way
    first = _child(LOAD, tmp_path / "ext", built=built_so)
    assert first.returncode == 0, first.stderr
    assert "LOADED" in first.stdout and "COMPILED" in first.stdout
    lines = first.stderr.splitlines()
    assert len(lines) == 3, first.stderr
    assert re.fullmatch(rf"torch_clip_fused: removed the stale build lock {re.escape(str(build_dir / 'lock'))} "
                        r"\(left by an interrupted build\)", lines[0]), lines[0]
    assert re.fullmatch(rf"torch_clip_fused: building the C\+\+ CPU extension in {re.escape(str(build_dir))} "
                        r"\(first use only; about [^)]+\) \.\.\.", lines[1]), lines[1]
    assert re.fullmatch(r"torch_clip_fused: \.\.\. built in \d+ s", lines[2]), lines[2]
    assert not (build_dir / "lock").exists()

    # a cached load imports the library: no torch build step (no ninja run), no compiler needed
    no_build = "import sys, torch.utils.cpp_extension as cpp_extension\n" \
               "cpp_extension.load = lambda **kwargs: sys.exit('torch build called')\n"
    env = dict(os.environ, PATH=str(tmp_path), CXX="/nonexistent/c++")
    cached = _child(no_build + LOAD, tmp_path / "ext", env=env)
    assert cached.returncode == 0, cached.stderr
    assert "LOADED" in cached.stdout
    assert cached.stderr == ""


def test_a_live_build_is_waited_for_and_said_once(built_so, tmp_path, monkeypatch):
    """Another process holds the build lock (as a running build does) and finishes the build once the
    waiting process has said that it waits; the waiter then loads that build without building again."""
    build_dir = _build_directory_for(tmp_path / "ext", monkeypatch)
    holder_code = f"""
        import fcntl, shutil, sys
        from torch_clip_fused.backends.cpp import build as cpp_build
        build_dir = cpp_build.build_directory()
        build_dir.mkdir(parents=True)
        with open(build_dir / cpp_build.LOCK_NAME, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            print("HOLDING", flush=True)
            sys.stdin.readline()  # until the waiter has said that it waits
            shutil.copy({built_so!r}, build_dir / "{Path(built_so).name}")  # the build finishes
        """
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(holder_code)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "HOLDING"
        waiter = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_FAKE_COMPILE.format(built=built_so))
                                   + textwrap.dedent(LOAD)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
        said = waiter.stderr.readline()  # blocks until the waiter says something (or exits)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        out, err = waiter.communicate(timeout=120)
        assert holder.wait(timeout=60) == 0
    finally:
        for process in (holder, waiter):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert said == (f"torch_clip_fused: waiting for another process's build of the C++ CPU extension "
                    f"in {build_dir} ...\n"), said + err
    assert waiter.returncode == 0, err
    assert "LOADED" in out and "COMPILED" not in out  # the holder's build was used
    assert err == "", err  # said once; a cached load after it


USER_SCRIPT = """\
import torch
from torch_clip_fused import ClippedSGD

param = torch.nn.Parameter(torch.ones(3))
param.grad = torch.ones(3)
opt = ClippedSGD([param], lr=0.1)
opt.step()
opt.step()
print("STEPPED", param.detach().tolist())
"""


def test_no_compiler_is_one_warning_at_the_users_line(tmp_path):
    """No C++ compiler, ninja present: one warning, attributed to the user's ``opt.step()`` line,
    saying what is missing, what runs instead and how to fix or silence it; nothing else on stderr."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ninja = shutil.which("ninja") or str(Path(sys.executable).parent / "ninja")
    (bin_dir / "ninja").symlink_to(ninja)
    script = tmp_path / "train.py"
    script.write_text(USER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    env.update(PATH=str(bin_dir), CXX="/nonexistent/c++", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "STEPPED" in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[1].strip() == "opt.step()", result.stderr  # the warning and its source line
    step_line = USER_SCRIPT.splitlines().index("opt.step()") + 1
    header = re.fullmatch(rf"{re.escape(str(script))}:{step_line}: RuntimeWarning: (.*)", lines[0])
    assert header, lines[0]
    message = header.group(1)
    assert message.startswith("torch_clip_fused: the C++ CPU backend is unavailable: no C++ compiler found "
                              "(CXX=/nonexistent/c++ is not an executable)"), message
    assert "using the reference backend instead" in message
    assert "build-essential" in message and "backend='reference'" in message
    assert len(message) < 600, message


def test_no_ninja_and_no_compiler_are_named_with_their_fixes(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))  # no ninja beside the interpreter either
    with pytest.raises(cpp_build.CppBuildError) as caught:
        cpp_build.check_toolchain()
    assert caught.value.reason == "no C++ compiler found (neither c++ nor g++ is on PATH) and ninja not found"
    assert "build-essential" in caught.value.fix and "pip install ninja" in caught.value.fix


def test_g_plus_plus_without_c_plus_plus_and_ninja_beside_the_interpreter_are_used(monkeypatch, tmp_path):
    """``pip install ninja`` puts ninja beside the venv's python, which is not on PATH when the venv's
    python is run without activating the venv; a system may have g++ and no c++."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "g++").symlink_to(compiler)
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "ninja").write_text("#!/bin/sh\n")
    (tmp_path / "venv" / "ninja").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("CXX", raising=False)
    assert cpp_build.check_toolchain() == ("g++", str(tmp_path / "venv" / "ninja"))


def test_fallback_warning_points_at_the_callers_line(monkeypatch):
    monkeypatch.setattr(cpp_build, "_module", None)
    monkeypatch.setattr(cpp_build, "_error", cpp_build.CppBuildError("ninja not found", "`pip install ninja`"))
    monkeypatch.setattr(backends, "_warned", set())
    opt = ClippedSGD(make_params(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(); line = sys._getframe().f_lineno  # noqa: E702  (the warning's expected line)
        opt.step()
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)
    assert issubclass(caught[0].category, RuntimeWarning)
    assert str(caught[0].message) == ("torch_clip_fused: the C++ CPU backend is unavailable: ninja not found; using "
                                      "the reference backend instead (pure PyTorch, slower steps). To build it: "
                                      "`pip install ninja`; or pass backend='reference' to silence this warning")


def _fake_prebuilt(tmp_path, built_so, record):
    """A prebuilt module: the built extension's library under another path, with a build record
    (never imported here: this process has the extension loaded already)."""
    path = tmp_path / Path(built_so).name
    shutil.copy(built_so, path)
    if record is not None:
        Path(f"{path}.json").write_text(json.dumps(record))
    import importlib.util

    return importlib.util.spec_from_file_location(Path(built_so).name.split(".")[0], path)


def test_a_prebuilt_module_built_for_this_torch_is_used_silently(built_so, tmp_path):
    code = f"""
        import importlib.util, json, shutil, torch
        from torch_clip_fused.backends.cpp import build as cpp_build, build_config
        record = build_config.identity(torch, cpp_build.csrc_dir())
        prebuilt = {str(tmp_path / "prebuilt" / Path(built_so).name)!r}
        shutil.copy({built_so!r}, prebuilt)
        with open(prebuilt + ".json", "w") as f:
            json.dump(record, f)
        spec = importlib.util.spec_from_file_location({Path(built_so).name.split(".")[0]!r}, prebuilt)
        cpp_build._prebuilt_spec = lambda: spec
        """
    (tmp_path / "prebuilt").mkdir()
    used = _child(textwrap.dedent(code) + LOAD, tmp_path / "ext")
    assert used.returncode == 0, used.stderr
    assert f"LOADED {tmp_path / 'prebuilt' / Path(built_so).name}" in used.stdout
    assert used.stderr == ""
    assert not (tmp_path / "ext").exists()  # no JIT build


@pytest.mark.parametrize("field,value,shown", [("torch", "2.11.0", "torch 2.11.0"),
                                                (None, None, "no build record")])
def test_a_prebuilt_module_for_another_torch_is_ignored_with_a_note(built_so, monkeypatch, tmp_path, capsys,
                                                                    field, value, shown):
    record = build_config.identity(torch, cpp_build.csrc_dir())
    if field is None:
        record = None
    else:
        record[field] = value
    monkeypatch.setattr(cpp_build, "_prebuilt_spec", lambda: _fake_prebuilt(tmp_path, built_so, record))
    monkeypatch.setattr(cpp_build, "_module", None)
    module = cpp_build.load_extension()  # the JIT build of this session (cached)
    assert Path(module.__file__).parent == cpp_build.build_directory()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("torch_clip_fused: ignoring the prebuilt C++ extension "), err
    assert shown in err[0] and "the C++ extension is built on first use instead" in err[0], err


@pytest.mark.skipif(os.environ.get("TCF_SLOW") != "1", reason="compiles the extension (minutes): set TCF_SLOW=1")
def test_ahead_of_time_build_goes_into_the_wheel_and_steps_as_the_jit_build(tmp_path):
    """``TORCH_CLIP_FUSED_BUILD_CPP=1 pip wheel --no-build-isolation``: the wheel holds the compiled
    extension; an install of it loads that module (no JIT build, nothing printed) and steps
    bit-identically to the JIT-built extension of this session."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", "demo_out", "dist"))
    env = dict(os.environ, TORCH_CLIP_FUSED_BUILD_CPP="1")
    start = time.perf_counter()
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env,
                           timeout=1800)
    print(f"ahead-of-time wheel build: {time.perf_counter() - start:.0f} s")
    assert wheel.returncode == 0, wheel.stdout + wheel.stderr
    (whl,) = (tmp_path / "dist").glob("torch_clip_fused-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                              str(tmp_path / "site"), str(whl)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr

    params = make_params(shapes=((7, 5), (5,), (3, 7001)))
    torch.save([p.detach() for p in params] + [p.grad for p in params], tmp_path / "params.pt")
    code = f"""
        import sys, torch
        from torch_clip_fused import ClippedSGD
        from torch_clip_fused.backends.cpp import load_extension
        assert load_extension().__name__ == "torch_clip_fused._C_cpu", load_extension()
        tensors = torch.load({str(tmp_path / 'params.pt')!r})
        params = [t.clone().requires_grad_() for t in tensors[:3]]
        for p, g in zip(params, tensors[3:]):
            p.grad = g.clone()
        opt = ClippedSGD(params, lr=0.1, momentum=0.9, clipping_type="auto_clip", seed=3, backend="cpp")
        for _ in range(3):
            opt.step()
        torch.save([p.detach() for p in params], {str(tmp_path / 'aot.pt')!r})
        """
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    aot = _child(code, tmp_path / "ext", env=env, cwd=tmp_path)
    assert aot.returncode == 0, aot.stderr
    assert aot.stderr == "" and not (tmp_path / "ext").exists()  # no JIT build, nothing said

    opt = ClippedSGD(params, lr=0.1, momentum=0.9, clipping_type="auto_clip", seed=3, backend="cpp")
    for _ in range(3):
        opt.step()
    for expected, got in zip(params, torch.load(tmp_path / "aot.pt")):
        assert torch.equal(expected.detach(), got)
