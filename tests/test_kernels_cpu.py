"""kernels/cpu.py (numba) against the float64 composite reference, for every op, flag, dtype,
layout and odd shape; opcheck; torch.compile; fork safety; the compile-cache fallback.

The references are kernels/composite.py evaluated on float64 copies of the inputs: composite.py
is the contract, float64 makes it exact enough to judge the kernels' own rounding.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import batchnorm
from batchnorm import ops
from batchnorm.kernels import composite
from tests.utils import assert_close

cpu = pytest.importorskip("batchnorm.kernels.cpu", reason="numba is not installed")
pytestmark = pytest.mark.skipif(not cpu.available(), reason="numba kernels unavailable")

SRC = Path(__file__).resolve().parents[1] / "src"

# (shape, layout): odd shapes (1 channel, spatial 1x1, primes, batch 2), every rank, both layouts,
# and sizes that split into several pieces / row blocks (PIECE = 4096 elements).
CASES = [
    ((2, 3, 5, 7), "contiguous"),
    ((2, 3, 5, 7), "channels_last"),
    ((4, 1, 3, 3), "contiguous"),
    ((4, 1, 3, 3), "channels_last"),
    ((3, 5, 1, 1), "contiguous"),
    ((2, 7, 11, 13), "channels_last"),
    ((37, 6), "contiguous"),
    ((2, 4, 6), "contiguous"),
    ((2, 3, 2, 3, 5), "contiguous"),
    ((2, 3, 2, 3, 5), "channels_last"),
    ((2, 2, 4999), "contiguous"),  # several pieces per (n, c) row
    ((2100, 3), "contiguous"),  # (M, C): 350-row blocks, two flushes of MC_FLUSH_ROWS each
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FLAGS = [  # (weight, bias, residual, relu)
    (True, True, False, False),
    (False, False, False, False),
    (True, False, False, True),
    (True, True, True, True),
    (False, True, True, False),
]


def _layout(x, layout):
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    return x.contiguous()


def _inputs(shape, layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = _layout(torch.randn(shape, generator=g) * 2 + 3, layout).to(dtype)
    dy = _layout(torch.randn(shape, generator=g), layout).to(dtype)
    res = _layout(torch.randn(shape, generator=g), layout).to(dtype)
    acc = composite.stat_dtype(dtype)
    w = (torch.rand(C, generator=g) + 0.5).to(dtype)
    b = torch.randn(C, generator=g).to(dtype)
    mean = torch.randn(C, generator=g).to(acc) + 3
    invstd = (torch.rand(C, generator=g) + 0.5).to(acc)
    return x, dy, res, w, b, mean, invstd


def _f64(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats(shape, layout, dtype):
    x = _inputs(shape, layout, dtype)[0]
    count = x.numel() // shape[1]
    mean, m2 = cpu.stats(x)
    ref_mean, ref_m2 = composite.stats(x.double())
    assert mean.dtype == composite.stat_dtype(dtype) and m2.dtype == mean.dtype
    tol_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # inputs are exact
    assert_close(mean, ref_mean, tol_dtype, count, "mean")
    assert_close(m2 / count, ref_m2 / count, tol_dtype, count, "m2 / count")


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "w{:d}b{:d}res{:d}relu{:d}".format(*f))
def test_elemt_and_backward(shape, layout, dtype, flags):
    has_w, has_b, has_res, relu = flags
    x, dy, res, w, b, mean, invstd = _inputs(shape, layout, dtype)
    w, b, res = (w if has_w else None), (b if has_b else None), (res if has_res else None)
    count = x.numel() // shape[1]

    y = cpu.elemt(x, mean, invstd, w, b, res, relu)
    ref_y = composite.elemt(x.double(), mean.double(), invstd.double(), _f64(w), _f64(b),
                            _f64(res), relu)
    assert y.dtype == dtype and y.stride() == torch.empty_like(x).stride()
    assert_close(y, ref_y, dtype, what="elemt")

    output = y if relu else None
    # the mask comes from the same output for both (the reference's rounding must not move it)
    ref_out = _f64(output)
    sum_dy, sum_dy_xhat = cpu.backward_reduce(dy, x, mean, invstd, output)
    ref_sum_dy, ref_sum_dy_xhat = composite.backward_reduce(dy.double(), x.double(), mean.double(),
                                                            invstd.double(), ref_out)
    assert sum_dy.dtype == mean.dtype
    tol_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(sum_dy / count, ref_sum_dy / count, tol_dtype, count, "sum_dy")
    assert_close(sum_dy_xhat / count, ref_sum_dy_xhat / count, tol_dtype, count, "sum_dy_xhat")

    mean_dy = ref_sum_dy.to(mean.dtype) / count
    mean_dy_xhat = ref_sum_dy_xhat.to(mean.dtype) / count
    dx = cpu.backward_elemt(dy, x, mean, invstd, w, mean_dy, mean_dy_xhat, output)
    ref_dx = composite.backward_elemt(dy.double(), x.double(), mean.double(), invstd.double(),
                                      _f64(w), mean_dy.double(), mean_dy_xhat.double(), ref_out)
    assert dx.dtype == dtype and dx.stride() == torch.empty_like(x).stride()
    assert_close(dx, ref_dx, dtype, what="backward_elemt")


def test_stats_stable_with_large_mean():
    """float32, mean offset 1e4, unit variance: normalizes within 1e-3 of float64."""
    g = torch.Generator().manual_seed(1)
    for layout, shape in (("contiguous", (8, 4, 33, 35)), ("channels_last", (8, 4, 33, 35)),
                          ("contiguous", (5000, 3))):
        x64 = torch.randn(shape, generator=g, dtype=torch.float64) + 1e4
        x = _layout(x64.float(), layout)
        mean, m2 = cpu.stats(x)
        count = x.numel() // shape[1]
        invstd = torch.rsqrt(m2 / count + 1e-5)
        y = cpu.elemt(x, mean, invstd, None, None, None, False)
        ref_mean, ref_m2 = composite.stats(x.double())
        ref_y = composite.elemt(x.double(), ref_mean, torch.rsqrt(ref_m2 / count + 1e-5), None,
                                None, None, False)
        assert (y.double() - ref_y).abs().max() < 1e-3, layout


def test_nan_propagates():
    x = torch.randn(4, 3, 6, 6)
    x[1, 2, 3, 3] = float("nan")
    mean, m2 = cpu.stats(x)
    assert torch.isnan(mean[2]) and torch.isnan(m2[2]) and torch.isfinite(mean[:2]).all()
    y = cpu.elemt(x, mean.nan_to_num(), torch.ones(3), None, None, None, True)
    assert torch.isnan(y[1, 2, 3, 3]) and (y.nan_to_num() >= 0).all()  # ReLU keeps NaN


def test_is_the_default_cpu_backend():
    from batchnorm import kernels

    for dtype in DTYPES:
        assert kernels.backend_name(torch.empty(2, 3, dtype=dtype)) == "cpu"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x, dy, res, w, b, mean, invstd = _inputs((2, 3, 4, 5), layout, torch.float32)
    y = cpu.elemt(x, mean, invstd, w, b, None, True)
    cases = [
        (ops.stats, (x,)),
        (ops.elemt, (x, mean, invstd, w, b, res, True)),
        (ops.elemt, (x, mean, invstd, None, None, None, False)),
        (ops.backward_reduce, (dy, x, mean, invstd, y)),
        (ops.backward_reduce, (dy, x, mean, invstd, None)),
        (ops.backward_elemt, (dy, x, mean, invstd, w, mean * 0.1, invstd * 0.1, y)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))


def test_module_matches_torch_nn_and_compiles():
    """batchnorm.BatchNorm2d on the numba path: eager == torch.nn, and fullgraph compile works."""
    torch._dynamo.reset()
    ours, theirs = batchnorm.BatchNorm2d(5), torch.nn.BatchNorm2d(5, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, 6, 7, generator=g).contiguous(memory_format=torch.channels_last)

    def step(model, x):  # the forward compiles whole; its backward graph runs the backward ops
        y = model(x)
        (y * y).sum().backward()
        return y

    compiled = torch.compile(ours, fullgraph=True)
    x1, x2 = x.clone().requires_grad_(), x.double().requires_grad_()  # reference in float64
    y1, y2 = step(compiled, x1), step(theirs, x2)
    assert_close(y1, y2, torch.float32, what="output")
    assert_close(x1.grad, x2.grad, torch.float32, 4 * 6 * 7, "grad_input")
    assert_close(ours.weight.grad, theirs.weight.grad, torch.float32, 4 * 6 * 7, "grad_weight")
    assert_close(ours.running_var, theirs.running_var, torch.float32, what="running_var")


def _run(script: str, env: dict[str, str], timeout: int = 180) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# The reference is computed before the fork: torch's own GNU OpenMP pool does not survive a
# fork (DataLoader workers run torch ops with one thread for that reason); numba's must.
FORK_SCRIPT = """
    import os, torch
    torch.set_num_threads(2)
    from batchnorm.kernels import cpu, composite
    x = torch.randn(8, 16, 96, 96)  # above PARALLEL_MIN_ELEMENTS: the threaded variant
    assert x.numel() >= cpu.PARALLEL_MIN_ELEMENTS
    ref_mean, ref_m2 = composite.stats(x.double())
    def check():
        mean, m2 = cpu.stats(x)
        assert torch.allclose(mean.double(), ref_mean, atol=1e-5)
        assert torch.allclose(m2.double(), ref_m2, rtol=1e-4)
        _, mean, m2, _ = cpu.forward_train(x, None, None, None, False, 1e-5)  # fused, threaded
        assert torch.allclose(mean.double(), ref_mean, atol=1e-5)
        assert torch.allclose(m2.double(), ref_m2, rtol=1e-4)
    check()
    import numba  # numba's thread count follows torch's, for large inputs only
    big = cpu.PARALLEL_MIN_ELEMENTS
    assert cpu._threads(big) == 2 and numba.get_num_threads() == 2
    assert cpu._threads(100) == 1
    torch.set_num_threads(1)
    assert cpu._threads(big) == 1
    torch.set_num_threads(2)
    from concurrent.futures import ThreadPoolExecutor  # concurrent launches from Python threads
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: check(), range(8)))
    pid = os.fork()
    if pid == 0:
        try:
            check()
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    check()
    print("child status", os.waitstatus_to_exitcode(status))
