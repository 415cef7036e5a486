"""The first-use build (kernels/cpu/build.py): a package installed without its extension (as an
ordinary, build-isolated `pip install` leaves it) compiles the bundled C++ sources on first import
into the cache, once across processes, loads the cached build later, can be turned off, and
falls back to torch's own kernels with one warning when the compiler fails.

Each test runs Python in subprocesses on a copy of this tree's package without the extension
(whatever is installed), with a temporary cache. One compile in all (about 20-60 s): the tests
that need a built cache share the one test that builds it.
"""

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "batchnorm"
COMPILER = shutil.which(os.environ.get("CXX", "c++"))
pytestmark = pytest.mark.slow

# A training step of BatchNorm2d against torch.nn's, then what served it and what was said.
STEP = textwrap.dedent("""
    import json, sys, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import batchnorm
        from batchnorm import kernels
    torch.manual_seed(0)
    ours, theirs = batchnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    y, y_twin = ours(x), theirs(x_twin)
    y.pow(2).sum().backward()
    y_twin.pow(2).sum().backward()
    torch.testing.assert_close(y, y_twin)
    torch.testing.assert_close(x.grad, x_twin.grad)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    extension = sys.modules.get("batchnorm.kernels.cpu._C")
    print(json.dumps({
        "native": kernels.native_cpu(),
        "backend": kernels.backend_name(x),
        "file": getattr(extension, "__file__", None),
        "warnings": [str(w.message) for w in caught if "batchnorm" in str(w.message)]}))
""")


@pytest.fixture
def package(tmp_path):
    """This tree's package as an ordinary install leaves it: the sources, no extension."""
    root = tmp_path / "site"
    shutil.copytree(PACKAGE, root / "batchnorm",
                    ignore=shutil.ignore_patterns("*.so", "_C.json", "__pycache__"))
    return root


def _start(site, cache, **env):
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("BATCHNORM_")}  # BATCHNORM_KERNELS, _BUILD, ...
    environment.update(PYTHONPATH=str(site), BATCHNORM_CACHE_DIR=str(cache), OMP_NUM_THREADS="1",
                       **env)
    return subprocess.Popen([sys.executable, "-c", STEP], env=environment, cwd=site,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process, timeout=300):
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def _run(site, cache, **env):
    return _finish(_start(site, cache, **env))


def _compiling_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("batchnorm: compiling ")]


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (c++ or $CXX) to build with")
def test_first_use_build_concurrent_then_cached(package, tmp_path):
    cache = tmp_path / "cache"
    # Two processes import at once, as DataLoader workers or torchrun ranks do: one compiles,
    # the other waits on the lock, and both serve the native kernels from the one build.
    first = [_finish(process) for process in [_start(package, cache), _start(package, cache)]]
    compiling = [line for _, stderr in first for line in _compiling_lines(stderr)]
    assert len(compiling) == 1, [stderr for _, stderr in first]
    assert " done in " in compiling[0], compiling
    for result, _ in first:
        assert result["native"] and result["backend"] == "cpu", result
        assert result["warnings"] == [], result
    files = {result["file"] for result, _ in first}
    assert len(files) == 1 and Path(files.pop()).parent.parent == cache, first
    built = [path.name for path in cache.iterdir() if path.is_dir()]
    assert len(built) == 1 and built[0].startswith(f"torch-{torch.__version__}-"), built

    # A later import loads the cached build without compiling.
    later, stderr = _run(package, cache)
    assert later["native"] and later["file"] == first[0][0]["file"], later
    assert _compiling_lines(stderr) == [], stderr

    # An extension installed beside the sources but built for another torch is not loaded
    # (this one would not even load): the cache's build for this torch serves.
    cpu = package / "batchnorm" / "kernels" / "cpu"
    (cpu / "_C.json").write_text(json.dumps({"torch": "1.0.0", "capability": "DEFAULT",
                                             "sources": "0"}))
    (cpu / f"_C{_extension_suffix()}").write_bytes(b"not a shared object")
    stale, stderr = _run(package, cache)
    assert stale["native"] and stale["file"] == first[0][0]["file"], stale
    assert stale["warnings"] == [] and _compiling_lines(stderr) == [], (stale, stderr)


def _extension_suffix():
    return importlib.machinery.EXTENSION_SUFFIXES[0]


def test_opt_out_leaves_torch_operations_with_one_warning(package, tmp_path):
    cache = tmp_path / "cache"
    result, stderr = _run(package, cache, BATCHNORM_BUILD="0")
    assert not result["native"] and result["backend"] == "aten", result
    assert len(result["warnings"]) == 1, result
    assert "BATCHNORM_BUILD=0" in result["warnings"][0], result
    assert "pip install --no-build-isolation" in result["warnings"][0], result
    assert _compiling_lines(stderr) == [] and not cache.exists(), stderr


def test_failing_compiler_falls_back_with_one_warning_and_is_not_retried(package, tmp_path):
    cache = tmp_path / "cache"
    result, stderr = _run(package, cache, CXX="/bin/false")
    assert not result["native"] and result["backend"] == "aten", result
    assert len(result["warnings"]) == 1, result
    warning = result["warnings"][0]
    assert "compiling them failed" in warning and "/bin/false" in warning, warning
    assert "Install a C++ compiler" in warning and "build.log" in warning, warning
    assert len(_compiling_lines(stderr)) == 1 and " failed after " in stderr, stderr

    # The next import with the same compiler does not try again; another compiler would.
    again, stderr = _run(package, cache, CXX="/bin/false")
    assert not again["native"] and len(again["warnings"]) == 1, again
    assert "failed before with the same compiler" in again["warnings"][0], again
    assert _compiling_lines(stderr) == [], stderr
