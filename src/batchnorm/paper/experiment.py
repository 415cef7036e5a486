"""The Figure 1 experiment, independent of the engine that trains the networks.

Two 784-100-100-100-10 sigmoid networks, one plain and one with batch norm before each sigmoid,
trained side by side on the same mini-batches from the same initial weights. Every eval_every
steps: test accuracy of both, and the 15th / 50th / 85th percentiles over the test set of the
input to one sigmoid of the last hidden layer (the paper's Figure 1 (a), (b), (c)).

Several seeds train at once: seed k (k = seed, seed + 1, ...) has its own initial weights and its
own batch order, drawn exactly as a single run of seed k draws them, so each seed's numbers are
those of that seed trained alone (tests/test_paper.py checks it for both engines).

The settings and the types an engine takes and returns are in batchnorm.paper.settings. An engine
(batchnorm.paper.torch_engine, batchnorm.paper.numpy_engine) provides

    Engine(data: MnistData, inits: list[InitialWeights], settings: Settings)   one init per seed
    engine.step(batch: np.ndarray)        one SGD step of every network; batch (S, 60) indices
    engine.evaluate() -> list[Evaluation] per seed: test accuracies, the tracked sigmoid's inputs
    engine.details: dict                  dtype, library versions, kernels (for the JSON)
    engine.float_mode()                   a context: the floating-point environment to train in
"""

import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from batchnorm.paper.data import MnistData
from batchnorm.paper.numpy_engine import NumpyEngine
from batchnorm.paper.settings import (
    ENGINES,
    NETS,
    Evaluation,
    InitialWeights,
    Settings,
    initial_weights,
)

__all__ = ["Settings", "InitialWeights", "Evaluation", "History", "initial_weights",
           "batch_stream", "BatchOrder", "run_experiment", "summarize", "summarize_seeds",
           "format_summary", "ENGINES"]


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


