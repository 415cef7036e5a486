"""The captured graph of a model, and the graph queries the tools share.

trace() captures a model as an fx graph (capture.py: torch.fx symbolic tracing, else torch.fx
with the example's concrete shapes; every batch-norm module a leaf) and records what each node
produced on an example input; a model no capture can handle gets a TraceError naming what
failed, never a guess from module order. The queries below answer what both the redundant-bias
proof (biases.py) and the fold planning (folding.py) ask of a node: who reads its values, which
module it calls, whether that module is shared, hooked or tied to another.
"""

import builtins
import copy
import dataclasses
from typing import Any, TypeGuard

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from batchnorm.tools.capture import SYMBOLIC, TensorRecord, TraceError, capture

__all__ = ["TraceError", "Traced", "trace", "traced_copy", "PRODUCERS", "TensorRecord"]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
PRODUCERS = CONVS + CONV_TRANSPOSES + (nn.Linear,)
_SHAPE_METHODS = {"size", "dim"}  # users that read only the shape, not the values
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}


@dataclasses.dataclass
class Traced:
    """A model, its fx graph (sharing the model's submodules) and what each node produced."""

    model: nn.Module
    graph_module: fx.GraphModule
    values: dict[fx.Node, Any]  # tensors as TensorRecord (shape, dtype), everything else as is
    calls: dict[int, int]  # id(module) -> number of call_module nodes calling it
    capture: str = SYMBOLIC  # which capture made the graph (capture.SYMBOLIC / CONCRETE)
    attempts: list[str] = dataclasses.field(default_factory=list)  # captures that failed first

    @property
    def shape_specialized(self) -> bool:
        """Whether the graph holds for the example's shapes only (not symbolic tracing)."""
        return self.capture != SYMBOLIC

    def module(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        return self.graph_module.get_submodule(str(node.target))

    def name(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{node.target} ({type(self.module(node)).__name__})"
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target))
        return f"{node.op} {node.target}"

    def shape(self, node: fx.Node) -> torch.Size | None:
        value = self.values.get(node)
        return value.shape if isinstance(value, TensorRecord) else None

    def tensor_shape(self, node: fx.Node) -> torch.Size:
        """shape() of a node that gives a tensor (a Conv/Linear or BN call, say)."""
        shape = self.shape(node)
        if shape is None:
            raise TypeError(f"{self.name(node)} gave no tensor on the example input")
        return shape


def as_tuple(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def trace(model: nn.Module, example_inputs: Any) -> Traced:
    """Capture model as an fx graph (BN modules as leaves) and run the graph on example_inputs.

    example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs. The run
    is under no_grad, but a BN in training mode updates its buffers: pass a copy when that
    matters (the public tools do). Raises TraceError naming what failed in each capture.
    """
    captured = capture(model, example_inputs)
    gm = captured.graph_module
    calls: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            key = id(gm.get_submodule(node.target))
            calls[key] = calls.get(key, 0) + 1
    return Traced(model, gm, captured.values, calls, captured.name, captured.attempts)


def traced_copy(model: nn.Module, example_inputs: Any, training: bool) -> Traced:
    """Trace a deep copy of model set to training or eval (running the example updates nothing
    the caller holds)."""
    clone = copy.deepcopy(model)
    clone.train(training)
    return trace(clone, example_inputs)


# ---------------------------------------------------------------------------------------------
# Graph queries
# ---------------------------------------------------------------------------------------------

def _is_shape_only(user: fx.Node) -> bool:
    if user.op == "call_method" and user.target in _SHAPE_METHODS:
        return True
    return (user.op == "call_function" and user.target is builtins.getattr
            and len(user.args) > 1 and user.args[1] in _SHAPE_ATTRS)


def value_users(node: fx.Node) -> list[fx.Node]:
    """Users that read node's values (x.size(0) or x.shape read only its shape)."""
    return [u for u in node.users if not _is_shape_only(u)]


def occurrences(node: fx.Node, user: fx.Node) -> int:
    found = []
    fx.node.map_arg((user.args, user.kwargs), lambda n: found.append(n) if n is node else None)
    return len(found)


def attr_users(traced: Traced, qualname: str) -> list[str]:
    """get_attr nodes reading a parameter or buffer of the module at qualname."""
    prefix = qualname + "."
    return [str(n.target) for n in traced.graph_module.graph.nodes
            if n.op == "get_attr" and str(n.target).startswith(prefix)]


def tensor_owners(model: nn.Module) -> dict[int, int]:
    """id(tensor) -> how many (module, name) slots hold it: > 1 means tied weights or buffers."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None:
                owners[id(t)] = owners.get(id(t), 0) + 1
    return owners


def is_bn_module_call(traced: Traced, node: fx.Node) -> bool:
    return isinstance(traced.module(node), _BatchNorm)


def bn_input(node: fx.Node) -> fx.Node | None:
    arg = node.args[0] if node.args else node.kwargs.get("input")
    return arg if isinstance(arg, fx.Node) else None


def is_producer(module: nn.Module | None) -> TypeGuard[_ConvNd | nn.Linear]:
    return type(module) in PRODUCERS  # exact types: a subclass may change forward


def feature_dim(module: _ConvNd | nn.Linear, out_shape: torch.Size) -> int | None:
    """The dim of the producer's output that its bias (and weight rows) run along."""
    if isinstance(module, nn.Linear):
        return len(out_shape) - 1
    spatial = len(module.kernel_size)
    return 1 if len(out_shape) == spatial + 2 else None  # None: unbatched input

def has_hooks(module: nn.Module | None) -> bool:
    """Forward hooks can change a module's output without the fx graph showing it."""
    return module is not None and bool(module._forward_hooks or module._forward_pre_hooks)


def bn_shared_reason(traced: Traced, bn_node: fx.Node, owners: dict[int, int]) -> str | None:
    bn = traced.module(bn_node)
    assert isinstance(bn, _BatchNorm), "called for batch-norm module calls only"
    if has_hooks(bn):
        return f"{bn_node.target} has forward hooks, which the graph does not show"
    if traced.calls[id(bn)] != 1:
        return f"{bn_node.target} is called {traced.calls[id(bn)]} times (a shared module)"
    if attr_users(traced, str(bn_node.target)):
        return f"{bn_node.target}'s parameters or buffers are also read directly"
    tied = [t for t in (bn.running_mean, bn.weight, bn.bias) if t is not None and owners[id(t)] > 1]
    if tied:
        return f"{bn_node.target} shares a parameter or buffer with another module"
    return None


def producer_reason(traced: Traced, node: fx.Node, owners: dict[int, int]) -> str | None:
    module = traced.module(node)
    assert is_producer(module), "called for Conv/ConvTranspose/Linear calls only"
    if traced.calls[id(module)] != 1:
        return f"called {traced.calls[id(module)]} times (a shared module)"
    if has_hooks(module):
        return "it has forward hooks, which the graph does not show"
    if attr_users(traced, str(node.target)):
        return "its parameters are also read directly by the graph"
    if feature_dim(module, traced.tensor_shape(node)) is None:
        return "called on an unbatched input"
    return None
