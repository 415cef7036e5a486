"""Deployment: while a model is traced or exported, a converted model records what the torch.nn
model records (src/batchnorm/traced.py).

Eval: torch.export's graph holds torch.nn's operations, the ONNX exporters (TorchScript-based and
dynamo) give the same nodes, onnxruntime the same outputs, Inductor's freezing folds the same
batch norms into their convolutions. Training: torch.compile, torch.export and torch.jit.trace
keep this package's extras (momentum=None, the NaN/Inf guard) against eager, in float64.
"""

import collections
import copy
import io
import re
import warnings

import pytest
import torch

import batchnorm
from batchnorm import nn as bnn

try:
    import onnx
    import onnxruntime
    import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    from benchmarks.onnx_bench import export as _onnx  # the graphs the benchmark times
    ONNX_MISSING = ""
except ImportError as error:  # pip install -e .[dev] installs them
    ONNX_MISSING = f"ONNX tests need onnx, onnxscript and onnxruntime: {error}"

needs_onnx = pytest.mark.skipif(bool(ONNX_MISSING), reason=ONNX_MISSING or "onnx installed")

C = 4  # channels of every layer here

# name: (dims, input shape, memory format, fused end: None / "relu" / "add_relu")
CASES = {
    "1d_linear": (1, (6, C), None, None),
    "1d": (1, (3, C, 7), None, None),
    "2d": (2, (3, C, 5, 6), None, None),
    "2d_channels_last": (2, (3, C, 5, 6), torch.channels_last, None),
    "3d": (3, (2, C, 3, 4, 5), None, None),
    "3d_channels_last": (3, (2, C, 3, 4, 5), torch.channels_last_3d, None),
    "relu2d": (2, (3, C, 5, 6), None, "relu"),
    "add_relu2d": (2, (3, C, 5, 6), None, "add_relu"),
}

TORCH_BN = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
CONV = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}


class Block(torch.nn.Module):
    """bn0 -> conv (or linear) -> bn1 [+ x] [-> ReLU]: bn0 has no convolution to fold into (ONNX
    keeps a BatchNormalization), bn1 has. `fused`: bn1 is our BatchNormReLU / BatchNormAddReLU
    layer, which adds and applies the ReLU itself."""

    def __init__(self, dims, linear, end, momentum=0.1):
        super().__init__()
        self.end, self.fused = end, False
        self.bn0 = TORCH_BN[dims](C, momentum=momentum)
        self.conv = (torch.nn.Linear(C, C, bias=False) if linear
                     else CONV[dims](C, C, 3, padding=1, bias=False))
        self.bn1 = TORCH_BN[dims](C, momentum=momentum)

    def forward(self, x):
        y = self.conv(self.bn0(x))
        if self.fused:
            return self.bn1(y, x) if self.end == "add_relu" else self.bn1(y)
        y = self.bn1(y)
        if self.end == "add_relu":
            y = y + x
        return torch.relu(y) if self.end else y


def _pair(case, dtype=torch.float32, momentum=0.1):
    """(torch.nn model, the converted model with the same state, input) for a CASES entry, eval,
    with running statistics and affine parameters away from their defaults."""
    dims, shape, layout, end = CASES[case]
    torch.manual_seed(0)
    reference = Block(dims, case == "1d_linear", end, momentum).to(dtype)
    with torch.no_grad():
        for bn in (reference.bn0, reference.bn1):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(shape, dtype=dtype)
    if layout is not None:
        reference = reference.to(memory_format=layout)
        x = x.contiguous(memory_format=layout)
    ours = batchnorm.convert(copy.deepcopy(reference))
    assert type(ours.bn1) is not type(reference.bn1)
    if end is not None:
        fused = bnn.BatchNormReLU2d if end == "relu" else bnn.BatchNormAddReLU2d
        ours.bn1, ours.fused = bnn.swap_class(ours.bn1, fused), True
    return reference.eval(), ours.eval(), x


