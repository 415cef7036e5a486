"""The router (functional.batch_norm_step): each route forced in turn against torch.nn.

Routes 3 (ours: the C++ kernels, or the composite) and 4 (torch's kernels) over several training
steps, then eval, in float64 (outputs, input and parameter gradients, buffers); route 4 is
torch.nn exactly in float32 too. Which route ran is read from the operators dispatched, not
assumed. Routes 1 (torch.func) and 2 (tracing) are tested in test_func.py, test_ops.py and
test_portability.py.
"""

import copy
import os
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import batchnorm
from batchnorm import functional, kernels
from tests.utils import Dispatched, check_forward_backward, make_inputs, parameter_pairs

SRC = Path(batchnorm.__file__).resolve().parents[1]
BACKENDS = ["default", "aten", "composite"]


def _expected_route(backend: str) -> str:
    """The namespace route 3 or 4 dispatches to for CPU tensors on `backend`."""
    if backend == "aten" or (backend == "default" and not kernels.native_cpu()):
        return "aten"
    return "batchnorm"


def _use(backend: str):
    return kernels.use(None if backend == "default" else backend)


def _pair(kind: str, momentum: float | None):
    """Ours and torch.nn's float64 twin (with the fused ReLU / residual add composed after it),
    the same random parameters and buffers."""
    ours = {"plain": batchnorm.BatchNorm2d, "relu": batchnorm.BatchNormReLU2d,
            "add-relu": batchnorm.BatchNormAddReLU2d}[kind](3, momentum=momentum).double()
    theirs = torch.nn.BatchNorm2d(3, momentum=momentum).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
        ours.running_mean.copy_(torch.randn(3, dtype=torch.float64))
        ours.running_var.copy_(torch.rand(3, dtype=torch.float64) + 0.5)
    theirs.load_state_dict(ours.state_dict())
    if kind == "plain":
        return ours, theirs, theirs
    if kind == "relu":
        return ours, theirs, lambda x: torch.relu(theirs(x))
    return ours, theirs, lambda x, residual: torch.relu(theirs(x) + residual)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "relu", "add-relu"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_each_route_matches_torch_nn(backend, kind, momentum, layout):
    torch.manual_seed(0)
    ours, theirs, reference = _pair(kind, momentum)
    shape = (4, 3, 5, 6)
    with _use(backend):
        for step in range(4):
            if step == 3:
                ours.eval()
                theirs.eval()
            inputs = make_inputs(shape, torch.float64, layout, seed=step)
            tensors = {"input": inputs.x}
            if kind == "add-relu":
                tensors["residual"] = inputs.residual
            with Dispatched() as dispatched:
                check_forward_backward(ours, reference, tensors, torch.float64,
                                       reduction_size=shape[0] * 30, dy=inputs.dy,
                                       params=parameter_pairs(ours, theirs),
                                       what=f"{backend} step {step}")
            route = _expected_route(backend)
            if step == 3 and backend == "default":
                route = "aten"  # eval that records a graph: torch's kernel and node
            assert route in dispatched.namespaces, (step, dispatched.namespaces)
            if route == "aten":
                assert "batchnorm" not in dispatched.namespaces, (step, dispatched.namespaces)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(ours, name), getattr(theirs, name),
                                           msg=f"{backend} step {step}: {name}")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_torchs_kernels_route_is_torch_nn_exactly(momentum):
    # Route 4 in float32: the very kernels torch.nn runs, so the very same bits.
    torch.manual_seed(0)
    ours = batchnorm.BatchNorm2d(5, momentum=momentum)
    theirs = torch.nn.BatchNorm2d(5, momentum=momentum)
    theirs.load_state_dict(ours.state_dict())
    with kernels.use("aten"):
        for step in range(3):
            x = torch.randn(6, 5, 7, 7)
            x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
            y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
            assert torch.equal(y_ours, y_theirs), step
            dy = torch.randn_like(x)
            y_ours.backward(dy)
            y_theirs.backward(dy)
            assert torch.equal(x_ours.grad, x_theirs.grad), step
            for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(),
                                         strict=True):
                assert torch.equal(a.grad, b.grad), (step, name)
            for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers(),
                                         strict=True):
                assert torch.equal(a, b), (step, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_nan_batch_leaves_the_buffers_on_every_route(backend, momentum):
    torch.manual_seed(0)
    ours = batchnorm.BatchNorm1d(4, momentum=momentum)
    with _use(backend):
        ours(torch.randn(8, 4))
        before = {name: b.clone() for name, b in ours.named_buffers()}
        x = torch.randn(8, 4)
        x[3, 2] = float("nan")
        x[5, 0] = float("inf")
        with pytest.warns(RuntimeWarning, match=r"BatchNorm1d\(4\).*skipped batches so far: 1"):
            y = ours(x)
        for name, b in ours.named_buffers():
            assert torch.equal(b, before[name]), (backend, name)
        assert ours.skipped_batches == 1
        assert torch.isfinite(y[:, 1]).all()  # the channels without NaN/Inf are normalized
        # a finite batch afterwards updates as torch.nn would from the same state
        theirs = torch.nn.BatchNorm1d(4, momentum=momentum)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(8, 4)
        torch.testing.assert_close(ours(x), theirs(x))
        for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_warns_for_a_skipped_batch(backend):
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    x = torch.randn(6, 3)
    x[0, 0] = float("nan")
    with _use(backend), pytest.warns(RuntimeWarning, match="^batch_norm: this training batch"):
        functional.batch_norm(x, running_mean, running_var, training=True)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rejected_call_changes_nothing(backend):
    ours = batchnorm.BatchNorm1d(4)
    with _use(backend):
        ours(torch.randn(8, 4))
        before = {name: b.clone() for name, b in ours.named_buffers()}
        with pytest.raises(RuntimeError, match="one value per channel|should contain 4 elem"):
            functional.batch_norm_step(torch.randn(8, 4), ours.running_mean, ours.running_var,
                                       torch.ones(5), None, True, 0.1, 1e-5,
                                       num_batches_tracked=ours.num_batches_tracked)
        with pytest.raises(RuntimeError, match="one value per channel|should contain 4 elem"):
            functional.batch_norm_step(torch.randn(8, 4), ours.running_mean, torch.ones(3),
                                       None, None, True, 0.1, 1e-5,
                                       num_batches_tracked=ours.num_batches_tracked)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            ours(torch.randn(1, 4))
        for name, b in ours.named_buffers():
            assert torch.equal(b, before[name]), (backend, name)


# What the kernels check themselves on the common call (Python checks only what they do not):
# (argument, the bad value's maker, words the message must name). The meta weight: torch's own
# kernel refuses it only after updating the running buffers.
KERNEL_REFUSALS = [
    ("weight", lambda c: torch.ones(c, dtype=torch.long), ["weight", "floating point"]),
    ("bias", lambda c: torch.zeros(c, dtype=torch.int32), ["bias", "floating point"]),
    ("running_mean", lambda c: torch.zeros(c, dtype=torch.long), ["running_mean", "floating"]),
    ("running_var", lambda c: torch.ones(c + 1), ["running_var", "4"]),
    ("weight", lambda c: torch.ones(c, device="meta"), ["weight", "meta", "cpu"]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name,bad,words", KERNEL_REFUSALS)
def test_what_the_kernels_refuse_is_named_and_changes_nothing(backend, training, name, bad,
                                                              words):
    args = {"running_mean": torch.randn(4), "running_var": torch.rand(4) + 0.5,
            "weight": torch.rand(4), "bias": torch.randn(4)}
    args[name] = bad(4)
    theirs = {k: v.clone() for k, v in args.items()}
    x = torch.randn(8, 4)
    try:  # torch's answer decides ours (torch 2.13 refuses them all; an older one may not)
        expected = torch.nn.functional.batch_norm(x, training=training, **theirs)
    except RuntimeError:
        expected = None
    before = {k: v.clone() for k, v in args.items() if k.startswith("running") and k != name}
    if expected is not None:
        with _use(backend):
            torch.testing.assert_close(functional.batch_norm(x, training=training, **args),
                                       expected)
        return
    with _use(backend), pytest.raises(RuntimeError) as info:  # torch's exception type
        functional.batch_norm(x, training=training, **args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    for k, v in before.items():
        assert torch.equal(args[k], v), (backend, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_batch_still_has_a_backward_on_every_route(backend):
    # The guard's restore happens after torch's autograd node saved the running buffers: it must
    # not bump their version (backward would raise), and the gradient is torch.nn's (NaN where
    # the batch is).
    ours, theirs = batchnorm.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    x = torch.randn(6, 3, dtype=torch.float64)
    x[0, 0] = float("nan")
    ours.double(), theirs.double()
    mine, reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    with _use(backend), pytest.warns(RuntimeWarning, match="skipped"):
        ours(mine).sum().backward()
    theirs(reference).sum().backward()
    assert torch.equal(ours.running_var, torch.ones(3, dtype=torch.float64))
    assert torch.isnan(mine.grad[:, 0]).all() and torch.isnan(reference.grad[:, 0]).all()
    torch.testing.assert_close(mine.grad[:, 1:], reference.grad[:, 1:])


def test_empty_batch_on_torchs_kernels():
    ours, theirs = batchnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    with kernels.use("aten"):
        y = ours(x)
    assert y.shape == theirs(x).shape
    y.sum().backward()
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
    assert torch.equal(ours.running_mean, theirs.running_mean)


@pytest.mark.parametrize("rank", [2, 4])
def test_layers_without_tensors_take_any_channel_count(rank):
    # torch checks the channels only against a tensor (weight, bias, running buffers)
    shape = (4, 3) if rank == 2 else (4, 3, 2, 2)
    cls, torch_cls = ((batchnorm.BatchNorm1d, torch.nn.BatchNorm1d) if rank == 2
                      else (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d))
    x = torch.randn(shape)
    ours = cls(5, affine=False, track_running_stats=False)
    torch.testing.assert_close(ours(x), torch_cls(5, affine=False, track_running_stats=False)(x))
    lazy = (batchnorm.LazyBatchNorm1d if rank == 2 else batchnorm.LazyBatchNorm2d)(
        affine=False, track_running_stats=False)
    torch_lazy = (torch.nn.LazyBatchNorm1d if rank == 2 else torch.nn.LazyBatchNorm2d)(
        affine=False, track_running_stats=False)
    for channels in (3, 7):
        x = torch.randn((4, channels) + shape[2:])
        torch.testing.assert_close(lazy(x), torch_lazy(x))
    for kwargs in ({"affine": True, "track_running_stats": False},
                   {"affine": False, "track_running_stats": True}):
        with pytest.raises(RuntimeError, match="expects 5 channels"):
            cls(5, **kwargs)(torch.randn(shape))
        with pytest.raises(RuntimeError):
            torch_cls(5, **kwargs)(torch.randn(shape))


def test_backends_are_named_and_checked():
    cuda = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32, is_cpu=False)
    meta = torch.empty(2, 3, device="meta")
    assert kernels.backend_name(cuda) == "aten"  # CUDA: torch's kernels (cuDNN) by default
    assert kernels.backend_name(meta) == "aten"
    with kernels.use("aten"):
        assert kernels.backend_name(torch.empty(2, 3)) == "aten"
        assert kernels.backend_name(cuda) == "aten"
    with kernels.use("composite"):
        assert kernels.backend_name(torch.empty(2, 3)) == "composite"
        assert kernels.backend_name(cuda) == "composite"
    expected = "cpu" if kernels.native_cpu() else "aten"
    assert kernels.backend_name(torch.empty(2, 3)) == expected
    with pytest.raises(ValueError, match="'aten', 'composite', 'triton' or None"):
        with kernels.use("cudnn"):
            pass


def test_the_cpp_autograd_node_serves_cpu_only():
    # One training formula per backend: the C++ node for the C++ kernels (AutogradCPU); every
    # other device's forward_train has no autograd kernel of its own, so the router's Python
    # formula (ops._BatchNormTrain) is the only one that can run there.
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has_kernel("batchnorm::forward_train", "AutogradCPU") == kernels.native_cpu()
    assert not has_kernel("batchnorm::forward_train", "AutogradCUDA")
    assert has_kernel("batchnorm::stats", "CUDA")  # SyncBatchNorm's primitives on CUDA


class Seen(TorchFunctionMode):
    """The functions called through torch's function overrides while active."""

    def __init__(self) -> None:
        super().__init__()
        self.funcs: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


class Marked(torch.Tensor):
    """A tensor subclass that changes nothing (torch's default __torch_function__)."""


def _training_step(wrap=lambda t: t):
    """One training step of functional.batch_norm in float64 (with a NaN-free batch, then a NaN
    one): outputs, gradients, buffers and the warnings, for comparison between routes."""
    torch.manual_seed(0)
    results = []
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for bad in (False, True):
        x = torch.randn(6, 3, 4, dtype=torch.float64)
        if bad:
            x[0, 1, 0] = float("nan")
        x.requires_grad_()
        w = torch.rand(3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, dtype=torch.float64, requires_grad=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = functional.batch_norm(wrap(x), mean, var, w, b, True, 0.1, 1e-5)
        y.backward(torch.ones_like(y))
        results.append((y.detach().clone(), x.grad, w.grad, b.grad, mean.clone(), var.clone(),
                        [str(c.message)[:40] for c in caught]))
    return results


def _same(a, b) -> None:
    for left, right in zip(a, b, strict=True):
        for p, q in zip(left, right, strict=True):
            if isinstance(p, torch.Tensor):
                torch.testing.assert_close(p.as_subclass(torch.Tensor),
                                           q.as_subclass(torch.Tensor), rtol=0, atol=0,
                                           equal_nan=True)
            else:
                assert p == q


def _watch_cpp_entry(monkeypatch, name: str) -> list:
    """Route the extension's C++ entry `name` (kernels.cpu.forward_train / forward_eval) through
    a wrapper that records each answer (a result, or NotImplemented where it declined)."""
    from batchnorm.kernels import cpu

    answers: list = []
    direct = getattr(cpu, name)

    def watched(*args):
        answers.append(direct(*args))
        return answers[-1]

    monkeypatch.setattr(cpu, name, watched)
    return answers


@pytest.mark.skipif(not kernels.native_cpu(), reason="the C++ kernels did not load")
@pytest.mark.parametrize("case", ["function mode", "tensor subclass"])
def test_cpp_entry_on_the_common_call_torch_ops_otherwise(monkeypatch, case):
    # The training step on the C++ kernels enters the op through the extension's own entry
    # (ops.batch_norm_train_step); under a torch function mode, or with a tensor subclass, the
    # entry declines and torch.ops calls the op, so the mode and the subclass see it as before.
    answers = _watch_cpp_entry(monkeypatch, "forward_train")
    plain = _training_step()
    assert len(answers) == 2 and all(a is not NotImplemented for a in answers)
    assert [a[1] for a in answers] == [True, False]  # the flag, read in C++
    assert plain[0][-1] == [] and plain[1][-1] != []  # the NaN batch warned, buffers kept
    answers.clear()
    if case == "function mode":
        with Seen() as seen:
            declined = _training_step()
        assert torch.ops.batchnorm.forward_train.default in seen.funcs
    else:
        declined = _training_step(lambda t: t.as_subclass(Marked))
        assert type(declined[0][0]) is Marked  # the subclass saw the op, as through torch.ops
    assert answers == [NotImplemented, NotImplemented]
    _same(plain, declined)
    torch.testing.assert_close(plain[0][0], torch.nn.functional.batch_norm(
        *_one_batch(), training=True, momentum=0.1, eps=1e-5), rtol=0, atol=1e-12)



@pytest.mark.skipif(not kernels.native_cpu(), reason="the C++ kernels did not load")
@pytest.mark.parametrize("case", ["function mode", "tensor subclass"])
def test_cpp_eval_entry_on_the_common_call_torch_ops_otherwise(monkeypatch, case):
    # Eval without a graph to record enters forward_eval through the extension's own entry
    # (ops.batch_norm_eval); a torch function mode or a tensor subclass makes it decline, and
    # torch.ops calls the op, which the mode and the subclass then see; results are the same.
    answers = _watch_cpp_entry(monkeypatch, "forward_eval")
    x, mean, var, w, b = _one_batch()
    var.uniform_(0.5, 2.0)
    plain = functional.batch_norm(x, mean, var, w, b, False, 0.1, 1e-5)
    assert len(answers) == 1 and answers[0] is not NotImplemented
    torch.testing.assert_close(plain, torch.nn.functional.batch_norm(x, mean, var, w, b, False,
                                                                     0.1, 1e-5),
                               rtol=0, atol=1e-12)
    answers.clear()
    if case == "function mode":
        with Seen() as seen:
            declined = functional.batch_norm(x, mean, var, w, b, False, 0.1, 1e-5)
        assert torch.ops.batchnorm.forward_eval.default in seen.funcs
    else:
        declined = functional.batch_norm(x.as_subclass(Marked), mean, var, w, b, False, 0.1,
                                         1e-5)
        assert type(declined) is Marked
    assert answers == [NotImplemented]
    torch.testing.assert_close(declined.as_subclass(torch.Tensor), plain, rtol=0, atol=0)

def _one_batch():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    return x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), w, b


def _run(script: str, **env):
    done = subprocess.run([sys.executable, "-c", script], timeout=240,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC),
                                                                           str(SRC.parent)]),
                                   **env),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


_TORCH_NN_EXACTLY = textwrap.dedent("""
    import torch, batchnorm
    from batchnorm import kernels
    from tests.test_router import Dispatched
    assert kernels.backend_name(torch.empty(2, 3)) == "aten", kernels.backend_name(torch.empty(1))
    torch.manual_seed(0)
    ours, theirs = batchnorm.BatchNormReLU2d(4), torch.nn.BatchNorm2d(4)
    for step in range(3):
        x = torch.randn(5, 4, 6, 6)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        with Dispatched() as dispatched:
            yo = ours(xo)
            yo.sum().backward()
        yt = torch.relu(theirs(xt))
        yt.sum().backward()
        assert "batchnorm" not in dispatched.namespaces, dispatched.namespaces
        assert torch.equal(yo, yt) and torch.equal(xo.grad, xt.grad)
        assert torch.equal(ours.running_var, theirs.running_var)
""")


@pytest.mark.slow
def test_without_the_extension_torchs_kernels_serve():
    _run('import sys; sys.modules["batchnorm.kernels.cpu._C"] = None  # never built\n'
         + _TORCH_NN_EXACTLY
         + "assert not kernels.native_cpu()\n")


@pytest.mark.slow
def test_environment_selects_torchs_kernels():
    _run(_TORCH_NN_EXACTLY + "assert not kernels.native_cpu()\n", BATCHNORM_KERNELS="aten")


@pytest.mark.slow
def test_environment_rejects_an_unknown_backend():
    done = subprocess.run([sys.executable, "-c", "import batchnorm"], timeout=240,
                          env=dict(os.environ, BATCHNORM_KERNELS="cudnn"), capture_output=True,
                          text=True)
    assert done.returncode != 0 and "BATCHNORM_KERNELS expects one of" in done.stderr


def test_warning_points_at_the_callers_line():
    m = batchnorm.BatchNorm1d(2)
    x = torch.full((3, 2), float("nan"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m(x)
    assert len(caught) == 1 and caught[0].filename == __file__


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("input_dtype,module_dtype", [(torch.float16, torch.float32),
                                                      (torch.float32, torch.bfloat16)])
def test_dtype_mixes_torch_refuses_still_run(backend, input_dtype, module_dtype):
    # torch's kernels take float32 parameters with a half input, not the reverse; the router
    # sends the reverse to our ops, so every route takes both (train and eval, with gradients)
    torch.manual_seed(0)
    ours = batchnorm.BatchNorm2d(3).to(module_dtype)
    theirs = torch.nn.BatchNorm2d(3).double()
    with _use(backend):
        for training in (True, False):
            ours.train(training)
            theirs.train(training)
            x = torch.randn(4, 3, 5, 5).to(input_dtype)
            y = ours(x)
            assert y.dtype == input_dtype
            y.float().sum().backward()
            torch.testing.assert_close(y.double(), theirs(x.double()), atol=0.05, rtol=0.05)
            assert ours.weight.grad.dtype == module_dtype


@pytest.mark.parametrize("backend", ["composite", "triton"])
def test_selecting_a_cuda_backend_registers_nothing_more(monkeypatch, backend):
    # CUDA's primitives are registered once, at import; a backend selected later is read at
    # each call. torch 2.11 refuses a second Python registration for the same key (every
    # kernels.use("composite") failed on a GPU machine); torch 2.13 only warns.
    registered = []
    original = torch.library.Library.impl

    def impl(self, op_name, fn, dispatch_key="", *args, **kwargs):
        registered.append(dispatch_key)
        return original(self, op_name, fn, dispatch_key, *args, **kwargs)

    monkeypatch.setattr(torch.library.Library, "impl", impl)
    try:
        context = kernels.use(backend)
        context.__enter__()
    except RuntimeError:  # triton without a GPU: nothing to select
        assert backend == "triton"
        return
    try:
        assert "CUDA" not in registered, registered
        assert kernels.backend_name(torch.empty(1, device="meta")) == "aten"  # others unchanged
    finally:
        context.__exit__(None, None, None)


@pytest.mark.parametrize("finite", [True, False])
@pytest.mark.parametrize("mean_dtype", [torch.float32, torch.float16])
def test_the_guard_without_a_host_read_keeps_or_restores(finite, mean_dtype):
    # The GPU form of torch's route's guard (no .item()), run here on CPU tensors: a finite batch
    # keeps torch's update and is counted; a non-finite one gets the old buffers back, uncounted,
    # without bumping their version (torch's autograd node saved them).
    old_mean, old_var = torch.randn(4).to(mean_dtype), torch.rand(4) + 0.5
    running_mean, running_var = old_mean + 1, old_var + 1  # "torch's update"
    if not finite:
        running_var[2] = float("nan")
    updated = running_mean.clone(), running_var.clone()
    count = torch.tensor(7)
    versions = running_mean._version, running_var._version
    flag = functional._keep_if_finite_on_device(running_mean, running_var, count,
                                                torch.cat((old_mean, old_var)))
    assert bool(flag) is finite and int(count) == 7 + finite
    expected = updated if finite else (old_mean, old_var)
    assert torch.equal(running_mean, expected[0])
    assert torch.equal(running_var, expected[1])
    assert (running_mean._version, running_var._version) == versions


def test_compiled_autograd_captures_a_converted_model():
    # Compiled autograd (eager forward, backward captured and compiled) cannot capture our C++
    # autograd node: while it is on, CPU training takes torch's kernels, whose nodes it captures.
    from torch._dynamo import compiled_autograd

    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                 torch.nn.ReLU()).double()
    ours = batchnorm.convert(copy.deepcopy(theirs))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        for model in (theirs, ours):
            model(x).square().sum().backward()
    for a, b in zip(theirs.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(theirs[1].running_var, ours[1].running_var)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_as_torch_nn(backend, reentrant):
    # Non-reentrant checkpointing stops its recomputation once the saved tensors it needs exist:
    # inside the last BN's call. torch.nn's layer has counted the batch by then, so must ours.
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                 torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3),
                                 torch.nn.BatchNorm2d(4)).double()
    ours = batchnorm.convert(copy.deepcopy(theirs))
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    with _use(backend):
        for model in (theirs, ours):
            checkpoint(model, x.clone().requires_grad_(),
                       use_reentrant=reentrant).square().sum().backward()
    for a, b in zip(theirs.buffers(), ours.buffers(), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(theirs.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
