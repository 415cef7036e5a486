"""Tracing a model with torch.fx and reading its graph: which biases a BN cancels, which BNs fold.

Every answer here is exact or absent: a layer is reported only when the graph proves it, and a
model torch.fx cannot trace gets a TraceError naming what failed, never a guess from module order.

A bias b of a Conv/ConvTranspose/Linear adds a constant field K (b broadcast over the layer's
output) to its output. It is redundant when K reaches a batch norm's input only through
operations op with op(x + K) = op(x) + K' for every x, and K' is constant over every dim but the
BN's channel dim: then BN subtracts it again (in batch statistics) or it can move into
running_mean (in running statistics). Two kinds of operations qualify:

    affine in x      K' = op(K) - op(0): views, reshapes, permutes, slices, average pools, means,
                     sums, interpolation, padding (zero padding gives a K' that is not constant,
                     so the check at the BN rejects it), pixel/channel shuffles
    max-like         max(x + K) = max(x) + K only when K is constant over the window: max pools
                     and amax, checked on K before passing K' = op(K)

    joins            op(x + K, y) = op(x, y) + K' with K' = op(K, 0) - op(0, 0) for every other
                     operand y: channel concatenation (cat), add and sub (a - b brings b's
                     constant in negated), neg, and multiplication or division by a number
                     written in the code (the constant arrives scaled). The other operands are
                     independent of K (every node on the path has one value user), so each bias
                     is proven on its own, and the constants of several biases meeting in a sum
                     add up: removing all of them moves their sum into running_mean.

ReLU, dropout with p > 0 (in training a random mask multiplies the shift; exact in eval is not
enough, since stripping must keep training outputs too), multiplications by other tensors (or by
numbers the graph computes, like a size) and anything not listed stop the walk. K is a generic
probe (random values per channel), so a bias that is zero by chance does not make a zero-padded
path look redundant. A second probe labels the batch samples: a path that mixes samples (a sum
over the batch) would bring the bias in scaled by the batch size, and is not reported.
"""

import builtins
import copy
import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.nn import fuses_relu

__all__ = ["TraceError", "Traced", "trace", "RedundantBias", "find_redundant_biases",
           "FoldPlan", "plan_folds", "PRODUCERS"]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
PRODUCERS = CONVS + CONV_TRANSPOSES + (nn.Linear,)

_AFFINE_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                   nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Upsample,
                   nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d,
                   nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d,
                   nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
                   nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
                   nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
_AFFINE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                     torch.unsqueeze, torch.mean, torch.sum, torch.movedim, operator.getitem,
                     F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                     F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.interpolate, F.pad,
                     F.pixel_shuffle, F.pixel_unshuffle}
_AFFINE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
                   "unsqueeze", "mean", "sum", "expand", "repeat", "flip", "clone", "movedim"}
_MAX_MODULES = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AdaptiveMaxPool1d: 1,
                nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}
_MAX_FUNCTIONS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.adaptive_max_pool1d: 1,
                  F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3}
# Several tensor operands, jointly linear: the other operands are set to zero to carry K.
_JOIN_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate, operator.add, operator.sub,
                   torch.add, torch.sub, torch.subtract, operator.neg, torch.neg}
_JOIN_METHODS = {"add", "sub", "subtract", "neg"}
# x * number, number * x, x / number: K arrives scaled by the number.
_SCALE_FUNCTIONS = {operator.mul, torch.mul, torch.multiply, operator.truediv, torch.div,
                    torch.divide, torch.true_divide}
_SCALE_METHODS = {"mul", "multiply", "div", "divide", "true_divide"}
_DIVISIONS = {operator.truediv, torch.div, torch.divide, torch.true_divide, "div", "divide",
              "true_divide"}
_SHAPE_METHODS = {"size", "dim"}  # users that read only the shape, not the values
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}


class TraceError(RuntimeError):
    """torch.fx could not turn the model into a graph, or the graph could not run on the input."""


@dataclasses.dataclass(frozen=True)
class _TensorRecord:
    shape: torch.Size
    dtype: torch.dtype


