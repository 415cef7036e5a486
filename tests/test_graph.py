"""`batchnorm graph`: the node list is reference.train_forward's stages, the printed table's numbers
are torch autograd's, the pictures are written and readable (no two texts overlap), and a wrong
gradient stops the drawing."""

import dataclasses
import inspect
import itertools
import re

import numpy as np
import pytest
import torch

from batchnorm import cli, graph, reference
from batchnorm.graph import Settings, build, checks, format_table, stages
from batchnorm.graph.draw import LAYOUTS, draw

VIEWS = ("train", "bias", "eval")
# the printed table rounds to 4 significant digits
PRINTED_RTOL, PRINTED_ATOL = 1e-3, 1e-9

# ----------------------------------------------------------------------------------------------
# The node list against reference.py

STAGE_LINE = re.compile(r"^\s*(\w+)\s*=.*#\s*stage\s+(\d+)\b", re.MULTILINE)


def reference_stages(source: str) -> list[tuple[int, str]]:
    """(stage number, variable) for each `name = ...  # stage N` line of train_forward's code."""
    return [(int(number), name) for name, number in STAGE_LINE.findall(source)]


def stage_mismatch(source: str, nodes) -> list[str]:
    """What differs between the stages in `source` and the graph's numbered nodes."""
    expected = reference_stages(source)
    actual = [(node.stage, node.name) for node in nodes if node.stage is not None]
    return [f"reference {e} / graph {a}" for e, a in itertools.zip_longest(expected, actual)
            if e != a]


def test_reference_source_has_its_ten_stages():
    found = reference_stages(inspect.getsource(reference.train_forward))
    assert [number for number, _ in found] == list(range(1, 11))
    assert found[0] == (1, "mu") and found[-1] == (10, "y")


@pytest.mark.parametrize("build_graph", [stages.train_graph, stages.bias_graph])
def test_graph_nodes_are_reference_train_forward_stages(build_graph):
    source = inspect.getsource(reference.train_forward)
    assert stage_mismatch(source, build_graph().nodes) == []


def test_a_stage_added_to_the_reference_and_not_the_graph_is_caught():
    source = inspect.getsource(reference.train_forward)
    stage_10 = next(line for line in source.splitlines() if "# stage 10" in line)
    grown = source.replace(stage_10, stage_10 + "\n    y2 = y * 2.0   # stage 11  new")
    assert grown != source
    assert stage_mismatch(grown, stages.train_graph().nodes) == [
        "reference (11, 'y2') / graph None"]


def test_backward_stages_walks_back_through_every_stage_of_the_graph():
    mentioned = re.findall(r"#\s*stage\s+(\d+)", inspect.getsource(reference.backward_stages))
    numbered = [n.stage for n in stages.train_graph().nodes if n.stage is not None]
    assert [int(m) for m in mentioned] == numbered[::-1]


def test_cache_fields_named_like_the_nodes():
    """The values checked against the reference are read from Cache fields of the same name."""
    names = {node.name for node in stages.train_graph().nodes}
    assert {"xmu", "std", "invstd", "x_hat"} <= names & {f.name for f in
                                                         dataclasses.fields(reference.Cache)}


@pytest.mark.parametrize("view", VIEWS)
def test_every_layout_places_exactly_the_graph_nodes(view):
    nodes = graph.VIEWS[view]().nodes
    assert sorted(LAYOUTS[view]) == sorted(node.name for node in nodes)


# ----------------------------------------------------------------------------------------------
# The numbers: torch autograd, computed here on the printed case


def autograd_nodes(settings: Settings) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (value, dL/d value) by torch autograd, float64, for the settings' input."""
    result = build(settings)                     # only its inputs and target are used here
    eps = settings.eps
    leaf = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
            for k, v in result.inputs.items()}
    t = dict(leaf)
    if settings.view == "eval":
        t["scale"] = t["gamma"] * torch.rsqrt(t["running_var"] + eps)
        t["shift"] = t["beta"] - t["scale"] * t["running_mean"]
        t["y"] = t["x"] * t["scale"] + t["shift"]
    else:
        if settings.view == "bias":
            t["x"] = t["Wu"] + t["b"]
        t["mu"] = t["x"].mean(0, keepdim=True)
        t["xmu"] = t["x"] - t["mu"]
        t["sq"] = t["xmu"].square()
        t["var"] = t["sq"].mean(0, keepdim=True)
        t["var_eps"] = t["var"] + eps
        t["std"] = t["var_eps"].sqrt()
        t["invstd"] = t["std"].reciprocal()
        t["x_hat"] = t["xmu"] * t["invstd"]
        t["scaled"] = t["x_hat"] * t["gamma"]
        t["y"] = t["scaled"] + t["beta"]
        # the end result as torch's own batch_norm computes it
        expected_y = torch.nn.functional.batch_norm(
            t["x"], None, None, t["gamma"].reshape(-1), t["beta"].reshape(-1), training=True,
            eps=eps)
        torch.testing.assert_close(t["y"], expected_y, rtol=1e-12, atol=1e-12)
    for tensor in t.values():
        if not tensor.is_leaf:
            tensor.retain_grad()
    target = torch.tensor(result.target)
    (0.5 * (t["y"] - target).square().sum()).backward()
    return {name: (tensor.detach().numpy(), tensor.grad.numpy()) for name, tensor in t.items()}