class BatchOrder:
    """batch_stream's batches, many at a time: take(k) is the next k batches as (k, batch_size),
    the same indices k calls of next(batch_stream(n, batch_size, seed)) give (the stream is the
    concatenation of the permutations, cut into batches; here it is cut k batches at a time)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.rng = np.random.default_rng([seed, 1])
        self.queue = np.empty(0, dtype=np.int64)

    def take(self, k: int) -> np.ndarray:
        need = k * self.batch_size
        parts = [self.queue]
        have = len(self.queue)
        while have < need:
            parts.append(self.rng.permutation(self.n))
            have += self.n
        queue = np.concatenate(parts)
        taken, self.queue = queue[:need], queue[need:]
        return taken.reshape(k, self.batch_size)


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


BOUND_BURST = 10    # steps of matmuls alone timed after each evaluation (measure_bound)


def make_engine(data: MnistData, inits: list[InitialWeights], settings: Settings):
    if settings.engine == "torch":
        from batchnorm.paper.torch_engine import TorchEngine  # imports torch: only when asked

        return TorchEngine(data, inits, settings)
    return NumpyEngine(data, inits, settings)


def run_experiment(data: MnistData, settings: Settings, progress: bool = True,
                   measure_bound: bool = False) -> dict:
    """Train both networks of every seed for settings.steps steps; return the result (a
    JSON-ready dict: settings, timings, and per seed its history and summary).

    measure_bound: also time the step's matrix products alone (the engines that can: torch),
    in a short burst after every evaluation, so that the bound and the steps see the same load
    on the machine: engine_details["matmul_ms_per_step"], the floor of a step (about 2% more
    time in all)."""
    seeds = settings.seed_list
    inits = [initial_weights(settings, seed=seed) for seed in seeds]
    engine = make_engine(data, inits, settings)
    histories = [History() for _ in seeds]

    def record(step):
        for history, evaluation in zip(histories, engine.evaluate(), strict=True):
            history.record(step, evaluation, settings.percentiles)

    with engine.float_mode():      # the engine's floating-point environment (torch: FTZ)
        record(0)
        bar = ProgressBar(settings.steps) if progress else None
        orders = [BatchOrder(len(data.y_train), settings.batch_size, seed) for seed in seeds]
        start = time.perf_counter()
        step, step_seconds = 0, 0.0        # step_seconds: the SGD steps alone, no evaluations
        bound_bursts: list[float] | None = (
            [] if measure_bound and hasattr(engine, "matmul_seconds_per_step") else None)
        while step < settings.steps:
            # the batches up to the next evaluation, (k, S, batch_size): seed s's order in [:, s]
            k = min(settings.eval_every - step % settings.eval_every, settings.steps - step)
            batches = np.stack([order.take(k) for order in orders], axis=1)
            began = time.perf_counter()
            for batch in batches:
                engine.step(batch)
            step_seconds += time.perf_counter() - began
            step += k
            record(step)
            if bound_bursts is not None:
                bound_bursts.append(engine.matmul_seconds_per_step(BOUND_BURST))
            if bar is not None:
                plain = np.mean([h.accuracy_plain[-1] for h in histories])
                bn = np.mean([h.accuracy_bn[-1] for h in histories])
                bar.update(step, f"test acc {plain:.3f} plain, {bn:.3f} BN (mean of {len(seeds)}),")
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if bound_bursts:
        engine.details["matmul_ms_per_step"] = float(np.mean(bound_bursts)) * 1e3
        engine.details["matmul_bursts"] = f"{len(bound_bursts)} x {BOUND_BURST} steps"
    result = {
        "settings": asdict(settings),
        "seeds": seeds,
        "data": data.source,
        "train_size": int(len(data.y_train)),
        "test_size": int(len(data.y_test)),
        "wall_seconds": wall,            # the training loop, evaluations included
        "step_seconds": step_seconds,    # engine.step alone
        "engine_details": engine.details,
        "runs": [{"seed": seed, "history": asdict(history)}
                 for seed, history in zip(seeds, histories, strict=True)],
    }
    for run in result["runs"]:
        run["summary"] = summarize(run["history"], settings.percentiles)
    result["summary"] = summarize_seeds([run["summary"] for run in result["runs"]])
    return result


# ----------------------------------------------------------------------------------------------
# The printed summary


THRESHOLDS = (0.80, 0.85, 0.90)
FINAL_EVALUATIONS = 10      # final accuracy: the mean of the last 10 trained evaluations
DRIFT_FROM = 5_000          # drift of the sigmoid input's distribution from this step to the end
DRIFT_WINDOW = 5            # ... each end the mean of 5 evaluations (1,000 steps at 250)


def _first_step_reaching(steps, accuracies, threshold):
    for step, accuracy in zip(steps, accuracies, strict=True):
        if accuracy >= threshold:
            return step
    return None


def summarize(history: dict, percentiles=(15.0, 50.0, 85.0)) -> dict:
    """One seed's final accuracies, steps to the thresholds, and drift of the median and the
    spread of the tracked sigmoid's input (the paper's point: with BN the distribution stays put).

    Final accuracy: the mean of the last FINAL_EVALUATIONS evaluations after step 0 (the
    untrained network's evaluation never counts; a short run has fewer, final_evaluations says
    how many). Drift: (value at the end) - (value at step DRIFT_FROM), each the mean over the
    DRIFT_WINDOW evaluations ending there, for the median and for the p85 - p15 spread; None
    when the run does not reach DRIFT_FROM or its end window would overlap the window at
    DRIFT_FROM (a run of <= 6,000 steps at eval_every 250): such a run cannot show drift.
    """
    steps = list(history["steps"])
    trained = [i for i, step in enumerate(steps) if step > 0][-FINAL_EVALUATIONS:]
    summary = {"final_evaluations": len(trained),
               "final_from_step": steps[trained[0]] if trained else None}
    low, mid, high = (list(percentiles).index(q) for q in (15.0, 50.0, 85.0))
    # the window at DRIFT_FROM ends at the last evaluation at or before it
    at_from = [i for i, step in enumerate(steps) if step <= DRIFT_FROM][-1] + 1
    drift = steps[-1] > DRIFT_FROM and len(steps) - DRIFT_WINDOW >= at_from
    summary["drift_from_step"] = DRIFT_FROM if drift else None
    for net in NETS:
        accuracies = history[f"accuracy_{net}"]
        summary[f"final_accuracy_{net}"] = (float(np.mean([accuracies[i] for i in trained]))
                                            if trained else None)
        for threshold in THRESHOLDS:
            summary[f"steps_to_{threshold:.2f}_{net}"] = _first_step_reaching(
                steps, accuracies, threshold)
        p = np.asarray(history[f"percentiles_{net}"])      # (evaluations, percentiles)
        if drift:
            begin = p[max(0, at_from - DRIFT_WINDOW):at_from].mean(axis=0)
            end = p[-DRIFT_WINDOW:].mean(axis=0)
            summary[f"median_drift_{net}"] = float(end[mid] - begin[mid])
            summary[f"spread_drift_{net}"] = float((end[high] - end[low])
                                                   - (begin[high] - begin[low]))
        else:
            summary[f"median_drift_{net}"] = summary[f"spread_drift_{net}"] = None
    return summary


def _mean(values):
    """The mean over seeds, None if any seed has none (a threshold never reached, no drift)."""
    return None if any(v is None for v in values) else float(np.mean(values))


def summarize_seeds(summaries: list[dict]) -> dict:
    """Per key: the mean over the seeds' summaries ({"mean": ..., "min": ..., "max": ...})."""
    combined = {}
    for key in summaries[0]:
        values = [s[key] for s in summaries]
        known = [v for v in values if v is not None]
        combined[key] = {"mean": _mean(values),
                         "min": min(known) if known else None,
                         "max": max(known) if known else None,
                         "reached": len(known)}
    return combined


