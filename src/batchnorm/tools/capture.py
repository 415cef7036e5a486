"""Graph capture: turn a model and an example input into a torch.fx graph the tools can read.

Two captures, tried in order; the first that succeeds is used, and Traced.capture names it:

    torch.fx symbolic       torch.fx's own tracing: every tensor a placeholder, the graph valid for
                            every input shape. Fails on Python control flow that reads a shape
                            or a value (`if x.shape[1] != self.channels: raise ...`,
                            `x.reshape(int(x.shape[0]), ...)`), as most transformers code does.
    torch.fx concrete       the same tracing (every batch-norm module a leaf, Conv/Linear
                            calls as call_module nodes) with the example's values running beside
                            the proxies: shape queries (x.shape, x.size(), x.dim(), len(x),
                            x.dtype, x.device) answer with the example's numbers, so Python
                            arithmetic and branches on shapes run as they do for the example.
                            The graph is the one the example took: valid for inputs of the same
                            shapes (any input that takes the same Python branches). Control flow
                            on tensor values (`if x.sum() > 0`, `.item()`, `.tolist()`) is still
                            refused: its branch could differ for the next input.

Both produce the same kind of graph (module calls, torch functions and tensor methods), so the
redundant-bias proof and the fold planning run unchanged on either and map straight back to
modules: a batch-norm, Conv or Linear call is a call_module node naming the module.

Whichever capture ran, the graph is run again on the example and its outputs must equal the
model's own (same mode, same random state): a graph that does not reproduce the model (a side
effect the trace missed, a cache filled with proxies) is refused, never used.

Example inputs: a tensor (model(x)), a tuple or list (model(*inputs)) or a dict (model(**inputs),
keyword inputs). Parameters of forward that the example does not give are fixed at their
defaults (so `if attention_mask is not None` takes the branch the call takes).
"""

import contextlib
import copy
import dataclasses
import inspect
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

__all__ = ["TraceError", "TensorRecord", "Capture", "capture", "split_inputs", "call",
           "SYMBOLIC", "CONCRETE"]

SYMBOLIC = "torch.fx symbolic"
# nn.Module.__call__ and __getattr__ as they are outside tracing: torch.fx patches both while it
# traces (a module call becomes a node, a parameter a proxy), and the concrete tracer runs
# modules and reads parameters on real tensors in the middle of a trace
_MODULE_CALL = getattr(fx._symbolic_trace, "_orig_module_call", nn.Module.__call__)
_MODULE_GETATTR = getattr(fx._symbolic_trace, "_orig_module_getattr", nn.Module.__getattr__)


@contextlib.contextmanager
def _outside_tracing():
    patched = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = _MODULE_CALL, _MODULE_GETATTR  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched  # type: ignore[method-assign]
CONCRETE = "torch.fx concrete"


class TraceError(RuntimeError):
    """No capture could turn the model into a graph, or the graph could not run on the input."""


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    shape: torch.Size
    dtype: torch.dtype


@dataclasses.dataclass
class Capture:
    graph_module: fx.GraphModule  # shares the model's submodules
    values: dict[fx.Node, Any]  # tensors as TensorRecord (shape, dtype), everything else as is
    name: str  # SYMBOLIC or CONCRETE
    attempts: list[str]  # why the captures tried before it failed


# ---------------------------------------------------------------------------------------------
# Example inputs
# ---------------------------------------------------------------------------------------------

def split_inputs(example_inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) of the call model(...) an example input stands for."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def call(model: nn.Module, example_inputs: Any) -> Any:
    args, kwargs = split_inputs(example_inputs)
    return model(*args, **kwargs)


