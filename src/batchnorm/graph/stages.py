"""Batch norm's computation graphs, and their staged forward and backward passes.

A graph is a list of nodes in forward (topological) order. An input node holds a given array; a
stage node computes its value from its inputs (forward) and, given dL/d(its value), the gradient
it sends back to each input (backward), the two written next to each other as in micrograd.
Where a node feeds several others, the gradients coming back along its edges add up: x and xmu
in Algorithm 1 each have two paths, the reason the backward pass of batch norm is worth a picture.

    train_graph   Algorithm 1: one node per stage of reference.train_forward (stages 1-10),
                  each named as the variable there
    bias_graph    Algorithm 1 after a layer's bias, x = Wu + b (the paper's section 3.2): b
                  cancels at the xmu node, and dL/db = sum(dL/dx) = 0
    eval_graph    Algorithm 2: the folded affine of reference.eval_forward, y = scale * x + shift
                  with population statistics E[x], Var[x]

Arrays are (N, C): N samples of one feature with C channels; a per-channel node (a statistic,
gamma, beta) is (1, C) and broadcasts over the batch, so the gradient it receives is summed over
the batch (`_sum_to`). run_graph() evaluates a graph under the loss L = 1/2 sum((y - target)^2),
so dL/dy = y - target; batchnorm.graph.checks.evaluate() runs it and checks every number.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from batchnorm import reference

__all__ = ["Node", "Graph", "Evaluation", "train_graph", "bias_graph", "eval_graph",
           "run_graph", "population_statistics"]


@dataclass(frozen=True)
class Node:
    """One node of the graph: an input (no `inputs`) or a stage computed from other nodes.

    forward(*input_values) -> value;  backward(grad, value, *input_values) -> one gradient per
    input, in the broadcast shape (the engine sums it down to the input's shape).
    """

    name: str                    # as in batchnorm.reference: "xmu", "x_hat", "invstd"
    paper: str                   # the paper's symbol (matplotlib mathtext)
    formula: str                 # one line of code: "xmu = x - mu"
    inputs: tuple[str, ...] = ()
    step: str = "input"          # the table's first column: "input", "1" .. "10", "bias", ...
    stage: int | None = None     # reference.train_forward's stage number, None elsewhere
    forward: Callable | None = None
    backward: Callable | None = None
    trained: bool = True         # False for buffers (running statistics): gradient not used

    @property
    def is_input(self) -> bool:
        return not self.inputs


@dataclass(frozen=True)
class Graph:
    kind: str                    # "train", "bias" or "eval"
    title: str
    nodes: tuple[Node, ...]
    output: str = "y"

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"graph {self.kind!r} has no node {name!r}; nodes: "
                       f"{[n.name for n in self.nodes]}")

    @property
    def stages(self) -> tuple[Node, ...]:
        return tuple(node for node in self.nodes if not node.is_input)

    def consumers(self, name: str) -> list[str]:
        return [node.name for node in self.nodes if name in node.inputs]


# ----------------------------------------------------------------------------------------------
# The graphs. Reductions are over the batch axis 0 of (N, C) arrays, keepdims: (1, C).


def _mean(x):
    return x.mean(axis=0, keepdims=True)                        # (N, C) -> (1, C)


def _mean_backward(grad, value, x):
    return (np.broadcast_to(grad / x.shape[0], x.shape),)       # spread out, divided by m


def _train_stages(eps: float) -> tuple[Node, ...]:
    """reference.train_forward's stages 1-10, forward and backward each; BN's input is node x."""
    return (
        Node("mu", r"$\mu_\mathcal{B}$", "mu = mean(x)", ("x",), "1", 1,
             _mean, _mean_backward),
        Node("xmu", r"$x_i - \mu_\mathcal{B}$", "xmu = x - mu", ("x", "mu"), "2", 2,
             lambda x, mu: x - mu,
             lambda g, out, x, mu: (g, -g)),
        Node("sq", r"$(x_i - \mu_\mathcal{B})^2$", "sq = xmu**2", ("xmu",), "3", 3,
             lambda xmu: xmu**2,
             lambda g, out, xmu: (g * 2.0 * xmu,)),
        Node("var", r"$\sigma^2_\mathcal{B}$", "var = mean(sq)", ("sq",), "4", 4,
             _mean, _mean_backward),
        Node("var_eps", r"$\sigma^2_\mathcal{B} + \epsilon$", f"var_eps = var + eps ({eps:g})",
             ("var",), "5", 5,
             lambda var: var + eps,
             lambda g, out, var: (g,)),
        Node("std", r"$\sqrt{\sigma^2_\mathcal{B} + \epsilon}$", "std = sqrt(var_eps)",
             ("var_eps",), "6", 6,
             np.sqrt,
             lambda g, out, var_eps: (g * 0.5 / out,)),
        Node("invstd", r"$1 / \sqrt{\sigma^2_\mathcal{B} + \epsilon}$", "invstd = 1 / std",
             ("std",), "7", 7,
             lambda std: 1.0 / std,
             lambda g, out, std: (g * -1.0 / std**2,)),
        Node("x_hat", r"$\hat{x}_i$", "x_hat = xmu * invstd", ("xmu", "invstd"), "8", 8,
             lambda xmu, invstd: xmu * invstd,
             lambda g, out, xmu, invstd: (g * invstd, g * xmu)),
        Node("scaled", r"$\gamma \hat{x}_i$", "scaled = gamma * x_hat", ("gamma", "x_hat"),
             "9", 9,
             lambda gamma, x_hat: gamma * x_hat,
             lambda g, out, gamma, x_hat: (g * x_hat, g * gamma)),
        Node("y", r"$y_i = \gamma \hat{x}_i + \beta$", "y = scaled + beta", ("scaled", "beta"),
             "10", 10,
             lambda scaled, beta: scaled + beta,
             lambda g, out, scaled, beta: (g, g)),
    )


def _ordered(stages, extra_inputs: dict[str, Node]) -> tuple[Node, ...]:
    """Stages in order, each input node placed just before its first use (the table's order)."""
    nodes, placed = [], set()
    for stage in stages:
        for name in stage.inputs:
            if name in extra_inputs and name not in placed:
                nodes.append(extra_inputs[name])
                placed.add(name)
        nodes.append(stage)
    return tuple(nodes)


_GAMMA = Node("gamma", r"$\gamma$", "gamma: learned scale, (C,)")
_BETA = Node("beta", r"$\beta$", "beta: learned shift, (C,)")


def train_graph(eps: float = 1e-5) -> Graph:
    """Algorithm 1 (training), node for node reference.train_forward."""
    x = Node("x", r"$x_i$", "x: the input, (N, C)")
    return Graph("train", "Algorithm 1 (training): normalized with the batch's own statistics",
                 _ordered(_train_stages(eps), {"x": x, "gamma": _GAMMA, "beta": _BETA}))


def bias_graph(eps: float = 1e-5) -> Graph:
    """Algorithm 1 on x = Wu + b: a linear (or conv) layer's output Wu plus its bias b."""
    wu = Node("Wu", r"$Wu$", "Wu: a layer's output, (N, C)")
    b = Node("b", r"$b$", "b: its bias, (C,)")
    x = Node("x", r"$x = Wu + b$", "x = Wu + b", ("Wu", "b"), "bias", None,
             lambda wu, b: wu + b,
             lambda g, out, wu, b: (g, g))
    stages = (x, *_train_stages(eps))
    return Graph("bias", "Algorithm 1 after a layer's bias, x = Wu + b: b cancels at xmu",
                 _ordered(stages, {"Wu": wu, "b": b, "gamma": _GAMMA, "beta": _BETA}))


def eval_graph(eps: float = 1e-5) -> Graph:
    """Algorithm 2 (inference), reference.eval_forward's lines: a fixed affine map of x."""
    inputs = {
        "running_var": Node("running_var", r"$\mathrm{Var}[x]$", "running_var: buffer, (C,)",
                            trained=False),
        "running_mean": Node("running_mean", r"$\mathrm{E}[x]$", "running_mean: buffer, (C,)",
                             trained=False),
        "x": Node("x", r"$x$", "x: the input, (N, C)"),
        "gamma": _GAMMA, "beta": _BETA,
    }
    stages = (
        Node("scale", r"$\gamma / \sqrt{\mathrm{Var}[x] + \epsilon}$",
             f"scale = gamma / sqrt(running_var + eps ({eps:g}))",
             ("gamma", "running_var"), "alg 2",
             forward=lambda gamma, var: gamma / np.sqrt(var + eps),
             backward=lambda g, out, gamma, var: (g / np.sqrt(var + eps),
                                                  g * gamma * -0.5 * (var + eps) ** -1.5)),
        Node("shift", r"$\beta - \gamma\,\mathrm{E}[x] / \sqrt{\mathrm{Var}[x] + \epsilon}$",
             "shift = beta - scale * running_mean", ("beta", "scale", "running_mean"), "alg 2",
             forward=lambda beta, scale, mean: beta - scale * mean,
             backward=lambda g, out, beta, scale, mean: (g, -g * mean, -g * scale)),
        Node("y", r"$y = \mathrm{scale} \cdot x + \mathrm{shift}$", "y = scale * x + shift",
             ("scale", "x", "shift"), "alg 2",
             forward=lambda scale, x, shift: scale * x + shift,
             backward=lambda g, out, scale, x, shift: (g * x, g * scale, g)),
    )
    return Graph("eval", "Algorithm 2 (inference): population statistics, one folded affine",
                 _ordered(stages, inputs))


# ----------------------------------------------------------------------------------------------
# The staged forward and backward passes, gradients summed over paths


@dataclass
class Evaluation:
    graph: Graph
    inputs: dict[str, np.ndarray]       # name -> (N, C) or (1, C)
    target: np.ndarray                  # (N, C): the loss is 1/2 sum((y - target)^2)
    eps: float
    values: dict[str, np.ndarray] = field(default_factory=dict)   # every node, forward
    grads: dict[str, np.ndarray] = field(default_factory=dict)    # every node, dL/d(node)
    # for a node feeding several others: consumer name -> the gradient back along that edge
    paths: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    loss: float = float("nan")
    checks: list = field(default_factory=list)          # checks.Check, added by checks.evaluate
    notes: dict[str, str] = field(default_factory=dict)           # node name -> one remark


def _sum_to(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A gradient in the broadcast shape summed down to the input's shape (per-channel: over N)."""
    grad = np.asarray(grad)
    axes = tuple(a for a, (g, s) in enumerate(zip(grad.shape, shape, strict=True))
                 if s == 1 and g != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else np.array(grad)


def run_graph(graph: Graph, inputs: dict[str, np.ndarray], target, eps: float = 1e-5
              ) -> Evaluation:
    """The staged forward, then the staged backward, unchecked (checks.evaluate checks them).

    inputs: the graph's input nodes, (N, C) for x (or Wu), (1, C) for per-channel ones; target:
    (N, C). eps must be the one the graph was built with (it is recorded for the checks).
    """
    missing = [n.name for n in graph.nodes if n.is_input and n.name not in inputs]
    if missing:
        raise ValueError(f"graph {graph.kind!r} needs input arrays for {missing}, got "
                         f"{sorted(inputs)}")
    target = np.asarray(target, dtype=np.float64)
    inputs = {name: np.asarray(array, dtype=np.float64) for name, array in inputs.items()}
    values = dict(inputs)
    for node in graph.stages:                                   # forward, in order
        assert node.forward is not None, f"stage {node.name} has no forward"
        values[node.name] = node.forward(*(values[name] for name in node.inputs))

    y = values[graph.output]
    loss = 0.5 * float(((y - target) ** 2).sum())
    grads = {graph.output: y - target}                          # dL/dy
    paths: dict[str, dict[str, np.ndarray]] = {}
    for node in reversed(graph.stages):                         # backward, in reverse order:
        grad = grads[node.name]                                 # every consumer already done
        assert node.backward is not None, f"stage {node.name} has no backward"
        back = node.backward(grad, values[node.name], *(values[name] for name in node.inputs))
        for name, contribution in zip(node.inputs, back, strict=True):
            contribution = _sum_to(contribution, values[name].shape)
            paths.setdefault(name, {})[node.name] = contribution
            grads[name] = grads[name] + contribution if name in grads else contribution
    paths = {name: by_edge for name, by_edge in paths.items() if len(by_edge) > 1}
    return Evaluation(graph, inputs, target, eps, values, grads, paths, loss)


# ----------------------------------------------------------------------------------------------
# Algorithm 2's population statistics


def population_statistics(batches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(E[x], Var[x]), each (C,), from training batches (N, C) as Algorithm 2, steps 8-10:
    E[x] the average of the batch means, Var[x] = m/(m-1) times the average biased variance.

    Computed with reference.update_running_stats with momentum=None (the cumulative average).
    """
    if not batches:
        raise ValueError("population statistics need at least one training batch, got none")
    channels = batches[0].shape[1]
    mean, var, tracked = np.zeros(channels), np.ones(channels), 0
    for batch in batches:
        _, cache = reference.train_forward(batch)
        mean, var, tracked = reference.update_running_stats(
            mean, var, cache.mean, cache.var, cache.m, momentum=None, num_batches_tracked=tracked)
    return mean, var