def _cell(value, fmt):
    return "never" if value is None else format(value, fmt)


def format_summary(result: dict) -> str:
    """The printed table: one column per seed and network, and the mean over seeds."""
    settings, runs = result["settings"], result["runs"]
    seeds = [run["seed"] for run in runs]
    per_step = result["step_seconds"] / settings["steps"] * 1e3
    threads = result["engine_details"].get("torch_threads")
    rows = [f"data: {result['data']}",
            f"engine {settings['engine']}, "
            + (f"seed {seeds[0]}, " if len(seeds) == 1 else
               f"seeds {', '.join(map(str, seeds))} side by side, ") +
            f"{settings['steps']} steps of batch {settings['batch_size']}, lr {settings['lr']}: "
            f"{result['wall_seconds']:.1f} s with evaluations; the steps alone "
            f"{per_step:.2f} ms each (all {2 * len(seeds)} networks"
            + (f", {threads} thread{'s' if threads != 1 else ''})" if threads else ")")]
    bound = result["engine_details"].get("matmul_ms_per_step")
    if bound:
        rows.append(f"the same matrix products alone: {bound:.2f} ms per step, so a step "
                    f"takes {per_step / bound:.2f}x the time of its matmuls")
    columns = [f"seed {seed}" for seed in seeds] + (["mean"] if len(seeds) > 1 else [])
    width = 34
    rows += ["", " " * width + "".join(f"{c:>17}" for c in columns),
             " " * width + "".join(f"{'plain':>8} {'BN':>8}" for _ in columns)]
    mean = result["summary"]

    def line(label, key, fmt):
        pairs = [[run["summary"][f"{key}_{net}"] for net in NETS] for run in runs]
        if len(seeds) > 1:
            pairs.append([mean[f"{key}_{net}"]["mean"] for net in NETS])
        return f"{label:<{width}}" + "".join(
            f"{_cell(plain, fmt):>8} {_cell(bn, fmt):>8}" for plain, bn in pairs)

    first = runs[0]["summary"]
    final = first["final_evaluations"]
    rows.append(line(f"final test accuracy (last {final} evals)" if final else
                     "final test accuracy (no evals)", "final_accuracy", ".4f"))
    for threshold in THRESHOLDS:
        rows.append(line(f"steps to test accuracy {threshold:.2f}",
                         f"steps_to_{threshold:.2f}", ".0f"))
    if first["drift_from_step"] is not None:
        rows.append(line(f"median drift, step {DRIFT_FROM} -> end", "median_drift", "+.3f"))
        rows.append(line(f"p85 - p15 drift, step {DRIFT_FROM} -> end", "spread_drift", "+.3f"))
    if len(seeds) > 1:
        rows.append("(mean: over the seeds; 'never' if a seed never got there)")
    rows += _short_run_notes(settings, first)
    return "\n".join(rows)


def _short_run_notes(settings: dict, summary: dict) -> list[str]:
    """What a run too short for the paper's comparison can and cannot show."""
    notes = []
    final = summary["final_evaluations"]
    if final < FINAL_EVALUATIONS:
        notes.append(f"short run: the final accuracy is the mean of {final} evaluation"
                     f"{'s' if final != 1 else ''} from step {summary['final_from_step']} on "
                     f"(not yet converged; a full run averages the last {FINAL_EVALUATIONS}).")
    if summary["drift_from_step"] is None:
        needed = DRIFT_FROM + DRIFT_WINDOW * settings["eval_every"]
        notes.append(f"no drift rows: the drift compares the tracked input from step "
                     f"{DRIFT_FROM} to the end and needs at least {needed} steps; a shorter "
                     f"run shows the accuracy curves, BN's head start (the steps to each "
                     f"threshold) and the percentiles of panels (b) and (c), not their drift.")
    return [""] + notes if notes else []
