"""The checks tests/test_cuda.py runs on CUDA tensors and, to prove they can fail, on CPU ones:
the cases (shapes, dtypes, constructor flags, fused kinds), a layer pair built for a case, the
training and eval steps, and the comparisons against torch.nn on the same device and in float64
on the CPU (tests/test_cuda.py's docstring says what each compares)."""

import contextlib
import copy
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import batchnorm
from batchnorm import functional, kernels
from tests.utils import (
    Dispatched,
    assert_close,
    check_forward_backward,
    make_inputs,
    tolerance,
)

SRC = Path(batchnorm.__file__).resolve().parents[1]

F64 = torch.float64
# Our layer class for each kind and input rank, and torch.nn's for the rank.
OURS = {
    "plain": {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d,
              5: batchnorm.BatchNorm3d},
    "relu": {2: batchnorm.BatchNormReLU1d, 3: batchnorm.BatchNormReLU1d,
             4: batchnorm.BatchNormReLU2d, 5: batchnorm.BatchNormReLU3d},
    "add-relu": {4: batchnorm.BatchNormAddReLU2d, 5: batchnorm.BatchNormAddReLU3d},
}
TORCH = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


class Case(NamedTuple):
    """One layer configuration: input shape, layout and dtype; the layer's parameter dtype, kind
    (plain, fused ReLU, fused residual add + ReLU) and constructor flags."""

    shape: tuple[int, ...]
    layout: str = "contiguous"
    dtype: torch.dtype = torch.float32
    param_dtype: torch.dtype = torch.float32
    kind: str = "plain"
    affine: bool = True
    track_running_stats: bool = True
    momentum: float | None = 0.1

    def id(self) -> str:
        short = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        flags = ("" if self.affine else "-noaffine") + ("" if self.track_running_stats
                                                        else "-untracked")
        return (f"{'x'.join(map(str, self.shape))}-{'cl' if self.layout != 'contiguous' else 'c'}"
                f"-{short[self.dtype]}/{short[self.param_dtype]}-{self.kind}{flags}"
                f"-m{self.momentum}")


# Odd sizes (C = 3, 7 x 5 maps, a 3 x 7 x 5 volume) for every rank, and one larger map whose
# reductions split across many programs on a GPU (the Triton route's combine kernels).
SHAPES = [((8, 3), "contiguous"), ((4, 3, 7), "contiguous"), ((4, 3, 7, 5), "contiguous"),
          ((4, 3, 7, 5), "channels_last"), ((2, 3, 3, 7, 5), "contiguous"),
          ((2, 3, 3, 7, 5), "channels_last"), ((40, 8, 33, 31), "contiguous"),
          ((40, 8, 33, 31), "channels_last")]
