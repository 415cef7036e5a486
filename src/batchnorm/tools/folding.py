"""Fold planning: which batch norms become a fixed affine map folded into a neighbouring
Conv/ConvTranspose/Linear in eval mode, read off the fx graph, and why the others stay."""

import dataclasses
from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from batchnorm.nn import fuses_relu
from batchnorm.tools.tracing import (
    CONVS,
    Traced,
    bn_input,
    bn_shared_reason,
    feature_dim,
    is_bn_module_call,
    is_producer,
    occurrences,
    producer_reason,
    tensor_owners,
    value_users,
)

__all__ = ["FoldPlan", "plan_folds", "functional_bn_args"]


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
    assert isinstance(bn, _BatchNorm), "node is an F.batch_norm call or a BN module call"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics: it normalizes with batch statistics even in eval mode"
    return bn_shared_reason(traced, node, owners)


def _exact_next_conv(module: _ConvNd) -> bool:
    """A conv reading only inside its input (no zero padding) sees bn(x) everywhere."""
    if module.padding_mode != "zeros":
        return True  # reflect / replicate / circular pad with copies of bn(x)
    padding = module.padding
    return padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding))


def _plan_previous(traced: Traced, node: fx.Node, owners: dict[int, int]) -> FoldPlan | str:
    producer = bn_input(node)
    if producer is None:
        return "after a non-tensor argument, not a Conv/ConvTranspose/Linear"
    module = traced.module(producer)
    if not is_producer(module):
        return f"after {traced.name(producer)}, not a Conv/ConvTranspose/Linear"
    reason = producer_reason(traced, producer, owners)
    if reason is None and len(value_users(producer)) != 1:
        reason = f"its output has {len(value_users(producer))} users, not only the BN"
    if reason is None and feature_dim(module, traced.tensor_shape(producer)) != 1:
        reason = "its output features are not the BN's channel dim (Linear on a 3D input)"
    if reason is not None:
        return f"{producer.target}: {reason}"
    return FoldPlan(node.name if node.op != "call_module" else str(node.target),
                    str(producer.target), "into previous", node.op != "call_module")


def _plan_next(traced: Traced, node: fx.Node, owners: dict[int, int]) -> FoldPlan | str:
    if node.op == "call_module":
        if fuses_relu(traced.module(node)):
            return "its fused ReLU sits between it and the next layer"
        if len(node.args) + len(node.kwargs) > 1:
            return "it adds a residual, which the next layer would not see scaled"
    users = value_users(node)
    if len(users) != 1 or occurrences(node, users[0]) != 1:
        return f"its output has {len(users)} users"
    user = users[0]
    module = traced.module(user)
    if type(module) not in CONVS + (nn.Linear,):
        return f"before {traced.name(user)}, not a Conv/Linear"
    reason = producer_reason(traced, user, owners)
    if reason is not None:
        return f"{user.target}: {reason}"
    in_shape = traced.tensor_shape(node)
    if isinstance(module, nn.Linear) and len(in_shape) != 2:
        return f"{user.target} reads the last dim of a {len(in_shape)}D input, not BN's channels"
    if isinstance(module, CONVS) and not _exact_next_conv(module):
        return f"{user.target} zero-pads its input, and a padded zero is not bn(anything)"
    return FoldPlan(node.name if node.op != "call_module" else str(node.target),
                    str(user.target), "into next", node.op != "call_module")


def plan_folds(traced: Traced) -> tuple[list[FoldPlan], list[tuple[str, str]]]:
    """For every BN (module or F.batch_norm call): a FoldPlan, or (bn, reason) it stays."""
    plans, skipped = [], []
    owners = tensor_owners(traced.model)
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