def parse_table(table: str) -> dict[str, tuple[list[float], list[float]]]:
    """node -> (forward values, gradient values) from format_table's text."""
    lines = table.splitlines()
    spans, start = [], 0
    for dashes in re.finditer(r"-+", lines[1]):
        spans.append((dashes.start(), dashes.end()))
        start = dashes.end()
    assert len(spans) == 5 and start
    rows = {}
    for line in lines[2:]:
        cells = [line[a:b if i < 4 else None].strip() for i, (a, b) in enumerate(spans)]
        if not cells[1]:
            continue                       # a "back from" row under its node
        gradient = cells[4].split("(buffer")[0]
        rows[cells[1]] = ([float(v) for v in cells[3].split()],
                          [float(v) for v in gradient.split()])
    return rows


CASES = [
    Settings(),
    Settings(view="bias"),
    Settings(view="eval"),
    Settings(n=2, channels=1),
    Settings(n=5, channels=4, channel=3, seed=3, gamma=-0.7, beta=2.0, eps=1e-3),
    Settings(n=4, x=(1.0, 2.0, 3.0, 4.0), channel=1, view="bias", bias=-5.0),
    Settings(n=3, x=(0.5, 0.5, 0.5), eps=0.1),                      # zero variance
    Settings(n=7, channels=2, channel=1, view="eval", batches=3, seed=11),
]


@pytest.mark.parametrize("settings", CASES, ids=lambda s: f"{s.view}-N{s.n}-c{s.channel}")
def test_printed_table_equals_autograd(settings):
    printed = parse_table(format_table(build(settings), settings.channel))
    expected = autograd_nodes(settings)
    assert sorted(printed) == sorted(expected)
    for name, (value, grad) in expected.items():
        np.testing.assert_allclose(printed[name][0], value[:, settings.channel],
                                   rtol=PRINTED_RTOL, atol=PRINTED_ATOL, err_msg=f"{name}")
        np.testing.assert_allclose(printed[name][1], grad[:, settings.channel],
                                   rtol=PRINTED_RTOL, atol=PRINTED_ATOL, err_msg=f"dL/d{name}")


