"""Model surgery on the graph's answers: strip redundant biases, fold eval-mode BN, inspect.

Each tool works on a deep copy (the model passed in is never changed) and returns the new model
with a report. What the reports' "max_abs_diff" measures is the largest difference between the
original's and the new model's outputs on the example input, in eval mode.
"""

import copy
import dataclasses
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.nn import fuses_relu
from batchnorm.tools.biases import RedundantBias, commuting_kind, find_redundant_biases
from batchnorm.tools.capture import CONCRETE, TraceError, call
from batchnorm.tools.folding import FoldPlan, functional_bn_args, plan_folds
from batchnorm.tools.tracing import (
    CONV_TRANSPOSES,
    Traced,
    bn_input,
    is_producer,
    trace,
    traced_copy,
)
from batchnorm.tools.weights import absorb_bias, fold_bn_into_next_weights, fold_bn_weights

__all__ = ["StripReport", "strip_redundant_biases", "FoldReport", "fold_bn", "BNRemnant",
           "Inspection", "inspect_model", "max_output_difference"]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _run(model: nn.Module, example_inputs: Any, training: bool) -> Any:
    """model's output in the given mode, the modules' flags restored afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        with torch.no_grad():
            return call(model, example_inputs)
    finally:
        for m, flag in flags.items():
            m.training = flag


def max_output_difference(a: nn.Module, b: nn.Module, example_inputs: Any,
                          training: bool = False) -> float:
    """max |a(x) - b(x)| over every output tensor. In eval mode nothing is updated; in training
    mode both run as deep copies (running statistics of a and b stay as they are), with the
    same random state (dropout masks)."""
    outs = []
    for m in (a, b):
        if training:
            m = copy.deepcopy(m)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outs.append(torch.utils._pytree.tree_leaves(_run(m, example_inputs, training)))
    out_a, out_b = outs
    diffs = [(x.double() - y.double()).abs().max().item() for x, y in zip(out_a, out_b, strict=True)
             if isinstance(x, Tensor) and x.numel()]
    return max(diffs, default=0.0)


def _describe_captures(captures: dict[str, str]) -> str:
    """'torch.fx symbolic' or 'training: torch.fx concrete, eval: torch.fx symbolic', plus
    what a concrete capture means for the result."""
    names = set(captures.values())
    text = (names.pop() if len(names) == 1 else
            ", ".join(f"{mode}: {name}" for mode, name in captures.items()))
    if any(name == CONCRETE for name in captures.values()):
        text += " (specialized to the example input's shapes: proven for inputs of those shapes)"
    return text


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _count_state(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values())


def _set_submodule(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


# ---------------------------------------------------------------------------------------------
# Strip redundant biases
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class StripReport:
    removed: list[RedundantBias]
    skipped: list[tuple[str, str]]  # (layer with a bias, why it stays)
    parameters_removed: int
    max_abs_diff: float  # eval mode
    max_abs_diff_train: float  # training mode (batch statistics), on copies
    captures: dict[str, str] = dataclasses.field(default_factory=dict)  # mode -> capture used

    def summary(self) -> str:
        lines = [f"removed {len(self.removed)} redundant biases ({self.parameters_removed} "
                 f"parameters); max output difference in eval {self.max_abs_diff:.3g}, in "
                 f"training {self.max_abs_diff_train:.3g}"]
        lines += [f"  graph: {_describe_captures(self.captures)}"] if self.captures else []
        lines += [f"  {r.layer}.bias -> {r.bn}.running_mean"
                  + (f" (through {', '.join(r.through)})" if r.through else "")
                  for r in self.removed]
        lines += [f"  kept {layer}.bias: {reason}" for layer, reason in self.skipped]
        return "\n".join(lines)


def analyse_biases(model: nn.Module, example_inputs: Any):
    """Redundant biases proven in both the training-mode and the eval-mode graph, the biases
    kept with why, and {mode: capture used}.

    A forward may branch on self.training, so a bias counts only when both graphs prove it.
    """
    traced_train = traced_copy(model, example_inputs, True)
    traced_eval = traced_copy(model, example_inputs, False)
    found_train, skipped_train = find_redundant_biases(traced_train)
    found_eval, skipped_eval = find_redundant_biases(traced_eval)
    in_train = {(f.layer, f.bn): f for f in found_train}
    found, skipped = [], dict(skipped_eval)
    for f in found_eval:
        twin = in_train.get((f.layer, f.bn))
        if twin is not None and torch.equal(twin.channel_bias, f.channel_bias):
            found.append(f)
        else:
            skipped.setdefault(f.layer, dict(skipped_train).get(
                f.layer, "redundant in the eval-mode graph but not in the training-mode one"))
    captures = {"training": traced_train.capture, "eval": traced_eval.capture}
    return found, sorted(skipped.items()), captures


def strip_redundant_biases(model: nn.Module, example_inputs: Any) -> tuple[nn.Module, StripReport]:
    """A copy of model without the biases its batch norms cancel, and a report.

    Each removed bias b (as the BN's channels see it, c) is subtracted from the BN's running_mean
    (biases meeting in one BN, through a concatenation or a sum, subtract their summed c once):
    training-mode outputs are unchanged because batch statistics absorb any per-channel
    constant, eval-mode outputs because running_mean - c absorbs it, and later running-mean
    updates keep the offset (see weights.absorb_bias). The gradients of every remaining
    parameter are those of the original. The copy keeps the model's class and mode.
    """
    found, skipped, captures = analyse_biases(model, example_inputs)
    stripped = copy.deepcopy(model)
    arriving: dict[str, Tensor] = {}  # per BN, the sum of the constants its input loses
    for f in found:
        stripped.get_submodule(f.layer).register_parameter("bias", None)
        arriving[f.bn] = arriving.get(f.bn, 0) + f.channel_bias  # float64; several through add
    for name, channel_bias in arriving.items():
        bn = stripped.get_submodule(name)
        running_mean = bn.running_mean
        if isinstance(running_mean, Tensor):  # a buffer: a tensor or None
            bn.running_mean = absorb_bias(running_mean, channel_bias)
    report = StripReport(found, skipped, sum(f.parameters for f in found),
                         max_output_difference(model, stripped, example_inputs),
                         max_output_difference(model, stripped, example_inputs, training=True),
                         captures)
    return stripped, report


# ---------------------------------------------------------------------------------------------
# Fold eval-mode BN
# ---------------------------------------------------------------------------------------------

class BNRemnant(nn.Module):
    """What is left of a folded BN that also added a residual or applied its fused ReLU."""

    def __init__(self, relu: bool) -> None:
        super().__init__()
        self.relu = relu

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        out = input if residual is None else input + residual
        return torch.relu(out) if self.relu else out

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


def _remnant(bn: nn.Module, node: fx.Node) -> nn.Module:
    relu = fuses_relu(bn)
    if len(node.args) + len(node.kwargs) > 1:
        return BNRemnant(relu)
    return nn.ReLU() if relu else nn.Identity()


@dataclasses.dataclass
class FoldReport:
    folded: list[FoldPlan]
    skipped: list[tuple[str, str]]  # (BN, why it stays)
    max_abs_diff: float
    parameters_before: int
    parameters_after: int
    state_before: int  # numbers in the state_dict (parameters and buffers)
    state_after: int
    graph_module: bool  # True when a functional batch_norm was folded (the result is a GraphModule)
    capture: str = ""  # which capture made the eval-mode graph

    def summary(self) -> str:
        lines = [f"folded {len(self.folded)} batch norms; parameters {self.parameters_before} -> "
                 f"{self.parameters_after}, state_dict numbers {self.state_before} -> "
                 f"{self.state_after}; max output difference in eval {self.max_abs_diff:.3g}"]
        lines += [f"  graph: {_describe_captures({'eval': self.capture})}"] if self.capture else []
        lines += [f"  {p.bn} {p.direction} {p.layer}" for p in self.folded]
        lines += [f"  kept {bn}: {reason}" for bn, reason in self.skipped]
        return "\n".join(lines)


def _fetch(gm: fx.GraphModule, target: str) -> Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def _bn_tensors(gm: fx.GraphModule, node: fx.Node, module: nn.Module | None):
    """(running_mean, running_var, eps, weight, bias) of a BN module or an F.batch_norm call."""
    if module is not None:
        return module.running_mean, module.running_var, module.eps, module.weight, module.bias
    named = functional_bn_args(node)
    assert named is not None, "node is an F.batch_norm call when there is no module"
    mean, var, gamma, beta = (None if named[k] is None else _fetch(gm, named[k].target)
                              for k in ("running_mean", "running_var", "weight", "bias"))
    return mean, var, named["eps"], gamma, beta


def _drop_unread_attributes(gm: fx.GraphModule, targets: set[str]) -> None:
    """Delete tensors only the erased F.batch_norm calls read (so the state_dict shrinks too).

    In a GraphModule only call_module targets run a forward; an attribute is safe to delete when
    no get_attr reads it and its owner is neither such a target nor inside one.
    """
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    leaves = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    for target in targets - read:
        owner, _, name = target.rpartition(".")
        if any(owner == leaf or owner.startswith(leaf + ".") for leaf in leaves):
            continue
        module = gm.get_submodule(owner)
        module._buffers.pop(name, None)
        module._parameters.pop(name, None)


def fold_bn(model: nn.Module, example_inputs: Any) -> tuple[nn.Module, FoldReport]:
    """An eval-mode copy of model with every foldable BN folded into a neighbouring layer.

    A BN folds into the Conv/ConvTranspose/Linear before it when that layer's only user is the
    BN and the layer is called once (a layer called twice would change its other call, the bug
    of pytorch#197539), else into the Conv/Linear after it when that is exact (no zero padding).
    Folded BN modules become Identity (nn.ReLU when they fused a ReLU, BNRemnant when they also
    added a residual); every module of the copy, these included, is in eval mode. F.batch_norm
    calls on stored tensors are folded too and removed from the graph (pytorch#122070); then the
    result is a torch.fx.GraphModule, otherwise the model's own class. The model passed in is
    left untouched.
    """
    traced = trace(copy.deepcopy(model).eval(), example_inputs)
    gm = traced.graph_module
    plans, skipped = plan_folds(traced)
    if traced.shape_specialized:  # an F.batch_norm fold returns the graph itself
        skipped += [(p.bn, f"functional batch_norm: folding it rewrites the graph, and this "
                           f"graph ({traced.capture}) holds for the example's shapes only")
                    for p in plans if p.functional]
        plans = [p for p in plans if not p.functional]
    # Module surgery goes to a copy no trace has run (tracing runs the model's Python, which may
    # leave state behind: a cache of attention biases, say), unless an F.batch_norm is folded:
    # then the result is the graph module, whose modules are the traced copy's.
    functional = any(p.functional for p in plans)
    folded = traced.model if functional else copy.deepcopy(model).eval()
    nodes = {n.name: n for n in gm.graph.nodes}
    by_target = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    graph_changed, erased_attributes = False, set()
    for plan in plans:
        node = nodes[plan.bn] if plan.functional else by_target[plan.bn]
        bn = None if plan.functional else folded.get_submodule(plan.bn)
        mean, var, eps, gamma, beta = _bn_tensors(gm, node, bn)
        layer = folded.get_submodule(plan.layer)
        assert is_producer(layer), "plan_folds folds into Conv/ConvTranspose/Linear only"
        groups = getattr(layer, "groups", 1)
        if plan.direction == "into previous":
            w, b = fold_bn_weights(layer.weight, layer.bias, mean, var, eps, gamma, beta,
                                   transposed=isinstance(layer, CONV_TRANSPOSES), groups=groups)
        else:
            w, b = fold_bn_into_next_weights(layer.weight, layer.bias, mean, var, eps, gamma,
                                             beta, groups=groups)
        layer.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)  # new tensors:
        layer.bias = nn.Parameter(b)  # a weight tied elsewhere keeps its value there
        if plan.functional:
            named = functional_bn_args(node)
            assert named is not None
            keys = ("running_mean", "running_var", "weight", "bias")
            erased_attributes |= {named[k].target for k in keys if named[k] is not None}
            node.replace_all_uses_with(bn_input(node))
            gm.graph.erase_node(node)
            graph_changed = True
        else:
            assert bn is not None
            remnant = _remnant(bn, node)
            _set_submodule(folded, plan.bn, remnant)
            if functional:
                _set_submodule(gm, plan.bn, remnant)
    result: nn.Module = folded
    if graph_changed:
        gm.graph.eliminate_dead_code()
        _drop_unread_attributes(gm, erased_attributes)
        gm.recompile()
        result = gm
    result.eval()  # the remnants (and a GraphModule) are new modules, built in training mode
    report = FoldReport(plans, skipped, max_output_difference(model, result, example_inputs),
                        _count_parameters(model), _count_parameters(result), _count_state(model),
                        _count_state(result), graph_changed, traced.capture)
    return result, report


# ---------------------------------------------------------------------------------------------
# Inspect
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Inspection:
    rows: list[dict[str, Any]]  # one per BN, in graph order
    redundant: list[RedundantBias]
    kept_biases: list[tuple[str, str]]
    folds: list[FoldPlan]
    not_folded: list[tuple[str, str]]
    parameters: int
    parameters_saved_by_strip: int
    parameters_saved_by_fold: int
    state_saved_by_fold: int
    captures: dict[str, str] = dataclasses.field(default_factory=dict)  # mode -> capture used
    strip_error: str | None = None  # why no bias could be analysed (no training-mode graph)

    def capture_summary(self) -> str:
        return _describe_captures(self.captures)


def _strip_reason(traced: Traced, node: fx.Node, kept: dict[str, str]) -> str:
    """Why no bias is stripped into the BN at node: walk its input back through operations a
    per-channel constant passes (views, pools, ...) to the layer that produced it."""
    source = bn_input(node)
    while source is not None:
        module = traced.module(source)
        if is_producer(module):
            name = str(source.target)
            if module.bias is None:
                return f"{name} ({type(module).__name__}) before it has no bias"
            return f"{name}.bias kept: {kept.get(name, 'not proven redundant in both modes')}"
        kind, _ = commuting_kind(traced, source)
        if kind not in ("affine", "max") or not source.args:
            break
        first = source.args[0]
        if not isinstance(first, fx.Node):
            break
        source = first
    where = traced.name(source) if source is not None else "a non-tensor argument"
    return f"its input comes from {where}, not from a Conv/ConvTranspose/Linear with a bias"


def inspect_model(model: nn.Module, example_inputs: Any) -> Inspection:
    """Everything the tools would do to model, without doing it (fold and strip run on copies).

    Each BN's row says why it can or cannot fold, and which biases it cancels or why none is
    stripped. When only the training-mode graph cannot be captured (the model draws random
    numbers in Python in training mode, say), folds are still reported and strip_error says
    why no bias was analysed.
    """
    traced = traced_copy(model, example_inputs, False)
    strip_error = None
    try:
        redundant, kept, captures = analyse_biases(model, example_inputs)
    except TraceError as exc:
        redundant, kept, captures = [], [], {"eval": traced.capture}
        strip_error = f"no training-mode graph, so no bias can be proven redundant: {exc}"
    _, fold_report = fold_bn(model, example_inputs)
    fold_of = {p.bn: p for p in fold_report.folded}
    skip_of = dict(fold_report.skipped)
    kept_of = dict(kept)
    bias_of: dict[str, list[str]] = {}
    for r in redundant:  # several per BN when they meet it through cat / add
        bias_of.setdefault(r.bn, []).append(r.layer)
    rows = []
    for node in traced.graph_module.graph.nodes:
        module = traced.module(node)
        if isinstance(module, _BatchNorm):
            name, kind = str(node.target), type(module).__name__
            channels, eps, affine = module.num_features, module.eps, module.affine
            stats = "running" if module.running_mean is not None else "batch"
            tracked = (int(module.num_batches_tracked) if module.num_batches_tracked is not None
                       else "-")
        elif (named := functional_bn_args(node)) is not None:
            name, kind, eps = node.name, "F.batch_norm", named["eps"]
            channels = traced.tensor_shape(node)[1]
            affine = named["weight"] is not None
            stats, tracked = ("running" if named["running_mean"] is not None else "batch"), "-"
        else:
            continue
        plan = fold_of.get(name)
        if name in bias_of:
            strip = ", ".join(bias_of[name])
        elif strip_error is not None:
            strip = "no: no training-mode graph (see below)"
        elif kind == "F.batch_norm":
            strip = "no: strip-bias handles BN modules only"
        else:
            strip = f"no: {_strip_reason(traced, node, kept_of)}"
        rows.append({"bn": name, "type": kind, "channels": channels, "eps": eps, "affine": affine,
                     "stats": stats, "batches": tracked,
                     "fold": f"{plan.direction} {plan.layer}" if plan else
                             f"no: {skip_of.get(name, '?')}",
                     "redundant_bias": strip})
    return Inspection(rows, redundant, kept, fold_report.folded, fold_report.skipped,
                      fold_report.parameters_before, sum(r.parameters for r in redundant),
                      fold_report.parameters_before - fold_report.parameters_after,
                      fold_report.state_before - fold_report.state_after, captures, strip_error)
