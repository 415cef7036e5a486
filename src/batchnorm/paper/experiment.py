"""The Figure 1 experiment, independent of the engine that trains the networks.

Two 784-100-100-100-10 sigmoid networks, one plain and one with batch norm before each sigmoid,
trained side by side on the same mini-batches from the same initial weights. Every eval_every
steps: test accuracy of both, and the 15th / 50th / 85th percentiles over the test set of the
input to one sigmoid of the last hidden layer (the paper's Figure 1 (a), (b), (c)).

An engine (batchnorm.paper.torch_engine, batchnorm.paper.numpy_engine) provides

    Engine(data: MnistData, init: InitialWeights, settings: Settings)
    engine.step(batch: np.ndarray)        one SGD step of both networks on these train indices
    engine.evaluate() -> Evaluation       test accuracies and the tracked sigmoid's inputs
    engine.details: dict                  dtype, library versions, kernels (for the JSON)
"""

import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from batchnorm.paper.data import MnistData

__all__ = ["Settings", "InitialWeights", "Evaluation", "History", "initial_weights",
           "batch_stream", "run_experiment", "summarize", "ENGINES"]

ENGINES = ("torch", "numpy")


@dataclass(frozen=True)
class Settings:
    """What the paper fixes, and what it leaves to us (marked "ours")."""

    steps: int = 50_000                  # paper: 50,000 steps
    batch_size: int = 60                 # paper: 60 examples per mini-batch
    hidden: tuple[int, ...] = (100, 100, 100)   # paper: 3 fully-connected hidden layers of 100
    lr: float = 0.5                      # ours: plain SGD (no momentum, no decay), lr 0.5
    init_std: float = 0.01               # ours: weights ~ N(0, 0.01^2) (paper: "small random
                                         # Gaussian values"), biases 0, gamma 1, beta 0
    eps: float = 1e-5                    # ours: PyTorch's default
    momentum: float = 0.1                # ours: running statistics as an exponential average
                                         # (paper: population statistics after training)
    eval_every: int = 250                # ours: how often (a), (b), (c) are recorded
    tracked_unit: int = 0                # ours: which sigmoid of the last hidden layer is shown
    percentiles: tuple[float, ...] = (15.0, 50.0, 85.0)  # paper: {15, 50, 85}th percentiles
    seed: int = 0                        # initial weights and batch order
    engine: str = "torch"

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch norm needs batches of at least 2, got {self.batch_size}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.tracked_unit < self.hidden[-1]:
            raise ValueError(f"tracked_unit must index the last hidden layer (0..."
                             f"{self.hidden[-1] - 1}), got {self.tracked_unit}")


@dataclass(frozen=True)
class InitialWeights:
    """The starting point both networks share (and both engines, for the same seed).

    weights[i] is (fan_in, fan_out); hidden-layer biases are 0 in the plain network and absent in
    the BN network (beta takes their place); the output layer has a bias in both.
    """

    weights: list[np.ndarray]     # float64


def initial_weights(settings: Settings, inputs: int = 784, classes: int = 10) -> InitialWeights:
    rng = np.random.default_rng([settings.seed, 0])
    sizes = (inputs, *settings.hidden, classes)
    return InitialWeights([rng.normal(0.0, settings.init_std, size=(fan_in, fan_out))
                           for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True)])


def batch_stream(n: int, batch_size: int, seed: int):
    """Endless mini-batches of train indices: shuffle, walk through, reshuffle (an epoch's tail
    joins the next epoch's head, so every batch is full)."""
    rng = np.random.default_rng([seed, 1])
    queue = np.empty(0, dtype=np.int64)
    while True:
        while len(queue) < batch_size:
            queue = np.concatenate([queue, rng.permutation(n)])
        batch, queue = queue[:batch_size], queue[batch_size:]
        yield batch


@dataclass(frozen=True)
class Evaluation:
    accuracy_plain: float
    accuracy_bn: float
    sigmoid_input_plain: np.ndarray   # (N_test,) input to the tracked sigmoid, plain network
    sigmoid_input_bn: np.ndarray      # (N_test,) the same with BN (eval mode: running stats)


@dataclass
class History:
    """Every recorded number, at steps[i]."""

    steps: list[int] = field(default_factory=list)
    accuracy_plain: list[float] = field(default_factory=list)
    accuracy_bn: list[float] = field(default_factory=list)
    percentiles_plain: list[list[float]] = field(default_factory=list)  # [p15, p50, p85] each
    percentiles_bn: list[list[float]] = field(default_factory=list)

    def record(self, step: int, evaluation: Evaluation, percentiles) -> None:
        self.steps.append(step)
        self.accuracy_plain.append(float(evaluation.accuracy_plain))
        self.accuracy_bn.append(float(evaluation.accuracy_bn))
        self.percentiles_plain.append(
            np.percentile(evaluation.sigmoid_input_plain, percentiles).tolist())
        self.percentiles_bn.append(
            np.percentile(evaluation.sigmoid_input_bn, percentiles).tolist())


