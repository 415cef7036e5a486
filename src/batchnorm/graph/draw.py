"""The picture of an evaluated graph: one box per node on a hand-made grid, arrows for the data
flow, in each box the chosen channel's forward value(s) (black) and dL/d(node) (red).

Layout, by hand: every text line is measured first (matplotlib's renderer, in inches), each box
is sized to its lines, each grid column to its widest box and each row to its tallest, and only
then is the figure sized and everything placed, so no text overlaps another whatever N is. The
axes' data units are inches of the figure.

    train / bias    a snake: x, mu, xmu, sq, var left to right; var_eps, std, invstd, x_hat back
                    right to left; scaled and y below x_hat (the bias view adds Wu and b in front)
    eval            the three lines of reference.eval_forward: scale, shift, y
"""

from dataclasses import dataclass, field

import numpy as np

from batchnorm.graph.stages import Evaluation

__all__ = ["LAYOUTS", "Box", "Drawing", "draw", "box_lines"]

# node name -> (column, row); row 0 on top
_SNAKE = {"x": (0, 0), "mu": (1, 0), "xmu": (2, 0), "sq": (3, 0), "var": (4, 0),
          "var_eps": (4, 1), "std": (3, 1), "invstd": (2, 1), "x_hat": (1, 1),
          "gamma": (0, 2), "scaled": (1, 2), "y": (2, 2), "beta": (3, 2)}
LAYOUTS: dict[str, dict[str, tuple[int, int]]] = {
    "train": _SNAKE,
    "bias": {"Wu": (-1, 0), "b": (-1, 1), **_SNAKE},
    "eval": {"gamma": (0, 0), "scale": (1, 0), "y": (3, 0),
             "running_var": (0, 1), "running_mean": (1, 1), "shift": (2, 1), "x": (3, 1),
             "beta": (2, 2)},
}
# edges that would cross a box drawn straight: (from, to) -> arc3's rad, leaving and entering
# through the top of the boxes
CURVED = {("x", "xmu"): -0.12}

DPI = 110
FONT_SIZE = 8.5
PAD = 0.08            # inches between a box's edge and its text
LINE_GAP = 0.025      # inches between two lines of a box
COLUMN_GAP = 0.45     # inches between the widest boxes of neighbouring columns
ROW_GAP = 0.45
MARGIN = 0.25
VALUES_PER_LINE = 4

COLORS = {"input": "#e6e6e6", "sample": "#dbe9f6", "channel": "#fbeec1"}  # box faces
FORWARD, GRADIENT, PATH, NOTE, FORMULA = "black", "#c0392b", "#d98880", "#1e8449", "#555555"
MONO = "DejaVu Sans Mono"


