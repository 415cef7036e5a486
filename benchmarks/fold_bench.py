"""Eval latency of the test zoo before and after BN folding, next to torch.fx's fuse.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fold_bench.py

Variants are timed round-robin in one process (so load from other processes hits them alike);
the table gives the median per-call latency and the ratio to the unfolded model. Writes
benchmarks/fold_bench.json and benchmarks/RESULTS_tools.md.
"""

import json
import os
import platform
import statistics
import sys
import time

import torch
from torch.fx.experimental.optimization import fuse

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.zoo import ZOO  # noqa: E402

from batchnorm.tools import fold_bn, strip_redundant_biases, trace  # noqa: E402

# ---- settings ---------------------------------------------------------------------------------
BATCH = 32          # the zoo's example inputs are repeated up to this batch size
ROUNDS = 30         # round-robin rounds; each times CALLS calls of every variant
CALLS = 5
WARMUP = 3
DTYPE = torch.float32
OUT_DIR = os.path.dirname(__file__)
# -----------------------------------------------------------------------------------------------


def _batch(x):
    xs = x if isinstance(x, tuple) else (x,)
    return tuple(t.repeat(BATCH // t.shape[0], *[1] * (t.dim() - 1)).to(DTYPE) for t in xs)


def _time(model, inputs):
    start = time.perf_counter()
    for _ in range(CALLS):
        model(*inputs)
    return (time.perf_counter() - start) / CALLS


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    rows = []
    for name, factory in ZOO.items():
        model, example = factory()
        model = model.to(DTYPE).eval()
        example = tuple(t.to(DTYPE) for t in example) if isinstance(example, tuple) else \
            example.to(DTYPE)
        inputs = _batch(example)
        folded, fold_report = fold_bn(model, example)
        _, strip_report = strip_redundant_biases(model, example)
        variants = {"original": model, "fold_bn": folded}
        fuse_error = None
        try:
            variants["fx fuse"] = fuse(model)
        except Exception as exc:  # fx.symbolic_trace traces into batchnorm's BN and fails
            fuse_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            # the same graph traced with every BN a leaf; fuse then folds the torch.nn BNs it
            # matches by exact type and leaves batchnorm's alone
            variants["fx fuse"] = fuse(trace(model, example).graph_module, no_trace=True)
        times = {k: [] for k in variants}
        with torch.inference_mode():
            for m in variants.values():
                for _ in range(WARMUP):
                    m(*inputs)
            for _ in range(ROUNDS):
                for k, m in variants.items():
                    times[k].append(_time(m, inputs))
            diff = max((folded(*inputs) - model(*inputs)).abs().max().item(), 0.0)
        median = {k: statistics.median(v) for k, v in times.items()}
        row = {"model": name, "batch": BATCH, "original_ms": 1e3 * median["original"],
               "fold_bn_ms": 1e3 * median["fold_bn"],
               "fold_bn_speedup": median["original"] / median["fold_bn"],
               "fx_fuse_ms": 1e3 * median["fx fuse"] if "fx fuse" in median else None,
               "fx_fuse_speedup": (median["original"] / median["fx fuse"]
                                   if "fx fuse" in median else None),
               "fx_fuse_error": fuse_error, "bn_layers": len(fold_report.folded)
               + len(fold_report.skipped), "folded": len(fold_report.folded),
               "parameters": fold_report.parameters_before,
               "fold_parameters_saved": fold_report.parameters_before
               - fold_report.parameters_after,
               "strip_parameters_saved": strip_report.parameters_removed,
               "fold_max_abs_diff_fp32": diff}
        rows.append(row)
        print(json.dumps(row))
    meta = {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), "threads": 1,
            "dtype": str(DTYPE), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "cpus": os.cpu_count()}
    with open(os.path.join(OUT_DIR, "fold_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    _write_markdown(meta, rows)


def _write_markdown(meta, rows):
    lines = [
        "## BN folding: zoo eval latency and parameter savings (benchmarks/fold_bench.py)",
        "",
        f"CPU, {meta['threads']} thread, {meta['dtype']}, batch {BATCH}, torch {meta['torch']}; "
        f"median of {ROUNDS} round-robin rounds x {CALLS} calls. Load average (1/5/15 min) "
        f"{'/'.join(f'{v:.1f}' for v in meta['loadavg_before'])} before, "
        f"{'/'.join(f'{v:.1f}' for v in meta['loadavg_after'])} after, on {meta['cpus']} cores "
        f"shared with other jobs: compare the ratios (measured side by side), not absolute times.",
        "",
        "| model | BN folded | params | strip-bias saves | fold saves | original ms | fold_bn ms "
        "| fold_bn speedup | fx fuse ms | fx fuse speedup | fp32 max diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        star = "*" if r["fx_fuse_error"] else ""
        fuse_ms = f"{r['fx_fuse_ms']:.3f}{star}"
        fuse_x = f"{r['fx_fuse_speedup']:.2f}x{star}"
        strip_pct = 100 * r["strip_parameters_saved"] / r["parameters"]
        fold_pct = 100 * r["fold_parameters_saved"] / r["parameters"]
        lines.append(
            f"| {r['model']} | {r['folded']}/{r['bn_layers']} | {r['parameters']} | "
            f"{r['strip_parameters_saved']} ({strip_pct:.1f}%) | "
            f"{r['fold_parameters_saved']} ({fold_pct:.1f}%) | "
            f"{r['original_ms']:.3f} | {r['fold_bn_ms']:.3f} | {r['fold_bn_speedup']:.2f}x | "
            f"{fuse_ms} | {fuse_x} | {r['fold_max_abs_diff_fp32']:.1e} |")
    errors = sorted({r["fx_fuse_error"] for r in rows if r["fx_fuse_error"]})
    if errors:
        lines += ["", "\\* torch.fx.experimental.optimization.fuse traces with the default "
                  "symbolic_trace, which traces into batchnorm's BN modules (not torch.nn's) and "
                  "fails (" + "; ".join(f"`{e}`" for e in errors) + "). Starred rows give fuse "
                  "the graph batchnorm.tools.trace makes (every BN a leaf, `no_trace=True`): it "
                  "then folds only the BNs whose type is exactly torch.nn's."]
    with open(os.path.join(OUT_DIR, "RESULTS_tools.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