@pytest.mark.parametrize("settings", CASES, ids=lambda s: f"{s.view}-N{s.n}-c{s.channel}")
def test_every_value_and_gradient_equals_autograd_in_full_precision(settings):
    result = build(settings)
    for name, (value, grad) in autograd_nodes(settings).items():
        np.testing.assert_allclose(result.values[name], value, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(result.grads[name], grad, rtol=1e-12, atol=1e-12)


def test_gradients_of_two_paths_add_up():
    result = build(Settings())
    for name, consumers in (("x", {"xmu", "mu"}), ("xmu", {"x_hat", "sq"})):
        assert set(result.paths[name]) == consumers
        np.testing.assert_allclose(sum(result.paths[name].values()), result.grads[name])


def test_bias_cancels_at_xmu_and_gets_no_gradient():
    with_bias = build(Settings(view="bias", bias=4.0))
    without = build(Settings())
    np.testing.assert_allclose(with_bias.values["mu"], without.values["mu"] + 4.0)
    np.testing.assert_allclose(with_bias.values["xmu"], without.values["xmu"], atol=1e-12)
    np.testing.assert_allclose(with_bias.grads["b"], 0.0, atol=1e-12)
    np.testing.assert_allclose(with_bias.grads["Wu"], without.grads["x"], atol=1e-12)


def test_eval_view_uses_algorithm_2s_population_statistics():
    settings = Settings(view="eval", batches=3)
    result = build(settings)
    rng = np.random.default_rng(settings.seed)
    x = graph._batch(rng, settings)
    rng.normal(size=x.shape)                                   # the target
    batches = [x, graph._batch(rng, settings), graph._batch(rng, settings)]
    m = settings.n
    np.testing.assert_allclose(result.inputs["running_mean"][0],
                               np.mean([b.mean(0) for b in batches], axis=0))
    np.testing.assert_allclose(result.inputs["running_var"][0],
                               np.mean([b.var(0) for b in batches], axis=0) * m / (m - 1))
    np.testing.assert_allclose(result.grads["x"], result.values["scale"] * result.grads["y"])


def test_a_wrong_stage_backward_is_caught_before_drawing(tmp_path, monkeypatch, capsys):
    def broken_graph(eps=1e-5):
        good = stages.train_graph(eps)
        nodes = tuple(dataclasses.replace(n, backward=lambda g, out, xmu: (g * xmu,))
                      if n.name == "sq" else n for n in good.nodes)      # d(xmu^2) is 2 xmu
        return dataclasses.replace(good, nodes=nodes)

    with pytest.raises(checks.GraphCheckError, match="dL/dxmu"):
        checks.evaluate(broken_graph(), build(Settings()).inputs, build(Settings()).target)
    monkeypatch.setitem(graph.VIEWS, "train", broken_graph)
    assert cli.main(["graph", "--out", str(tmp_path)]) == 1
    assert "nothing drawn" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# The command and its files


@pytest.mark.parametrize("flags, view", [([], "train"), (["--bias"], "bias"),
                                         (["--eval"], "eval")])
@pytest.mark.slow
def test_command_prints_the_table_and_writes_png_and_svg(tmp_path, capsys, flags, view):
    assert cli.main(["graph", "--out", str(tmp_path), *flags]) == 0
    out = capsys.readouterr().out
    assert "stage  node" in out and "checked before drawing:" in out
    assert "torch autograd" in out
    if view != "eval":
        assert "closed form (reference.backward_closed_form) gives the same dx" in out
    png, svg = tmp_path / f"{view}.png", tmp_path / f"{view}.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert b"<svg" in svg.read_bytes()[:1000] and svg.stat().st_size > 10_000


def test_command_options_reach_the_input(tmp_path, capsys):
    assert cli.main(["graph", "--out", str(tmp_path), "--x", "1,2,3,4,5", "--channel", "2",
                     "--gamma", "3", "--beta", "-1", "--eps", "0.01"]) == 0
    out = capsys.readouterr().out
    rows = parse_table(out[out.index("stage  node"):out.index("\n\nchecked")])
    assert rows["x"][0] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert rows["mu"][0] == [3.0] and rows["var"][0] == [2.0]
    assert rows["gamma"][0] == [3.0] and rows["beta"][0] == [-1.0]
    assert rows["var_eps"][0] == [2.01]


@pytest.mark.parametrize("argv, message", [
    (["--x", "1,2,3", "--n", "4"], "--x has 3 values but the batch size is 4"),
    (["--n", "1"], "at least 2 samples"),
    (["--channel", "3"], "the channel shown must lie in [0, 2]"),
    (["--eps", "0"], "eps must be positive"),
    (["--eval", "--batches", "0"], "at least 1 training batch"),
])
def test_bad_settings_say_what_was_expected(tmp_path, capsys, argv, message):
    assert cli.main(["graph", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_x_values_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli.main(["graph", "--x", "1,two,3"])
    assert "expected comma-separated numbers" in capsys.readouterr().err


def test_graph_is_listed_in_the_usage(capsys):
    assert cli.main(["--help"]) == 0
    assert "graph" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Readable pictures: nothing overlaps


def _overlap(a, b, gap=0.0) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _segment_hits_box(start, end, box, samples=200) -> bool:
    x0, y0, x1, y1 = box
    for t in np.linspace(0.02, 0.98, samples):
        x, y = start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1])
        if x0 < x < x1 and y0 < y < y1:
            return True
    return False


@pytest.mark.parametrize("settings", [Settings(), Settings(view="bias"), Settings(view="eval"),
                                      Settings(n=9, channels=2, channel=1)],
                         ids=lambda s: f"{s.view}-N{s.n}")
def test_picture_has_no_overlapping_text_or_boxes(tmp_path, settings):
    result = build(settings)
    drawing = draw(result, settings.channel, [tmp_path / "picture.png"])
    boxes = {name: box.extent for name, box in drawing.boxes.items()}
    for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2):
        assert not _overlap(box_a, box_b, gap=0.1), f"boxes {a} and {b} overlap"
    for i, j in itertools.combinations(range(len(drawing.texts)), 2):
        assert not _overlap(drawing.texts[i], drawing.texts[j]), \
            f"text lines {i} and {j} overlap: {drawing.texts[i]} {drawing.texts[j]}"
    width, height = drawing.size
    for extent in drawing.texts:
        assert 0 <= extent[0] and extent[2] <= width and 0 <= extent[1] and extent[3] <= height
    for source, target, start, end, rad in drawing.edges:
        if rad == 0:
            for name, box in boxes.items():
                if name not in (source, target):
                    assert not _segment_hits_box(start, end, box), \
                        f"edge {source} -> {target} crosses box {name}"
