"""Eval-mode batch norm on large inputs against the GPU's memory bandwidth: the achieved GB/s of
ours on the Triton kernels, of torch's (cuDNN) and of a plain copy of the same input.

    python benchmarks/gpu_eval_bandwidth.py --out bandwidth.json    # on a GPU (gpu_check.sh)
    python benchmarks/gpu_eval_bandwidth.py --self-check            # dry run on the CPU

Per shape, layout and dtype, each provider timed with triton.testing.do_bench (the L2 cache
flushed before every call; median of the calls), in milliseconds and in GB/s of the bytes an eval
call must move at the least (read x, write y; the per-channel vectors are negligible):
  copy           out.copy_(x) into a preallocated tensor of x's layout: the bandwidth bound
  torch          torch.nn.functional.batch_norm, training=False (cuDNN where it serves)
  ours           batchnorm.functional.batch_norm on the Triton kernels (kernels.use("triton")):
                 the router, the forward_eval op, invstd, then the elemt kernel
  ours-kernel    the elemt Triton kernel alone (invstd computed beforehand)
  ours-default   batchnorm.functional.batch_norm on torch's kernels, CUDA's default route (the
                 router's cost over torch's call)
Every provider's output is checked against float64 first; a wrong one is marked WRONG and its
time not reported as a bandwidth. Weight, bias and running statistics are float32 for bfloat16
inputs, as mixed precision keeps them.

--self-check: a tiny CPU input, the Triton kernels interpreted (TRITON_INTERPRET=1) and a
wall-clock timer: it tests this script without a GPU; its numbers mean nothing.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

SHAPES = [(64, 256, 56, 56), (32, 2048, 7, 7), (32, 64, 112, 112)]
SELF_CHECK_SHAPES = [(2, 5, 7, 3)]
LAYOUTS = ["contiguous", "channels_last"]
DTYPES = ["float32", "bfloat16"]
EPS = 1e-5
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}  # max |error| / max |y| against float64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the rows and the machine to this JSON file")
    parser.add_argument("--self-check", action="store_true",
                        help="dry run on the CPU (tiny input, Triton interpreted)")
    args = parser.parse_args()
    if args.self_check:
        if "triton" in sys.modules:
            raise SystemExit("--self-check needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"  # read by triton's decorators at import
    import torch

    if not args.self_check and not torch.cuda.is_available():
        print("gpu_eval_bandwidth: no CUDA device here; nothing to measure (--self-check dry-runs "
              "it on the CPU)")
        return 0
    import triton

    from batchnorm import kernels
    from batchnorm.kernels import triton as triton_kernels

    device = torch.device("cpu" if args.self_check else "cuda")
    serving = (kernels.serving("cpu", triton_kernels, "triton") if args.self_check
               else kernels.use("triton"))
    machine = {"torch": torch.__version__, "triton": triton.__version__,
               "python": platform.python_version(), "self_check": args.self_check}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        machine |= {"gpu": props.name, "cuda": torch.version.cuda,
                    "memory_GiB": round(props.total_memory / 2**30, 1),
                    "multiprocessors": props.multi_processor_count}
    print(f"# eval bandwidth: {machine}")
    names = ["copy", "torch", "ours", "ours-kernel", "ours-default"]
    print(f"{'shape':>18} {'layout':>8} {'dtype':>8} {'MB':>7} "
          + " ".join(f"{n + ' GB/s':>17}" for n in names) + f" {'ours/torch':>10}"
          + f" {'ours/copy':>9}")
    rows = []
    shapes = SELF_CHECK_SHAPES if args.self_check else SHAPES
    wrong = False
    with serving:
        for shape in shapes:
            for layout in LAYOUTS:
                for dtype_name in DTYPES:
                    r = measure(shape, layout, dtype_name, device, torch, triton_kernels,
                                kernels, args.self_check)
                    rows.append(r)
                    wrong |= not all(p["correct"] for p in r["providers"].values())
                    print(line(r, names), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)
        print(f"# wrote {args.out}")
    if wrong:
        print("# WRONG: some provider's output differs from float64's")
    return 1 if wrong else 0


def measure(shape, layout, dtype_name, device, torch, triton_kernels, kernels, self_check):
    """One row: every provider checked against float64, then timed."""
    from batchnorm import functional

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.rand(C, generator=g) + 0.5).to(device)
    bias = torch.randn(C, generator=g).to(device)
    mean = (torch.randn(C, generator=g) * 0.1).to(device)
    var = (torch.rand(C, generator=g) + 0.5).to(device)
    invstd = torch.rsqrt(var + EPS)
    out = torch.empty_like(x)
    view = (1, C, 1, 1)
    expected = ((x.double() - mean.double().view(view)) * invstd.double().view(view)
                * weight.double().view(view) + bias.double().view(view))

    def default_route():  # inside main's kernels.use("triton"): torch's kernels again
        with kernels.use("aten"):
            return functional.batch_norm(x, mean, var, weight, bias, False, 0.1, EPS)

    calls = {
        "copy": lambda: out.copy_(x),
        "torch": lambda: torch.nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.1,
                                                        EPS),
        "ours": lambda: functional.batch_norm(x, mean, var, weight, bias, False, 0.1, EPS),
        "ours-kernel": lambda: triton_kernels.elemt(x, mean, invstd, weight, bias, None, False),
        "ours-default": default_route,
    }
    nbytes = 2 * x.numel() * x.element_size()  # read x, write y
    providers = {}
    with torch.no_grad():
        for name, fn in calls.items():
            result = fn()
            reference = x.double() if name == "copy" else expected
            error = (result.double() - reference).abs().max().item()
            correct = error <= TOLERANCE[dtype_name] * reference.abs().max().item()
            if name != "copy":
                correct = correct and result.stride() == x.stride()
            ms = time_ms(fn, self_check)
            providers[name] = {"ms": ms, "GB_s": nbytes / ms / 1e6, "correct": correct,
                               "max_error": error}
    r = {"shape": "x".join(map(str, shape)), "layout": layout, "dtype": dtype_name,
         "bytes_moved": nbytes, "ours_backend": kernels.backend_name(x), "providers": providers}
    if all(providers[n]["correct"] for n in ("ours", "torch", "copy")):
        r["ours_vs_torch"] = providers["torch"]["ms"] / providers["ours"]["ms"]
        r["ours_time_over_copy"] = providers["ours"]["ms"] / providers["copy"]["ms"]
    return r


def time_ms(fn, self_check: bool) -> float:
    if self_check:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def line(r: dict, names: list[str]) -> str:
    cells = []
    for name in names:
        p = r["providers"][name]
        cell = f"{p['GB_s']:.0f} ({p['ms']:.3f}ms)" if p["correct"] else "WRONG"
        cells.append(f"{cell:>17}")
    ratio = f"{r['ours_vs_torch']:>10.2f}" if "ours_vs_torch" in r else f"{'-':>10}"
    over = f"{r['ours_time_over_copy']:>9.2f}" if "ours_time_over_copy" in r else f"{'-':>9}"
    return (f"{r['shape']:>18} {r['layout'][:8]:>8} {r['dtype']:>8} "
            f"{r['bytes_moved'] / 2 / 1e6:>7.1f} " + " ".join(cells) + f" {ratio} {over}")


if __name__ == "__main__":
    sys.exit(main())
