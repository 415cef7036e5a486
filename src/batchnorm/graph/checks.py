"""The checks made before anything is drawn: every value and gradient of an evaluated graph
against torch autograd through the same stages, torch.nn.functional.batch_norm's own backward,
and batchnorm.reference (train_forward's cache; backward_stages and backward_closed_form).

A difference beyond TOLERANCE raises GraphCheckError naming the node and what it was compared
with.
"""

from dataclasses import dataclass

import numpy as np

from batchnorm import reference
from batchnorm.graph.stages import Evaluation, Graph, run_graph, train_graph

__all__ = ["TOLERANCE", "Check", "GraphCheckError", "evaluate"]

# float64 throughout; values and gradients are of order 1 and sums run over a handful of terms,
# so agreement is ~1e-15. Relative to the larger of 1 and the compared array's largest magnitude.
TOLERANCE = 1e-10


@dataclass(frozen=True)
class Check:
    """One comparison made before anything is drawn."""

    what: str          # "dL/dxmu", "x_hat", "dx"
    against: str       # "torch autograd", "reference.backward_closed_form", ...
    max_diff: float

    @property
    def passed(self) -> bool:
        return self.max_diff <= TOLERANCE


class GraphCheckError(AssertionError):
    """A value or gradient of the graph disagrees with the reference or with torch autograd."""


