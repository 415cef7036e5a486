"""The C++ CPU kernels (kernels/cpu/) against the float64 composite, for every op, flag, dtype,
layout and odd shape; opcheck; threading (1 and 2 threads, Python threads at once, fork);
running without the extension.

The references are the composite kernels (kernels/composite.py, the contract) evaluated on
float64 copies of the inputs, with `kernels.use("composite")` so that no C++ kernel takes part.
"""

import gc
import math
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import pytest
import torch

import batchnorm  # noqa: F401  (defines the ops)
from batchnorm import kernels, ops
from batchnorm.kernels import composite
from batchnorm.layout import stat_dtype
from tests.utils import assert_close, make_inputs, to_layout

pytestmark = pytest.mark.skipif(not kernels.native_cpu(),
                                reason="the C++ CPU kernels are not built (see setup.py)")

SRC = Path(__file__).resolve().parents[1] / "src"

# (shape, layout): odd shapes (1 channel, spatial 1x1, primes, batch 2), every rank, both
# layouts, rows shorter and longer than a vector, more values per channel than one flush of the
# float lanes (4096 values, 256 rows), and sizes above the 32768-value grain (threads split them).
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
    ((2, 2, 4999), "contiguous"),
    ((2100, 3), "contiguous"),
    ((3, 40, 17, 19), "channels_last"),
    ((2, 3, 130, 131), "contiguous"),
    # short runs (16 <= S < 256), walked as one span in aligned vectors that cross channels:
    # a 7x7 map, S equal to a float32 vector (16), and S = 255
    ((3, 37, 7, 7), "contiguous"),
    ((2, 5, 16), "contiguous"),
    ((2, 9, 255), "contiguous"),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FLAGS = [  # (weight, bias, residual, relu)
    (True, True, False, False),
    (False, False, False, False),
    (True, False, False, True),
    (True, True, True, True),
    (False, True, True, False),
]


def _f64(t):
    return None if t is None else t.double()


def _reference(name, *args):
    """The composite op on float64 copies, no C++ kernel involved."""
    with kernels.use("composite"):
        return getattr(torch.ops.batchnorm, name)(*[_f64(a) if isinstance(a, torch.Tensor)
                                                    else a for a in args])


