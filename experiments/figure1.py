"""Figure 1 of Ioffe & Szegedy (2015), section 4.1: MNIST, 784-100-100-100-10 sigmoid networks
with and without batch norm. The same experiment as `batchnorm paper`, written out flat.

    python experiments/figure1.py                        # the settings below
    python experiments/figure1.py --engine=numpy --seed=1 --seeds=1 --steps=10000

Writes {out}/figure1.png and {out}/figure1.json and prints the summary.
"""

import os

# One thread for torch and BLAS, set before numpy and torch start their thread pools:
# on (60, 100) matrices threads cost more than they give.
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

# -----------------------------------------------------------------------------------------------
# settings (the paper's: steps, batch of 60, 3 x 100 sigmoid units; ours: lr, init std, eval grid)
steps = 50_000        # SGD steps of both networks
seed = 0              # the first seed: initial weights and batch order
seeds = 3             # seeds seed, seed + 1, ... trained side by side
lr = 0.5              # plain SGD, no momentum, no decay
engine = "torch"      # "torch": batchnorm.BatchNorm1d + autograd; "numpy": batchnorm.reference
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

import json  # noqa: E402

import torch  # noqa: E402

from batchnorm.paper.data import load_embedded_mnist, load_mnist_idx  # noqa: E402
from batchnorm.paper.experiment import Settings, format_summary, run_experiment  # noqa: E402
from batchnorm.paper.plot import plot_figure1  # noqa: E402

torch.set_num_threads(1)

data = load_mnist_idx(mnist) if mnist else load_embedded_mnist()
print(data.source)
settings = Settings(steps=steps, seed=seed, seeds=seeds, lr=lr, engine=engine)
result = run_experiment(data, settings, progress=True, measure_bound=True)

os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "figure1.json"), "w") as f:
    json.dump(result, f, indent=1)
plot_figure1(result, os.path.join(out, "figure1.png"))
print(format_summary(result))
print(f"wrote {out}/figure1.png and {out}/figure1.json")
