"""First-call latency in a fresh process: `import batchnorm` plus the first training step.

    python benchmarks/first_call.py

Each measurement is a new interpreter. torch is imported first (its own cost is not ours); then
the clock runs over `import batchnorm` and one training forward + backward of BatchNorm2d on
(8, 16, 10, 10) float32. torch.nn's first call is timed the same way for comparison. The median
of 5 processes is printed.
"""

import statistics
import subprocess
import sys

SCRIPT = """
import time, torch
torch.set_num_threads(1)
x = torch.randn(8, 16, 10, 10, requires_grad=True)
start = time.perf_counter()
{body}
print(time.perf_counter() - start)
"""
OURS = "import batchnorm\nbatchnorm.BatchNorm2d(16)(x).sum().backward()"
TORCH = "torch.nn.BatchNorm2d(16)(x).sum().backward()"


def measure(body: str, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", SCRIPT.format(body=body)],
                             capture_output=True, text=True, check=True).stdout
        times.append(float(out.split()[-1]))
    return statistics.median(times)


if __name__ == "__main__":
    ours, theirs = measure(OURS), measure(TORCH)
    print(f"import batchnorm + first BatchNorm2d forward+backward: {ours * 1e3:.0f} ms")
    print(f"torch.nn.BatchNorm2d first forward+backward:           {theirs * 1e3:.1f} ms")