def _count(shape):
    return int(torch.tensor(shape).prod()) // shape[1]


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats(shape, layout, dtype):
    x = make_inputs(shape, dtype, layout).x
    mean, m2 = ops.stats(x)
    assert mean.dtype == m2.dtype == stat_dtype(dtype)
    ref_mean, ref_m2 = _reference("stats", x)
    n = _count(shape)
    assert_close(mean, ref_mean, torch.float32 if dtype != torch.float64 else dtype, n, "mean")
    # M2 grows with the count: compare the variance it stands for
    assert_close(m2 / n, ref_m2 / n, torch.float32 if dtype != torch.float64 else dtype, n,
                 "m2 / count")


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "w{}b{}r{}relu{}".format(*map(int, f)))
def test_elemt_and_backward(shape, layout, dtype, flags):
    has_w, has_b, has_res, relu = flags
    x, dy, res, w, b, mean, invstd = make_inputs(shape, dtype, layout)
    w, b, res = (w if has_w else None), (b if has_b else None), (res if has_res else None)
    n = _count(shape)

    y = ops.elemt(x, mean, invstd, w, b, res, relu)
    assert y.dtype == dtype and y.stride() == x.stride()
    assert_close(y, _reference("elemt", x, mean, invstd, w, b, res, relu), dtype, what="elemt")

    out = y if relu else None
    sums = ops.backward_reduce(dy, x, mean, invstd, out)
    ref_sums = _reference("backward_reduce", dy, x, mean, invstd, out)
    for ours, ref, what in zip(sums, ref_sums, ("sum_dy", "sum_dy_xhat"), strict=True):
        assert_close(ours / n, ref / n, torch.float32 if dtype != torch.float64 else dtype, n,
                     what)

    mean_dy, mean_dy_xhat = (s / n for s in ref_sums)
    dx = ops.backward_elemt(dy, x, mean, invstd, w, mean_dy.to(mean.dtype),
                            mean_dy_xhat.to(mean.dtype), out)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    ref_dx = _reference("backward_elemt", dy, x, mean, invstd, w, mean_dy, mean_dy_xhat, out)
    assert_close(dx, ref_dx, dtype, what="backward_elemt")


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "w{}b{}r{}relu{}".format(*map(int, f)))
def test_fused_training_step(shape, layout, dtype, flags):
    has_w, has_b, has_res, relu = flags
    x, dy, res, w, b, _, _ = make_inputs(shape, dtype, layout, seed=1)
    w, b, res = (w if has_w else None), (b if has_b else None), (res if has_res else None)
    C, n = shape[1], _count(shape)
    tol = torch.float32 if dtype != torch.float64 else dtype
    buffers = [torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype),
               torch.tensor(3, dtype=torch.long)]
    ref_buffers = [t.clone() for t in buffers]

    y, mean, m2, invstd, finite = ops.forward_train(x, w, b, res, relu, 1e-5, *buffers, None)
    ref = _reference("forward_train", x, w, b, res, relu, 1e-5, *[_f64(t) if t.is_floating_point()
                                                                  else t for t in ref_buffers],
                     None)
    assert bool(finite) and y.stride() == x.stride()
    assert_close(y, ref[0], dtype, n, "output")
    for ours, theirs, what in zip((mean, m2 / n, invstd), (ref[1], ref[2] / n, ref[3]),
                                  ("mean", "m2 / count", "invstd"), strict=True):
        assert_close(ours, theirs, tol, n, what)
    assert int(buffers[2]) == 4  # momentum None: the cumulative average over 4 batches
    expected_mean = 0.75 * 0 + 0.25 * ref[1]
    assert_close(buffers[0], expected_mean, dtype, n, "running_mean")
    assert_close(buffers[1], 0.75 * 1 + 0.25 * ref[2] / (n - 1), dtype, n, "running_var")

    out = y if relu else None
    dx, sum_dy, sum_dy_xhat = ops.backward_train(dy, x, mean, invstd, w, out)
    ref_dx, ref_sum_dy, ref_sum_dy_xhat = _reference("backward_train", dy, x, mean, invstd, w,
                                                     out)
    assert dx.stride() == x.stride()
    assert_close(dx, ref_dx, dtype, n, "grad_input")
    assert_close(sum_dy / n, ref_sum_dy / n, tol, n, "sum_dy")
    assert_close(sum_dy_xhat / n, ref_sum_dy_xhat / n, tol, n, "sum_dy_xhat")


@pytest.mark.parametrize("offset", [0, 1, 5, 15])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_elemt_short_runs_from_any_alignment(offset, dtype):
    # x starting `offset` values past an aligned address: the first vector of the span, the run
    # boundaries inside vectors and the scalar tail all move; every channel must keep its own
    # constants (make_inputs gives each channel different ones)
    shape = (3, 11, 7, 7)
    x, _, res, w, b, mean, invstd = make_inputs(shape, dtype)
    flat = torch.empty(x.numel() + offset, dtype=dtype)
    shifted = flat[offset:].view(shape).copy_(x)
    assert shifted.is_contiguous() and shifted.storage_offset() == offset
    for residual, relu in ((None, False), (res, True)):
        y = ops.elemt(shifted, mean, invstd, w, b, residual, relu)
        assert_close(y, _reference("elemt", x, mean, invstd, w, b, residual, relu), dtype,
                     what=f"elemt, offset {offset}")


@pytest.mark.parametrize("shape,layout", CASES[:6])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_eval(shape, layout, dtype):
    x, _, res, w, b, mean, invstd = make_inputs(shape, dtype, layout, seed=2)
    var = (1 / invstd**2).to(dtype)  # the variance invstd stands for, eps aside
    y = ops.forward_eval(x, mean.to(dtype), var, w, b, res, True, 1e-3)
    assert y.stride() == x.stride()
    assert_close(y, _reference("forward_eval", x, mean.to(dtype), var, w, b, res, True, 1e-3),
                 dtype, what="forward_eval")