@dataclass
class Box:
    """A node's box in figure inches: centre, size, and its lines (text, colour, font family)."""

    name: str
    lines: list[tuple[str, str, str, str]]      # (text, colour, family, weight)
    width: float = 0.0
    height: float = 0.0
    line_heights: list[float] = field(default_factory=list)
    centre: tuple[float, float] = (0.0, 0.0)

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in inches."""
        (cx, cy), hw, hh = self.centre, self.width / 2, self.height / 2
        return cx - hw, cy - hh, cx + hw, cy + hh


@dataclass
class Drawing:
    """What was drawn, for tests and for reading the layout: boxes, edges and the figure size."""

    boxes: dict[str, Box]
    edges: list[tuple[str, str, tuple[float, float], tuple[float, float], float]]  # rad 0: line
    size: tuple[float, float]
    texts: list[tuple[float, float, float, float]]   # every text line's extent, inches
    paths: list[str]


def _format(value: float) -> str:
    return f"{value:.4g}"


def _vector_lines(label: str, array: np.ndarray, channel: int) -> list[str]:
    """'label  v1  v2  v3  v4' for one channel, VALUES_PER_LINE values a line."""
    values = [_format(float(v)) for v in np.asarray(array)[:, channel]]
    cells = [f" {v:>7}" for v in values]
    chunks = [cells[i:i + VALUES_PER_LINE] for i in range(0, len(cells), VALUES_PER_LINE)]
    indent = " " * len(label)
    return [(label if i == 0 else indent) + "".join(chunk) for i, chunk in enumerate(chunks)]


def _kind(result: Evaluation, name: str) -> str:
    if result.graph.node(name).is_input:
        return "input"
    return "channel" if result.values[name].shape[0] == 1 else "sample"


def box_lines(result: Evaluation, name: str, channel: int) -> list[tuple[str, str, str, str]]:
    """The lines of a node's box: title (stage, name, paper's symbol), code, value, gradient,
    the gradient of each path back into it when there are several, and a remark."""
    node = result.graph.node(name)
    step = "" if node.is_input else f"{node.step}  "
    lines = [(f"{step}{name}    {node.paper}", FORWARD, "sans-serif", "bold"),
             (node.formula, FORMULA, MONO, "normal")]
    lines += [(text, FORWARD, MONO, "normal")
              for text in _vector_lines("value ", result.values[name], channel)]
    label = "dL/d  " if node.trained else "dL/d* "
    lines += [(text, GRADIENT, MONO, "normal")
              for text in _vector_lines(label, result.grads[name], channel)]
    for i, (consumer, contribution) in enumerate(result.paths.get(name, {}).items()):
        lines.append((f"  {'=' if i == 0 else '+'} back from {consumer}:", PATH, MONO, "normal"))
        lines += [(text, PATH, MONO, "normal")
                  for text in _vector_lines(" " * 6, contribution, channel)]
    if not node.trained:
        lines.append(("* a buffer: not trained", NOTE, "sans-serif", "italic"))
    if name in result.notes:
        lines.append((result.notes[name], NOTE, "sans-serif", "italic"))
    return lines


def _text(ax, x, y, text, colour, family, weight, size=FONT_SIZE, ha="left"):
    style = "italic" if weight == "italic" else "normal"
    weight = "normal" if weight == "italic" else weight
    return ax.text(x, y, text, color=colour, family=family, weight=weight, style=style,
                   fontsize=size, ha=ha, va="top", zorder=3)


def _measure(ax, renderer, lines) -> list[tuple[float, float]]:
    """(width, height) in inches of each line as it will be drawn."""
    sizes = []
    for text, colour, family, weight in lines:
        artist = _text(ax, 0, 0, text, colour, family, weight)
        extent = artist.get_window_extent(renderer)
        sizes.append((extent.width / DPI, extent.height / DPI))
        artist.remove()
    return sizes


def _boundary(box: Box, towards: tuple[float, float]) -> tuple[float, float]:
    """Where the line from the box's centre towards a point leaves the box."""
    (cx, cy), (tx, ty) = box.centre, towards
    dx, dy = tx - cx, ty - cy
    scales = [box.width / 2 / abs(dx) if dx else np.inf, box.height / 2 / abs(dy) if dy else np.inf]
    t = min(scales)
    return cx + t * dx, cy + t * dy


def _caption(result: Evaluation, channel: int) -> tuple[list[str], list[str]]:
    graph = result.graph
    n, c = result.values["x"].shape
    header = [f"Batch norm, {graph.title}",
              f"channel {channel} of x, shape (N, C) = ({n}, {c});  black: forward value;  "
              f"red: dL/d(node), the gradient flowing back;  L = 1/2 sum((y - t)^2), "
              f"so dL/dy = y - t"]
    worst = max(c.max_diff for c in result.checks)
    footer = ["boxes: grey an input, blue one value per sample, yellow one value per channel "
              "(a statistic, broadcast over the batch: the gradient into it is a sum)",
              f"every value and gradient shown was checked against torch autograd and "
              f"batchnorm.reference before drawing (max relative difference {worst:.0e})"]
    if graph.kind != "eval":
        footer.append("closed form: dx = gamma * invstd / m * (m dy - sum(dy) - x_hat "
                      "sum(dy x_hat)) gives the same dx at x, skipping stages 1-8")
    return header, footer


