"""`batchnorm graph`: batch norm's computation graph, drawn with the numbers of a real input.

    stages.py   the graphs (Algorithm 1 stage by stage as reference.train_forward; with a bias
                before BN; Algorithm 2) and their staged forward and backward
    checks.py   every value and gradient against batchnorm.reference and torch autograd
    draw.py     the picture: one box per node, arrows for the data flow (matplotlib)

A small batch x of shape (N, C) goes through the graph; L = 1/2 sum((y - t)^2) with a fixed target
t gives dL/dy = y - t. For one channel the command prints every node's forward value and the
gradient flowing back into it, then writes OUT/<view>.png and OUT/<view>.svg. Nothing is drawn
unless every value and gradient matches torch autograd on the same numbers.
"""

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np

from batchnorm.graph.checks import GraphCheckError, evaluate
from batchnorm.graph.stages import (
    Evaluation,
    bias_graph,
    eval_graph,
    population_statistics,
    train_graph,
)

__all__ = ["Settings", "build", "format_table", "format_checks", "add_arguments", "run"]


@dataclass(frozen=True)
class Settings:
    """What the picture is drawn for. x: the chosen channel's N values (None: drawn at random)."""

    n: int = 4                       # batch size N
    channels: int = 3                # C
    channel: int = 0                 # the one shown
    x: tuple[float, ...] | None = None
    eps: float = 1e-5
    gamma: float = 2.0               # every channel's; not 1, so the scale stage shows
    beta: float = 0.5
    seed: int = 0
    view: str = "train"              # "train", "bias" or "eval"
    bias: float = 3.0                # the bias b of the "bias" view
    batches: int = 8                 # training batches behind the "eval" view's E[x], Var[x]

    def __post_init__(self):
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {sorted(VIEWS)}, got {self.view!r}")
        if self.x is not None and len(self.x) != self.n:
            raise ValueError(f"--x has {len(self.x)} values but the batch size is {self.n}; "
                             f"give one value per sample of the batch")
        if self.n < 2:
            raise ValueError(f"batch norm in training needs a batch of at least 2 samples, "
                             f"got N={self.n}")
        if self.channels < 1 or not 0 <= self.channel < self.channels:
            raise ValueError(f"the channel shown must lie in [0, {self.channels - 1}] for "
                             f"{self.channels} channels, got channel {self.channel}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive (it keeps sqrt(var + eps) away from 0), "
                             f"got {self.eps}")
        if self.batches < 1:
            raise ValueError(f"the population statistics need at least 1 training batch, got "
                             f"{self.batches}")


VIEWS = {"train": train_graph, "bias": bias_graph, "eval": eval_graph}


def _batch(rng: np.random.Generator, settings: Settings) -> np.ndarray:
    """(N, C) values of order 1 around 1, rounded to one decimal so they can be read."""
    return np.round(rng.normal(1.0, 2.0, size=(settings.n, settings.channels)), 1)


def build(settings: Settings | None = None) -> Evaluation:
    """The chosen view's graph evaluated (and checked) on the settings' input."""
    settings = settings or Settings()
    rng = np.random.default_rng(settings.seed)
    x = _batch(rng, settings)                                         # (N, C)
    if settings.x is not None:
        x[:, settings.channel] = settings.x
    target = np.round(rng.normal(0.0, 1.0, size=x.shape), 1)          # (N, C)
    per_channel = (1, settings.channels)
    inputs = {"gamma": np.full(per_channel, settings.gamma),
              "beta": np.full(per_channel, settings.beta)}
    if settings.view == "train":
        inputs["x"] = x
    elif settings.view == "bias":
        inputs["Wu"] = x
        inputs["b"] = np.full(per_channel, settings.bias)
    else:  # eval: population statistics from `batches` training batches, the first being x
        batches = [x] + [_batch(rng, settings) for _ in range(settings.batches - 1)]
        mean, var = population_statistics(batches)
        inputs |= {"x": x, "running_mean": mean.reshape(per_channel),
                   "running_var": var.reshape(per_channel)}
    graph = VIEWS[settings.view](settings.eps)
    return evaluate(graph, inputs, target, settings.eps)


# ----------------------------------------------------------------------------------------------
# Text output


def format_number(value: float) -> str:
    """4 significant digits; a difference of rounding size shown as such (1.4e-17)."""
    return f"{value:.4g}"


def channel_values(array: np.ndarray, channel: int) -> list[float]:
    """One channel of an (N, C) or (1, C) array, as a list."""
    return [float(v) for v in np.asarray(array)[:, channel]]


def _cell(array, channel: int) -> str:
    return " ".join(f"{format_number(v):>8}" for v in channel_values(array, channel))