def _bind(model: nn.Module, example_inputs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """({parameter: value} the example gives, {parameter: default} for the rest of forward's)."""
    signature = inspect.signature(model.forward)
    args, kwargs = split_inputs(example_inputs)
    try:
        given = signature.bind(*args, **kwargs).arguments
    except TypeError as exc:
        raise TraceError(f"the example input does not fit {type(model).__name__}.forward"
                         f"{signature}: {exc}") from exc
    defaults = {}
    for name, p in signature.parameters.items():
        if p.kind == p.VAR_KEYWORD and name in given:
            raise TraceError(f"{type(model).__name__}.forward takes **{name} and the example "
                             f"passes keywords through it; torch.fx cannot trace that")
        if name not in given and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            defaults[name] = p.default
    return given, defaults


def _placeholder_values(gm: fx.GraphModule, given: dict[str, Any]) -> list[Any]:
    """The positional arguments of gm, placeholder by placeholder: a given parameter's value, or
    the default fx stored for a parameter fixed at its default (placeholder `name_1`)."""
    values = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        target = str(node.target).lstrip("*")
        if target in given:
            values.append(given[target])
        elif node.args:
            values.append(node.args[0])
        else:
            raise TraceError(f"the graph's input {target} has no value in the example input")
    return values


# ---------------------------------------------------------------------------------------------
# The two tracers
# ---------------------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    """torch.fx's tracer with every batch-norm module a leaf, and a record of where it failed."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: list[str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(f"{self.path_of_module(m) or '(root)'} ({type(m).__name__})")
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()


class _ConcreteProxy(fx.Proxy):
    """A proxy holding the value its node gave on the example input. Shape queries answer with
    that value (Python numbers, not graph nodes); everything else is recorded as usual, and
    bool() / int() of a proxy (control flow on a tensor's values) is refused by fx as before."""

    value: Any = None

    def size(self, dim: int | None = None):
        return self.value.size() if dim is None else self.value.size(dim)

    def dim(self) -> int:
        return self.value.dim()

    def numel(self) -> int:
        return self.value.numel()

    def nelement(self) -> int:
        return self.value.numel()

    def is_floating_point(self) -> bool:
        return self.value.is_floating_point()

    def is_complex(self) -> bool:
        return self.value.is_complex()

    @property
    def shape(self):
        return self.value.shape

    @property
    def ndim(self) -> int:
        return self.value.ndim

    @property
    def dtype(self):
        return self.value.dtype

    @property
    def device(self):
        return self.value.device

    @property
    def is_cuda(self) -> bool:
        return self.value.is_cuda

    def __len__(self) -> int:
        return len(self.value)

    def __iter__(self):
        return iter([self[i] for i in range(len(self.value))])  # type: ignore[index]


def _concrete(a: Any) -> Any:
    """a with every proxy replaced by the value it holds."""
    def value(x: Any) -> Any:
        if isinstance(x, _ConcreteProxy):
            return x.value
        if isinstance(x, fx.proxy.Attribute):
            return getattr(value(x.root), x.attr)
        if isinstance(x, fx.Proxy):
            raise TraceError(f"a proxy without a concrete value reached {x.node.name}")
        return x
    return pytree.tree_map(value, a, is_leaf=lambda x: isinstance(x, fx.Proxy))


class _ConcreteTracer(_Tracer):
    """_Tracer whose proxies carry the example's values, computed op by op as the graph is built
    (the same calls the graph will make: modules, functions, methods on the real tensors)."""

    def __init__(self, inputs: dict[str, Any]) -> None:
        super().__init__()
        self.inputs = inputs

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        value = self._run(kind, target, args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        if isinstance(proxy, _ConcreteProxy):
            proxy.value = value
        return proxy

    def _run(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            name = str(target)
            return self.inputs[name] if name in self.inputs else (args[0] if args else None)
        if kind == "output":
            return None
        args, kwargs = _concrete(args), _concrete(kwargs)
        with _outside_tracing(), torch.no_grad():
            if kind == "get_attr":
                owner: Any = self.root
                for part in str(target).split("."):
                    owner = getattr(owner, part)
                return owner
            if kind == "call_module":
                return self.root.get_submodule(str(target))(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], str(target))(*args[1:], **kwargs)
            return target(*args, **kwargs)


def _trace_with(tracer: _Tracer, model: nn.Module, defaults: dict[str, Any],
                how: str) -> fx.GraphModule:
    try:
        graph = tracer.trace(model, concrete_args=defaults or None)
    except Exception as exc:
        where = " -> ".join(tracer.failed_in or [f"(root) ({type(model).__name__})"])
        raise TraceError(f"{how} failed inside {where}: {type(exc).__name__}: {exc}") from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


# ---------------------------------------------------------------------------------------------
# Running the graph: record each node's value, check it reproduces the model
# ---------------------------------------------------------------------------------------------

class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as exc:
            raise TraceError(f"the captured graph failed at node {n.name} ({n.op} {n.target}) "
                             f"on the example input: {type(exc).__name__}: {exc}") from exc
        self.values[n] = TensorRecord(out.shape, out.dtype) if isinstance(out, Tensor) else out
        return out


def _tensor_leaves(out: Any) -> list[Tensor]:
    if hasattr(out, "to_tuple") and callable(out.to_tuple):  # transformers' ModelOutput
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    return [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]


def _same_outputs(expected: Any, got: Any) -> str | None:
    """None when got's tensors equal expected's, in order; else what differs."""
    a, b = _tensor_leaves(expected), _tensor_leaves(got)
    if len(a) != len(b):
        return f"the model gives {len(a)} output tensors, the graph {len(b)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape != y.shape or not torch.equal(x, y):
            return f"output tensor {i} differs"
    return None


def _record(gm: fx.GraphModule, reference: nn.Module, given: dict[str, Any],
            example_inputs: Any) -> dict[fx.Node, Any]:
    """Run gm on the example (recording every node), and reference (a copy of the model as it
    was before tracing) on the same input with the same random state; refuse a graph whose
    outputs are not the model's."""
    recorder = _Recorder(gm)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        expected = call(reference, example_inputs)
        random_state = torch.get_rng_state()
        torch.manual_seed(0)
        got = recorder.run(*_placeholder_values(gm, given))
        same_draws = torch.equal(random_state, torch.get_rng_state())
    differs = _same_outputs(expected, got)
    mode = "training" if reference.training else "eval"
    if not same_draws:  # even with equal outputs: the draw decided a branch the graph froze
        outputs = "equal" if differs is None else f"different ({differs})"
        raise TraceError(f"{type(reference).__name__} draws random numbers the graph does not "
                         f"(a torch.rand in Python, layerdrop say; outputs {outputs} for this "
                         f"draw), so the graph cannot be checked against the model in {mode} "
                         f"mode")
    if differs is not None:
        raise TraceError(f"the captured graph does not reproduce {type(reference).__name__} on "
                         f"the example input in {mode} mode ({differs}); something the trace "
                         f"cannot see (a side effect, state kept between calls) changes the "
                         f"result")
    return recorder.values


def capture(model: nn.Module, example_inputs: Any) -> Capture:
    """The first capture that turns model into a graph reproducing it on example_inputs.

    Tracing and the recording run execute the model (its BN layers in training mode update
    their buffers): pass a copy when that matters (the public tools do). Raises TraceError with
    every capture's reason when none works.
    """
    given, defaults = _bind(model, example_inputs)
    reference = copy.deepcopy(model)
    attempts: list[str] = []
    for name in (SYMBOLIC, CONCRETE):
        tracer = _Tracer() if name == SYMBOLIC else _ConcreteTracer(given)
        with torch.no_grad():  # a failed attempt may have run BN layers in training mode
            for buffer, kept in zip(model.buffers(), reference.buffers(), strict=True):
                buffer.copy_(kept)
        try:
            with torch.random.fork_rng(devices=[]):  # the concrete run may draw dropout masks
                gm = _trace_with(tracer, model, defaults, name)
            values = _record(gm, copy.deepcopy(reference), given, example_inputs)
        except TraceError as exc:
            attempts.append(str(exc))
            continue
        return Capture(gm, values, name, attempts)
    raise TraceError(
        f"the tools could not trace {type(model).__name__} into a graph: "
        + "; ".join(f"({i + 1}) {a}" for i, a in enumerate(attempts))
        + ". The tools act only on what a graph proves; make that code traceable (no Python "
          "control flow on tensor values) or wrap it in a leaf module")
