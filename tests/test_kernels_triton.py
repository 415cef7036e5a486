"""kernels/triton.py against float64 and composite.py: on the CPU under the Triton interpreter,
or on the GPU when there is one.

Without CUDA, TRITON_INTERPRET=1 must be set before triton itself is imported (its @jit
functions, tl.zeros included, read it when they are defined), so it is set here, at
collection; when triton was already imported without it, the module is skipped with the
reason. With CUDA the same tests run the compiled kernels on CUDA tensors.

Tile sizes are shrunk with tile_config so small tensors cross every block boundary: batch
larger than BLOCK_N, spatial sizes that are not multiples of BLOCK_S, channels not multiples
of BLOCK_C, several splits (the combine kernels, looping over their own blocks) and one split
(the reduction kernels' direct write). A last test compiles every kernel for a real GPU
(sm_90) without a GPU, which the interpreter cannot check (loop-carried types, vectorization).
"""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from batchnorm import kernels
from batchnorm.kernels import composite
from tests.utils import assert_close, check_forward_backward, make_inputs

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
INTERPRETED = not ON_GPU
pytestmark = [pytest.mark.interpreter] if INTERPRETED else []

if INTERPRETED and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        pytest.skip("triton was imported in this process before TRITON_INTERPRET=1 could be set; "
                    "run this file in a fresh process", allow_module_level=True)
    _previous_interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        triton = pytest.importorskip(
            "triton", reason="triton is not installed (pip install 'batchnorm[gpu]')")
        from batchnorm.kernels import triton as triton_kernels
    finally:  # the decorators have read it; _interpreter sets it again around each test
        if _previous_interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _previous_interpret
else:
    triton = pytest.importorskip(
        "triton", reason="triton is not installed (pip install 'batchnorm[gpu]')")
    from batchnorm.kernels import triton as triton_kernels


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """The interpreter reads TRITON_INTERPRET again while running (lazy imports): keep it set."""
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


# Small tiles: every case below crosses each tile boundary at least once. The interpreter's cost
# is per tile, not per element, so tensors are kept to a few tiles per op.
SMALL_TILES = dict(reduce_tile=16, elementwise_tile=16, max_block_c=2, combine_block=2,
                   target_programs=8)
ONE_SPLIT = dict(SMALL_TILES, target_programs=1)


def _reference_stats(x):
    """float64 per-channel mean and M2."""
    return composite.stats(x.double())


def _count(x):
    return x.numel() // x.shape[1]


def _check_all_ops(x, grad, weight=None, bias=None, residual=None, relu=False,
                   tiles=SMALL_TILES):
    """Run the four primitives on x (and the upstream gradient grad) and compare each with
    composite.py in float64.

    Each op gets the same (float32) inputs as its reference, so one op's error does not
    propagate into the next comparison.
    """
    dtype, count = x.dtype, _count(x)
    with triton_kernels.tile_config(**tiles):
        # stats
        mean, m2 = triton_kernels.stats(x)
        mean64, m2_64 = _reference_stats(x)
        assert mean.dtype == m2.dtype == torch.float32
        assert_close(mean, mean64, torch.float32, count, "mean")
        assert_close(m2 / count, m2_64 / count, torch.float32, count, "M2 / count")
        mean32 = mean64.float()
        invstd = torch.rsqrt(m2_64 / count + 1e-5).float()

        # elemt (+ affine, residual, ReLU)
        y = triton_kernels.elemt(x, mean32, invstd, weight, bias, residual, relu)
        args64 = [None if t is None else t.double() for t in (weight, bias, residual)]
        y64 = composite.elemt(x.double(), mean32.double(), invstd.double(), *args64, relu)
        y_composite = composite.elemt(x, mean32, invstd, weight, bias, residual, relu)
        assert y.dtype == dtype and y.stride() == torch.empty_like(x).stride()
        assert_close(y, y64, dtype, what="elemt vs float64")
        assert_close(y, y_composite, dtype, what="elemt vs composite")

        # backward_reduce, dy masked by the ReLU's output when fused
        output = y if relu else None
        sum_dy, sum_dy_xhat = triton_kernels.backward_reduce(grad, x, mean32, invstd, output)
        ref_dy, ref_dy_xhat = composite.backward_reduce(
            grad.double(), x.double(), mean32.double(), invstd.double(),
            None if output is None else output.double())
        assert sum_dy.dtype == sum_dy_xhat.dtype == torch.float32
        assert_close(sum_dy, ref_dy, torch.float32, count, "sum_dy")
        assert_close(sum_dy_xhat, ref_dy_xhat, torch.float32, count, "sum_dy_xhat")

        # backward_elemt with the training-mode means
        mean_dy, mean_dy_xhat = (ref_dy / count).float(), (ref_dy_xhat / count).float()
        dx = triton_kernels.backward_elemt(grad, x, mean32, invstd, weight, mean_dy,
                                           mean_dy_xhat, output)
        dx64 = composite.backward_elemt(
            grad.double(), x.double(), mean32.double(), invstd.double(),
            None if weight is None else weight.double(), mean_dy.double(),
            mean_dy_xhat.double(), None if output is None else output.double())
        assert dx.dtype == dtype and dx.stride() == torch.empty_like(x).stride()
        assert_close(dx, dx64, dtype, what="backward_elemt vs float64")