def format_table(result: Evaluation, channel: int) -> str:
    """stage | node | formula | forward | gradient, one row per node, for channel `channel`;
    a node that feeds several others gets one extra row per path back into it."""
    rows = [("stage", "node", "formula", f"forward (channel {channel})",
             f"dL/d node (channel {channel})")]
    for node in result.graph.nodes:
        grad = _cell(result.grads[node.name], channel)
        if not node.trained:
            grad += "  (buffer: not trained)"
        rows.append((node.step, node.name, node.formula,
                     _cell(result.values[node.name], channel), grad))
        for consumer, contribution in result.paths.get(node.name, {}).items():
            rows.append(("", "", "", f"  back from {consumer}:", _cell(contribution, channel)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_checks(result: Evaluation) -> str:
    """One line per thing compared against: how many comparisons, the largest difference."""
    groups: dict[str, list] = {}
    for check in result.checks:
        groups.setdefault(check.against, []).append(check)
    lines = []
    for against, checks in groups.items():
        worst = max(c.max_diff for c in checks)
        names = ", ".join(c.what for c in checks)
        if len(names) > 60:
            names = f"{len(checks)} values and gradients"
        lines.append(f"  {against}: {names} equal (max relative difference {worst:.1e})")
    return "\n".join(lines)


def _closed_form_line(result: Evaluation) -> str:
    if result.graph.kind == "eval":
        return ("dx = scale * dy: in inference the statistics are constants, so the backward is\n"
                "  the same per-channel affine map, sample by sample (no closed form needed)")
    return ("dx at node x: the closed form (reference.backward_closed_form) gives the same dx,\n"
            "  dx = gamma * invstd / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat)),\n"
            "  from two per-channel sums and the forward's x_hat and invstd: it never forms\n"
            "  the gradients of stages 1-8")


def describe(result: Evaluation, settings: Settings) -> str:
    graph = result.graph
    shape = result.values["x"].shape
    head = [f"batchnorm graph: {graph.title}",
            f"x of shape {shape} (seed {settings.seed}), channel {settings.channel} shown; "
            f"eps {settings.eps:g}, gamma {settings.gamma:g}, beta {settings.beta:g}"]
    if graph.kind == "bias":
        head.append(f"bias b = {settings.bias:g} added to every channel before BN")
    if graph.kind == "eval":
        head.append(f"E[x], Var[x]: averages over {settings.batches} training batches of "
                    f"{settings.n} (the first is x), Var with m/(m-1)")
    head.append(f"loss L = 1/2 sum((y - t)^2) = {format_number(result.loss)} over the whole "
                f"batch, so dL/dy = y - t")
    return "\n".join([*head, "", format_table(result, settings.channel), "",
                      "checked before drawing:", format_checks(result), "",
                      _closed_form_line(result)])


# ----------------------------------------------------------------------------------------------
# The command


def _values(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 1,2,3,4, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    defaults = Settings()
    parser.add_argument("--n", type=int, default=None,
                        help=f"batch size N (default {defaults.n}, or the number of --x values)")
    parser.add_argument("--channels", type=int, default=defaults.channels,
                        help=f"channels C of the input (default {defaults.channels})")
    parser.add_argument("--channel", type=int, default=defaults.channel,
                        help="the channel whose numbers are shown (default 0)")
    parser.add_argument("--x", type=_values, default=None, metavar="V1,V2,...",
                        help="the shown channel's input values, one per sample (default: drawn "
                             "with --seed)")
    parser.add_argument("--eps", type=float, default=defaults.eps,
                        help=f"eps (default {defaults.eps:g})")
    parser.add_argument("--gamma", type=float, default=defaults.gamma,
                        help=f"gamma of every channel (default {defaults.gamma:g})")
    parser.add_argument("--beta", type=float, default=defaults.beta,
                        help=f"beta of every channel (default {defaults.beta:g})")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the input and of the loss's target (default 0)")
    views = parser.add_mutually_exclusive_group()
    views.add_argument("--eval", action="store_true",
                       help="Algorithm 2: population statistics and the folded affine")
    views.add_argument("--bias", type=float, nargs="?", const=defaults.bias, default=None,
                       metavar="B", help=f"a bias B added before BN, cancelled at x - mu "
                                         f"(B defaults to {defaults.bias:g})")
    parser.add_argument("--batches", type=int, default=defaults.batches,
                        help=f"--eval: training batches averaged into E[x], Var[x] (default "
                             f"{defaults.batches})")
    parser.add_argument("--out", metavar="DIR", default=os.path.join("out", "graph"),
                        help="directory for <view>.png and <view>.svg (default out/graph)")


def settings_from(args: argparse.Namespace) -> Settings:
    view = "eval" if args.eval else "bias" if args.bias is not None else "train"
    n = args.n if args.n is not None else len(args.x) if args.x is not None else Settings.n
    return Settings(n=n, channels=args.channels, channel=args.channel, x=args.x, eps=args.eps,
                    gamma=args.gamma, beta=args.beta, seed=args.seed, view=view,
                    bias=args.bias if args.bias is not None else Settings.bias,
                    batches=args.batches)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except ValueError as error:
        print(f"batchnorm graph: {error}", file=sys.stderr)
        return 2
    try:
        result = build(settings)
    except GraphCheckError as error:
        print(f"batchnorm graph: nothing drawn: {error}", file=sys.stderr)
        return 1
    print(describe(result, settings))
    try:
        from batchnorm.graph.draw import draw
    except ImportError as error:
        print(f"\nno picture: {error}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    paths = [os.path.join(args.out, f"{settings.view}.{suffix}") for suffix in ("png", "svg")]
    draw(result, settings.channel, paths)
    print(f"\nwrote {' and '.join(paths)}")
    return 0