@pytest.mark.parametrize("channels", [1, 7, 8, 127, 128, 129, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_forward_eval_factors_are_the_scalar_formula(channels, dtype, affine):
    # forward_eval computes invstd = 1 / sqrt(var + eps) in vectors of doubles, chunk by chunk
    # (channel counts around the vector width and the chunk, and a scalar tail): the output must
    # be bit for bit elemt's with invstd from that formula in double, rounded to the statistics'
    # dtype, over variances of every magnitude, 0 with eps 0 (invstd inf) and inf (invstd 0)
    generator = torch.Generator().manual_seed(channels)
    acc = stat_dtype(dtype)
    x = torch.randn(2, channels, 3, 5, generator=generator).to(dtype)
    var = torch.rand(channels, generator=generator, dtype=torch.float64)
    var = (var * 10.0 ** torch.randint(-30, 30, (channels,), generator=generator)).to(acc)
    var[0] = 0
    var[channels // 2] = float("inf") if channels > 1 else 0
    mean = torch.randn(channels, generator=generator).to(acc)
    w = torch.rand(channels, generator=generator).add_(0.5).to(acc) if affine else None
    b = torch.randn(channels, generator=generator).to(acc) if affine else None
    for eps in (0.0, 1e-5):
        # in Python floats: IEEE square root and division (torch.sqrt of float64 is not always
        # the correctly rounded root)
        invstd = torch.tensor([1 / math.sqrt(v + eps) if v + eps > 0 else math.inf
                               for v in var.double().tolist()], dtype=torch.float64).to(acc)
        y = ops.forward_eval(x, mean, var, w, b, None, False, eps)
        expected = ops.elemt(x, mean, invstd, w, b, None, False)
        assert torch.equal(y.isnan(), expected.isnan())
        assert torch.equal(y.nan_to_num(), expected.nan_to_num()), f"eps {eps}"


@pytest.mark.parametrize("momentum", [0.1, None, 1.0])
@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float64, torch.float16,
                                          torch.bfloat16], ids=str)
def test_update_running_stats(momentum, buffer_dtype):
    g = torch.Generator().manual_seed(3)
    mean, m2 = torch.randn(5, generator=g), torch.rand(5, generator=g) * 10
    count = torch.tensor(7.0)
    ours = [torch.randn(5, generator=g).to(buffer_dtype), torch.rand(5, generator=g).to(
        buffer_dtype), torch.tensor(2)]
    theirs = [t.clone() for t in ours]
    assert bool(ops.update_running_stats(*ours, mean, m2, count, momentum))
    with kernels.use("composite"):
        assert bool(ops.update_running_stats(*theirs, mean, m2, count, momentum))
    for a, b, what in zip(ours, theirs, ("running_mean", "running_var", "num_batches_tracked"),
                          strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, msg=what)
    assert int(ours[2]) == 3


def test_non_finite_batch_updates_nothing():
    x = torch.randn(4, 3, 5)
    x[1, 2, 3] = float("nan")
    running = [torch.zeros(3), torch.ones(3), torch.tensor(0)]
    y, mean, m2, invstd, finite = ops.forward_train(x, None, None, None, False, 1e-5, *running,
                                                    0.1)
    assert not bool(finite)
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()
    assert torch.equal(running[0], torch.zeros(3)) and torch.equal(running[1], torch.ones(3))
    assert int(running[2]) == 0
    x[1, 2, 3] = float("inf")
    assert not bool(ops.forward_train(x, None, None, None, False, 1e-5, *running, 0.1)[4])
    assert int(running[2]) == 0


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_stats_stable_with_large_mean(layout):
    g = torch.Generator().manual_seed(0)
    x64 = to_layout(torch.randn(8, 4, 9, 9, generator=g, dtype=torch.float64) + 1e4, layout)
    mean, m2 = ops.stats(x64.float())
    n = 8 * 81
    ref_mean, ref_m2 = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False) * n
    assert (mean.double() - ref_mean).abs().max() < 1e-3
    assert ((m2.double() - ref_m2) / ref_m2).abs().max() < 1e-4


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_float32_extremes_normalize(layout, scale):
    # 1e30-scale values square to infinity in float32; the kernels fall back to double for the
    # channel and normalize it correctly. 1e-30-scale values are below eps: x_hat is tiny.
    g = torch.Generator().manual_seed(1)
    x64 = to_layout(torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64) * scale, layout)
    mean, m2 = ops.stats(x64.float())
    torch.testing.assert_close(mean.double(), x64.float().double().mean((0, 2, 3)),
                               rtol=1e-5, atol=scale * 1e-6)
    y, *_, finite = ops.forward_train(x64.float(), None, None, None, False, 1e-5, None, None,
                                      None, 0.1)
    ref = torch.nn.functional.batch_norm(x64, None, None, training=True, eps=1e-5)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5 if scale > 1 else 1e-30)