# (input, parameters): float32; half inputs with float32 parameters (mixed precision, what
# cuDNN serves); a bfloat16 layer.
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float32),
          (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
# Every constructor flag besides the defaults (affine, tracked, momentum 0.1)
FLAGS = [dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
         dict(affine=False, track_running_stats=False, momentum=None)]
FUSED_SHAPES = [((4, 3, 7, 5), "contiguous"), ((4, 3, 7, 5), "channels_last"),
                ((2, 3, 3, 7, 5), "channels_last")]
HALF = [DTYPES[0], DTYPES[2]]


def _cases(shapes, dtypes, flag_shapes, fused_shapes) -> list[Case]:
    cases = [Case(shape, layout, dtype, param_dtype) for shape, layout in shapes
             for dtype, param_dtype in dtypes]
    cases += [Case(shape, layout, **flags) for shape, layout in flag_shapes for flags in FLAGS]
    for shape, layout in fused_shapes:
        for dtype, param_dtype in HALF:
            cases += [Case(shape, layout, dtype, param_dtype, kind)
                      for kind in ("relu", "add-relu")]
    return cases


# The default route: every shape in every dtype, the flags and the fused layers on a few.
DEFAULT_CASES = _cases(SHAPES, DTYPES, [SHAPES[0], SHAPES[3]], FUSED_SHAPES)
# The Triton route compiles its kernels for each shape, dtype and flag combination, so fewer:
# every shape in float32, every dtype on the 4D and large maps, the flags and fused layers on one
# or two.
TRITON_CASES = ([Case(shape, layout) for shape, layout in SHAPES]
                + [Case(shape, layout, dtype, param_dtype) for shape, layout in SHAPES[2:4] +
                   SHAPES[6:] for dtype, param_dtype in DTYPES[1:]]
                + [Case(*SHAPES[3], **flags) for flags in FLAGS]
                + [Case(shape, layout, dtype, param_dtype, kind)
                   for shape, layout in FUSED_SHAPES[:2] for dtype, param_dtype in HALF
                   for kind in ("relu", "add-relu")])


def case_params(cases: list[Case]):
    return [pytest.param(case, id=case.id()) for case in cases]


def _use(backend: str):
    return contextlib.nullcontext() if backend == "default" else kernels.use(backend)


# ---------------------------------------------------------------------------------------------
# The helpers: one case's layers, its steps, the comparisons
# ---------------------------------------------------------------------------------------------


class Layers(NamedTuple):
    ours: nn.Module  # on the device, in the case's parameter dtype
    theirs: nn.Module  # torch.nn's, likewise
    reference: nn.Module  # torch.nn's in float64 on the CPU


def build(case: Case, device) -> Layers:
    """The three layers of a case with the same parameters and buffers (random, away from 1 and
    0), rounded once to the case's parameter dtype so that all three start from the same values."""
    channels, rank = case.shape[1], len(case.shape)
    flags = dict(affine=case.affine, track_running_stats=case.track_running_stats,
                 momentum=case.momentum)
    reference = TORCH[rank](channels, **flags).to(F64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if case.affine:
            reference.weight.copy_(torch.rand(channels, generator=g, dtype=F64) + 0.5)
            reference.bias.copy_(torch.randn(channels, generator=g, dtype=F64))
        if case.track_running_stats:
            reference.running_mean.copy_(torch.randn(channels, generator=g, dtype=F64))
            reference.running_var.copy_(torch.rand(channels, generator=g, dtype=F64) + 0.5)
    state = {name: t.to(case.param_dtype) if t.is_floating_point() else t
             for name, t in reference.state_dict().items()}
    reference.load_state_dict(state)
    ours = OURS[case.kind][rank](channels, **flags).to(device=device, dtype=case.param_dtype)
    theirs = TORCH[rank](channels, **flags).to(device=device, dtype=case.param_dtype)
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    return Layers(ours, theirs, reference)


def _run(layer: nn.Module, fused: bool, kind: str, x: Tensor, residual: Tensor, dy: Tensor,
         grad: bool) -> dict[str, Tensor]:
    """One call of a layer (ours fuses the ReLU and the residual add; torch.nn's is followed by
    them): the output, with grad the gradients of the input, residual and parameters for the
    upstream gradient dy, and the buffers after the call."""
    x = x.detach().requires_grad_(grad)
    res = residual.detach().requires_grad_(grad) if kind == "add-relu" else None
    with torch.set_grad_enabled(grad):
        if fused:
            y = layer(x) if res is None else layer(x, res)
        else:
            y = layer(x)
            if res is not None:
                y = y + res
            if kind != "plain":
                y = torch.relu(y)
    results = {"output": y.detach()}
    if grad:
        leaves = {"input": x} | ({} if res is None else {"residual": res})
        leaves |= dict(layer.named_parameters())
        grads = torch.autograd.grad(y, list(leaves.values()), dy.to(y.dtype))
        results |= {f"grad of {name}": g for name, g in zip(leaves, grads, strict=True)}
    return results | {name: b.detach().clone() for name, b in layer.named_buffers()}


def step(layers: Layers, case: Case, device, seed: int, training: bool, grad: bool,
         route: str, triton_calls: list | None = None, what: str = "") -> None:
    """One call of the three layers on the same values (float64 ones rounded to the case's dtype,
    those in float64 for the reference), compared; the route read from the dispatcher."""
    for layer in layers:
        layer.train(training)
    inputs = make_inputs(case.shape, F64, case.layout, seed=seed)
    x, dy, residual = (t.to(device=device, dtype=case.dtype)  # keeps the layout
                       for t in (inputs.x, inputs.dy, inputs.residual))
    if triton_calls is not None:
        triton_calls.clear()
    with Dispatched() as dispatched:
        ours = _run(layers.ours, True, case.kind, x, residual, dy, grad)
    theirs = _run(layers.theirs, False, case.kind, x, residual, dy, grad)
    reference = _run(layers.reference, False, case.kind, *(t.cpu().to(F64) for t in
                                                           (x, residual, dy)), grad)
    if route == "aten":
        assert "aten" in dispatched.namespaces and "batchnorm" not in dispatched.namespaces, (
            f"{what}: expected torch's kernels only, dispatched {dispatched.namespaces}")
    else:
        assert "batchnorm" in dispatched.namespaces, (
            f"{what}: expected our ops ({route}), dispatched {dispatched.namespaces}")
    if triton_calls is not None:  # the Triton primitives did the work
        expected = {"elemt"} | ({"stats"} if training or not case.track_running_stats else set())
        expected |= {"backward_reduce", "backward_elemt"} if grad else set()
        assert expected <= set(triton_calls), f"{what}: Triton primitives called {triton_calls}"
    count = x.numel() // x.shape[1]
    compare(ours, theirs, reference, exact=route == "aten", count=count,
            channels_last=case.layout == "channels_last", what=what)


def compare(ours: dict[str, Tensor], theirs: dict[str, Tensor], reference: dict[str, Tensor],
            exact: bool, count: int, channels_last: bool, what: str) -> None:
    """Every result of ours against float64 (assert_near_float64) and against torch.nn's on the
    same device: exactly, or within its dtype's tolerance where torch.nn's own result is within
    that tolerance of float64 (its unfused ReLU and residual add in float16 / bfloat16 round
    twice, so an output near 0 can be clamped there and not in float64, moving that element's
    gradients by O(1): against such a result only float64 judges ours)."""
    assert ours.keys() == theirs.keys() == reference.keys(), (what, ours.keys(), theirs.keys())
    for name, mine in ours.items():
        torch_nn, where = theirs[name], f"{what}: {name}"
        assert mine.dtype == torch_nn.dtype and mine.shape == torch_nn.shape, (
            f"{where}: {mine.dtype} {tuple(mine.shape)}, torch.nn's {torch_nn.dtype} "
            f"{tuple(torch_nn.shape)}")
        if not mine.is_floating_point():  # num_batches_tracked
            assert torch.equal(mine.cpu(), torch_nn.cpu()), f"{where}: {mine} != {torch_nn}"
            assert torch.equal(mine.cpu(), reference[name]), f"{where}: {mine} != float64's"
            continue
        reduction_size = 1 if name == "output" else count
        torch_excess = assert_near_float64(mine, torch_nn, reference[name], reduction_size, where)
        if exact:
            assert torch.equal(mine, torch_nn), (
                f"{where}: not torch.nn's bit for bit (max |difference| "
                f"{(mine.double() - torch_nn.double()).abs().max().item():.3g})")
            assert mine.stride() == torch_nn.stride(), (
                f"{where}: strides {mine.stride()}, torch.nn's {torch_nn.stride()}")
        elif torch_excess == 0:
            assert_close(mine, torch_nn, mine.dtype, reduction_size, f"{where} vs torch.nn")
        if channels_last and name in ("output", "grad of input"):
            fmt = torch.channels_last if mine.dim() == 4 else torch.channels_last_3d
            assert mine.is_contiguous(memory_format=fmt), f"{where}: channels_last not kept"


def assert_near_float64(mine: Tensor, torch_nn: Tensor, reference: Tensor, reduction_size: int,
                        what: str) -> float:
    """mine within its dtype's tolerance of the float64 reference; where torch.nn's own result
    is further off than that (a warning says so), no further off than twice torch.nn's. Returns
    how far torch.nn's result is beyond the tolerance (0: within it)."""
    tol = tolerance(mine.dtype, reduction_size)
    ref = reference.detach().cpu().to(F64)
    allowed = tol["atol"] + tol["rtol"] * ref.abs()

    def excess(t: Tensor) -> float:  # the largest error beyond the tolerance (NaN stays NaN)
        error = (t.detach().cpu().to(F64) - ref).abs() - allowed
        return error.clamp_min(0).max().item() if error.numel() else 0.0

    mine_excess, torch_excess = excess(mine), excess(torch_nn)
    if torch_excess > 0:
        warnings.warn(f"{what}: torch.nn's own result is off float64 by up to {torch_excess:.3g} "
                      f"beyond the {mine.dtype} tolerance", RuntimeWarning, stacklevel=2)
    assert mine_excess <= 2 * torch_excess, (
        f"{what}: off float64 by up to {mine_excess:.3g} beyond the {mine.dtype} tolerance "
        f"(atol {tol['atol']:.3g}, rtol {tol['rtol']:.3g}); torch.nn's own is {torch_excess:.3g} "
        f"beyond it")
    return torch_excess


def check_case(case: Case, device, backend: str, route: str,
               triton_calls: list | None = None) -> None:
    """Three training steps and an eval step (with gradients, then without), each compared; the
    backend must serve the case's input with `route`."""
    torch.manual_seed(0)
    layers = build(case, device)
    with _use(backend):
        probe = torch.empty(1, dtype=case.dtype, device=device)
        assert kernels.backend_name(probe) == route, (backend, kernels.backend_name(probe))
        for seed in range(3):
            step(layers, case, device, seed, True, True, route, triton_calls,
                 f"{case.id()} training step {seed}")
        step(layers, case, device, 3, False, True, route, triton_calls, f"{case.id()} eval")
        step(layers, case, device, 4, False, False, route, triton_calls,
             f"{case.id()} eval, no_grad")


def check_nan_guard(device, backend: str, momentum: float | None, dtype: torch.dtype,
                    layout: str) -> None:
    """A batch with NaN and Inf leaves running_mean, running_var and num_batches_tracked as they
    were; the other channels are normalized; a warning and the skipped-batch count on the CPU
    only (off the CPU reading the flag would cost a host synchronisation per step); the next
    finite batch updates as torch.nn's layer would from the same state."""
    torch.manual_seed(0)
    exact = backend in ("default", "aten")  # torch's kernels serve (CUDA's default, or forced)
    ours = batchnorm.BatchNorm2d(4, momentum=momentum).to(device)
    shape = (8, 4, 3, 5)

    def batch(seed: int) -> Tensor:
        return make_inputs(shape, F64, layout, seed=seed).x.to(device=device, dtype=dtype)

    with _use(backend):
        ours(batch(0))
        before = {name: b.clone() for name, b in ours.named_buffers()}
        x = batch(1)
        x[3, 2, 1, 1] = float("nan")
        x[5, 0, 0, 2] = float("inf")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = ours(x)
        for name, b in ours.named_buffers():
            assert torch.equal(b, before[name]), (name, b, before[name])
        assert torch.isfinite(y[:, 1]).all() and torch.isfinite(y[:, 3]).all()
        skipped = [w for w in caught if "non-finite statistics" in str(w.message)]
        on_cpu = torch.device(device).type == "cpu"
        assert len(skipped) == int(on_cpu) and ours.skipped_batches == int(on_cpu), (
            [str(w.message) for w in caught], ours.skipped_batches)
        theirs = nn.BatchNorm2d(4, momentum=momentum).to(device)
        theirs.load_state_dict(ours.state_dict())
        x = batch(2)
        results = [(layer(x), dict(layer.named_buffers())) for layer in (ours, theirs)]
    (y_ours, buffers_ours), (y_theirs, buffers_theirs) = results
    assert_same(y_ours, y_theirs, exact, "output after the skipped batch")
    for name, b in buffers_ours.items():
        assert_same(b, buffers_theirs[name], exact, f"{name} after the skipped batch")


def assert_same(mine: Tensor, torch_nn: Tensor, exact: bool, what: str) -> None:
    if exact or not mine.is_floating_point():
        assert torch.equal(mine, torch_nn), f"{what}: {mine} != {torch_nn}"
    else:
        assert_close(mine, torch_nn, mine.dtype, what=what)


class SmallCNN(nn.Module):
    """conv-BN-ReLU three times, the third's output plus the first's (a residual), pooled into a
    linear head: torch.nn's layers, converted by batchnorm.convert for ours."""

    def __init__(self, channels: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        y = F.relu(self.bn3(self.conv3(y)) + x)
        return self.head(y.mean((2, 3)))


# After three SGD steps ours' route 3 and torch's kernels differ by rounding in the statistics,
# carried through the steps: ~1e-6 relative on the composite (CPU, float32). The margin is for
# the GPU's convolutions (TF32 is turned off, but should a backend round inputs anyway, a
# one-ulp difference going in can come out as 1e-3 of one term); a wrong kernel is off by O(1).
CNN_TOLERANCE = dict(rtol=1e-3, atol=1e-4)


def check_cnn(device, backend: str, layout: str) -> None:
    """A converted SmallCNN against torch.nn's: three SGD steps (losses, then every parameter
    and buffer), then eval outputs. Exactly on torch's kernels (cuDNN deterministic, no TF32, so
    that the convolutions are the same arithmetic in both models), to CNN_TOLERANCE on ours."""
    torch.manual_seed(0)
    theirs = SmallCNN().to(device)
    report: list[str] = []
    ours = batchnorm.convert(copy.deepcopy(theirs), report=report)
    assert len(report) == 3 and all(isinstance(getattr(ours, f"bn{i}"), batchnorm.BatchNorm2d)
                                    for i in (1, 2, 3)), report
    if layout == "channels_last":
        ours, theirs = (m.to(memory_format=torch.channels_last) for m in (ours, theirs))
    exact = backend in ("default", "aten")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, theirs)]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 12, 12, generator=g), torch.randint(0, 10, (16,), generator=g))
               for _ in range(4)]

    def same(mine: Tensor, torch_nn: Tensor, what: str) -> None:
        if exact:
            assert torch.equal(mine, torch_nn), (
                f"{what}: max |difference| {(mine - torch_nn).abs().max().item():.3g}")
        else:
            torch.testing.assert_close(mine, torch_nn, **CNN_TOLERANCE,
                                       msg=lambda m: f"{what}: {m}")

    cudnn = torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                       allow_tf32=False)
    with cudnn, _use(backend):
        for i, (x, target) in enumerate(batches[:3]):
            x = x.to(device).contiguous(memory_format=torch.channels_last if layout ==
                                        "channels_last" else torch.contiguous_format)
            target = target.to(device)
            losses = []
            for model, optimizer in zip((ours, theirs), optimizers, strict=True):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), target)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
            same(*losses, f"loss of step {i}")
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(),
                                     strict=True):
            same(a, b, f"{name} after 3 steps")
        ours.eval()
        theirs.eval()
        x = batches[3][0].to(device)
        with torch.no_grad():
            same(ours(x), theirs(x), "eval output")