def _operations(graph):
    """(operation, its non-tensor arguments) of each call in an fx graph, in order."""
    def plain(args):
        return tuple(a for a in args if not isinstance(a, torch.fx.Node))
    return [(str(n.target), plain(n.args)) for n in graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("case", CASES)
def test_export_eval_graph_equals_torch_nn(case):
    reference, ours, x = _pair(case)
    expected, got = torch.export.export(reference, (x,)), torch.export.export(ours, (x,))
    assert _operations(got.graph) == _operations(expected.graph)
    assert "aten.batch_norm.default" in str(_operations(got.graph))
    decomposed = got.run_decompositions()  # the core-aten graph backends take
    assert (_operations(decomposed.graph)
            == _operations(expected.run_decompositions().graph))
    torch.testing.assert_close(got.module()(x), reference(x))
    torch.testing.assert_close(decomposed.module()(x), reference(x))


def _tracer_warnings(model, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(model, (x,), check_trace=False)
    return [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES)
def test_jit_trace_warns_no_more_than_torch_nn(case, training):
    """The argument checks compare plain ints while torch.jit.trace records (the TorchScript
    ONNX exporter traces so): a traced size compared in Python warns and costs ~0.1 ms a layer."""
    reference, ours, x = _pair(case)
    reference.train(training)
    ours.train(training)
    got, expected = _tracer_warnings(ours, x), _tracer_warnings(reference, x)
    assert len(got) <= len(expected), got  # torch.nn's training forward checks its batch size


def _onnxruntime(proto, x):
    session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _node_counts(proto):
    return collections.Counter(node.op_type for node in proto.graph.node)


@needs_onnx
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("case", CASES)
def test_onnx_eval_matches_torch_nn(case, dynamo):
    reference, ours, x = _pair(case)
    expected, got = _onnx(reference, x, dynamo), _onnx(ours, x, dynamo)
    assert _node_counts(got) == _node_counts(expected)
    torch.testing.assert_close(_onnxruntime(got, x), reference(x), atol=1e-5, rtol=1e-5)


@needs_onnx
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_of_a_model_in_training_mode(dynamo):
    """The TorchScript-based exporter exports a training model in eval mode (its default
    training=EVAL), ours as torch.nn's. The dynamo exporter records the training forward: ours
    normalizes with the batch's statistics (the update of the buffers has no ONNX output and is
    left out); torch.nn's graph there is an inference BatchNormalization (torch 2.13,
    onnxscript 0.7), so only ours is compared with the eager training forward."""
    reference, ours, x = _pair("2d")
    reference.train()
    ours.train()
    state = copy.deepcopy(ours.state_dict())
    got = _onnx(ours, x, dynamo)
    for key, value in ours.state_dict().items():  # exporting is not a training step
        torch.testing.assert_close(value, state[key], msg=key)
    if not dynamo:
        assert _node_counts(got) == _node_counts(_onnx(reference, x, dynamo))
        torch.testing.assert_close(_onnxruntime(got, x), reference.eval()(x), atol=1e-5,
                                   rtol=1e-5)
    else:
        torch.testing.assert_close(_onnxruntime(got, x), ours(x), atol=1e-5, rtol=1e-5)



@needs_onnx
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("case", ["1d_linear", "2d", "2d_channels_last", "3d", "relu2d",
                                  "add_relu2d"])
def test_onnx_training_export_matches_torch_nn(case, momentum):
    """torch.onnx.export(..., dynamo=False, training=TrainingMode.TRAINING), which torch.nn's
    layers export (BatchNormalization with training_mode=1), exports ours to the same nodes;
    onnxruntime then normalizes with the batch's statistics, as torch.nn's training forward."""
    reference, ours, x = _pair(case, momentum=momentum)
    graphs = []
    for model in (reference, ours):
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.train(), (x,), buffer, dynamo=False,
                              training=torch.onnx.TrainingMode.TRAINING)
        graphs.append(onnx.load_from_string(buffer.getvalue()))
    assert _node_counts(graphs[1]) == _node_counts(graphs[0])
    assert "BatchNormalization" in _node_counts(graphs[1])
    torch.testing.assert_close(_onnxruntime(graphs[1], x), _onnxruntime(graphs[0], x))
    with torch.no_grad():
        torch.testing.assert_close(_onnxruntime(graphs[1], x), reference.train()(x),
                                   atol=1e-5, rtol=1e-5)

def _nan_batch(x):
    x = x.clone()
    x[(0, 1) + (0,) * (x.dim() - 2)] = float("nan")  # one value of channel 1
    return x


@pytest.mark.parametrize("case", ["1d_linear", "2d_channels_last", "3d", "add_relu2d"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_jit_trace_training_keeps_momentum_none_and_the_guard(case, momentum):
    """Traced once, run for three batches: outputs and buffers equal torch.nn's (float64); then
    a batch with a NaN leaves every buffer and num_batches_tracked as they were."""
    reference, ours, x = _pair(case, torch.float64, momentum)
    reference.train()
    ours.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the in-place buffer updates
        traced = torch.jit.trace(ours, x, check_trace=False)
    reference(x)  # the trace ran one training step
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        batch = torch.randn(x.shape, dtype=x.dtype, generator=g) * (1 + step) + step
        batch = batch.contiguous(memory_format=_format(x))
        torch.testing.assert_close(traced(batch), reference(batch))
        _assert_same_buffers(ours, reference)
    before = copy.deepcopy(ours.state_dict())
    assert traced(_nan_batch(x)).isnan().any()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    traced.eval()
    ours.eval()
    reference.eval()
    eval_trace = torch.jit.trace(ours, x)
    torch.testing.assert_close(eval_trace(x), reference(x))
    assert "aten::batch_norm" in str(eval_trace.inlined_graph)


def _format(x):
    for layout in (torch.channels_last, torch.channels_last_3d):
        if x.dim() == (4 if layout is torch.channels_last else 5) and x.is_contiguous(
                memory_format=layout) and not x.is_contiguous():
            return layout
    return torch.contiguous_format


def _assert_same_buffers(ours, reference):
    got, expected = dict(ours.named_buffers()), dict(reference.named_buffers())
    assert got.keys() == expected.keys()
    assert not any(value.requires_grad for value in got.values())  # no autograd history
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], msg=name)


class Mixed(torch.nn.Module):
    """Every constructor flag in one network (one compile): momentum=None (cumulative average),
    affine=False, track_running_stats=False, and the fused add-ReLU end."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.cumulative = bnn.BatchNorm2d(C, momentum=None)
        self.plain = bnn.BatchNorm2d(C, affine=False)
        self.untracked = bnn.BatchNormReLU2d(C, track_running_stats=False)
        self.end = bnn.BatchNormAddReLU2d(C, momentum=0.3)

    def forward(self, x):
        y = self.cumulative(self.conv(x))
        return self.end(self.untracked(self.plain(y)), y)


def _mixed_models():
    torch.manual_seed(0)
    ours = Mixed().double().train()
    with torch.no_grad():
        for bn in (ours.cumulative, ours.end):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return ours, copy.deepcopy(ours)


def _batches():
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=g) * (1 + i) + i
               for i in range(3)]
    return batches[:2] + [_nan_batch(batches[2])] + batches[2:]


def _step(model, x, skipped_warning):
    """One training step: (output, input gradient, parameter gradients)."""
    x = x.clone().requires_grad_()
    with warnings.catch_warnings():
        if skipped_warning:  # eager on the CPU warns of the skipped batch; traced code cannot
            warnings.simplefilter("ignore", RuntimeWarning)
        y = model(x)
    y.nan_to_num().square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return y.detach(), x.grad, grads


@pytest.mark.slow
def test_compiled_training_keeps_momentum_none_and_the_guard():
    """fullgraph torch.compile (no graph break, no .item()) against eager, float64, through two
    batches, a batch with a NaN (outputs NaN, buffers and num_batches_tracked unchanged), and
    one more batch: outputs, input and parameter gradients, every buffer; then eval."""
    torch._dynamo.reset()
    eager, ours = _mixed_models()
    compiled = torch.compile(ours, fullgraph=True)
    for x in _batches():
        skipped = bool(x.isnan().any())
        want, got = _step(eager, x, skipped), _step(compiled, x, skipped)
        torch.testing.assert_close(got[0], want[0], equal_nan=True)
        if not skipped:
            torch.testing.assert_close(got[1], want[1])
            for g, w in zip(got[2], want[2], strict=True):
                torch.testing.assert_close(g, w)
        _assert_same_buffers(ours, eager)
    assert ours.cumulative.num_batches_tracked.item() == 3  # the NaN batch is not counted
    x = _batches()[0]
    torch.testing.assert_close(compiled.eval()(x), eager.eval()(x))


@pytest.mark.slow
def test_exported_training_program_keeps_momentum_none_and_the_guard():
    """torch.export in training mode: the program's module updates its own buffers as the eager
    model does, the NaN batch skipped."""
    eager, ours = _mixed_models()
    x = _batches()[0]
    program = torch.export.export(ours, (x,)).module()  # exporting runs no step
    for x in _batches():
        skipped = bool(x.isnan().any())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = eager(x)
        torch.testing.assert_close(program(x), want, equal_nan=True)
        _assert_same_buffers(program, eager)
        assert skipped or not want.isnan().any()
    assert program.cumulative.num_batches_tracked.item() == 3


def _post_grad_operations(model, x, freezing):
    """The operations of the graph Inductor lowers (after its graph passes) for model(x), eval,
    no_grad: a counter of their names, memory addresses removed."""
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    seen = []

    class Record(CustomGraphPass):
        def __call__(self, graph):
            seen.append(collections.Counter(
                re.sub(r"0x[0-9a-f]+", "", str(n.target)).split(", Match")[0]
                for n in graph.nodes if n.op == "call_function"))

        def uuid(self):
            return None

    torch._dynamo.reset()
    with (config.patch(freezing=freezing, force_disable_caches=True,
                       post_grad_custom_post_pass=Record()),
          torch.no_grad()):
        output = torch.compile(model)(x)
    assert len(seen) == 1, seen
    return seen[0], output


@pytest.mark.slow
@pytest.mark.parametrize("freezing", [False, True])
def test_inductor_freezing_folds_the_same_batch_norms(freezing):
    reference, ours, x = _pair("2d")
    expected, want = _post_grad_operations(reference, x, freezing)
    got, output = _post_grad_operations(ours, x, freezing)
    assert got == expected
    # the batch norms left, each one x - mean: freezing folds bn1 into the convolution before
    # it; bn0 normalizes the input, which no convolution precedes
    assert got["aten.sub.Tensor"] == (1 if freezing else 2), got
    torch.testing.assert_close(output, want)


def _eager_route(*args, **kwargs):
    """functional's router outside tracing, its output alone (the skip flag dropped)."""
    from batchnorm import functional

    return functional.batch_norm_step(*args, **kwargs)[0]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("buffers", [True, False], ids=["buffers", "no_buffers"])
@pytest.mark.parametrize("end", [None, "relu", "add_relu"])
def test_traced_batch_norm_equals_the_eager_route(momentum, affine, buffers, end):
    """traced.batch_norm called directly (it is plain torch operations) against
    functional._batch_norm's eager route, float64: outputs, input / weight / bias / residual
    gradients, running buffers and num_batches_tracked over two batches, a batch with a NaN, an
    empty batch and one more batch, then eval."""
    from batchnorm import traced

    g = torch.Generator().manual_seed(4)

    def state():
        mean = torch.randn(C, dtype=torch.float64, generator=g) if buffers else None
        var = torch.rand(C, dtype=torch.float64, generator=g) + 0.5 if buffers else None
        weight = torch.rand(C, dtype=torch.float64, generator=g) + 0.5 if affine else None
        bias = torch.randn(C, dtype=torch.float64, generator=g) if affine else None
        return [mean, var, weight, bias, torch.zeros((), dtype=torch.long)]

    eager = state()
    mine = [None if t is None else t.clone() for t in eager]
    for p in (eager, mine):
        for t in p[2:4]:
            if t is not None:
                t.requires_grad_()
    shape = (3, C, 4, 5)
    steps = [(torch.randn(shape, dtype=torch.float64, generator=g) * (1 + i) + i, True)
             for i in range(4)]
    steps[2] = (_nan_batch(steps[2][0]), True)
    steps.insert(3, (torch.empty(0, *shape[1:], dtype=torch.float64), True))
    if buffers:  # eval normalizes with the running statistics
        steps.append((torch.randn(shape, dtype=torch.float64, generator=g), False))
    residual = torch.randn(shape, dtype=torch.float64, generator=g) if end == "add_relu" else None
    for x, training in steps:
        outputs, grads = [], []
        for fn, (mean, var, weight, bias, count) in ((_eager_route, eager),
                                                     (traced.batch_norm, mine)):
            xi = x.clone().requires_grad_()
            res = None
            if residual is not None:
                res = residual[:len(x)].clone().requires_grad_()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the eager route's skip warning
                y = fn(xi, mean, var, weight, bias, training, momentum, 1e-5, residual=res,
                       relu=end is not None, num_batches_tracked=count)
            outputs.append(y.detach())
            inputs = [t for t in (xi, weight, bias, res) if t is not None]
            grads.append(torch.autograd.grad(y.nan_to_num().square().sum(), inputs,
                                             allow_unused=True) if x.numel() else ())
        torch.testing.assert_close(outputs[1], outputs[0], equal_nan=True)
        if not outputs[0].isnan().any():
            for got, want in zip(grads[1], grads[0], strict=True):
                torch.testing.assert_close(got, want)
        for got, want in zip(mine, eager, strict=True):
            if want is not None:
                torch.testing.assert_close(got.detach(), want.detach())
    assert eager[4].item() == (4 if buffers else 5)  # the NaN batch is counted only without buffers
