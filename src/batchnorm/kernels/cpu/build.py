"""The first-use build: compiles the C++ sources that ship with the package against the torch
installed now, once, into a per-user cache, for an install that has no extension built for this
torch (an ordinary `pip install`, with build isolation, sees no torch and builds none).

    find()      the extension to load: the one installed beside the sources if it was built for
                this torch and these sources, else the cache's (compiling it first if needed)
    build()     torch.utils.cpp_extension.load (ninja, torch's headers, compile_flags.py's flags)
                into the cache directory, behind a file lock

The cache directory is keyed by what the binary depends on: torch's version, Python's ABI, the
instruction set (compile_flags.capability()) and a hash of the sources and flags, under
$BATCHNORM_CACHE_DIR, else $XDG_CACHE_HOME/batchnorm, else ~/.cache/batchnorm. Processes that
start at once (DataLoader workers, torchrun ranks) compile once: the first takes the lock, the
others wait on it and then load what it built. A build that fails is remembered with the
compiler it ran (so a later import does not compile again for nothing, and an installed or
changed compiler is tried); `BATCHNORM_BUILD=0` turns the build off.
"""

import contextlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from batchnorm.kernels.cpu import compile_flags

MODULE = "batchnorm.kernels.cpu._C"
STAMP = "_C.json"  # what an extension was built for, beside it
CACHE_ENV, BUILD_ENV = "BATCHNORM_CACHE_DIR", "BATCHNORM_BUILD"
INSTALL_HINT = ("or install the package after torch with `pip install --no-build-isolation "
                "batchnorm`, which builds them then")
COMPILER_HINT = (f"Install a C++ compiler (g++ or clang++, or set CXX to one) and import again, "
                 f"{INSTALL_HINT}; {BUILD_ENV}=0 turns this build off")


class Unavailable(Exception):
    """The extension cannot be loaded here: why (cause) and what to do about it (fix)."""

    def __init__(self, cause: str, fix: str):
        super().__init__(cause)
        self.cause, self.fix = cause, fix


def find() -> ModuleType:
    """The extension module for this torch and processor, compiling it into the cache first if
    none is built; Unavailable if it cannot be had."""
    if MODULE in sys.modules:  # loaded already, or None: its import blocked (as tests do)
        loaded = sys.modules[MODULE]
        if loaded is None:
            raise Unavailable(f"the import of {MODULE} is blocked (None in sys.modules)",
                              f"Unblock it, {INSTALL_HINT}")
        return loaded
    try:
        capability = compile_flags.capability()
    except ValueError as wrong:
        raise Unavailable(str(wrong), "Set it to one of those or unset it") from None
    expected = {"torch": torch.__version__, "capability": capability,
                "sources": compile_flags.source_hash()}
    installed = _built(compile_flags.SOURCE_DIR, expected, keys=("torch", "sources"))
    if installed is not None:
        return _import(installed)
    directory = cache_directory(expected)
    cached = _built(directory, expected)
    if cached is not None:
        return _import(cached)
    if os.environ.get(BUILD_ENV, "1").lower() in ("0", "false", "no", "off"):
        raise Unavailable(f"none is built for torch {torch.__version__}, and {BUILD_ENV}="
                          f"{os.environ[BUILD_ENV]} turns off compiling them on first use",
                          f"Unset {BUILD_ENV} to compile them once into {directory}, "
                          f"{INSTALL_HINT}")
    try:
        return _import(build(directory, expected))
    except OSError as unwritable:  # the cache directory or its lock
        raise Unavailable(f"the cache {directory} cannot be written ({unwritable})",
                          f"Set {CACHE_ENV} to a directory of your own, {INSTALL_HINT}") from None


def cache_directory(expected: dict[str, str]) -> Path:
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or
                            os.path.join(os.path.expanduser("~"), ".cache"), "batchnorm")
    name = (f"torch-{expected['torch']}-{sys.implementation.cache_tag}-"
            f"{expected['capability']}-{expected['sources']}")
    return Path(root) / name