def draw(result: Evaluation, channel: int, paths) -> Drawing:
    """Draw `result` for `channel` and save it to each of `paths` (.png, .svg, ...)."""
    try:
        import matplotlib
    except ImportError as missing:
        raise ImportError("the picture needs matplotlib: pip install 'batchnorm[plot]'") \
            from missing
    matplotlib.use("Agg")   # files only; no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    layout = LAYOUTS[result.graph.kind]
    names = [node.name for node in result.graph.nodes]
    if sorted(layout) != sorted(names):
        raise ValueError(f"the {result.graph.kind!r} layout places {sorted(layout)} but the "
                         f"graph has the nodes {sorted(names)}")
    figure = plt.figure(figsize=(4, 4), dpi=DPI)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]  # Agg's (see above)

    # 1. measure: every box sized to its lines
    boxes = {}
    for name in names:
        box = Box(name, box_lines(result, name, channel))
        sizes = _measure(ax, renderer, box.lines)
        box.line_heights = [h for _, h in sizes]
        box.width = max(w for w, _ in sizes) + 2 * PAD
        box.height = sum(box.line_heights) + LINE_GAP * (len(sizes) - 1) + 2 * PAD
        boxes[name] = box
    header, footer = _caption(result, channel)
    header_sizes = _measure(ax, renderer, [(t, FORWARD, "sans-serif", "normal") for t in header])
    footer_sizes = _measure(ax, renderer, [(t, FORMULA, "sans-serif", "normal") for t in footer])

    # 2. lay out: columns as wide as their widest box, rows as tall as their tallest
    columns = sorted({col for col, _ in layout.values()})
    rows = sorted({row for _, row in layout.values()})
    column_width = {c: max(boxes[n].width for n, (col, _) in layout.items() if col == c)
                    for c in columns}
    row_height = {r: max(boxes[n].height for n, (_, row) in layout.items() if row == r)
                  for r in rows}
    grid_width = sum(column_width.values()) + COLUMN_GAP * (len(columns) - 1)
    grid_height = sum(row_height.values()) + ROW_GAP * (len(rows) - 1)
    width = max(grid_width, *(w for w, _ in header_sizes + footer_sizes)) + 2 * MARGIN
    column_centre, x = {}, (width - grid_width) / 2
    for c in columns:
        column_centre[c] = x + column_width[c] / 2
        x += column_width[c] + COLUMN_GAP
    # room above the top row for the curved edges: arc3 rises rad * distance / 2 at its middle
    arc_room = max((abs(rad) * abs(column_centre[layout[b][0]] - column_centre[layout[a][0]]) / 2
                    for (a, b), rad in CURVED.items() if a in layout and b in layout), default=0)
    header_height = (sum(h for _, h in header_sizes) + LINE_GAP * len(header) + ROW_GAP
                     + arc_room)
    footer_height = sum(h for _, h in footer_sizes) + LINE_GAP * len(footer) + ROW_GAP / 2
    height = header_height + grid_height + footer_height + 2 * MARGIN
    row_centre, y = {}, height - MARGIN - header_height
    for r in rows:
        row_centre[r] = y - row_height[r] / 2
        y -= row_height[r] + ROW_GAP
    for name, (col, row) in layout.items():
        boxes[name].centre = (column_centre[col], row_centre[row])

    figure.set_size_inches(width, height)
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)

    # 3. draw: boxes and their lines, the caption, then the edges
    texts = []
    for name, box in boxes.items():
        x0, y0, x1, y1 = box.extent
        ax.add_patch(FancyBboxPatch((x0, y0), box.width, box.height,
                                    boxstyle="round,pad=0,rounding_size=0.06",
                                    facecolor=COLORS[_kind(result, name)], edgecolor="0.45",
                                    linewidth=1.0, zorder=2))
        y = y1 - PAD
        for (text, colour, family, weight), line_height in zip(box.lines, box.line_heights,
                                                               strict=True):
            artist = _text(ax, x0 + PAD, y, text, colour, family, weight)
            texts.append(artist)
            y -= line_height + LINE_GAP
    y = height - MARGIN
    for i, (text, (_, line_height)) in enumerate(zip(header, header_sizes, strict=True)):
        texts.append(_text(ax, width / 2, y, text, FORWARD, "sans-serif",
                           "bold" if i == 0 else "normal", ha="center"))
        y -= line_height + LINE_GAP
    y = MARGIN + footer_height - ROW_GAP / 2
    for text, (_, line_height) in zip(footer, footer_sizes, strict=True):
        texts.append(_text(ax, width / 2, y, text, FORMULA, "sans-serif", "normal",
                           ha="center"))
        y -= line_height + LINE_GAP

    edges = []
    for node in result.graph.stages:
        for source in node.inputs:
            start_box, end_box = boxes[source], boxes[node.name]
            rad = CURVED.get((source, node.name), 0.0)
            if rad:   # out of the top of one box, into the top of the other
                start = (start_box.centre[0], start_box.extent[3])
                end = (end_box.centre[0], end_box.extent[3])
            else:
                start = _boundary(start_box, end_box.centre)
                end = _boundary(end_box, start_box.centre)
            ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=11,
                                         shrinkA=1, shrinkB=1, linewidth=1.1, color="0.35",
                                         connectionstyle=f"arc3,rad={rad}", zorder=1))
            edges.append((source, node.name, start, end, rad))

    figure.canvas.draw()
    # Agg's canvas (matplotlib.use("Agg")); FigureCanvasBase's stub has no get_renderer
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    inch = figure.dpi_scale_trans.inverted()
    extents = [tuple(artist.get_window_extent(renderer).transformed(inch).extents)
               for artist in texts]
    paths = [str(p) for p in paths]
    for path in paths:
        figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return Drawing(boxes, edges, (width, height), extents, paths)