# ---------------------------------------------------------------------------------------------
# Shapes that cross every block boundary
# ---------------------------------------------------------------------------------------------

SHAPES = [
    # BLOCK_S = 16 < S = 21, N = 2 > BLOCK_N = 1, 4 splits merged 2 at a time
    pytest.param((2, 2, 3, 7), "contiguous", SMALL_TILES, id="nchw-S-over-BLOCK_S"),
    # C = 3 over BLOCK_C = 2, 30 rows over BLOCK_R = 8
    pytest.param((2, 3, 3, 5), "channels_last", SMALL_TILES, id="cl-C-over-BLOCK_C"),
    # large N, small spatial: BLOCK_N = 4 < N = 9, S = 3 not a multiple of BLOCK_S = 4
    # (FlagGems' variance was wrong here)
    pytest.param((9, 2, 1, 3), "contiguous", SMALL_TILES, id="nchw-largeN-smallS"),
    pytest.param((9, 2, 3, 1), "channels_last", SMALL_TILES, id="cl-largeN-smallS"),
    pytest.param((2, 2, 3, 7), "contiguous", ONE_SPLIT, id="nchw-one-split"),
    pytest.param((2, 3, 3, 5), "channels_last", ONE_SPLIT, id="cl-one-split"),
    pytest.param((3, 1, 3, 7), "channels_last", SMALL_TILES, id="one-channel"),
    pytest.param((9, 3, 1, 1), "channels_last", SMALL_TILES, id="spatial-1x1"),
    pytest.param((19, 3), "contiguous", SMALL_TILES, id="2d-N-C"),
    pytest.param((3, 2, 10), "contiguous", SMALL_TILES, id="3d-N-C-L"),
    pytest.param((2, 3, 2, 2, 3), "channels_last", SMALL_TILES, id="5d-channels-last-3d"),
    pytest.param((3, 2, 11), "noncontiguous", SMALL_TILES, id="strided-view"),
    # default tiles: S = 70 takes BLOCK_S = 32 (pads to 96, not 128): 3 tiles per row
    pytest.param((3, 5, 7, 10), "contiguous", {}, id="default-tiles"),
    pytest.param((3, 5, 7, 9), "channels_last", {}, id="default-tiles-cl"),
]


@pytest.mark.parametrize("shape,layout,tiles", SHAPES)
def test_all_ops_match_float64(shape, layout, tiles):
    x, dy, _, weight, bias, _, _ = make_inputs(shape, torch.float32, layout, device=DEVICE)
    _check_all_ops(x, dy, weight, bias, tiles=tiles)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(dtype, layout):
    # bf16 arithmetic in the interpreter is wrong unless upcast first: this fails if a kernel
    # computes before converting. Parameters in float32, as under autocast.
    x, dy, residual, weight, bias, _, _ = make_inputs((3, 3, 2, 7), dtype, layout, device=DEVICE)
    _check_all_ops(x, dy, weight.float(), bias.float(), residual, relu=True)


