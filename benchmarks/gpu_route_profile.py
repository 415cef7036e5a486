"""Where one batch-norm call's time goes on each route, on a GPU: per call, the wall time
(synchronized), the host time (the calls enqueued without waiting), the kernels launched, and the
operators that take the host's time. Routes: torch.nn, this package's default (torch's kernels
with the extras composed around them) and the Triton route (BATCHNORM_KERNELS=triton).

Why: on an H200 the Triton route took about 2 ms a call whatever the shape while its kernels
alone took 0.04-0.7 ms (benchmarks/RESULTS.md, "GPU"), and the default route's NaN/Inf guard adds
small kernels to every training step. This says how many and where the host's time goes.

    python3 benchmarks/gpu_route_profile.py --out profile.txt     # on a GPU machine
    python benchmarks/gpu_route_profile.py --self-check           # a tiny CPU run of the script
"""

import argparse
import contextlib
import time

import torch
from torch.profiler import ProfilerActivity, profile

import batchnorm
from batchnorm import kernels

CALLS = 20  # timed calls per route and mode
PROFILED = 5  # profiled calls per route and mode


def routes(device: torch.device) -> dict:
    """name -> (layer factory, the backend selection to run it under)."""
    chosen = {"torch.nn": (torch.nn.BatchNorm2d, contextlib.nullcontext),
              "default": (batchnorm.BatchNorm2d, lambda: kernels.use(None))}
    try:
        with kernels.use("triton"):
            pass
        chosen["triton"] = (batchnorm.BatchNorm2d, lambda: kernels.use("triton"))
    except RuntimeError as unavailable:  # no Triton or no GPU: said, and left out
        print(f"# triton route left out: {unavailable}")
    return chosen


def step(layer, x, grad, training: bool):
    """One call: training forward + backward, or eval forward without gradients."""
    if training:
        y = layer(x)
        y.backward(grad)
        return y
    with torch.no_grad():
        return layer(x)


def measure(layer, x, grad, training: bool, device: torch.device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(5):
        step(layer, x, grad, training)
    sync()
    start = time.perf_counter()
    for _ in range(CALLS):
        step(layer, x, grad, training)
    host = (time.perf_counter() - start) / CALLS
    sync()
    wall = (time.perf_counter() - start) / CALLS
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as trace:
        for _ in range(PROFILED):
            step(layer, x, grad, training)
        sync()
    events = trace.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                        "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    ops = sum(e.count for e in events if e.key.startswith(("aten::", "batchnorm::")))
    table = events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50)
    return {"wall_us": wall * 1e6, "host_us": host * 1e6, "launches": launches / PROFILED,
            "ops": ops / PROFILED, "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="32x256x56x56", help="N x C x H x W")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--self-check", action="store_true", help="tiny shape on the CPU")
    args = parser.parse_args()
    device = torch.device("cpu" if args.self_check else "cuda")
    shape = (2, 3, 4, 5) if args.self_check else tuple(int(v) for v in args.shape.split("x"))
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)
    lines = [f"# gpu_route_profile: {shape} float32 on {device}, torch {torch.__version__}; per "
             f"call: wall (synchronized) and host time, kernels launched, aten/batchnorm ops"]
    details = []
    for name, (factory, selection) in routes(device).items():
        for training in (True, False):
            layer = factory(shape[1]).to(device).train(training)
            with selection():
                row = measure(layer, x, grad, training, device)
            mode = "train fwd+bwd" if training else "eval"
            lines.append(f"{name:>9} {mode:>13}: wall {row['wall_us']:9.1f} us  host "
                         f"{row['host_us']:9.1f} us  launches {row['launches']:5.1f}  ops "
                         f"{row['ops']:5.1f}")
            details.append(f"\n## {name}, {mode}\n{row['table']}")
    report = "\n".join(lines + details)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
