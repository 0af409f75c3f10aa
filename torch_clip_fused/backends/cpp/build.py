"""Building and loading the C++ extension (csrc/).

``load_extension()`` loads, in this order:

1. the module compiled at install time (``TORCH_CLIP_FUSED_BUILD_CPP=1``, see setup.py), when its build
   record (``<module file>.json``) matches this process: torch (version, commit, C++ ABI), Python, CPU
   flags and C++ sources (build_config.identity); otherwise it says in one line why it is ignored;
2. the JIT build: ``torch.utils.cpp_extension.load`` with ninja, on first use, into a folder of
   ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) named after that same identity,
   so that two environments on one machine never build over each other.  A complete build leaves
   its record beside the library (``<library>.json``); later processes import that library
   directly (no ninja run, no compiler needed: the folder's name guarantees the sources match), so
   that checkouts at other paths, another ninja or touched sources never rebuild it.

The JIT build says what it does on first use and how long it took; a cached load says nothing.
Processes building into one folder take turns under an OS lock (``fcntl.flock`` of ``build.flock``,
released by the OS when its holder dies, however it dies): one that finds it held says once that it
waits; the one that holds it removes torch's own lock file if one is there, which can then only be
left by a build that was killed (torch's lock file names no owner: alone, it is waited on forever).
A missing compiler or ninja is found before torch is called, and torch's own messages (and, when
the build fails, the compiler's output) go to ``build.log`` in the folder, not to the terminal.  A
failure is remembered: every later call raises the same CppBuildError (a RuntimeError with the
reason and the fix).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

from . import build_config

#: the OS lock file in the build folder (fcntl.flock)
LOCK_NAME = "build.flock"
#: the log of the last first-use build in the build folder (torch's messages, the compiler's output)
LOG_NAME = "build.log"
_TORCH_LOCK = "lock"  # torch.utils.file_baton.FileBaton's file in the build folder
# the first build on 2 cores: about 35 s idle, 2-2.5 min shared with another job, 6 min shared with
# several (about 80 s of CPU time, most of it clipped_sgd.cpp on one core)
_EXPECTED_TIME = "1-3 minutes"
_COMPILER_FIX = ("install a C++ compiler (g++: e.g. `apt-get install build-essential`, `dnf install gcc-c++` or "
                 "`conda install -c conda-forge gxx`) or set CXX to one")
_NINJA_FIX = "`pip install ninja`"

_module = None
_error = None


class CppBuildError(RuntimeError):
    """The C++ extension cannot be built or loaded: ``reason`` says what is missing or failed, ``fix``
    what to do about it."""

    def __init__(self, reason: str, fix: str = ""):
        self.reason, self.fix = reason, fix
        super().__init__(f"the C++ backend could not be built: {reason}" + (f"; to build it: {fix}" if fix else ""))


def load_extension():
    """The compiled module; builds it on first call, raises CppBuildError with the reason if it cannot."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise CppBuildError(_error.reason, _error.fix)
    try:
        _module = _prebuilt() or _jit_build()
    except CppBuildError as err:
        _error = err
        raise
    except Exception as err:  # kept, raised again with its reason on every later use
        _error = CppBuildError(f"{type(err).__name__}: {err}")
        raise CppBuildError(_error.reason) from err
    return _module


def loaded_extension():
    """The module if it is already built and loaded, else None (never starts a build)."""
    return _module


def csrc_dir() -> Path:
    spec = importlib.util.find_spec("torch_clip_fused.csrc")
    if spec is None or not spec.submodule_search_locations:
        raise CppBuildError("the C++ sources (torch_clip_fused.csrc) are not installed", "reinstall torch_clip_fused")
    return Path(list(spec.submodule_search_locations)[0])


def build_directory(ident: dict | None = None) -> Path:
    """The JIT build's folder for this process (for ``ident``, build_config.identity, when given)."""
    if ident is None:
        import torch

        ident = build_config.identity(torch, csrc_dir())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / build_config.folder_name(ident)