def _max_diff(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise GraphCheckError(f"shapes differ: {actual.shape} against {expected.shape}")
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    return float(np.abs(actual - expected).max(initial=0.0)) / scale


def evaluate(graph: Graph, inputs: dict[str, np.ndarray], target, eps: float = 1e-5
             ) -> Evaluation:
    """stages.run_graph's forward and backward, then every check; GraphCheckError if one fails.
    Arguments as run_graph's."""
    result = run_graph(graph, inputs, target, eps)
    result.checks += _check_against_autograd(result)
    result.checks += _CHECKS_AGAINST_REFERENCE[graph.kind](result)
    failed = [c for c in result.checks if not c.passed]
    if failed:
        raise GraphCheckError(
            "the staged graph disagrees with " + "; ".join(
                f"{c.against} on {c.what} (max relative difference {c.max_diff:.3g}, expected "
                f"<= {TOLERANCE:g})" for c in failed))
    return result


# ----------------------------------------------------------------------------------------------
# The checks: torch autograd through the same stages, torch's own batch_norm, the NumPy reference


def _torch_nodes(kind: str, leaves: dict, eps: float) -> dict:
    """Every node of graph `kind` as a torch tensor, computed from the leaf tensors `leaves`."""
    import torch

    if kind == "eval":
        t = dict(leaves)
        t["scale"] = t["gamma"] / torch.sqrt(t["running_var"] + eps)
        t["shift"] = t["beta"] - t["scale"] * t["running_mean"]
        t["y"] = t["scale"] * t["x"] + t["shift"]
        return t
    t = dict(leaves)
    if kind == "bias":
        t["x"] = t["Wu"] + t["b"]
    t["mu"] = t["x"].mean(dim=0, keepdim=True)
    t["xmu"] = t["x"] - t["mu"]
    t["sq"] = t["xmu"] ** 2
    t["var"] = t["sq"].mean(dim=0, keepdim=True)
    t["var_eps"] = t["var"] + eps
    t["std"] = torch.sqrt(t["var_eps"])
    t["invstd"] = 1.0 / t["std"]
    t["x_hat"] = t["xmu"] * t["invstd"]
    t["scaled"] = t["gamma"] * t["x_hat"]
    t["y"] = t["scaled"] + t["beta"]
    return t


def _check_against_autograd(result: Evaluation) -> list[Check]:
    """Every node's value and dL/d(node) against torch autograd on the same float64 numbers,
    and y, dx, dgamma, dbeta against torch.nn.functional.batch_norm's own backward."""
    import torch
    import torch.nn.functional as F

    graph, eps = result.graph, result.eps
    leaves = {name: torch.tensor(array, dtype=torch.float64, requires_grad=True)
              for name, array in result.inputs.items()}
    tensors = _torch_nodes(graph.kind, leaves, eps)
    unmatched = sorted(set(tensors) ^ {node.name for node in graph.nodes})
    if unmatched:
        raise GraphCheckError(f"graph {graph.kind!r} and its torch counterpart differ in the "
                              f"nodes {unmatched}")
    for tensor in tensors.values():
        if not tensor.is_leaf:
            tensor.retain_grad()
    target = torch.tensor(result.target, dtype=torch.float64)
    loss = 0.5 * ((tensors[graph.output] - target) ** 2).sum()
    loss.backward()

    checks = [Check("L", "torch autograd", _max_diff(result.loss, loss.item()))]
    for node in graph.nodes:
        tensor = tensors[node.name]
        checks.append(Check(node.name, "torch autograd", _max_diff(
            result.values[node.name], tensor.detach().numpy())))
        checks.append(Check(f"dL/d{node.name}", "torch autograd", _max_diff(
            result.grads[node.name], tensor.grad.numpy())))

    # torch's batch_norm kernel, forward and backward, on BN's input x and per-channel vectors
    x = torch.tensor(result.values["x"], dtype=torch.float64, requires_grad=True)
    gamma = torch.tensor(result.inputs["gamma"].reshape(-1), dtype=torch.float64,
                         requires_grad=True)
    beta = torch.tensor(result.inputs["beta"].reshape(-1), dtype=torch.float64,
                        requires_grad=True)
    if graph.kind == "eval":
        running_mean, running_var = (torch.tensor(result.inputs[k].reshape(-1),
                                                  dtype=torch.float64)
                                     for k in ("running_mean", "running_var"))
        y = F.batch_norm(x, running_mean, running_var, gamma, beta, training=False, eps=eps)
    else:
        y = F.batch_norm(x, None, None, gamma, beta, training=True, eps=eps)
    (0.5 * ((y - target) ** 2).sum()).backward()
    assert x.grad is not None and gamma.grad is not None and beta.grad is not None
    against = "torch.nn.functional.batch_norm"
    checks += [Check("y", against, _max_diff(result.values["y"], y.detach().numpy())),
               Check("dL/dx", against, _max_diff(result.grads["x"], x.grad.numpy())),
               Check("dL/dgamma", against, _max_diff(result.grads["gamma"].reshape(-1),
                                                     gamma.grad.numpy())),
               Check("dL/dbeta", against, _max_diff(result.grads["beta"].reshape(-1),
                                                    beta.grad.numpy()))]
    return checks


def _check_train(result: Evaluation) -> list[Check]:
    """Values against reference.train_forward's cache, gradients against both its backwards."""
    v, g = result.values, result.grads
    gamma, beta = result.inputs["gamma"].reshape(-1), result.inputs["beta"].reshape(-1)
    y, cache = reference.train_forward(v["x"], gamma, beta, result.eps)
    dy = g["y"]
    checks = [Check("y", "reference.train_forward", _max_diff(v["y"], y)),
              Check("mu", "reference.train_forward", _max_diff(v["mu"].reshape(-1), cache.mean)),
              Check("var", "reference.train_forward", _max_diff(v["var"].reshape(-1), cache.var))]
    for name in ("xmu", "std", "invstd", "x_hat"):      # the cache's fields are node names
        checks.append(Check(name, "reference.train_forward",
                            _max_diff(v[name], getattr(cache, name))))
    for backward in (reference.backward_stages, reference.backward_closed_form):
        dx, dgamma, dbeta = backward(dy, cache)
        against = f"reference.{backward.__name__}"
        checks += [Check("dL/dx", against, _max_diff(g["x"], dx)),
                   Check("dL/dgamma", against, _max_diff(g["gamma"].reshape(-1), dgamma)),
                   Check("dL/dbeta", against, _max_diff(g["beta"].reshape(-1), dbeta))]
    result.notes["x"] = "closed form: the same dx"
    return checks


def _check_bias(result: Evaluation) -> list[Check]:
    """Algorithm 1's checks, and the cancellation: with b or without, x - mu, y and every
    gradient downstream are the same, and dL/db = sum(dL/dx) = 0."""
    checks = _check_train(result)
    without = evaluate(train_graph(result.eps),
                       {"x": result.inputs["Wu"], "gamma": result.inputs["gamma"],
                        "beta": result.inputs["beta"]}, result.target, result.eps)
    against = "the same graph without b"
    checks += [Check("xmu", against, _max_diff(result.values["xmu"], without.values["xmu"])),
               Check("y", against, _max_diff(result.values["y"], without.values["y"])),
               Check("dL/dWu", against, _max_diff(result.grads["Wu"], without.grads["x"])),
               Check("dL/db", "expected 0 (b cancels)",
                     _max_diff(result.grads["b"], np.zeros_like(result.grads["b"])))]
    result.notes["x"] = "mu moves by b, so b cancels at xmu"
    result.notes["xmu"] = "b cancelled: same as without b"
    result.notes["b"] = "dL/db = sum(dL/dx) = 0 (to rounding)"
    return checks


def _check_eval(result: Evaluation) -> list[Check]:
    v, inputs = result.values, result.inputs
    y = reference.eval_forward(v["x"], inputs["running_mean"].reshape(-1),
                               inputs["running_var"].reshape(-1), inputs["gamma"].reshape(-1),
                               inputs["beta"].reshape(-1), result.eps)
    scale = v["scale"]
    result.notes["x"] = "dL/dx = scale * dL/dy, sample by sample"
    return [Check("y", "reference.eval_forward", _max_diff(v["y"], y)),
            Check("dL/dx", "scale * dL/dy",
                  _max_diff(result.grads["x"], scale * result.grads["y"]))]


_CHECKS_AGAINST_REFERENCE = {"train": _check_train, "bias": _check_bias, "eval": _check_eval}