def test_empty_batch_stats_are_zero():
    for layout, shape in (("contiguous", (0, 3, 4, 4)), ("channels_last", (0, 3, 4, 4)),
                          ("contiguous", (0, 5))):
        x = to_layout(torch.empty(shape), layout)
        mean, m2 = ops.stats(x)
        assert torch.equal(mean, torch.zeros(shape[1])) and torch.equal(m2, torch.zeros(shape[1]))
        sums = ops.backward_reduce(x, x, mean, mean + 1, None)
        assert all(torch.equal(s, torch.zeros(shape[1])) for s in sums)
        assert ops.elemt(x, mean, mean + 1, None, None, None, False).shape == shape


def test_is_the_cpu_backend():
    for dtype in DTYPES:
        assert kernels.backend_name(torch.empty(2, 3, dtype=dtype)) == "cpu"
    with kernels.use("composite"):
        assert kernels.backend_name(torch.empty(2, 3)) == "composite"
        x = torch.randn(4, 3)
        y_composite = ops.elemt(x, x[0], x[1].abs(), None, None, None, False)
    assert kernels.backend_name(torch.empty(2, 3)) == "cpu"
    torch.testing.assert_close(ops.elemt(x, x[0], x[1].abs(), None, None, None, False),
                               y_composite)


@pytest.mark.parametrize("relu", [False, True])
def test_the_training_node_behaves_as_torchs_nodes(relu):
    """The C++ node of forward_train (autograd.cpp) keeps what autograd promises of every node:
    its saved tensors go through saved-tensor hooks, are freed after a backward (a second one
    raises), are checked for in-place changes, and keep no reference cycle with the output they
    save for the ReLU mask; a gradient asked for one argument only is that argument's."""
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def step(input):
        return ops.forward_train(input, weight, bias, None, relu, 1e-5, None, None, None, 0.1)[0]

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = step(x)
    assert y.grad_fn.name() == "BatchNormTrainBackward"
    assert len(packed) == 4 + relu  # input, weight, mean, invstd (+ the output)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    changed = x * 1
    y = step(changed)
    changed.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    (grad_weight,) = torch.autograd.grad((step(x) * x).sum(), [weight])
    expected = torch.autograd.grad((composite_step(x, weight, bias, relu) * x).sum(), [weight])[0]
    torch.testing.assert_close(grad_weight, expected)
    output = weakref.ref(step(x))
    gc.collect()
    assert output() is None


def composite_step(x, weight, bias, relu):
    with kernels.use("composite"):
        return ops.batch_norm_train(x, weight, bias, 1e-5, None, relu)[0]


def test_wrong_device_and_shape_are_clear_errors():
    x = torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError, match="weight must hold one value per channel"):
        ops.forward_train(x, torch.ones(4), None, None, False, 1e-5, None, None, None, 0.1)
    with pytest.raises(RuntimeError, match="residual must have the input's shape"):
        ops.elemt(x, torch.zeros(3), torch.ones(3), None, None, torch.ones(4, 3), False)
    with pytest.raises(RuntimeError, match="like the input"):
        ops.elemt(x, torch.zeros(3, device="meta"), torch.ones(3), None, None, None, False)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x, dy, res, w, b, mean, invstd = make_inputs((3, 4, 5, 6), torch.float32, layout)
    n = _count((3, 4, 5, 6))
    samples = {
        "stats": (x,),
        "elemt": (x, mean, invstd, w, b, res, True),
        "backward_reduce": (dy, x, mean, invstd, None),
        "backward_elemt": (dy, x, mean, invstd, w, mean / n, invstd / n, None),
        "forward_train": (x, w, b, res, True, 1e-5, torch.zeros(4), torch.ones(4),
                          torch.tensor(0), 0.1),
        "backward_train": (dy, x, mean, invstd, w, None),
        "forward_eval": (x, mean, invstd, w, b, None, False, 1e-5),
        "update_running_stats": (torch.zeros(4), torch.ones(4), torch.tensor(0), mean,
                                 invstd, torch.tensor(float(n)), None),
    }
    for name, args in samples.items():
        torch.library.opcheck(getattr(torch.ops.batchnorm, name).default, args)


# ---------------------------------------------------------------------------------------------
# Threads: torch's own pool, Python threads, fork
# ---------------------------------------------------------------------------------------------


def _train_step(x, dy):
    out = ops.forward_train(x, None, None, None, True, 1e-5, None, None, None, 0.1)
    y, mean, _, invstd, _ = out
    # and the unfused normalize (eval's pass), which splits the channels the same way
    return (y, *ops.backward_train(dy, x, mean, invstd, None, y),
            ops.elemt(x, mean, invstd, None, None, None, False))


