"""What the Figure 1 experiment is run with, and what an engine gives back: the settings, the
initial weights of one seed, one evaluation. The experiment (experiment.py) and both engines
(torch_engine.py, numpy_engine.py) build on this module; it imports neither.
"""

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ENGINES", "NETS", "Settings", "InitialWeights", "initial_weights", "Evaluation"]

ENGINES = ("torch", "numpy")
NETS = ("plain", "bn")    # the two networks of every seed, in this order everywhere


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
    seed: int = 0                        # the first seed: initial weights and batch order
    seeds: int = 3                       # ours: seeds seed, seed + 1, ... trained side by side
    engine: str = "torch"

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        for name in ("steps", "batch_size", "eval_every", "seeds"):
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


def initial_weights(settings: Settings, inputs: int = 784, classes: int = 10,
                    seed: int | None = None) -> InitialWeights:
    """The initial weights of one seed (default settings.seed)."""
    rng = np.random.default_rng([settings.seed if seed is None else seed, 0])
    sizes = (inputs, *settings.hidden, classes)
    return InitialWeights([rng.normal(0.0, settings.init_std, size=(fan_in, fan_out))
                           for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True)])


@dataclass(frozen=True)
class Evaluation:
    accuracy_plain: float
    accuracy_bn: float
    sigmoid_input_plain: np.ndarray   # (N_test,) input to the tracked sigmoid, plain network
    sigmoid_input_bn: np.ndarray      # (N_test,) the same with BN (eval mode: running stats)