_ENVIRONMENT_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import batchnorm
    from batchnorm import kernels
    from tests.utils import Dispatched
    device, backend = sys.argv[1], sys.argv[2]
    x = torch.empty(6, 4, 5, 5, device=device)
    assert kernels.backend_name(x) == backend, kernels.backend_name(x)
    wide = "aten" if backend == "triton" else backend  # float64 is not among Triton's dtypes
    assert kernels.backend_name(x.double()) == wide, kernels.backend_name(x.double())
    torch.manual_seed(0)
    ours = batchnorm.BatchNormReLU2d(4).to(device)
    theirs = torch.nn.BatchNorm2d(4).to(device)
    for step in range(3):
        x = torch.randn(6, 4, 5, 5, device=device)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        with Dispatched() as dispatched:
            yo = ours(xo)
            (go,) = torch.autograd.grad(yo.square().sum(), xo)
        assert "batchnorm" in dispatched.namespaces, dispatched.namespaces
        yt = torch.relu(theirs(xt))
        (gt,) = torch.autograd.grad(yt.square().sum(), xt)
        torch.testing.assert_close(yo, yt)
        torch.testing.assert_close(go, gt)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert int(ours.num_batches_tracked) == step + 1
    print("served by", backend)
""")


def check_environment_selects(device: str, backend: str) -> None:
    """BATCHNORM_KERNELS=backend in a fresh process: that backend serves the device's tensors
    (our ops dispatched) and a training layer matches torch.nn's."""
    env = dict(os.environ, BATCHNORM_KERNELS=backend,
               PYTHONPATH=os.pathsep.join([str(SRC), str(SRC.parent)]))
    done = subprocess.run([sys.executable, "-c", _ENVIRONMENT_SCRIPT, device, backend], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"served by {backend}" in done.stdout


def check_functional_fused(device, backend: str, training: bool, dtype: torch.dtype) -> None:
    """functional.batch_norm with residual= and relu=True against torch.nn.functional's batch norm
    followed by the add and the ReLU, in float64 on the same device (outputs, the gradients of
    input, residual, weight and bias), and the running buffers it updates. On torch's kernels
    only in float32: there the add and the ReLU follow in the input's dtype, as in torch.nn, and
    a half output near 0 may be clamped where float64's is not (see compare)."""
    shape = (6, 5, 7, 3)
    inputs = make_inputs(shape, dtype, "channels_last", device=device)
    buffers = [t.to(device=device, dtype=torch.float32) for t in (inputs.mean, 1 / inputs.invstd)]
    buffers64 = [t.to(F64) for t in buffers]

    def ours(x, residual, weight, bias):
        return functional.batch_norm(x, *buffers, weight, bias, training, 0.1, 1e-5,
                                     residual=residual, relu=True)

    def theirs(x, residual, weight, bias):  # float64
        y = F.batch_norm(x, *buffers64, weight, bias, training, 0.1, 1e-5)
        return torch.relu(y + residual)

    leaves = {"input": inputs.x, "residual": inputs.residual,
              "weight": inputs.weight.float(), "bias": inputs.bias.float()}
    with _use(backend):
        check_forward_backward(ours, theirs, leaves, dtype, reduction_size=inputs.x.numel() // 5,
                               dy=inputs.dy, what=f"{backend} training={training}")
    for mine, reference in zip(buffers, buffers64, strict=True):
        assert_close(mine, reference, torch.float32, inputs.x.numel() // 5, "running buffers")