class ProgressBar:
    """One line on stderr, redrawn: [#####.....] step/steps, accuracies, elapsed and ETA."""

    def __init__(self, total: int, stream=None, width: int = 30):
        self.total, self.width, self.stream = total, width, stream or sys.stderr
        self.start = time.perf_counter()

    def update(self, step: int, note: str = "") -> None:
        elapsed = time.perf_counter() - self.start
        done = int(self.width * step / self.total)
        eta = elapsed / step * (self.total - step) if step else 0.0
        self.stream.write(f"\r[{'#' * done}{'.' * (self.width - done)}] {step}/{self.total} "
                          f"{note} {elapsed:.0f}s elapsed, {eta:.0f}s left ")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def make_engine(data: MnistData, init: InitialWeights, settings: Settings):
    if settings.engine == "torch":
        from batchnorm.paper.torch_engine import TorchEngine
        return TorchEngine(data, init, settings)
    from batchnorm.paper.numpy_engine import NumpyEngine
    return NumpyEngine(data, init, settings)


def run_experiment(data: MnistData, settings: Settings, progress: bool = True) -> dict:
    """Train both networks for settings.steps steps; return the result (JSON-ready dict)."""
    engine = make_engine(data, initial_weights(settings), settings)
    history = History()
    history.record(0, engine.evaluate(), settings.percentiles)
    bar = ProgressBar(settings.steps) if progress else None
    batches = batch_stream(len(data.y_train), settings.batch_size, settings.seed)
    start = time.perf_counter()
    for step in range(1, settings.steps + 1):
        engine.step(next(batches))
        if step % settings.eval_every == 0 or step == settings.steps:
            history.record(step, engine.evaluate(), settings.percentiles)
            if bar is not None:
                bar.update(step, f"test acc {history.accuracy_plain[-1]:.3f} plain, "
                                 f"{history.accuracy_bn[-1]:.3f} BN,")
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    result = {
        "settings": asdict(settings),
        "data": data.source,
        "train_size": int(len(data.y_train)),
        "test_size": int(len(data.y_test)),
        "wall_seconds": wall,
        "engine_details": engine.details,
        "history": asdict(history),
    }
    result["summary"] = summarize(result)
    return result


# ----------------------------------------------------------------------------------------------
# The printed summary


THRESHOLDS = (0.80, 0.85, 0.90)
FINAL_EVALUATIONS = 10      # final accuracy: the mean of the last 10 evaluations
DRIFT_FROM = 5_000          # drift of the sigmoid input's distribution from this step to the end
DRIFT_WINDOW = 5            # ... each end the mean of 5 evaluations (1,000 steps at 250)


def _first_step_reaching(steps, accuracies, threshold):
    for step, accuracy in zip(steps, accuracies, strict=True):
        if accuracy >= threshold:
            return step
    return None


def _window_mean(steps, values: np.ndarray, step: int) -> np.ndarray:
    """The mean of the DRIFT_WINDOW evaluations ending at the last one at or before step: single
    evaluations are noisy (one batch moves the running statistics)."""
    end = max(i for i, s in enumerate(steps) if s <= step) + 1
    return values[max(0, end - DRIFT_WINDOW):end].mean(axis=0)


def summarize(result: dict) -> dict:
    """Final accuracies, steps to the thresholds, drift of median and spread of the tracked
    sigmoid's input (the paper's point: with BN the distribution stays put).

    Drift: (value at the end) - (value at step 5,000), each the mean over the 5 evaluations
    ending there, for the median and for the p85 - p15 spread.
    """
    history, settings = result["history"], result["settings"]
    steps = history["steps"]
    summary = {}
    for net in ("plain", "bn"):
        accuracies = history[f"accuracy_{net}"]
        summary[f"final_accuracy_{net}"] = float(np.mean(accuracies[-FINAL_EVALUATIONS:]))
        for threshold in THRESHOLDS:
            summary[f"steps_to_{threshold:.2f}_{net}"] = _first_step_reaching(
                steps, accuracies, threshold)
        # percentiles are [p15, p50, p85] in settings["percentiles"] order
        p = np.asarray(history[f"percentiles_{net}"])
        low, mid, high = (list(settings["percentiles"]).index(q) for q in (15.0, 50.0, 85.0))
        start = min(DRIFT_FROM, steps[-1])
        begin, end = _window_mean(steps, p, start), _window_mean(steps, p, steps[-1])
        summary[f"drift_from_step_{net}"] = start
        summary[f"median_drift_{net}"] = float(end[mid] - begin[mid])
        summary[f"spread_drift_{net}"] = float((end[high] - end[low]) - (begin[high] - begin[low]))
    return summary


def format_summary(result: dict) -> str:
    s, settings = result["summary"], result["settings"]
    rows = [f"data: {result['data']}",
            f"engine {settings['engine']}, seed {settings['seed']}, {settings['steps']} steps of "
            f"batch {settings['batch_size']}, lr {settings['lr']}: {result['wall_seconds']:.1f} s",
            "",
            f"{'':34}{'without BN':>12}{'with BN':>12}",
            f"{'final test accuracy (last 10 evals)':34}"
            f"{s['final_accuracy_plain']:>12.4f}{s['final_accuracy_bn']:>12.4f}"]
    for threshold in THRESHOLDS:
        cells = [s[f"steps_to_{threshold:.2f}_{net}"] for net in ("plain", "bn")]
        cells = ["never" if c is None else str(c) for c in cells]
        rows.append(f"{f'steps to test accuracy {threshold:.2f}':34}{cells[0]:>12}{cells[1]:>12}")
    start = s["drift_from_step_plain"]
    rows += [f"{f'median drift, step {start} -> end':34}"
             f"{s['median_drift_plain']:>+12.3f}{s['median_drift_bn']:>+12.3f}",
             f"{f'p85 - p15 drift, step {start} -> end':34}"
             f"{s['spread_drift_plain']:>+12.3f}{s['spread_drift_bn']:>+12.3f}"]
    return "\n".join(rows)