def check_toolchain(need_compiler: bool = True) -> tuple:
    """``(compiler, ninja)``: the C++ compiler (None when not needed) and the ninja to build with;
    raises CppBuildError naming what is missing and how to get it."""
    missing, fixes, compiler = [], [], None
    if need_compiler:
        compiler, looked_for = _compiler()
        if compiler is None:
            missing.append(f"no C++ compiler found ({looked_for})")
            fixes.append(_COMPILER_FIX)
    ninja = _ninja()
    if ninja is None:
        missing.append("ninja not found")
        fixes.append(_NINJA_FIX)
    if missing:
        raise CppBuildError(" and ".join(missing), "; ".join(fixes))
    return compiler, ninja


def _compiler() -> tuple:
    """(the compiler torch's build will run, or None; what was looked for).  torch runs $CXX, else c++."""
    if os.name == "nt":
        return os.environ.get("CXX", "cl"), ""
    cxx = os.environ.get("CXX")
    if cxx:
        words = shlex.split(cxx)
        return (cxx if words and shutil.which(words[0]) else None), f"CXX={cxx} is not an executable"
    for name in ("c++", "g++"):
        if shutil.which(name):
            return name, ""
    return None, "neither c++ nor g++ is on PATH"


def _ninja():
    """ninja on PATH, or beside the interpreter (``pip install ninja`` in a venv run without activating it)."""
    found = shutil.which("ninja")
    if found:
        return found
    beside = Path(sys.executable).parent / ("ninja.exe" if os.name == "nt" else "ninja")
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def _say(message: str) -> None:
    print(f"torch_clip_fused: {message}", file=sys.stderr, flush=True)


# --- the prebuilt module (setup.py with TORCH_CLIP_FUSED_BUILD_CPP=1) ---------------------------------

def _prebuilt_spec():
    """The spec of the module compiled at install time, or None."""
    try:
        return importlib.util.find_spec(build_config.PREBUILT_MODULE)
    except (ImportError, ValueError):
        return None


