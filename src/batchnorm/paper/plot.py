"""Figure 1 of Ioffe & Szegedy (2015), three panels side by side, from a result dict:

    (a) test accuracy against training steps, with and without BN
    (b) the 15th / 50th / 85th percentiles of one last-hidden-layer sigmoid's input, without BN
    (c) the same with BN;  (b) and (c) share their y-axis so the drift can be compared
"""

import os

__all__ = ["plot_figure1"]


def plot_figure1(result: dict, path) -> str:
    """Write the figure to path (PNG, or any format matplotlib infers from the suffix)."""
    try:
        import matplotlib
    except ImportError as missing:
        raise ImportError("the figure needs matplotlib: pip install 'batchnorm[plot]'") \
            from missing
    matplotlib.use("Agg")   # files only; no display needed
    import matplotlib.pyplot as plt

    history, settings = result["history"], result["settings"]
    steps = [s / 1000 for s in history["steps"]]    # thousands of steps, as the paper's axis
    figure, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))
    figure.subplots_adjust(wspace=0.25)

    a.plot(steps, history["accuracy_plain"], color="tab:gray", linestyle="--", label="Without BN")
    a.plot(steps, history["accuracy_bn"], color="tab:blue", label="With BN")
    # the paper's axis starts at 0.7; start lower when a curve's second half is below it
    half = len(steps) // 2
    lowest = min(history["accuracy_plain"][half:] + history["accuracy_bn"][half:])
    a.set_ylim(max(0.0, min(0.7, lowest - 0.05)), 1.0)
    a.set_xlabel("training steps (thousands)")
    a.set_ylabel("test accuracy")
    a.legend(loc="lower right")
    a.grid(alpha=0.3)
    a.set_title("(a)")

    percentiles = settings["percentiles"]
    styles = {15.0: ":", 50.0: "-", 85.0: "--"}
    for axis, key, title in ((b, "percentiles_plain", "(b) without BN"),
                             (c, "percentiles_bn", "(c) with BN")):
        curves = list(zip(*history[key], strict=True))       # one series per percentile
        for q, curve in zip(percentiles, curves, strict=True):
            axis.plot(steps, curve, color="black", linestyle=styles.get(q, "-."), linewidth=1.2,
                      label=f"{q:g}th percentile")
        axis.set_xlabel("training steps (thousands)")
        axis.grid(alpha=0.3)
        axis.set_title(title)
    b.sharey(c)
    b.set_ylabel(f"input to sigmoid {settings['tracked_unit']} of the last hidden layer")
    c.legend(loc="upper right", fontsize="small")
    figure.suptitle(f"Figure 1 reproduction: {result['data'].split(':')[0]}, "
                    f"{settings['engine']} engine, seed {settings['seed']}", fontsize="medium")

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return str(path)
