"""Rows, the console table, the ResNet-50 totals and the result files (JSON or CSV)."""

import csv
import json
import os

NOISY_SPREAD = 0.15
NOISY_RERUNS = 2  # a noisy row is measured up to this many more times
COPY = "copy"  # the timed copy of the input that every row carries (not a provider)
RATIOS = (("torch", "speedup_vs_torch"), ("compile", "speedup_vs_compile"),
          ("ours-unfused", "speedup_vs_unfused"))


def row(case: dict, ms: dict, correct: dict, errors: dict, spread: dict,
        bytes_per_element: int) -> dict:
    """One measured case: its description, each provider's median ms and check, the copy of the
    input timed with them, ours' ratios and the spread."""
    ms = dict(ms)
    copy_ms = ms.pop(COPY, None)
    out = dict(case)
    out["spread"] = max(spread.get(name, 0.0) for name in ("ours", "torch", COPY))
    out["noisy"] = out["spread"] > NOISY_SPREAD
    for name, value in ms.items():
        out[f"{name}_ms"] = value
        out[f"{name}_correct"] = correct[name]
    for name, error in errors.items():
        out[f"{name}_error"] = error
    ours = ms.get("ours")
    for other, key in RATIOS:
        if ours is not None and other in ms:
            out[key] = ms[other] / ours
    if copy_ms is not None:
        # a copy moves 2 x size; the mode moves bytes_per_element x size at the least
        out["copy_ms"] = copy_ms
        out["roofline_ms"] = copy_ms * bytes_per_element / 2
        if ours is not None:
            out["x_roofline"] = ours / out["roofline_ms"]
            out["ours_vs_copy"] = ours / copy_ms
    return out


def table_header(names: list[str]) -> str:
    return (f"{'shape':>20} {'layout':>8} {'mode':>16} {'thr':>3} "
            + " ".join(f"{n + ' ms':>12}" for n in names)
            + f" {'copy ms':>10} {'vs torch':>8} {'vs compile':>10} {'vs unfused':>10}"
            + f" {'x roofline':>10} {'spread':>6}")


def table_line(r: dict, names: list[str]) -> str:
    cells = []
    for name in names:
        if f"{name}_error" in r:
            cells.append(f"{'ERROR':>12}")
        elif f"{name}_ms" not in r:
            cells.append(f"{'-':>12}")
        elif not r[f"{name}_correct"]:
            cells.append(f"{'WRONG':>12}")
        else:
            cells.append(f"{r[f'{name}_ms']:>12.3f}")

    def ratio(key, width):
        return f"{r[key]:>{width}.2f}" if key in r else f"{'-':>{width}}"

    copy = f"{r['copy_ms']:>10.3f}" if "copy_ms" in r else f"{'-':>10}"
    attempts = r.get("attempts", 1)
    return (f"{r['shape']:>20} {r['layout'][:8]:>8} {r['mode']:>16} {r['threads']:>3} "
            + " ".join(cells) + f" {copy} {ratio('speedup_vs_torch', 8)} "
            f"{ratio('speedup_vs_compile', 10)} {ratio('speedup_vs_unfused', 10)} "
            f"{ratio('x_roofline', 10)} {r['spread']:>6.0%}"
            + (" noisy" if r["noisy"] else "")
            + (f" ({attempts} runs)" if attempts > 1 else ""))


def errors_of(rows: list[dict]) -> list[str]:
    return [f"{r['shape']} {r['layout']} {r['dtype']} {r['mode']} {key[:-6]}: {r[key]}"
            for r in rows for key in r if key.endswith("_error")]


def totals(rows: list[dict], names: list[str]) -> list[dict]:
    """Per (dtype, layout, mode, threads): each provider's time summed over the ResNet-50 shapes
    in the run, each weighted by how many of ResNet-50's BN layers have it."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("layers"):
            groups.setdefault((r["dtype"], r["layout"], r["mode"], r["threads"]), []).append(r)
    out = []
    for (dtype, layout, mode, threads), group in groups.items():
        ms = {}
        for name in names:
            if all(r.get(f"{name}_ms") is not None for r in group):
                ms[name] = sum(r[f"{name}_ms"] * r["layers"] for r in group)
        entry = {"dtype": dtype, "layout": layout, "mode": mode, "threads": threads,
                 "shapes": len(group), "layers": sum(r["layers"] for r in group), "ms": ms}
        for other, key in RATIOS:
            if "ours" in ms and other in ms:
                entry[key] = ms[other] / ms["ours"]
        out.append(entry)
    return out


def totals_lines(entries: list[dict]) -> list[str]:
    if not entries:
        return []
    lines = ["# ResNet-50 totals: ms over its BN layers of the measured shapes, speedup of ours"]
    for e in entries:
        cells = " ".join(f"{name} {ms:.3f}" for name, ms in e["ms"].items())
        ratios = " ".join(f"x{e[key]:.2f} vs {other}" for other, key in RATIOS if key in e)
        lines.append(f"{e['dtype']:>8} {e['layout'][:8]:>8} {e['mode']:>16} {e['threads']:>3} "
                     f"({e['shapes']} shapes, {e['layers']} layers) {cells}  {ratios}")
    return lines


def write(path: str, rows: list[dict], machine: dict, totals: list[dict] | None = None) -> None:
    """JSON: {"machine", "rows"[, "totals"]}; CSV: the rows, one column per key."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    if path.endswith(".csv"):
        keys = sorted({k for r in rows for k in r})
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        return
    result = {"machine": machine, "rows": rows}
    if totals:
        result["totals"] = totals
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