def _prebuilt():
    """The module compiled at install time if it was built for this process, else None."""
    spec = _prebuilt_spec()
    if spec is None or not spec.origin:
        return None
    import torch

    try:
        record = json.loads(Path(f"{spec.origin}.json").read_text())
    except (OSError, ValueError):
        return _ignore_prebuilt(spec, "it has no build record")
    for key, value in build_config.identity(torch, csrc_dir()).items():
        if record.get(key) != value:
            if key == "sources":
                return _ignore_prebuilt(spec, "built from other C++ sources than the installed ones")
            return _ignore_prebuilt(spec, f"built for {key} {record.get(key)}, this process has {value}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as err:
        return _ignore_prebuilt(spec, f"it does not load: {err}")
    return module


def _ignore_prebuilt(spec, why: str) -> None:
    _say(f"ignoring the prebuilt C++ extension {spec.origin} ({why}); the C++ extension is built on first use instead")
    return None


# --- the JIT build -------------------------------------------------------------------------------------

def _jit_build():
    import torch

    csrc = csrc_dir()
    ident = build_config.identity(torch, csrc)
    build_dir = build_directory(ident)
    name = build_config.module_name(ident)
    library = build_dir / f"{name}{'.pyd' if os.name == 'nt' else '.so'}"
    record = Path(f"{library}.json")  # written once the build is complete
    if record.exists():  # built for exactly this identity (the folder's name): no ninja, no compiler
        return _import_built(name, library, build_dir)
    compiler, ninja = check_toolchain(need_compiler=not library.exists())  # before anything is said or made
    build_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(build_dir):
        if record.exists():  # built by the process this one waited for
            return _import_built(name, library, build_dir)
        module = _build(name, library, build_dir, csrc, ident, compiler, ninja)
        _write_record(record, ident)
    return module


def _build(name, library, build_dir, csrc, ident, compiler, ninja):
    """torch's JIT build (ninja: compiles what is missing or out of date) and import of the module."""
    from torch.utils import cpp_extension

    building = not library.exists()
    if building and compiler is None:
        compiler, ninja = check_toolchain()
    if building:
        _say(f"building the C++ CPU extension in {build_dir} (first use only; about {_EXPECTED_TIME}) ...")
        start = time.monotonic()
    log = []
    try:
        with _toolchain_env(compiler, ninja), _torch_messages_to(log):
            module = cpp_extension.load(
                name=name, sources=[str(csrc / s) for s in build_config.SOURCES], extra_include_paths=[str(csrc)],
                extra_cflags=list(ident["cflags"]), extra_ldflags=list(ident["ldflags"]),
                build_directory=str(build_dir), verbose=False)
    except Exception as err:
        path = _write_log(build_dir, log + [f"{type(err).__name__}: {err}"])
        raise CppBuildError(f"the build failed ({_first_error(err)})",
                            f"see the full log in {path}" if path else "") from err
    if building:
        seconds = time.monotonic() - start
        _write_log(build_dir, log + [f"built in {seconds:.0f} s"])
        _say(f"... built in {seconds:.0f} s")
    return module


def _import_built(name: str, library: Path, build_dir: Path):
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (ImportError, OSError) as err:
        raise CppBuildError(f"the build in {build_dir} does not load ({err})",
                            f"delete {build_dir} to build it again") from err
    return module


def _write_record(record: Path, ident: dict) -> None:
    """The build record that marks the build complete (written whole, or not at all)."""
    partial = record.with_name(f"{record.name}.{os.getpid()}.partial")
    try:
        partial.write_text(json.dumps(ident, indent=1) + "\n")
        os.replace(partial, record)
    except OSError:  # a read-only folder: the next process runs torch's (no-op) build again
        pass


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold the folder's OS lock, waiting (and saying so once) while another live process holds it;
    then remove torch's lock file if a killed build left one."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock file alone
        yield
        return
    with open(build_dir / LOCK_NAME, "a") as handle:
        locked = True
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process's build of the C++ CPU extension in {build_dir} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: torch's lock file alone
            locked = False
        stale = build_dir / _TORCH_LOCK
        if locked and stale.exists():
            stale.unlink()
            _say(f"removed the stale build lock {stale} (left by an interrupted build)")
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _toolchain_env(compiler, ninja):
    """CXX and PATH as torch's build needs them: the compiler found (g++ where there is no c++) and
    ninja's folder (ninja beside the interpreter); restored afterwards."""
    saved = {key: os.environ.get(key) for key in ("CXX", "PATH")}
    if compiler and not os.environ.get("CXX") and compiler != "c++":
        os.environ["CXX"] = compiler
    if ninja and shutil.which("ninja") is None:
        os.environ["PATH"] = str(Path(ninja).parent) + os.pathsep + os.environ.get("PATH", "")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _torch_messages_to(log: list):
    """torch's log records and warnings during the build go to ``log``, not to the terminal."""

    class _Keep(logging.Filter):
        def filter(self, record):
            log.append(f"{record.levelname} {record.name}: {record.getMessage()}")
            return False

    keep = _Keep()
    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addFilter(keep)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                log.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        logger.removeFilter(keep)


def _write_log(build_dir: Path, lines: list):
    """Write the build log; its path, or None if it cannot be written."""
    path = build_dir / LOG_NAME
    try:
        path.write_text("\n".join(lines) + "\n")
    except OSError:
        return None
    return path


def _first_error(err: Exception) -> str:
    """The compiler's first error line (or the exception's first line), shortened."""
    text = str(err)
    match = re.search(r"^.*\berror\b:.*$", text, re.MULTILINE | re.IGNORECASE)
    line = (match.group(0) if match else text.splitlines()[0] if text else type(err).__name__).strip()
    return line if len(line) <= 200 else line[:197] + "..."