@pytest.mark.parametrize(
    "layout,affine,residual,relu",
    [("contiguous", False, False, False), ("channels_last", True, False, True),
     ("contiguous", False, True, True), ("channels_last", True, True, False),
     ("contiguous", True, True, True)],
    ids=["plain", "bn-relu-cl", "bn-add-relu-no-affine", "bn-add-cl", "bn-add-relu"],
)
def test_fused_variants(layout, affine, residual, relu):
    shape = (2, 3, 2, 5)
    x, dy, res, weight, bias, _, _ = make_inputs(shape, torch.float32, layout, device=DEVICE)
    weight, bias = (weight, bias) if affine else (None, None)
    _check_all_ops(x, dy, weight, bias, res if residual else None, relu)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_stats_stable_with_large_mean(layout):
    # mean 1e4, unit variance, float32: E[x^2] - E[x]^2 would lose every digit; the shifted
    # two-pass tiles and Chan merges must normalize within 1e-3 of float64.
    x = make_inputs((5, 2, 3, 7), torch.float32, layout, scale=1.0, offset=1e4, device=DEVICE).x
    with triton_kernels.tile_config(**SMALL_TILES):
        mean, m2 = triton_kernels.stats(x)
        var = m2 / _count(x)
        y = triton_kernels.elemt(x, mean, torch.rsqrt(var + 1e-5), None, None, None, False)
    mean64, m2_64 = _reference_stats(x)
    var64 = m2_64 / _count(x)
    y64 = (x.double() - mean64.view(1, -1, 1, 1)) / torch.sqrt(var64 + 1e-5).view(1, -1, 1, 1)
    assert (var.double() / var64 - 1).abs().max() < 1e-4
    assert (y.double() - y64).abs().max() < 1e-3


def test_default_tiles_many_tiles_per_split_large_mean():
    # Production tile sizes: 28 x 28 rows take BLOCK_S = 32, 25 tiles per channel in 4 splits;
    # Chan merges over many tiles keep float32 statistics of mean-1e4 data within 1e-3.
    x = make_inputs((16, 2, 28, 28), scale=1.0, offset=1e4, device=DEVICE).x
    with triton_kernels.tile_config(target_programs=8):
        plan = triton_kernels._plan_for(x, False)
        assert plan.geometry["BLOCK_S"] == 32 and plan.splits == 4
        mean, m2 = triton_kernels.stats(x)
        y = triton_kernels.elemt(x, mean, torch.rsqrt(m2 / _count(x) + 1e-5), None, None, None,
                                 False)
    mean64, m2_64 = _reference_stats(x)
    y64 = ((x.double() - mean64.view(1, -1, 1, 1))
           / torch.sqrt(m2_64 / _count(x) + 1e-5).view(1, -1, 1, 1))
    assert (m2.double() / m2_64 - 1).abs().max() < 1e-4
    assert (y.double() - y64).abs().max() < 1e-3


def test_grad_sums_with_many_splits_and_combine_blocks():
    # 4 splits of 6 x 8 tiles, merged two at a time by the combine kernels' loop
    x, grad = make_inputs((8, 1, 2, 3), device=DEVICE)[:2]  # (x, dy, ...)
    with triton_kernels.tile_config(**dict(SMALL_TILES, reduce_tile=8, target_programs=4)):
        mean, m2 = triton_kernels.stats(x)
        invstd = torch.rsqrt(m2 / _count(x) + 1e-5)
        sums = triton_kernels.backward_reduce(grad, x, mean, invstd, None)
    mean64, m2_64 = _reference_stats(x)
    assert_close(mean, mean64, torch.float32, _count(x), "mean")
    assert_close(m2, m2_64, torch.float32, _count(x), "M2")
    ref = composite.backward_reduce(grad.double(), x.double(), mean.double(), invstd.double(),
                                    None)
    for ours, theirs in zip(sums, ref, strict=True):
        assert_close(ours, theirs, torch.float32, _count(x), "gradient sums")