@dataclasses.dataclass
class Traced:
    """A model, its fx graph (sharing the model's submodules) and what each node produced."""

    model: nn.Module
    graph_module: fx.GraphModule
    values: dict[fx.Node, Any]  # tensors as _TensorRecord (shape, dtype), everything else as is
    calls: dict[int, int]  # id(module) -> number of call_module nodes calling it

    def module(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        return self.graph_module.get_submodule(node.target)

    def name(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{node.target} ({type(self.module(node)).__name__})"
        if node.op == "call_function":
            return getattr(node.target, "__name__", str(node.target))
        return f"{node.op} {node.target}"

    def shape(self, node: fx.Node) -> torch.Size | None:
        value = self.values.get(node)
        return value.shape if isinstance(value, _TensorRecord) else None


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


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as exc:
            raise TraceError(f"the traced graph failed at node {n.name} ({n.op} {n.target}) on "
                             f"the example input: {type(exc).__name__}: {exc}") from exc
        self.values[n] = _TensorRecord(out.shape, out.dtype) if isinstance(out, Tensor) else out
        return out


def _as_tuple(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def trace(model: nn.Module, example_inputs: Any) -> Traced:
    """Trace model with torch.fx (BN modules as leaves) and run the graph once on example_inputs.

    The run is under no_grad, but a BN in training mode updates its buffers: pass a copy when that
    matters (the public tools do). Raises TraceError naming the module where tracing failed.
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = " -> ".join(tracer.failed_in or [f"(root) ({type(model).__name__})"])
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}; it failed inside {where}: "
            f"{type(exc).__name__}: {exc}. The tools only act on what the graph proves; make "
            f"that code traceable (no Python control flow on tensor values) or wrap it in a "
            f"leaf module"
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*_as_tuple(example_inputs))
    calls: dict[int, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            key = id(gm.get_submodule(node.target))
            calls[key] = calls.get(key, 0) + 1
    return Traced(model, gm, recorder.values, calls)


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


def _occurrences(node: fx.Node, user: fx.Node) -> int:
    found = []
    fx.node.map_arg((user.args, user.kwargs), lambda n: found.append(n) if n is node else None)
    return len(found)


def _attr_users(traced: Traced, qualname: str) -> list[str]:
    """get_attr nodes reading a parameter or buffer of the module at qualname."""
    prefix = qualname + "."
    return [str(n.target) for n in traced.graph_module.graph.nodes
            if n.op == "get_attr" and str(n.target).startswith(prefix)]


def _tensor_owners(model: nn.Module) -> dict[int, int]:
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


def _is_producer(module: nn.Module | None) -> bool:
    return type(module) in PRODUCERS  # exact types: a subclass may change forward


def _feature_dim(module: nn.Module, out_shape: torch.Size) -> int | None:
    """The dim of the producer's output that its bias (and weight rows) run along."""
    if isinstance(module, nn.Linear):
        return len(out_shape) - 1
    spatial = len(module.kernel_size)
    return 1 if len(out_shape) == spatial + 2 else None  # None: unbatched input


# ---------------------------------------------------------------------------------------------
# Redundant biases
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RedundantBias:
    """The bias of `layer` reaches batch norm `bn` as the per-channel constant `channel_bias`."""

    layer: str
    bn: str
    through: list[str]
    channel_bias: Tensor  # (C,) float64, the actual bias as BN's input channels see it
    parameters: int
    channels: list[int] = dataclasses.field(default_factory=list)  # BN channels it reaches
    joins: list[str] = dataclasses.field(default_factory=list)  # cat / add / sub ... passed


def _constant_except(field: Tensor, keep: set[int]) -> bool:
    """Whether field is constant along every dim not in keep (to rounding of a float64 probe)."""
    dims = [d for d in range(field.dim()) if d not in keep]
    if not dims or field.numel() == 0:
        return True
    spread = field.amax(dims) - field.amin(dims)
    return bool((spread <= 1e-9 * (1 + field.abs().amax())).all())


def _concrete(traced: Traced, node: fx.Node, chain: fx.Node, field: Tensor,
              zero_others: bool = False):
    """node's args and kwargs with `chain` replaced by field and other nodes by recorded values;
    other tensors are zeros when zero_others (a join's other operands), else the call is refused
    (None, None): their values were not kept."""
    bad = []

    def value(n: fx.Node):
        if n is chain:
            return field
        v = traced.values.get(n)
        if isinstance(v, _TensorRecord):
            if zero_others:
                return torch.zeros(v.shape, dtype=torch.float64)
            bad.append(n.name)
        return v

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
    return (None, None) if bad else (args, kwargs)


def _apply(traced: Traced, node: fx.Node, chain: fx.Node, field: Tensor,
           zero_others: bool = False) -> Tensor | None:
    args, kwargs = _concrete(traced, node, chain, field, zero_others)
    if args is None:
        return None
    if node.op == "call_module":
        return traced.module(node)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)


def _commuting_kind(traced: Traced, node: fx.Node) -> tuple[str | None, int]:
    """('affine', 0), ('join', 0), ('scale', 0), ('max', pooled trailing dims) or (None, 0) for
    a node on the bias's path."""
    if node.op == "call_module":
        module = traced.module(node)
        if isinstance(module, nn.Dropout) or type(module) in (nn.Dropout1d, nn.Dropout2d,
                                                              nn.Dropout3d):
            return ("affine", 0) if module.p == 0 else (None, 0)
        if type(module) in _AFFINE_MODULES:
            return "affine", 0
        if type(module) in _MAX_MODULES and not module.return_indices:
            return "max", _MAX_MODULES[type(module)]
        return None, 0
    if node.op == "call_function":
        if node.target in _AFFINE_FUNCTIONS:
            return "affine", 0
        if node.target in _MAX_FUNCTIONS and not node.kwargs.get("return_indices", False):
            return "max", _MAX_FUNCTIONS[node.target]
        if node.target is torch.amax:
            return "max", -1
        if node.target in _JOIN_FUNCTIONS:
            return "join", 0
        if node.target in _SCALE_FUNCTIONS:
            return "scale", 0
        return None, 0
    if node.op == "call_method":
        if node.target in _AFFINE_METHODS:
            return "affine", 0
        if node.target in _JOIN_METHODS:
            return "join", 0
        if node.target in _SCALE_METHODS:
            return "scale", 0
        if node.target == "amax":
            return "max", -1
    return None, 0


def _operand_reason(traced: Traced, node: fx.Node, chain: fx.Node, kind: str) -> str | None:
    """Why node does not pass chain's constant on as a join or a scaling, or None when it does.

    cat: chain is one of the concatenated tensors. add / sub / neg: chain is an operand and
    nothing else in the call is a traced value (alpha, say). mul / div: chain times (or over) a
    number written in the code; a number the graph computes (x.size(0)) could change with the
    batch, and a tensor factor would make the constant vary with that tensor.
    """
    where = f"{traced.name(node)} reads {traced.name(chain)}"
    if node.target in (torch.cat, torch.concat, torch.concatenate):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        if not (isinstance(tensors, (list, tuple)) and any(t is chain for t in tensors)):
            return f"{where} other than as one of the tensors it concatenates"
        return None
    operands = list(node.args[:2]) + [node.kwargs.get(k) for k in ("input", "other")]
    rest = list(node.args[2:]) + [v for k, v in node.kwargs.items() if k not in ("input", "other")]
    if not any(o is chain for o in operands):
        return f"{where} other than as an operand"
    if any(isinstance(v, fx.Node) for v in rest):
        return f"{traced.name(node)} takes a traced value besides its operands"
    if kind == "join":
        return None
    if node.kwargs.get("rounding_mode") is not None:
        return f"{traced.name(node)} rounds"
    others = [o for o in operands if o is not chain and o is not None]
    if len(others) != 1 or isinstance(others[0], bool) or not isinstance(others[0], (int, float)):
        return f"{traced.name(node)} multiplies by something other than a number in the code"
    if node.target in _DIVISIONS and node.args[0] is not chain:
        return f"{traced.name(node)} divides by {traced.name(chain)}"
    return None


def _amax_dims(traced: Traced, node: fx.Node, chain: fx.Node, field: Tensor) -> list[int]:
    args, kwargs = _concrete(traced, node, chain, field)
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None or dim == ():
        return list(range(field.dim()))  # amax over everything
    return [d % field.dim() for d in _as_tuple(dim)]


def _walk_to_bn(traced: Traced, start: fx.Node, fields: dict[str, Tensor]):
    """Follow start's single value user through commuting ops to a BN module's input.

    fields are tensors shaped like start's output, each carried through every op as the bias is
    (the op's affine part, or the op itself for max-like ops): "probe" (decides structure),
    "actual" (the real bias), and "samples" / "ones" (track which batch samples each position
    draws from). Returns (bn node, names passed through, the joins among them, fields at the BN)
    or a reason string.
    """
    node, through, joins = start, [], []
    while True:
        users = value_users(node)
        if len(users) != 1:
            return f"output of {traced.name(node)} has {len(users)} users, not only the BN"
        user = users[0]
        if user.op == "output":
            return f"{traced.name(node)} is a model output before reaching any batch norm"
        if _occurrences(node, user) != 1:
            return f"{traced.name(user)} reads {traced.name(node)} more than once"
        if is_bn_module_call(traced, user):
            if bn_input(user) is not node:
                return f"reaches {traced.name(user)} through its residual input, not its input"
            return user, through, joins, fields
        if user.op == "call_function" and user.target is F.batch_norm:
            return "reaches a functional batch_norm; strip-bias handles BN modules only"
        kind, pooled = _commuting_kind(traced, user)
        if kind is None:
            return (f"{traced.name(user)} lies between and does not commute with adding a "
                    f"per-channel constant")
        if kind in ("join", "scale"):
            reason = _operand_reason(traced, user, node, kind)
            if reason is not None:
                return reason
            joins.append(traced.name(user))
        elif not (user.args and user.args[0] is node):
            return f"{traced.name(user)} reads {traced.name(node)} other than as its input"
        if _has_hooks(traced.module(user)):
            return f"{traced.name(user)} has forward hooks, which the graph does not show"
        probe = fields["probe"]
        if kind == "max":
            dims = (list(range(probe.dim() - pooled, probe.dim())) if pooled > 0 else
                    _amax_dims(traced, user, node, probe))
            others = set(range(probe.dim())) - set(dims)
            if not all(_constant_except(f, others) for f in fields.values()):
                return f"{traced.name(user)} takes a max over a window where the bias varies"
            new = {k: _apply(traced, user, node, f) for k, f in fields.items()}
        else:  # the affine part: op(f, 0) - op(0, 0), a join's other operands set to zero
            joined = kind != "affine"
            zero = _apply(traced, user, node, torch.zeros_like(probe), joined)
            new = {k: _apply(traced, user, node, f, joined) for k, f in fields.items()}
            if isinstance(zero, Tensor):
                new = {k: f - zero for k, f in new.items()}
        if not all(isinstance(f, Tensor) for f in new.values()):
            return f"{traced.name(user)} takes another tensor argument or gives no tensor"
        fields, node = new, user
        through.append(traced.name(user))


def _per_sample(fields: dict[str, Tensor], labels: Tensor) -> bool:
    """Whether position (n, ...) at the BN draws only on sample n: samples == labels[n] * ones.

    A bias routed through a sum over the batch (or a reshape mixing samples) would reach the BN
    scaled by the batch size, and a running_mean correction made for one batch size would be
    wrong for another; such paths are not reported.
    """
    samples, ones = fields["samples"], fields["ones"]
    if samples.dim() == 0 or samples.shape[0] > labels.numel():
        return False
    expected = labels[: samples.shape[0]].reshape(-1, *[1] * (samples.dim() - 1)) * ones
    return bool(((samples - expected).abs() <= 1e-9 * (1 + ones.abs())).all())


def _has_hooks(module: nn.Module | None) -> bool:
    """Forward hooks can change a module's output without the fx graph showing it."""
    return module is not None and bool(module._forward_hooks or module._forward_pre_hooks)


def _bn_shared_reason(traced: Traced, bn_node: fx.Node, owners: dict[int, int]) -> str | None:
    bn = traced.module(bn_node)
    if _has_hooks(bn):
        return f"{bn_node.target} has forward hooks, which the graph does not show"
    if traced.calls[id(bn)] != 1:
        return f"{bn_node.target} is called {traced.calls[id(bn)]} times (a shared module)"
    if _attr_users(traced, str(bn_node.target)):
        return f"{bn_node.target}'s parameters or buffers are also read directly"
    tied = [t for t in (bn.running_mean, bn.weight, bn.bias) if t is not None and owners[id(t)] > 1]
    if tied:
        return f"{bn_node.target} shares a parameter or buffer with another module"
    return None


def _producer_reason(traced: Traced, node: fx.Node, owners: dict[int, int]) -> str | None:
    module = traced.module(node)
    if traced.calls[id(module)] != 1:
        return f"called {traced.calls[id(module)]} times (a shared module)"
    if _has_hooks(module):
        return "it has forward hooks, which the graph does not show"
    if _attr_users(traced, str(node.target)):
        return "its parameters are also read directly by the graph"
    if _feature_dim(module, traced.shape(node)) is None:
        return "called on an unbatched input"
    return None


def find_redundant_biases(traced: Traced) -> tuple[list[RedundantBias], list[tuple[str, str]]]:
    """Every producer bias the graph proves a BN cancels, and (layer, reason) for other biases."""
    found, skipped = [], []
    owners = _tensor_owners(traced.model)
    generator = torch.Generator().manual_seed(0)
    for node in traced.graph_module.graph.nodes:
        module = traced.module(node)
        if not _is_producer(module) or module.bias is None:
            continue
        reason = _producer_reason(traced, node, owners)
        if reason is None and owners[id(module.bias)] > 1:
            reason = "its bias is shared with another module"
        if reason is not None:
            skipped.append((str(node.target), reason))
            continue
        out_shape = traced.shape(node)
        dim = _feature_dim(module, out_shape)
        view = [1] * len(out_shape)
        view[dim] = -1
        c = module.bias.numel()
        probe_bias = 1 + torch.rand(c, generator=generator, dtype=torch.float64)
        labels = 1 + torch.rand(out_shape[0], generator=generator, dtype=torch.float64)
        sample_view = [-1] + [1] * (len(out_shape) - 1)
        fields = {"probe": probe_bias.reshape(view),
                  "actual": module.bias.detach().double().reshape(view),
                  "samples": labels.reshape(sample_view),
                  "ones": torch.ones((), dtype=torch.float64)}
        fields = {k: f.expand(out_shape).contiguous() for k, f in fields.items()}
        with torch.no_grad():
            walked = _walk_to_bn(traced, node, fields)
        if isinstance(walked, str):
            skipped.append((str(node.target), walked))
            continue
        bn_node, through, joins, fields = walked
        probe, actual = fields["probe"], fields["actual"]
        reason = _bn_shared_reason(traced, bn_node, owners)
        if reason is None and not _per_sample(fields, labels):
            reason = (f"between it and {bn_node.target} samples of the batch are mixed, so the "
                      f"bias would reach the BN scaled by the batch size")
        if reason is None and probe.dim() < 2:
            reason = f"{bn_node.target} gets a {probe.dim()}D input, with no channel dim"
        if reason is None and not _constant_except(probe, {1}):
            reason = (f"the bias is not a per-channel constant at {bn_node.target}'s input "
                      f"(padding or a layout change in between varies it)")
        if reason is not None:
            skipped.append((str(node.target), reason))
            continue
        dims = [d for d in range(actual.dim()) if d != 1]
        channel_bias = actual.mean(dims) if dims else actual
        channel_probe = (probe.mean(dims) if dims else probe).abs()
        reached = (channel_probe > 1e-12 * channel_probe.amax()).nonzero().flatten().tolist()
        found.append(RedundantBias(str(node.target), str(bn_node.target), through, channel_bias, c,
                                   reached, joins))
    return found, skipped


# ---------------------------------------------------------------------------------------------
# Foldable pairs (eval mode)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FoldPlan:
    """Fold the BN at `bn` (a module name, or a functional call's node name) into `layer`.

    direction "into previous": layer(x) -> bn: layer's output channels absorb BN.
    direction "into next": bn -> layer: layer's input channels absorb BN.
    """

    bn: str
    layer: str
    direction: str
    functional: bool = False


_FUNCTIONAL_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training",
                       "momentum", "eps")


def functional_bn_args(node: fx.Node) -> dict[str, Any] | None:
    """F.batch_norm's arguments by name, or None when node is not an F.batch_norm call."""
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    named = dict(zip(_FUNCTIONAL_BN_ARGS, node.args, strict=False))
    named.update(node.kwargs)
    for key, default in (("weight", None), ("bias", None), ("training", False), ("eps", 1e-5)):
        named.setdefault(key, default)
    return named


def _bn_eval_reason(traced: Traced, node: fx.Node, owners: dict[int, int]) -> str | None:
    """Why the BN at node cannot become a fixed affine map in eval mode, or None."""
    named = functional_bn_args(node)
    if named is not None:
        if named["training"] is not False:
            return "functional batch_norm with training not a constant False"
        for key in ("running_mean", "running_var", "weight", "bias"):
            arg = named[key]
            if arg is not None and not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
                return f"functional batch_norm's {key} is computed in the graph, not stored"
        if named["running_mean"] is None or named["running_var"] is None:
            return "functional batch_norm without running statistics uses batch statistics"
        return None
    bn = traced.module(node)
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics: it normalizes with batch statistics even in eval mode"
    return _bn_shared_reason(traced, node, owners)


def _exact_next_conv(module: nn.Module) -> bool:
    """A conv reading only inside its input (no zero padding) sees bn(x) everywhere."""
    if module.padding_mode != "zeros":
        return True  # reflect / replicate / circular pad with copies of bn(x)
    padding = module.padding
    return padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding))