"""


def test_fork_after_use():
    """A process that used the threaded kernels (from several Python threads at once) forks
    (DataLoader workers); the child uses them."""
    env = {"NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    result = _run(FORK_SCRIPT, env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "child status 0" in result.stdout, result.stdout + result.stderr[-2000:]


def test_available_is_false_without_numba():
    """No numba: available() says so (no exception) and the composite fallback serves."""
    script = """
        import sys
        sys.modules["numba"] = None  # makes `import numba` raise ImportError
        import torch
        from batchnorm import kernels
        from batchnorm.kernels import composite, cpu
        assert cpu.available() is False
        assert kernels.backend_for(torch.empty(2, 3)) is composite
        print("ok")
    """
    result = _run(script, {"PYTHONPATH": str(SRC)})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


CACHE_SCRIPT = """
    import torch
    from batchnorm.kernels import cpu, composite
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    mean, m2 = cpu.stats(x)
    ref_mean, ref_m2 = composite.stats(x)
    assert torch.allclose(mean, ref_mean) and torch.allclose(m2, ref_m2)
    print("ok")
"""


def test_cache_falls_back_to_user_dir_then_to_none(tmp_path):
    """Package dir not writable -> numba's user cache dir; that not writable either -> no cache.

    The tests may run as root, which ignores file modes, so "not writable" is made by putting a
    file where numba wants a directory.
    """
    package = tmp_path / "src" / "batchnorm"
    shutil.copytree(SRC / "batchnorm", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "kernels" / "__pycache__").write_text("not a directory")
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    base = {"PYTHONPATH": str(tmp_path / "src"), "NUMBA_NUM_THREADS": "1", "HOME": str(blocker)}

    user_cache = tmp_path / "user-cache"
    result = _run(CACHE_SCRIPT, {**base, "XDG_CACHE_HOME": str(user_cache)})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
    assert list(user_cache.rglob("*.nbi")), "expected numba's index files in the user cache dir"

    result = _run(CACHE_SCRIPT, {**base, "XDG_CACHE_HOME": str(blocker / "cache")})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# forward_train / backward_train: the fused training step equals the four-op composition
# ---------------------------------------------------------------------------------------------

TRAIN_CASES = CASES + [((2, 5, 3, 1), "contiguous"), ((3, 4, 9, 9), "channels_last")]


def _compose_forward(x, w, b, res, relu, eps):
    """composite.py's four-op forward, as ops.py runs it without forward_train."""
    mean, m2 = composite.stats(x)
    invstd = torch.rsqrt(m2 / (x.numel() // x.shape[1]) + eps)
    return composite.elemt(x, mean, invstd, w, b, res, relu), mean, m2, invstd


def _compose_backward(dy, x, mean, invstd, w, output):
    sum_dy, sum_dy_xhat = composite.backward_reduce(dy, x, mean, invstd, output)
    count = x.numel() // x.shape[1]
    dx = composite.backward_elemt(dy, x, mean, invstd, w, sum_dy / count, sum_dy_xhat / count,
                                  output)
    return dx, sum_dy, sum_dy_xhat


@pytest.fixture(params=["fused", "separate"])
def slab_budget(request, monkeypatch):
    """Both sides of the cache threshold: every shape fused, or none (the separate kernels)."""
    fused = request.param == "fused"
    monkeypatch.setattr(cpu, "FUSED_SLAB_BYTES", 1 << 40 if fused else 0)
    monkeypatch.setattr(cpu, "FUSED_MIN_ROW_BYTES", 0 if fused else 1 << 40)
    return request.param


@pytest.mark.parametrize("shape,layout", TRAIN_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "w{:d}b{:d}res{:d}relu{:d}".format(*f))
def test_train_step(shape, layout, dtype, flags, slab_budget):
    has_w, has_b, has_res, relu = flags
    x, dy, res, w, b, _, _ = _inputs(shape, layout, dtype)
    w, b, res = (w if has_w else None), (b if has_b else None), (res if has_res else None)
    count, eps = x.numel() // shape[1], 1e-5
    stat_tol = torch.float64 if dtype == torch.float64 else torch.float32  # inputs are exact

    y, mean, m2, invstd = cpu.forward_train(x, w, b, res, relu, eps)
    ref_y, ref_mean, ref_m2, ref_invstd = _compose_forward(x.double(), _f64(w), _f64(b),
                                                           _f64(res), relu, eps)
    acc = composite.stat_dtype(dtype)
    assert (mean.dtype, m2.dtype, invstd.dtype) == (acc, acc, acc)
    assert y.dtype == dtype and y.stride() == torch.empty_like(x).stride()
    assert_close(mean, ref_mean, stat_tol, count, "mean")
    assert_close(m2 / count, ref_m2 / count, stat_tol, count, "m2 / count")
    assert_close(invstd, ref_invstd, stat_tol, count, "invstd")
    assert_close(y, ref_y, dtype, count, "output")
    # and the same as this backend's own separate ops, to their rounding
    sep_mean, sep_m2 = cpu.stats(x)
    torch.testing.assert_close(mean, sep_mean)
    torch.testing.assert_close(m2, sep_m2)

    output = y if relu else None  # the mask comes from the same output for both
    dx, sum_dy, sum_dy_xhat = cpu.backward_train(dy, x, mean, invstd, w, output)
    ref_dx, ref_sum_dy, ref_sum_dy_xhat = _compose_backward(
        dy.double(), x.double(), mean.double(), invstd.double(), _f64(w), _f64(output))
    assert (sum_dy.dtype, sum_dy_xhat.dtype) == (acc, acc)
    assert dx.dtype == dtype and dx.stride() == torch.empty_like(x).stride()
    assert_close(sum_dy / count, ref_sum_dy / count, stat_tol, count, "sum_dy")
    assert_close(sum_dy_xhat / count, ref_sum_dy_xhat / count, stat_tol, count, "sum_dy_xhat")
    assert_close(dx, ref_dx, dtype, count, "grad_input")


@pytest.mark.parametrize("shape", [(2, 3, 4999), (16, 8, 7, 7), (3, 1, 5, 5), (256, 32)])
def test_train_step_uses_fused_kernels_within_budget(shape, monkeypatch):
    """Within the budget the fused kernels run (counted), beyond it they do not."""
    calls = []

    def counted(kernel, name):
        def call(*args):
            calls.append(name)
            return kernel(*args)
        return call

    for name in ("forward_train_ncs", "backward_train_ncs"):
        pair = getattr(cpu._nk, name)
        monkeypatch.setattr(cpu._nk, name, tuple(counted(k, name) for k in pair))
    for name in ("forward_train_mc", "backward_train_mc"):
        monkeypatch.setattr(cpu._nk, name, counted(getattr(cpu._nk, name), name))
    monkeypatch.setattr(cpu, "FUSED_MIN_ROW_BYTES", 0)
    x, dy, _, w, b, _, _ = _inputs(shape, "contiguous", torch.float32)
    for budget, expected in ((1 << 30, 2), (16, 0)):
        calls.clear()
        monkeypatch.setattr(cpu, "FUSED_SLAB_BYTES", budget)
        y, mean, m2, invstd = cpu.forward_train(x, w, b, None, False, 1e-5)
        cpu.backward_train(dy, x, mean, invstd, w, None)
        assert len(calls) == expected, (budget, calls)
    if len(shape) == 4 and shape[1] > 2:  # short rows: fused only while the whole input fits
        monkeypatch.setattr(cpu, "FUSED_MIN_ROW_BYTES", 1 << 30)
        whole = x.numel() * 4 * 2  # dy and x
        for budget, expected in ((whole, 2), (whole // shape[1], 0)):
            calls.clear()
            monkeypatch.setattr(cpu, "FUSED_SLAB_BYTES", budget)
            y, mean, m2, invstd = cpu.forward_train(x, w, b, None, False, 1e-5)
            cpu.backward_train(dy, x, mean, invstd, w, None)
            assert len(calls) == expected, (budget, calls)


def test_train_step_stable_with_large_mean(slab_budget):
    """float32, mean offset 1e4, unit variance: the fused statistics normalize within 1e-3."""
    g = torch.Generator().manual_seed(3)
    for layout, shape in (("contiguous", (8, 4, 33, 35)), ("contiguous", (5000, 3)),
                          ("channels_last", (8, 4, 33, 35))):
        x = _layout((torch.randn(shape, generator=g, dtype=torch.float64) + 1e4).float(), layout)
        y, _, _, _ = cpu.forward_train(x, None, None, None, False, 1e-5)
        ref_y = _compose_forward(x.double(), None, None, None, False, 1e-5)[0]
        assert (y.double() - ref_y).abs().max() < 1e-3, layout


def test_train_step_nan_propagates(slab_budget):
    x = torch.randn(4, 3, 6, 6)
    x[1, 2, 3, 3] = float("nan")
    y, mean, m2, invstd = cpu.forward_train(x, None, None, None, True, 1e-5)
    assert torch.isnan(mean[2]) and torch.isnan(m2[2]) and torch.isfinite(mean[:2]).all()
    assert torch.isnan(y[:, 2]).all() and (y[:, :2] >= 0).all()
    dx, sum_dy, _ = cpu.backward_train(torch.ones_like(x), x, mean, invstd, None, None)
    assert torch.isnan(dx[:, 2]).all() and torch.isfinite(dx[:, :2]).all()


def test_train_step_empty_batch():
    x = torch.empty(0, 3, 4, 4)
    y, mean, m2, invstd = cpu.forward_train(x, None, None, None, False, 1e-5)
    ref = _compose_forward(x, None, None, None, False, 1e-5)
    assert y.shape == x.shape
    torch.testing.assert_close(m2, cpu.stats(x)[1])
    assert mean.shape == ref[1].shape


def test_large_outputs_reuse_only_free_buffers(monkeypatch):
    """A large output's buffer is handed out again only when nothing refers to it any more."""
    monkeypatch.setattr(cpu, "_POOL", {})
    x = torch.randn(4, 4, 256, 260)  # above NUMPY_ALLOC_BYTES
    assert x.numel() * 4 >= cpu.NUMPY_ALLOC_BYTES
    y = cpu._empty_like(x)
    first = y.data_ptr()
    assert first % (2 << 20) == 0 and y.stride() == x.stride()
    held = [cpu._empty_like(x) for _ in range(2)]  # y is alive: fresh buffers
    assert first not in {t.data_ptr() for t in held}
    view, array = y[1], y.numpy()
    del y
    assert cpu._empty_like(x).data_ptr() != first  # a view still refers to it
    del view
    assert cpu._empty_like(x).data_ptr() != first  # a numpy array still refers to it
    del array
    z = cpu._empty_like(x)
    assert z.data_ptr() == first  # free: reused
    z.fill_(2.0)  # and the kernels write results into a reused buffer, not stale values
    out = cpu.elemt(x, torch.zeros(4), torch.ones(4), None, None, None, False)
    del z, out
    out = cpu.elemt(x, torch.zeros(4), torch.ones(4), None, None, None, False)
    torch.testing.assert_close(out, x)
    monkeypatch.setattr(cpu, "POOL_MAX_BYTES", 0)  # reuse off: nothing is kept
    cpu._POOL.clear()
    cpu._empty_like(x)
    assert not any(cpu._POOL.values())
