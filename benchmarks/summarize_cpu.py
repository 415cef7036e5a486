"""Summary of `batchnorm bench --out FILE.json` runs against the CPU backend's targets.

    python benchmarks/summarize_cpu.py benchmarks/results_cpu_1t.json [more.json ...]
    python benchmarks/summarize_cpu.py --table FILE.json [more.json ...]

The rows of every file given are taken together (a run split by --threads or --modes). Prints,
per thread count: the train forward+backward geomean and minimum vs torch.nn, the slowest rows,
eval-forward geomean and minimum, eval against the copy of the same input timed in the same
rounds (shapes of 8 MB and more), fused BN+ReLU vs BN then ReLU, the x-roofline median of shapes
of 8 MB and more, and whether 2 threads beat 1 on every shape of 1 MB and more. Rows still noisy
after their reruns are counted and named.
"""

import json
import math
import statistics
import sys


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def load_rows(paths: list[str]) -> list[dict]:
    return [r for path in paths for r in json.load(open(path))["rows"]]


def main(paths: list[str]) -> None:
    rows = load_rows(paths)
    by = {}
    for r in rows:
        by.setdefault(r["threads"], []).append(r)
    for threads, rs in sorted(by.items()):
        def pick(mode, rs=rs):
            return [r for r in rs if r["mode"] == mode and "speedup_vs_torch" in r]
        train, evals, relu = pick("train-fwd-bwd"), pick("eval-fwd"), pick("relu-fwd-bwd")
        noisy = [r for r in rs if r.get("noisy")]
        worst = min(train, key=lambda r: r["speedup_vs_torch"])
        worst_eval = min(evals, key=lambda r: r["speedup_vs_torch"])
        big = [r["x_roofline"] for r in rs if r["bytes"] >= 8 << 20 and "x_roofline" in r
               and r["mode"] in ("train-fwd-bwd", "train-fwd", "eval-fwd")]
        print(f"## {threads} thread(s): {len(rs)} rows, {len(noisy)} noisy")
        train_mean = geomean([r["speedup_vs_torch"] for r in train])
        eval_mean = geomean([r["speedup_vs_torch"] for r in evals])
        fused_mean = geomean([r["speedup_vs_unfused"] for r in relu if "speedup_vs_unfused" in r])
        print(f"train fwd+bwd vs torch.nn: geomean {train_mean:.2f}x, "
              f"min {worst['speedup_vs_torch']:.2f}x ({worst['shape']} {worst['layout']})")
        print(f"eval fwd vs torch.nn: geomean {eval_mean:.2f}x, min "
              f"{worst_eval['speedup_vs_torch']:.2f}x ({worst_eval['shape']} "
              f"{worst_eval['layout']})")
        print(f"fused BN+ReLU vs BN then torch.relu: geomean {fused_mean:.2f}x")
        slow = sorted((r for r in rs if "speedup_vs_torch" in r and r["mode"] in
                       ("train-fwd-bwd", "eval-fwd")), key=lambda r: r["speedup_vs_torch"])[:6]
        print("slowest train fwd+bwd / eval rows vs torch.nn: " + "; ".join(
            f"{r['shape']} {r['layout'][:6]} {r['mode']} {r['speedup_vs_torch']:.2f}x"
            + (" (noisy)" if r.get("noisy") else "") for r in slow))
        copies = [r for r in evals if r["bytes"] >= 8 << 20 and "ours_vs_copy" in r]
        if copies:
            over = [r for r in copies if r["ours_vs_copy"] > 1.2]
            print(f"eval vs a copy of the same input (same rounds), shapes >= 8 MB: max "
                  f"{max(r['ours_vs_copy'] for r in copies):.2f}x the copy's time, "
                  f"{len(over)} of {len(copies)} over 1.2x"
                  + (": " + "; ".join(f"{r['shape']} {r['layout']} {r['ours_vs_copy']:.2f}"
                                      for r in over) if over else ""))
        reruns = [r for r in rs if r.get("attempts", 1) > 1]
        if reruns:
            print(f"rows measured again for their spread: {len(reruns)}; still noisy: "
                  + ("; ".join(f"{r['shape']} {r['layout'][:6]} {r['mode']} "
                               f"{r['spread']:.0%}" for r in noisy) or "none"))
        if big:
            print(f"x roofline, shapes >= 8 MB (train-fwd, train-fwd-bwd, eval-fwd): median "
                  f"{statistics.median(big):.2f}, max {max(big):.2f}")
        for r in train:
            if r["shape"] in ("60x100", "256x1024"):
                print(f"  {r['shape']} train fwd+bwd: ours {r['ours_ms']:.3f} ms, torch "
                      f"{r['torch_ms']:.3f} ms ({r['speedup_vs_torch']:.2f}x)")
    if 1 in by and 2 in by:
        one = {(r["shape"], r["layout"], r["mode"]): r for r in by[1]}
        slower = []
        for r in by[2]:
            o = one.get((r["shape"], r["layout"], r["mode"]))
            if o and r["bytes"] >= 1 << 20 and r["ours_ms"] >= o["ours_ms"]:
                slower.append(f"{r['shape']} {r['layout']} {r['mode']} "
                              f"({o['ours_ms']:.3f} -> {r['ours_ms']:.3f} ms)")
        print(f"2 threads not faster than 1 on {len(slower)} rows of >= 1 MB"
              + (": " + "; ".join(slower) if slower else ""))


def table(paths: list[str]) -> None:
    """Every row as a markdown table (ms, ratios, spread; noisy rows marked)."""
    rows = load_rows(paths)
    print("| shape | layout | mode | threads | ours ms | torch.nn ms | copy ms | vs torch.nn "
          "| vs ours unfused | x roofline | spread |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        unfused = f"{r['speedup_vs_unfused']:.2f}" if "speedup_vs_unfused" in r else ""
        noisy = " (noisy)" if r.get("noisy") else ""
        print(f"| {r['shape']} | {r['layout']} | {r['mode']} | {r['threads']} | "
              f"{r['ours_ms']:.3f} | {r['torch_ms']:.3f} | {r.get('copy_ms', float('nan')):.3f} | "
              f"{r['speedup_vs_torch']:.2f} | "
              f"{unfused} | {r['x_roofline']:.2f} | {r['spread']:.0%}{noisy} |")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--table"]
    sources = args or ["benchmarks/results_cpu.json"]
    table(sources) if "--table" in sys.argv else main(sources)
