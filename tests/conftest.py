"""Test-wide settings: one thread for torch (and so for our CPU kernels, on torch's pool), and
the --quick option.

Two xdist workers on 2 shared cores with spinning OpenMP pools slow everything 15-60x. Tests
about threading set their own counts.
"""

from collections import defaultdict

import torch

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true",
                     help="a short representative run: the first, middle and last case of each "
                          "parametrized test; no tests marked slow (subprocesses, compilers) or "
                          "interpreter (Triton kernels under TRITON_INTERPRET)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--quick"):
        return  # the full run: everything collected
    cases = defaultdict(list)  # one test function's parametrizations, in collection order
    for item in items:
        if hasattr(item, "callspec"):
            cases[(item.path, item.originalname)].append(item)
    kept = set()
    for group in cases.values():
        kept.update(id(group[i]) for i in {0, len(group) // 2, len(group) - 1})
    selected, deselected = [], []
    for item in items:
        heavy = item.get_closest_marker("slow") or item.get_closest_marker("interpreter")
        thinned = hasattr(item, "callspec") and id(item) not in kept
        (deselected if heavy or thinned else selected).append(item)
    config.hook.pytest_deselected(items=deselected)
    items[:] = selected
