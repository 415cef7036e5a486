"""`batchnorm paper`: Figure 1 of Ioffe & Szegedy (2015), section 4.1, on MNIST.

    data.py           the embedded 5,000-image MNIST sample, or real MNIST IDX files (--mnist DIR)
    settings.py       the settings, one seed's initial weights, one evaluation (what engines use)
    experiment.py     the shared training loop, the recorded history, the summary
    torch_engine.py   the networks on batchnorm.BatchNorm1d (ours), backward by hand, float32
    numpy_engine.py   the same networks on batchnorm.reference, backward by hand, float64
    plot.py           the three-panel figure

Both engines train S seeds (--seeds, default 3) of both networks at once: each layer's weights
of all seeds as one (S, fan_in, fan_out) tensor, batch norm on the seeds' channels side by side.
reproduce() is the one way a run is made (this command and experiments/figure1.py).

Writes OUT/figure1.png and OUT/figure1.json and prints the summary table.
"""

import argparse
import json
import os
import sys

from batchnorm.paper.data import DataError, load_embedded_mnist, load_mnist_idx
from batchnorm.paper.experiment import ENGINES, Settings, format_summary, run_experiment

__all__ = ["add_arguments", "run", "reproduce", "use_one_thread", "Settings", "run_experiment"]

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def use_one_thread() -> None:
    """One thread for torch (and so for our CPU kernels, on torch's pool) and BLAS: on
    (60, 100) matrices threads cost more than they give on 2 shared cores.

    The environment variables reach pools not started yet (child processes, BLAS when not yet
    loaded); torch is told directly, and threadpoolctl limits the BLAS pools already started.
    """
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, "1")
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)  # BLAS pools that numpy / torch already started


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    defaults = Settings()
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help=f"training steps of both networks (default {defaults.steps}, the "
                             f"paper's)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="the first seed of the initial weights and the batch order "
                             "(default 0)")
    parser.add_argument("--seeds", type=int, default=defaults.seeds,
                        help=f"how many seeds (--seed, --seed + 1, ...) train side by side, "
                             f"each with its own initial weights and batch order (default "
                             f"{defaults.seeds}; 1: a single run)")
    parser.add_argument("--lr", type=float, default=defaults.lr,
                        help=f"SGD learning rate (default {defaults.lr}, our choice)")
    parser.add_argument("--engine", choices=ENGINES, default=defaults.engine,
                        help="torch: batchnorm.BatchNorm1d's kernels, float32 (default); numpy: "
                             "batchnorm.reference, float64; both with the backward by hand")
    parser.add_argument("--mnist", metavar="DIR", default=None,
                        help="directory of the real MNIST IDX files (train-images-idx3-ubyte, "
                             "train-labels-idx1-ubyte, t10k-..., gzipped or not); default: the "
                             "embedded 5,000-image sample")
    parser.add_argument("--out", metavar="DIR", default=os.path.join("out", "paper"),
                        help="directory for figure1.png and figure1.json (default out/paper)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """`batchnorm paper`: the arguments as Settings, then reproduce()."""
    try:
        settings = Settings(steps=args.steps, seed=args.seed, seeds=args.seeds, lr=args.lr,
                            engine=args.engine)
    except ValueError as error:
        print(f"batchnorm paper: {error}", file=sys.stderr)
        return 2
    return reproduce(settings, mnist=args.mnist, out=args.out, progress=not args.quiet)


def reproduce(settings: Settings, mnist: str | None = None, out: str = os.path.join("out", "paper"),
              progress: bool = True) -> int:
    """The one way Figure 1 is made (`batchnorm paper`, experiments/figure1.py): one thread,
    the data (the embedded sample, or the MNIST IDX files in mnist), every seed trained, then
    {out}/figure1.json, the printed summary and {out}/figure1.png. Returns the exit status."""
    use_one_thread()
    try:
        data = load_mnist_idx(mnist) if mnist else load_embedded_mnist()
    except (FileNotFoundError, DataError) as error:
        print(f"batchnorm paper: {error}", file=sys.stderr)
        return 1
    print(f"data: {data.source}", file=sys.stderr)
    result = run_experiment(data, settings, progress=progress, measure_bound=True)

    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "figure1.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print(format_summary(result))
    try:
        from batchnorm.paper.plot import plot_figure1
        png_path = plot_figure1(result, os.path.join(out, "figure1.png"))
    except ImportError as error:
        print(f"\nwrote {json_path}; no figure: {error}")
        return 0
    print(f"\nwrote {png_path} and {json_path}")
    return 0
