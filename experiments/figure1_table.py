"""The summary of several Figure 1 runs as one Markdown table.

    python experiments/figure1_table.py out/paper/*/figure1.json
"""

import json
import sys

from batchnorm.paper.experiment import THRESHOLDS, summarize

rows = ["| engine | seed | final acc. without BN | final acc. with BN | "
        + " | ".join(f"steps to {t:.2f} (without / with)" for t in THRESHOLDS)
        + " | median drift (without / with) | p85-p15 drift (without / with) | wall time |",
        "|---" * (7 + len(THRESHOLDS)) + "|"]


def cell(value):
    return "never" if value is None else f"{value:,}"


for path in sys.argv[1:]:
    with open(path) as f:
        result = json.load(f)
    s, settings = summarize(result), result["settings"]   # recomputed from the history
    steps_to = [f"{cell(s[f'steps_to_{t:.2f}_plain'])} / {cell(s[f'steps_to_{t:.2f}_bn'])}"
                for t in THRESHOLDS]
    rows.append(f"| {settings['engine']} | {settings['seed']} | {s['final_accuracy_plain']:.4f} | "
                f"{s['final_accuracy_bn']:.4f} | " + " | ".join(steps_to)
                + f" | {s['median_drift_plain']:+.2f} / {s['median_drift_bn']:+.2f}"
                f" | {s['spread_drift_plain']:+.2f} / {s['spread_drift_bn']:+.2f}"
                f" | {result['wall_seconds']:.0f} s |")
print("\n".join(rows))
