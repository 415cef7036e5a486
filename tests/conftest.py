"""Test-wide settings: one thread for torch (and so for our CPU kernels, on torch's pool).

Two xdist workers on 2 shared cores with spinning OpenMP pools slow everything 15-60x. Tests
about threading set their own counts.
"""

import torch

torch.set_num_threads(1)