@pytest.mark.parametrize("shape,layout", [((16, 24, 33, 33), "contiguous"),
                                          ((16, 24, 33, 33), "channels_last"),
                                          ((70000, 7), "contiguous"),
                                          ((4, 700, 7, 7), "contiguous")])
def test_two_threads_agree_with_one(shape, layout):
    x, dy = make_inputs(shape, torch.float32, layout, seed=5)[:2]  # (x, dy, ...)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = _train_step(x, dy)
        torch.set_num_threads(2)
        threaded = _train_step(x, dy)
    finally:
        torch.set_num_threads(saved)
    n = _count(shape)
    for a, b in zip(serial, threaded, strict=True):
        assert_close(a / (n if a.dim() == 1 else 1), b / (n if b.dim() == 1 else 1),
                     torch.float32, n, "1 thread vs 2")


def test_python_threads_at_once():
    x, dy = make_inputs((8, 16, 40, 40), torch.float32, "channels_last", seed=6)[:2]
    expected = _train_step(x, dy)
    results, errors = [None] * 4, []

    def work(i):
        try:
            for _ in range(5):
                results[i] = _train_step(x, dy)
        except Exception as error:  # noqa: BLE001  reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for result in results:
        for a, b in zip(result, expected, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.slow
def test_fork_after_use():
    script = textwrap.dedent("""
        import os, torch, batchnorm
        from batchnorm import ops
        x = torch.randn(16, 24, 40, 40)
        torch.set_num_threads(2)
        ops.forward_train(x, None, None, None, False, 1e-5, None, None, None, 0.1)
        pid = os.fork()
        if pid == 0:
            # as DataLoader workers do: GNU OpenMP's pool does not survive fork (torch's own
            # kernels hang in the child too otherwise), one thread needs no pool
            torch.set_num_threads(1)
            y = ops.forward_train(x, None, None, None, False, 1e-5, None, None, None, 0.1)[0]
            os._exit(0 if abs(float(y.mean())) < 1e-4 else 3)
        _, status = os.waitpid(pid, 0)
        raise SystemExit(os.waitstatus_to_exitcode(status))
    """)
    done = subprocess.run([sys.executable, "-c", script], timeout=120, env=_env())
    assert done.returncode == 0


def _env(**extra):
    """This tree's sources (and its tests package, for tests.utils), whatever is installed."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(SRC.parent)]), **extra)


@pytest.mark.slow
def test_without_the_extension_warns_once_and_uses_torchs_kernels():
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["batchnorm.kernels.cpu._C"] = None  # as if it was never built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, batchnorm
            from batchnorm import kernels
            m = batchnorm.nn.BatchNorm1d(3)
            m(torch.randn(4, 3)).sum().backward()
            m(torch.randn(4, 3))
        messages = [str(w.message) for w in caught if "native CPU kernels" in str(w.message)]
        assert len(messages) == 1 and "pip install --no-build-isolation" in messages[0], messages
        assert kernels.backend_name(torch.empty(2, 3)) == "aten"
    """)
    done = subprocess.run([sys.executable, "-c", script], timeout=120, env=_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_environment_forces_the_composite():
    script = ("import torch, batchnorm; from batchnorm import kernels; "
              "assert kernels.backend_name(torch.empty(2, 3)) == 'composite'")
    done = subprocess.run([sys.executable, "-c", script], timeout=120,
                          env=_env(BATCHNORM_KERNELS="composite"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_composite_reference_is_not_the_cpu_kernels():
    # The references above would prove nothing if use("composite") still ran the C++ kernels.
    calls = []
    original = composite.stats

    def counted(x):
        calls.append(1)
        return original(x)

    class Recording:
        stats = staticmethod(counted)
        elemt = staticmethod(composite.elemt)
        backward_reduce = staticmethod(composite.backward_reduce)
        backward_elemt = staticmethod(composite.backward_elemt)

    with kernels.serving("cpu", Recording, "recording"):
        ops.stats(torch.randn(3, 2))
        assert kernels.backend_name(torch.empty(1)) == "recording"
    ops.stats(torch.randn(3, 2))
    assert calls == [1]


@pytest.mark.slow
def test_python_autograd_path_matches_torch():
    # Without the extension the single-process step runs through ops._BatchNormTrain (the
    # Python twin of kernels/cpu/autograd.cpp): train steps, eval, gradgradcheck against torch.
    script = textwrap.dedent("""
        import torch, batchnorm
        from batchnorm import kernels
        from tests.utils import check_forward_backward, make_inputs, parameter_pairs
        assert not kernels.native_cpu()
        for shape, relu in (((6, 3, 4, 5), False), ((7, 4), True)):
            ours = batchnorm.BatchNormReLU2d(3) if relu and len(shape) == 4 else (
                batchnorm.BatchNormReLU1d(shape[1]) if relu else batchnorm.BatchNorm2d(3))
            theirs = (torch.nn.BatchNorm1d(shape[1]) if len(shape) == 2 else
                      torch.nn.BatchNorm2d(3))
            ours.double(); theirs.double()
            reference = (lambda x: torch.relu(theirs(x))) if relu else theirs
            count = shape[0] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            for step in range(3):
                inputs = make_inputs(shape, torch.float64, seed=step)
                check_forward_backward(ours, reference, {"input": inputs.x}, torch.float64,
                                       reduction_size=count, dy=inputs.dy,
                                       params=parameter_pairs(ours, theirs),
                                       what=f"{shape} step {step}")
            torch.testing.assert_close(ours.running_mean, theirs.running_mean)
            torch.testing.assert_close(ours.running_var, theirs.running_var)
            ours.eval(); theirs.eval()
            inputs = make_inputs(shape, torch.float64, seed=10)
            check_forward_backward(ours, reference, {"input": inputs.x}, torch.float64,
                                   reduction_size=count, params=parameter_pairs(ours, theirs),
                                   what=f"{shape} eval")
        x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
        w = torch.rand(3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, dtype=torch.float64, requires_grad=True)
        f = lambda x, w, b: batchnorm.functional.batch_norm(x, None, None, w, b, training=True)
        assert torch.autograd.gradgradcheck(f, (x, w, b))
    """)
    done = subprocess.run([sys.executable, "-c", script], timeout=300,
                          env=_env(BATCHNORM_KERNELS="composite"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("shape,layout", [((3, 3, 700, 701), "contiguous"),
                                          ((8, 8, 256, 256), "contiguous"),
                                          ((16, 32, 96, 96), "channels_last")])
@pytest.mark.slow
def test_large_float32_outputs_streamed(shape, layout):
    # Outputs of 16 MB and more are written with non-temporal stores from each run's first
    # aligned element on (S = 490700: unaligned runs; S = 65536: aligned ones; channels-last
    # rows of 32 channels, each starting aligned).
    x, dy, res, w, b, _, _ = make_inputs(shape, torch.float32, layout, seed=9)
    n = _count(shape)
    y, mean, m2, invstd, _ = ops.forward_train(x, w, b, res, True, 1e-5, None, None, None, 0.1)
    ref = _reference("forward_train", x, w, b, res, True, 1e-5, None, None, None, 0.1)
    assert_close(y, ref[0], torch.float32, n, "output")
    dx, *_ = ops.backward_train(dy, x, mean, invstd, w, y)
    ref_dx = _reference("backward_train", dy, x, mean, invstd, w, y)[0]
    assert_close(dx, ref_dx, torch.float32, n, "grad_input")
    y2 = ops.elemt(x, mean, invstd, w, b, None, False)
    assert_close(y2, _reference("elemt", x, mean, invstd, w, b, None, False), torch.float32,
                 what="elemt")


@pytest.mark.slow
def test_composite_normalizes_float32_extremes_without_false_alarms():
    script = textwrap.dedent("""
        import warnings, torch, batchnorm
        from batchnorm import kernels
        assert not kernels.native_cpu()
        g = torch.Generator().manual_seed(0)
        x64 = torch.randn(6, 3, 4, 5, generator=g, dtype=torch.float64) * 1e30 + 3e30
        m = batchnorm.BatchNorm2d(3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = m(x64.float())
        ref = torch.nn.functional.batch_norm(x64.float().double(), None, None, training=True)
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
        assert int(m.num_batches_tracked) == 1
    """)
    done = subprocess.run([sys.executable, "-c", script], timeout=300,
                          env=_env(BATCHNORM_KERNELS="composite"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_composite_has_one_name_and_the_old_one_still_works():
    for name in ("composite", "torch"):
        with kernels.use(name):
            assert kernels.backend_name(torch.zeros(2, 3)) == "composite"
    with pytest.raises(ValueError, match="'composite', 'triton' or None"):
        with kernels.use("numba"):
            pass
