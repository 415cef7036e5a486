"""First-call latency of the numba path in a fresh process: warm compile cache vs cold.

    python benchmarks/first_call.py

Each measurement is a new interpreter: import torch and batchnorm, then one training
forward + backward of BatchNorm2d on (8, 16, 10, 10) float32, timed from the first batchnorm
import. "cold" points NUMBA_CACHE_DIR at an empty directory, so every kernel compiles.
"""

import os
import subprocess
import sys
import tempfile

SCRIPT = """
import time, torch
torch.set_num_threads(1)
start = time.perf_counter()
import batchnorm
bn = batchnorm.BatchNorm2d(16)
x = torch.randn(8, 16, 10, 10, requires_grad=True)
bn(x).sum().backward()
first = time.perf_counter() - start
start = time.perf_counter()
bn(x).sum().backward()
print(f"{first:.3f} {time.perf_counter() - start:.5f}")
"""


def measure(env_extra: dict[str, str]) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", **env_extra}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), float(out[1])


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as cache:
        cold = measure({"NUMBA_CACHE_DIR": cache})
        warm_same_dir = measure({"NUMBA_CACHE_DIR": cache})
    warm = measure({})
    print(f"cold cache : first step {cold[0]:.2f} s, second step {cold[1] * 1e3:.2f} ms")
    print(f"warm cache : first step {warm_same_dir[0]:.2f} s (fresh NUMBA_CACHE_DIR, 2nd process)")
    print(f"warm cache : first step {warm[0]:.2f} s (default cache location)")