@pytest.mark.parametrize("S", [1, 7, 49, 70, 196, 784, 3136, 12544, 100_003])
def test_spatial_block_pads_least(S):
    limit = 2048
    block = triton_kernels._spatial_block(S, limit)
    assert block & (block - 1) == 0 and block <= limit
    padded = -(-S // block) * block
    candidates = [2**i for i in range(5, 12) if 2**i <= triton.next_power_of_2(S)]
    assert all(padded <= -(-S // c) * c for c in candidates), (S, block)


def test_split_plan_covers_every_tile():
    # The host-side plan: splits * tiles_per_split covers all tiles, and no split is empty.
    for num_tiles in (1, 2, 7, 100, 1001):
        for programs in (1, 3, 64, 500):
            splits, per = triton_kernels._splits(num_tiles, programs, 100)
            assert splits * per >= num_tiles > (splits - 1) * per
            assert 1 <= splits <= num_tiles


# ---------------------------------------------------------------------------------------------
# Through the custom ops and autograd, as the CUDA path runs them
# ---------------------------------------------------------------------------------------------


def test_training_forward_backward_through_ops(monkeypatch):
    # Serve this device's tensors with the Triton kernels (CPU: as kernels/__init__ serves
    # CUDA tensors), recording the calls.
    from batchnorm import functional

    calls = []

    def recorded(name):
        def run(*args):
            calls.append(name)
            return getattr(triton_kernels, name)(*args)
        return run

    serving = types.ModuleType("batchnorm.kernels.triton")
    serving.DTYPES = triton_kernels.DTYPES
    for name in ("stats", "elemt", "backward_reduce", "backward_elemt"):
        setattr(serving, name, recorded(name))
    inputs = make_inputs((6, 3, 5, 4), torch.float32, "channels_last", device=DEVICE)
    running_mean, running_var = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    rm64 = torch.zeros(3, dtype=torch.float64, device=DEVICE)
    rv64 = torch.ones(3, dtype=torch.float64, device=DEVICE)

    def ours(x, weight, bias, residual):
        return functional.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                                     residual=residual, relu=True)

    def theirs(x, weight, bias, residual):  # float64
        return torch.relu(torch.nn.functional.batch_norm(x, rm64, rv64, weight, bias,
                                                         training=True) + residual)

    leaves = {"input": inputs.x, "weight": inputs.weight, "bias": inputs.bias,
              "residual": inputs.residual}
    with kernels.serving(DEVICE.type, serving, "triton"):
        assert kernels.backend_name(inputs.x) == "triton"
        check_forward_backward(ours, theirs, leaves, torch.float32,
                               reduction_size=_count(inputs.x), dy=inputs.dy)
    assert calls == ["stats", "elemt", "backward_reduce", "backward_elemt"]
    assert_close(running_mean, rm64, torch.float32, what="running_mean")
    assert_close(running_var, rv64, torch.float32, what="running_var")


# ---------------------------------------------------------------------------------------------
# Contract details
# ---------------------------------------------------------------------------------------------


def test_dtypes_and_availability(monkeypatch):
    assert triton_kernels.DTYPES == {torch.float32, torch.float16, torch.bfloat16}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_kernels.available()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton_kernels.available() == torch.cuda.is_available()


def test_empty_input_uses_the_fallback():
    x = torch.empty(0, 3, 4, 4, device=DEVICE)
    zeros, ones = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    # the composite's results: zero statistics and sums (no values), an empty output
    torch.testing.assert_close(triton_kernels.stats(x), (zeros, zeros), rtol=0, atol=0)
    torch.testing.assert_close(triton_kernels.backward_reduce(x, x, zeros, ones, None),
                               (zeros, zeros), rtol=0, atol=0)
    y = triton_kernels.elemt(x, zeros, ones, None, None, None, True)
    torch.testing.assert_close(y, torch.empty_like(x))


def test_bad_arguments_are_named():
    x = make_inputs((2, 3, 4, 4), device=DEVICE).x
    zeros, ones = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match=r"residual must have the input's shape \(2, 3, 4, 4\)"):
        triton_kernels.elemt(x, zeros, ones, None, None, torch.zeros(2, 3, 4, 5, device=DEVICE),
                             False)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        triton_kernels.elemt(x, zeros, ones, torch.ones(4, device=DEVICE), None, None, False)
    with pytest.raises(ValueError, match=r"expect an input of shape \(N, C, \*\)"):
        triton_kernels.stats(torch.zeros(5, device=DEVICE))


def test_tile_config_rejects_non_powers_of_two():
    with pytest.raises(ValueError, match="reduce_tile must be a power of two, got 48"):
        with triton_kernels.tile_config(reduce_tile=48):
            pass


@pytest.mark.skipif(ON_GPU, reason="the dry run interprets the kernels on the CPU; with a GPU "
                    "run batchnorm bench --device cuda itself")
def test_bench_cuda_self_check_runs_and_verifies(tmp_path, capsys):
    # The benchmark's dry run: CPU tensors on the interpreted kernels, ours (through the ops and
    # directly) vs torch.nn, JSON.
    from batchnorm.cli import main

    out = tmp_path / "bench.json"
    code = main(["bench", "--device", "cuda", "--self-check", "--batch", "2", "--dtypes",
                 "bfloat16", "--layouts", "channels_last", "--modes", "add-relu-fwd-bwd",
                 "--providers", "ours,ours-kernels,torch", "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["backend"] == "triton" and row["ours_correct"], row
    assert row["ours-kernels_correct"] and row["ours-unfused_correct"], row
    assert result["machine"]["device"] == "cuda"


# ---------------------------------------------------------------------------------------------
# The real compiler, without a GPU
# ---------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from batchnorm.kernels import _triton_kernels as K

# One compile per kernel, both branches of every flag across the cases; bf16 tensors,
# float32 per-channel vectors.
TENSORS = {"x_ptr", "out_ptr", "grad_ptr", "grad_input_ptr", "residual_ptr"}
CASES = [
    (K._stats_nchw_kernel, dict(BLOCK_N=4, BLOCK_S=512, FINAL=False)),
    (K._stats_cl_kernel, dict(BLOCK_R=32, BLOCK_C=64, FINAL=True)),
    (K._stats_combine_kernel, dict(BLOCK_P=16, BLOCK_C=32)),
    (K._grad_sums_nchw_kernel, dict(HAS_OUTPUT=True, BLOCK_N=8, BLOCK_S=256)),
    (K._grad_sums_cl_kernel, dict(HAS_OUTPUT=False, BLOCK_R=32, BLOCK_C=64)),
    (K._sums_combine_kernel, dict(BLOCK_P=16, BLOCK_C=32)),
    (K._elemt_kernel, dict(CHANNEL_IS_COLUMN=False, HAS_WEIGHT=True, HAS_BIAS=True,
                           HAS_RESIDUAL=True, RELU=True, BLOCK_R=16, BLOCK_K=128)),
    (K._backward_elemt_kernel, dict(CHANNEL_IS_COLUMN=True, HAS_WEIGHT=True, HAS_OUTPUT=True,
                                    BLOCK_R=32, BLOCK_K=64)),
]
# As at run time for torch allocations and sizes divisible by 16 (C = 64, S = 56 * 56, ...).
ALIGNED = {"C", "S", "K", "R"}
for kernel, constexprs in CASES:
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = "*bf16" if name in TENSORS else "*fp32"
        else:
            signature[name] = "i32"
        if name.endswith("_ptr") or name in ALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert compiled.asm["cubin"], kernel.__name__
    # memory-bound: aligned tensors must be read with vector (>= 32-bit x 2) loads
    vector_loads = sum(compiled.asm["ptx"].count(f"ld.global.v{n}") for n in (2, 4))
    assert vector_loads > 0, f"{kernel.__name__} {constexprs}: no vectorized global loads"
print("compiled", len(CASES))
"""


def _nvidia_backend_present():
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_backend_present(),
                    reason="this triton build has no NVIDIA backend to compile with")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled 8" in result.stdout
