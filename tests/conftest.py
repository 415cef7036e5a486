"""Test-wide settings: one thread for torch (numba: NUMBA_NUM_THREADS, set in scripts/test.sh).

torch and numba each bring an OpenMP runtime; on 2 shared cores both spinning slows everything
15-60x. Tests about threading set their own counts.
"""

import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
