"""Redundant biases: which producer biases a batch norm provably cancels, read off the fx graph.

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

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from batchnorm.tools.tracing import (
    TensorRecord,
    Traced,
    as_tuple,
    bn_input,
    bn_shared_reason,
    feature_dim,
    has_hooks,
    is_bn_module_call,
    is_producer,
    occurrences,
    producer_reason,
    tensor_owners,
    value_users,
)

__all__ = ["RedundantBias", "find_redundant_biases", "commuting_kind"]

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
        if isinstance(v, TensorRecord):
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
        module = traced.module(node)
        assert module is not None
        return module(*args, **kwargs)
    if node.op == "call_function":
        assert callable(node.target)
        return node.target(*args, **kwargs)
    return getattr(args[0], str(node.target))(*args[1:], **kwargs)  # call_method: a name


def commuting_kind(traced: Traced, node: fx.Node) -> tuple[str | None, int]:
    """('affine', 0), ('join', 0), ('scale', 0), ('max', pooled trailing dims) or (None, 0) for
    a node on the bias's path."""
    if node.op == "call_module":
        module = traced.module(node)
        assert module is not None
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


def _amax_dims(traced: Traced, node: fx.Node, chain: fx.Node, field: Tensor) -> list[int] | None:
    """The dims an amax reduces, or None when it reads another traced tensor (out=, say)."""
    args, kwargs = _concrete(traced, node, chain, field)
    if args is None:
        return None
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None or dim == ():
        return list(range(field.dim()))  # amax over everything
    return [d % field.dim() for d in as_tuple(dim)]


def _walk_to_bn(traced: Traced, start: fx.Node, fields: dict[str, Tensor],
                ) -> tuple[fx.Node, list[str], list[str], dict[str, Tensor]] | str:
    """Follow start's single value user through commuting ops to a BN module's input.

    fields are tensors shaped like start's output, each carried through every op as the bias is
    (the op's affine part, or the op itself for max-like ops): "probe" (decides structure),
    "actual" (the real bias), and "samples" / "ones" (track which batch samples each position
    draws from). Returns (bn node, names passed through, the joins among them, fields at the BN)
    or a reason string.
    """
    node = start
    through: list[str] = []
    joins: list[str] = []
    while True:
        users = value_users(node)
        if len(users) != 1:
            return f"output of {traced.name(node)} has {len(users)} users, not only the BN"
        user = users[0]
        if user.op == "output":
            return f"{traced.name(node)} is a model output before reaching any batch norm"
        if occurrences(node, user) != 1:
            return f"{traced.name(user)} reads {traced.name(node)} more than once"
        if is_bn_module_call(traced, user):
            if bn_input(user) is not node:
                return f"reaches {traced.name(user)} through its residual input, not its input"
            return user, through, joins, fields
        if user.op == "call_function" and user.target is F.batch_norm:
            return "reaches a functional batch_norm; strip-bias handles BN modules only"
        kind, pooled = commuting_kind(traced, user)
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
        if has_hooks(traced.module(user)):
            return f"{traced.name(user)} has forward hooks, which the graph does not show"
        probe = fields["probe"]
        if kind == "max":
            dims = (list(range(probe.dim() - pooled, probe.dim())) if pooled > 0 else
                    _amax_dims(traced, user, node, probe))
            if dims is None:
                return f"{traced.name(user)} takes another tensor argument"
            others = set(range(probe.dim())) - set(dims)
            if not all(_constant_except(f, others) for f in fields.values()):
                return f"{traced.name(user)} takes a max over a window where the bias varies"
            new = {k: _apply(traced, user, node, f) for k, f in fields.items()}
        else:  # the affine part: op(f, 0) - op(0, 0), a join's other operands set to zero
            joined = kind != "affine"
            zero = _apply(traced, user, node, torch.zeros_like(probe), joined)
            new = {k: _apply(traced, user, node, f, joined) for k, f in fields.items()}
            if isinstance(zero, Tensor):
                new = {k: f if f is None else f - zero for k, f in new.items()}
        tensors = {k: f for k, f in new.items() if isinstance(f, Tensor)}
        if len(tensors) != len(new):
            return f"{traced.name(user)} takes another tensor argument or gives no tensor"
        fields, node = tensors, user
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


def find_redundant_biases(traced: Traced) -> tuple[list[RedundantBias], list[tuple[str, str]]]:
    """Every producer bias the graph proves a BN cancels, and (layer, reason) for other biases."""
    found, skipped = [], []
    owners = tensor_owners(traced.model)
    generator = torch.Generator().manual_seed(0)
    for node in traced.graph_module.graph.nodes:
        module = traced.module(node)
        if not is_producer(module) or module.bias is None:
            continue
        reason = producer_reason(traced, node, owners)
        if reason is None and owners[id(module.bias)] > 1:
            reason = "its bias is shared with another module"
        if reason is not None:
            skipped.append((str(node.target), reason))
            continue
        out_shape = traced.tensor_shape(node)
        dim = feature_dim(module, out_shape)
        assert dim is not None, "producer_reason skips unbatched calls"
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
        reason = bn_shared_reason(traced, bn_node, owners)
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