def _plan_previous(traced: Traced, node: fx.Node, owners) -> FoldPlan | str:
    producer = bn_input(node)
    if producer is None or not _is_producer(traced.module(producer)):
        after = traced.name(producer) if producer is not None else "a non-tensor argument"
        return f"after {after}, not a Conv/ConvTranspose/Linear"
    reason = _producer_reason(traced, producer, owners)
    if reason is None and len(value_users(producer)) != 1:
        reason = f"its output has {len(value_users(producer))} users, not only the BN"
    if reason is None and _feature_dim(traced.module(producer), traced.shape(producer)) != 1:
        reason = "its output features are not the BN's channel dim (Linear on a 3D input)"
    if reason is not None:
        return f"{producer.target}: {reason}"
    return FoldPlan(node.name if node.op != "call_module" else str(node.target),
                    str(producer.target), "into previous", node.op != "call_module")


def _plan_next(traced: Traced, node: fx.Node, owners) -> FoldPlan | str:
    if node.op == "call_module":
        bn = traced.module(node)
        if fuses_relu(bn):
            return "its fused ReLU sits between it and the next layer"
        if len(node.args) + len(node.kwargs) > 1:
            return "it adds a residual, which the next layer would not see scaled"
    users = value_users(node)
    if len(users) != 1 or _occurrences(node, users[0]) != 1:
        return f"its output has {len(users)} users"
    user = users[0]
    module = traced.module(user)
    if type(module) not in CONVS + (nn.Linear,):
        return f"before {traced.name(user)}, not a Conv/Linear"
    reason = _producer_reason(traced, user, owners)
    if reason is not None:
        return f"{user.target}: {reason}"
    in_shape = traced.shape(node)
    if isinstance(module, nn.Linear) and len(in_shape) != 2:
        return f"{user.target} reads the last dim of a {len(in_shape)}D input, not BN's channels"
    if isinstance(module, CONVS) and not _exact_next_conv(module):
        return f"{user.target} zero-pads its input, and a padded zero is not bn(anything)"
    return FoldPlan(node.name if node.op != "call_module" else str(node.target),
                    str(user.target), "into next", node.op != "call_module")


