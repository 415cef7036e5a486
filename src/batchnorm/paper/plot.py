"""Figure 1 of Ioffe & Szegedy (2015), three panels side by side, from a result dict:

    (a) test accuracy against training steps, with and without BN: the mean over the seeds, and
        the band from the lowest to the highest seed
    (b) the 15th / 50th / 85th percentiles of one last-hidden-layer sigmoid's input, without BN:
        the first seed's lines solid, the other seeds' faint
    (c) the same with BN;  (b) and (c) share their y-axis so the drift can be compared

The legends sit below the axes, so they hide no data whatever the curves do.
"""

import os

import numpy as np

__all__ = ["plot_figure1", "draw_figure1"]

PERCENTILE_COLORS = {15.0: "tab:blue", 50.0: "black", 85.0: "tab:red"}
LEGEND_BELOW = dict(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize="small",
                    frameon=False)


def plot_figure1(result: dict, path) -> str:
    """Write the figure to path (PNG, or any format matplotlib infers from the suffix)."""
    figure = draw_figure1(result)
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return str(path)


def draw_figure1(result: dict):
    """The figure (a matplotlib Figure; the caller closes it)."""
    try:
        import matplotlib
    except ImportError as missing:
        raise ImportError("the figure needs matplotlib: pip install 'batchnorm[plot]'") \
            from missing
    matplotlib.use("Agg")   # files only; no display needed
    import matplotlib.lines
    import matplotlib.pyplot as plt

    settings, runs = result["settings"], result["runs"]
    seeds = [run["seed"] for run in runs]
    steps = np.asarray(runs[0]["history"]["steps"]) / 1000   # thousands, as the paper's axis
    figure, (a, b, c) = plt.subplots(1, 3, figsize=(13, 4.3))
    figure.subplots_adjust(wspace=0.25)

    # (a) accuracy: the mean over seeds, and the min-max band
    lowest = 1.0
    for net, color, style, label in (("plain", "tab:gray", "--", "Without BN"),
                                     ("bn", "tab:blue", "-", "With BN")):
        accuracy = np.array([run["history"][f"accuracy_{net}"] for run in runs])   # (S, evals)
        a.plot(steps, accuracy.mean(0), color=color, linestyle=style,
               label=label + (f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""))
        if len(seeds) > 1:
            a.fill_between(steps, accuracy.min(0), accuracy.max(0), color=color, alpha=0.25,
                           linewidth=0, label=f"{label}: lowest to highest seed")
        lowest = min(lowest, accuracy[:, len(steps) // 2:].min())
    # the paper's axis starts at 0.7; start lower when a curve's second half is below it
    a.set_ylim(max(0.0, min(0.7, lowest - 0.05)), 1.0)
    a.set_xlabel("training steps (thousands)")
    a.set_ylabel("test accuracy")
    a.legend(ncol=2, **LEGEND_BELOW)
    a.grid(alpha=0.3)
    a.set_title("(a)")

    # (b), (c) percentiles: seed 0 solid, the others faint
    percentiles = settings["percentiles"]
    for axis, key, title in ((b, "percentiles_plain", "(b) without BN"),
                             (c, "percentiles_bn", "(c) with BN")):
        for k, run in enumerate(reversed(runs)):        # the first seed drawn last, on top
            first = k == len(runs) - 1
            curves = np.asarray(run["history"][key]).T   # (percentiles, evals)
            for q, curve in zip(percentiles, curves, strict=True):
                axis.plot(steps, curve, color=PERCENTILE_COLORS.get(q, "tab:green"),
                          linewidth=1.3 if first else 0.8, alpha=1.0 if first else 0.3,
                          label=f"{q:g}th percentile, seed {run['seed']}" if first else None)
        axis.set_xlabel("training steps (thousands)")
        axis.grid(alpha=0.3)
        axis.set_title(title)
    b.sharey(c)
    b.set_ylabel(f"input to sigmoid {settings['tracked_unit']} of the last hidden layer")
    handles, labels = c.get_legend_handles_labels()
    if len(seeds) > 1:
        faint = matplotlib.lines.Line2D([], [], color="gray", alpha=0.3, linewidth=0.8)
        handles.append(faint)
        labels.append(f"seeds {', '.join(map(str, seeds[1:]))} (faint)")
    c.legend(handles, labels, ncol=2, **LEGEND_BELOW)
    seed_text = (f"seed {seeds[0]}" if len(seeds) == 1
                 else f"seeds {seeds[0]}-{seeds[-1]}")
    figure.suptitle(f"Figure 1 reproduction: {result['data'].split(':')[0]}, "
                    f"{settings['engine']} engine, {seed_text}", fontsize="medium")
    return figure
