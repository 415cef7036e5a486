"""The summary of Figure 1 runs as one Markdown table, a row per seed.

    python experiments/figure1_table.py out/paper/figure1.json [more runs' figure1.json ...]

Drift is n/a for a run too short to show it (see batchnorm.paper.experiment.summarize).
"""

import json
import sys

from batchnorm.paper.experiment import THRESHOLDS, summarize

rows = ["| engine | seed | final acc. without BN | final acc. with BN | "
        + " | ".join(f"steps to {t:.2f} (without / with)" for t in THRESHOLDS)
        + " | median drift (without / with) | p85-p15 drift (without / with) |",
        "|---" * (6 + len(THRESHOLDS)) + "|"]


def cell(value, fmt=",", missing="never"):
    return missing if value is None else format(value, fmt)


for path in sys.argv[1:]:
    with open(path) as f:
        result = json.load(f)
    settings = result["settings"]
    for run in result["runs"]:
        s = summarize(run["history"], settings["percentiles"])   # recomputed from the history
        steps_to = [f"{cell(s[f'steps_to_{t:.2f}_plain'])} / {cell(s[f'steps_to_{t:.2f}_bn'])}"
                    for t in THRESHOLDS]
        drifts = [" / ".join(cell(s[f"{key}_{net}"], "+.2f", "n/a") for net in ("plain", "bn"))
                  for key in ("median_drift", "spread_drift")]
        rows.append(f"| {settings['engine']} | {run['seed']} | {s['final_accuracy_plain']:.4f} | "
                    f"{s['final_accuracy_bn']:.4f} | " + " | ".join(steps_to + drifts) + " |")
print("\n".join(rows))