def plan_folds(traced: Traced) -> tuple[list[FoldPlan], list[tuple[str, str]]]:
    """For every BN (module or F.batch_norm call): a FoldPlan, or (bn, reason) it stays."""
    plans, skipped = [], []
    owners = _tensor_owners(traced.model)
    taken_previous, taken_next = set(), set()
    for node in traced.graph_module.graph.nodes:
        if not (is_bn_module_call(traced, node) or functional_bn_args(node) is not None):
            continue
        name = str(node.target) if node.op == "call_module" else node.name
        reason = _bn_eval_reason(traced, node, owners)
        if reason is not None:
            skipped.append((name, reason))
            continue
        previous = _plan_previous(traced, node, owners)
        if isinstance(previous, FoldPlan) and previous.layer not in taken_previous:
            taken_previous.add(previous.layer)
            plans.append(previous)
            continue
        following = _plan_next(traced, node, owners)
        if isinstance(following, FoldPlan) and following.layer not in taken_next:
            taken_next.add(following.layer)
            plans.append(following)
            continue
        skipped.append((name, f"{previous}; {following}"))
    return plans, skipped


def traced_copy(model: nn.Module, example_inputs: Any, training: bool) -> Traced:
    """Trace a deep copy of model set to training or eval (running the example updates nothing
    the caller holds)."""
    clone = copy.deepcopy(model)
    clone.train(training)
    return trace(clone, example_inputs)
