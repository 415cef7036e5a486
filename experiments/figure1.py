"""Figure 1 of Ioffe & Szegedy (2015), section 4.1: MNIST, 784-100-100-100-10 sigmoid networks
with and without batch norm. The same run as `batchnorm paper` (both call
batchnorm.paper.reproduce), with its settings written out at the top.

    python experiments/figure1.py                        # the settings below
    python experiments/figure1.py --engine=numpy --seed=1 --seeds=1 --steps=10000

Writes {out}/figure1.png and {out}/figure1.json and prints the summary.
"""

# -----------------------------------------------------------------------------------------------
# settings (the paper's: steps, batch of 60, 3 x 100 sigmoid units; ours: lr, init std, eval grid)
steps = 50_000        # SGD steps of both networks
seed = 0              # the first seed: initial weights and batch order
seeds = 3             # seeds seed, seed + 1, ... trained side by side
lr = 0.5              # plain SGD, no momentum, no decay
engine = "torch"      # "torch": batchnorm.BatchNorm1d's kernels; "numpy": batchnorm.reference
mnist = ""            # a directory of MNIST IDX files; "" for the embedded 5,000-image sample
out = "out/paper"     # where figure1.png and figure1.json go
# -----------------------------------------------------------------------------------------------
# --key=value on the command line overrides a setting above
import sys  # noqa: E402

for argument in sys.argv[1:]:
    key, _, value = argument.lstrip("-").partition("=")
    if key not in ("steps", "seed", "seeds", "lr", "engine", "mnist", "out") or not value:
        sys.exit(f"unknown or empty setting {argument!r}; expected --steps=N, --seed=N, "
                 f"--seeds=N, --lr=X, --engine=torch|numpy, --mnist=DIR or --out=DIR")
    globals()[key] = type(globals()[key])(value)

from batchnorm.paper import Settings, reproduce  # noqa: E402

sys.exit(reproduce(Settings(steps=steps, seed=seed, seeds=seeds, lr=lr, engine=engine),
                   mnist=mnist or None, out=out))