def build(directory: Path, expected: dict[str, str]) -> Path:
    """Compile the extension into directory (once, across processes) and return its path."""
    from filelock import FileLock, Timeout  # a dependency of torch

    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"batchnorm: waiting for another process compiling the native CPU kernels into "
              f"{directory}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        built = _built(directory, expected)  # by the process that held the lock
        if built is not None:
            return built
        compiler = _compiler()
        failed = directory / "failed.json"
        earlier = _read_json(failed)
        if earlier is not None and earlier.get("compiler") == compiler:
            raise Unavailable(f"compiling them failed before with the same compiler: "
                              f"{earlier.get('cause')} (log: {directory / 'build.log'})",
                              COMPILER_HINT)
        return _build_locked(directory, expected, compiler)
    finally:
        lock.release()


def _build_locked(directory: Path, expected: dict[str, str], compiler: str) -> Path:
    from torch.utils import cpp_extension  # imports setuptools: only here, not on every import

    print(f"batchnorm: compiling the native CPU kernels for torch {expected['torch']} "
          f"({expected['capability']}) into {directory}, once (a minute or less) ...",
          end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    path = os.environ.get("PATH", "")
    try:
        import ninja  # the pip package: its binary need not be on PATH (an unactivated venv)

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    except (ImportError, AttributeError):
        pass  # a ninja on PATH, or torch says that there is none
    try:
        # is_python_module=False: torch builds it (and dlopens it, harmlessly: nothing registers
        # before register_kernels()); _import loads it under its package's name
        with _quiet(cpp_extension):  # torch's notes on the compiler: the cause says it
            cpp_extension.load(
                "_C", [str(s) for s in compile_flags.sources()],
                extra_cflags=compile_flags.compile_args(expected["capability"]),
                extra_ldflags=compile_flags.link_args(), build_directory=str(directory),
                is_python_module=False)
    except Exception as error:  # any failure of the build leaves torch's own kernels serving
        seconds = time.perf_counter() - start
        print(f" failed after {seconds:.1f} s", file=sys.stderr, flush=True)
        log = directory / "build.log"
        log.write_text(f"{type(error).__name__}: {error}\n")
        cause = f"{_cause(error).rstrip('.')} (compiler: {os.environ.get('CXX', 'c++')})"
        (directory / "failed.json").write_text(json.dumps({"compiler": compiler,
                                                           "cause": cause}))
        raise Unavailable(f"compiling them failed: {cause} (log: {log})", COMPILER_HINT) from None
    finally:
        os.environ["PATH"] = path
    print(f" done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    (directory / "failed.json").unlink(missing_ok=True)
    stamp = directory / (STAMP + ".tmp")
    stamp.write_text(json.dumps(expected))
    stamp.replace(directory / STAMP)  # last, and atomic: the stamp says the build is whole
    return directory / "_C.so"


@contextlib.contextmanager
def _quiet(cpp_extension: ModuleType) -> Iterator[None]:
    """Without torch's warnings and log lines about the compiler (a failure's cause names it)."""
    logger = logging.getLogger(cpp_extension.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _built(directory: Path, expected: dict[str, str],
           keys: tuple[str, ...] = ("torch", "capability", "sources")) -> Path | None:
    """The extension in directory if its stamp says it was built for `expected` (the installed
    one may have been built for less than this processor has: the extension checks that)."""
    stamp = _read_json(directory / STAMP)
    if stamp is None or any(stamp.get(key) != expected[key] for key in keys):
        return None
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (directory / f"_C{suffix}").exists():
            return directory / f"_C{suffix}"
    return None


def _read_json(path: Path) -> dict | None:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or cut short
        return None
    return content if isinstance(content, dict) else None


def _import(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
    assert spec is not None
    try:
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except (ImportError, OSError) as broken:
        raise Unavailable(f"{path} does not load ({broken})",
                          f"Delete {path} to have them compiled again") from None
    sys.modules[MODULE] = module
    return module


def _compiler() -> str:
    """Which compiler a build runs (torch's choice: $CXX, else c++), and its file's time."""
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    if path is None:
        return f"{name} (not found)"
    return f"{os.path.realpath(path)} {os.stat(path).st_mtime_ns}"


def _cause(error: Exception) -> str:
    """The line of a build error that names its cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and not line.startswith("Error building extension"):
            return line
    for line in lines:
        if "not found" in line or "No such file" in line:
            return line
    return lines[-1] if lines else type(error).__name__
