"""batchnorm paper: data loading, both engines (S seeds side by side), the summary and the JSON,
the figure, the CLI's errors."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from batchnorm.paper import data as paper_data
from batchnorm.paper.experiment import (
    BatchOrder,
    Settings,
    batch_stream,
    format_summary,
    initial_weights,
    run_experiment,
    summarize,
    summarize_seeds,
)

# float64 end to end (NumPy engine vs torch autograd, both float64): only rounding differs.
GRADIENT_TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-12)}
# S seeds side by side against each seed alone, per engine: the same arithmetic on differently
# batched matmuls, so only rounding may differ (float32 torch, float64 numpy); accuracies are
# counts over 1,000 test images and must agree exactly at these tolerances.
SIDE_BY_SIDE_TOLERANCE = {"torch": dict(rtol=1e-4, atol=1e-4), "numpy": dict(rtol=1e-9, atol=1e-9)}


@pytest.fixture(scope="module")
def embedded():
    return paper_data.load_embedded_mnist()


# ----------------------------------------------------------------------------------------------
# Data


def test_embedded_sample_split(embedded):
    assert embedded.x_train.shape == (4000, 784) and embedded.x_test.shape == (1000, 784)
    assert embedded.x_train.dtype == np.float32
    assert 0.0 <= embedded.x_train.min() and embedded.x_train.max() <= 1.0
    assert embedded.x_train.max() == 1.0          # scaled from 0..255, not left raw
    assert np.bincount(embedded.y_train).tolist() == [400] * 10     # stratified
    assert np.bincount(embedded.y_test).tolist() == [100] * 10
    # the split is fixed: a second load gives the same test set
    again = paper_data.load_embedded_mnist()
    np.testing.assert_array_equal(again.x_test, embedded.x_test)
    # train and test are disjoint images (a few MNIST images are duplicates; allow none here
    # beyond what the raw sample has)
    train_rows = {row.tobytes() for row in embedded.x_train}
    assert sum(row.tobytes() in train_rows for row in embedded.x_test) <= 5


def _write_idx(path, array: np.ndarray, type_byte: int, gz: bool, truncate: int = 0) -> None:
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    raw = raw[:len(raw) - truncate]
    (gzip.open if gz else open)(path, "wb").write(raw)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_read_idx_roundtrip(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    path = tmp_path / ("images.idx" + (".gz" if gz else ""))
    _write_idx(path, images, 0x08, gz)
    np.testing.assert_array_equal(paper_data.read_idx(path), images)
    values = np.arange(6, dtype=np.int32).reshape(2, 3) - 3       # a big-endian type
    _write_idx(tmp_path / "ints.idx", values, 0x0C, gz=False)
    np.testing.assert_array_equal(paper_data.read_idx(tmp_path / "ints.idx"), values)


def _write_mnist_dir(directory, gz: bool, n_train=30, n_test=20):
    rng = np.random.default_rng(1)
    suffix = ".gz" if gz else ""
    sets = {"train": n_train, "t10k": n_test}
    for prefix, n in sets.items():
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x08, gz)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 0x08, gz)
    return rng


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_load_mnist_idx_directory(tmp_path, gz):
    _write_mnist_dir(tmp_path, gz)
    mnist = paper_data.load_mnist_idx(tmp_path)
    assert mnist.x_train.shape == (30, 784) and mnist.x_test.shape == (20, 784)
    assert mnist.y_test.tolist() == [i % 10 for i in range(20)]
    assert mnist.x_train.dtype == np.float32 and mnist.x_train.max() <= 1.0


def test_missing_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        paper_data.load_mnist_idx(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        paper_data.load_mnist_idx(tmp_path)              # an empty directory
    with pytest.raises(FileNotFoundError, match="not found"):
        paper_data.read_mnist_csv(tmp_path / "missing.csv.gz")


def test_corrupt_data_errors(tmp_path):
    (tmp_path / "junk").write_bytes(b"this is not an idx file")
    with pytest.raises(paper_data.DataError, match="not an IDX file"):
        paper_data.read_idx(tmp_path / "junk")
    labels = np.arange(10, dtype=np.uint8)
    _write_idx(tmp_path / "short", labels, 0x08, gz=False, truncate=3)
    with pytest.raises(paper_data.DataError, match="bytes"):
        paper_data.read_idx(tmp_path / "short")
    # a directory whose label file holds digits beyond 9
    _write_mnist_dir(tmp_path, gz=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(20, 12, np.uint8), 0x08, True)
    with pytest.raises(paper_data.DataError, match="labels 0..9"):
        paper_data.load_mnist_idx(tmp_path)
    # image and label counts that disagree
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(19, np.uint8), 0x08, True)
    with pytest.raises(paper_data.DataError, match="20 images but"):
        paper_data.load_mnist_idx(tmp_path)
    csv = tmp_path / "bad.csv"
    csv.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(paper_data.DataError, match="785 columns"):
        paper_data.read_mnist_csv(csv)


def test_cli_reports_bad_data_path(tmp_path, capsys):
    from batchnorm.cli import main
    assert main(["paper", "--mnist", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 1
    assert "train-images-idx3-ubyte" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The numpy engine's hand-written backward against torch autograd


def _autograd_gradients(init, settings, x, y, batch_norm):
    """dL/dparameter of the same network in torch float64 autograd, torch's own batch_norm."""
    weights = [torch.tensor(w, requires_grad=True) for w in init.weights]
    hidden = len(weights) - 1
    params = {f"weight{i}": w for i, w in enumerate(weights)}
    h = torch.from_numpy(x).double()
    for i in range(hidden):
        z = h @ weights[i]
        if batch_norm:
            gamma = torch.ones(z.shape[1], dtype=torch.float64, requires_grad=True)
            beta = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
            params[f"gamma{i}"], params[f"beta{i}"] = gamma, beta
            z = torch.nn.functional.batch_norm(z, None, None, gamma, beta, training=True,
                                               eps=settings.eps)
        else:
            bias = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
            params[f"bias{i}"] = bias
            z = z + bias
        h = torch.sigmoid(z)
    out_bias = torch.zeros(weights[-1].shape[1], dtype=torch.float64, requires_grad=True)
    params[f"bias{hidden}"] = out_bias
    loss = torch.nn.functional.cross_entropy(h @ weights[-1] + out_bias, torch.from_numpy(y))
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.item(), {name: g.numpy() for name, g in zip(params, grads, strict=True)}


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn"])
def test_numpy_engine_gradients_match_autograd(embedded, batch_norm):
    """Two seeds side by side (stacked weights, BN on 2 * 100 channels); each seed's gradients
    are those of its own network in torch autograd."""
    from batchnorm.paper.numpy_engine import NumpyNet
    # std 0.3 rather than 0.01: larger activations exercise every term of the backward pass
    settings = Settings(init_std=0.3, seed=3, seeds=2)
    inits = [initial_weights(settings, seed=seed) for seed in settings.seed_list]
    batches = [next(batch_stream(len(embedded.y_train), settings.batch_size, seed=seed))
               for seed in settings.seed_list]
    x = np.stack([embedded.x_train[b] for b in batches]).astype(np.float64)   # (2, 60, 784)
    onehot = np.eye(10)[np.stack([embedded.y_train[b] for b in batches])]
    net = NumpyNet(inits, batch_norm=batch_norm, settings=settings)
    loss, grads = net.gradients(x, onehot, update_running=False)
    tolerance = GRADIENT_TOLERANCE[torch.float64]
    for s, (init, batch) in enumerate(zip(inits, batches, strict=True)):
        expected_loss, expected = _autograd_gradients(
            init, settings, x[s], embedded.y_train[batch], batch_norm)
        assert loss[s] == pytest.approx(expected_loss, rel=1e-12)
        assert sorted(grads) == sorted(expected)
        for name in expected:
            if name.startswith(("weight", "bias")):      # (S, in, out), (S, 1, out)
                ours = grads[name][s].reshape(expected[name].shape)
            else:                                         # gamma, beta: seed s's channels
                ours = grads[name][s * 100:(s + 1) * 100]
            np.testing.assert_allclose(ours, expected[name], **tolerance, err_msg=name)
            assert np.abs(expected[name]).max() > 1e-8, f"{name}: a gradient of zero tests nothing"


def test_batch_order_is_batch_stream():
    """The batches taken k at a time are the single run's stream, batch for batch."""
    stream, order = batch_stream(130, 60, seed=5), BatchOrder(130, 60, seed=5)
    taken = np.concatenate([order.take(k) for k in (1, 3, 250, 2)])
    expected = np.stack([next(stream) for _ in range(len(taken))])
    np.testing.assert_array_equal(taken, expected)


def test_bn_calls_are_the_module(embedded):
    """The torch engine's BN forward and backward (the layer's own ops, no autograd) equal
    batchnorm.BatchNorm1d called as a module with autograd, running statistics included."""
    from batchnorm.nn import BatchNorm1d
    from batchnorm.paper.torch_engine import bn_state, bn_train_backward, bn_train_forward
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(60, 300, generator=generator) * 3 + 1
    du = torch.randn(60, 300, generator=generator)
    ours, module = BatchNorm1d(300), BatchNorm1d(300)
    with torch.no_grad():
        for layer in (ours, module):
            layer.weight.copy_(torch.rand(300, generator=torch.Generator().manual_seed(1)) + 0.5)
            layer.bias.copy_(torch.randn(300, generator=torch.Generator().manual_seed(2)))
    u, mean, invstd = bn_train_forward(bn_state(ours), z)
    dz, d_gamma, d_beta = bn_train_backward(bn_state(ours), du, z, mean, invstd)
    z_leaf = z.clone().requires_grad_()
    expected = module(z_leaf)
    expected_grads = torch.autograd.grad(expected, (z_leaf, module.weight, module.bias), du)
    torch.testing.assert_close(u, expected)
    for got, want in zip((dz, d_gamma, d_beta), expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(ours.running_mean, module.running_mean)
    torch.testing.assert_close(ours.running_var, module.running_var)
    assert int(ours.num_batches_tracked) == int(module.num_batches_tracked) == 1


def test_torch_engine_step_matches_numpy_engine(embedded):
    """The torch engine's hand-written backward (float32) against the NumPy engine's (float64,
    tested against autograd above): every parameter's change over 3 SGD steps of 2 seeds."""
    from batchnorm.paper.numpy_engine import NumpyEngine
    from batchnorm.paper.torch_engine import TorchEngine
    settings = Settings(init_std=0.3, seeds=2)     # large weights: every term matters
    inits = [initial_weights(settings, seed=seed) for seed in settings.seed_list]
    ours, reference = TorchEngine(embedded, inits, settings), NumpyEngine(embedded, inits, settings)

    def state(engine):
        if isinstance(engine, TorchEngine):
            arrays = [engine.w_first, *engine.w["plain"], *engine.w["bn"], engine.small,
                      *engine.norm_parameters,
                      *(b for norm in engine.norms for b in (norm.running_mean, norm.running_var))]
            return [a.double().numpy().copy() for a in arrays]
        small = [*engine.plain.biases[:-1], engine.plain.biases[-1], engine.bn.biases[-1]]
        # the torch engine's small vector: b_first = [b_plain0 | 0], then the same order
        first_bias = np.concatenate([small[0], np.zeros_like(small[0])], axis=2)
        arrays = [engine.first, *engine.plain.weights[1:], *engine.bn.weights[1:],
                  np.concatenate([a.ravel() for a in [first_bias, *small[1:]]]),
                  *(t for i in range(3) for t in (engine.bn.gamma[i], engine.bn.beta[i])),
                  *(b for i in range(3) for b in (engine.bn.running_mean[i],
                                                  engine.bn.running_var[i]))]
        return [a.copy() for a in arrays]      # the engine updates its arrays in place

    before = state(reference)
    for got, want in zip(state(ours), before, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)   # the same start
    orders = [BatchOrder(len(embedded.y_train), 60, seed) for seed in settings.seed_list]
    batches = np.stack([order.take(3) for order in orders], axis=1)
    for batch in batches:
        ours.step(batch)
        reference.step(batch)
    for k, (got, want, start) in enumerate(zip(state(ours), state(reference), before,
                                               strict=True)):
        change = want - start
        assert np.abs(change).max() > 1e-6, f"array {k} did not move: the check tests nothing"
        np.testing.assert_allclose(got - start, change, atol=2e-4 * np.abs(change).max(),
                                   err_msg=f"array {k}")


# today's single-seed runs (the code before seeds ran side by side), seeds 0-2, 500 steps,
# evaluated every 100: BN test accuracies, and the last percentiles (p15, p50, p85) of the
# tracked input without and with BN. Both engines gave these (to 4e-6).
SINGLE_RUNS = {
    0: ([0.1, 0.841, 0.875, 0.852, 0.866, 0.867], [-1.9893, -1.9818, -1.9758],
        [-2.0902, -0.6388, 0.8981]),
    1: ([0.1, 0.861, 0.825, 0.857, 0.871, 0.87], [-1.9255, -1.9211, -1.9169],
        [-1.5171, 0.094, 1.4915]),
    2: ([0.1, 0.801, 0.866, 0.893, 0.896, 0.874], [-1.9378, -1.9335, -1.9296],
        [-1.6259, -0.5547, 1.4808]),
}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "numpy"])
def test_seeds_side_by_side_equal_each_alone(embedded, engine):
    """S seeds trained at once give each seed's numbers trained alone (and today's single runs):
    BN on the seeds' channels side by side is S separate BN layers, and each seed keeps its own
    initial weights and batch order."""
    together = run_experiment(embedded, Settings(steps=500, eval_every=100, engine=engine,
                                                 seeds=3), progress=False)
    assert together["seeds"] == [0, 1, 2]
    tolerance = SIDE_BY_SIDE_TOLERANCE[engine]
    for run in together["runs"]:
        alone = run_experiment(embedded, Settings(steps=500, eval_every=100, engine=engine,
                                                  seed=run["seed"], seeds=1), progress=False)
        assert alone["seeds"] == [run["seed"]]
        expected = alone["runs"][0]["history"]
        assert run["history"]["steps"] == expected["steps"]
        for key in ("accuracy_plain", "accuracy_bn", "percentiles_plain", "percentiles_bn"):
            np.testing.assert_allclose(run["history"][key], expected[key], **tolerance,
                                       err_msg=f"seed {run['seed']}: {key}")
        assert run["summary"] == alone["runs"][0]["summary"] or engine == "torch"
        accuracy_bn, p_plain, p_bn = SINGLE_RUNS[run["seed"]]
        np.testing.assert_allclose(run["history"]["accuracy_bn"], accuracy_bn, atol=1e-12)
        np.testing.assert_allclose(run["history"]["percentiles_plain"][-1], p_plain, atol=1e-4)
        np.testing.assert_allclose(run["history"]["percentiles_bn"][-1], p_bn, atol=1e-4)
    # the seeds differ from each other: the comparison above is not of one run with itself
    assert together["runs"][0]["history"]["accuracy_bn"] != \
        together["runs"][2]["history"]["accuracy_bn"]


# ----------------------------------------------------------------------------------------------
# Short runs: BN ahead, both engines agree, the JSON


SHORT = 750   # steps; the BN network passes 0.85 within ~250 while the plain one is near chance


@pytest.fixture(scope="module")
def short_torch_run(embedded):
    return run_experiment(embedded, Settings(steps=SHORT, eval_every=250), progress=False)


def test_short_run_bn_ahead(short_torch_run):
    for run in short_torch_run["runs"]:
        summary, history = run["summary"], run["history"]
        assert summary["final_accuracy_bn"] > summary["final_accuracy_plain"] + 0.2
        assert history["accuracy_bn"][-1] > 0.85
        assert summary["steps_to_0.85_bn"] is not None
        # (c) with BN the tracked input stays centred; its spread stays of order one
        p15, p50, p85 = history["percentiles_bn"][-1]
        assert p15 < p50 < p85


def test_json_fields(short_torch_run, tmp_path):
    path = tmp_path / "figure1.json"
    path.write_text(json.dumps(short_torch_run))
    result = json.loads(path.read_text())
    assert set(result) >= {"settings", "seeds", "data", "train_size", "test_size",
                           "wall_seconds", "step_seconds", "runs", "summary"}
    settings = result["settings"]
    assert settings["steps"] == SHORT and settings["batch_size"] == 60
    assert settings["hidden"] == [100, 100, 100] and settings["lr"] == 0.5
    assert settings["seed"] == 0 and settings["seeds"] == 3 and result["seeds"] == [0, 1, 2]
    assert [run["seed"] for run in result["runs"]] == [0, 1, 2]
    for run in result["runs"]:      # every seed's numbers are kept
        history = run["history"]
        assert history["steps"] == list(range(0, SHORT + 1, 250))
        for key in ("accuracy_plain", "accuracy_bn", "percentiles_plain", "percentiles_bn"):
            assert len(history[key]) == len(history["steps"])
        assert all(len(p) == 3 for p in history["percentiles_bn"])
        summary = run["summary"]
        for net in ("plain", "bn"):
            for key in ("final_accuracy", "steps_to_0.80", "steps_to_0.85", "steps_to_0.90",
                        "median_drift", "spread_drift"):
                assert f"{key}_{net}" in summary
        # the summary is recomputable from the numbers
        assert summarize(history, settings["percentiles"]) == summary
    assert result["summary"] == summarize_seeds([run["summary"] for run in result["runs"]])
    final = [run["summary"]["final_accuracy_bn"] for run in result["runs"]]
    assert result["summary"]["final_accuracy_bn"]["mean"] == pytest.approx(np.mean(final))
    assert result["summary"]["final_accuracy_bn"]["min"] == min(final)


def test_numpy_engine_same_picture(embedded, short_torch_run):
    """The specification path gives the torch path's curves within float32-vs-64 noise."""
    result = run_experiment(embedded, Settings(steps=250, engine="numpy", seeds=2),
                            progress=False)
    for ours, theirs in zip(result["runs"], short_torch_run["runs"], strict=False):
        for net in ("plain", "bn"):
            accuracies = ours["history"][f"accuracy_{net}"]
            np.testing.assert_allclose(
                accuracies, theirs["history"][f"accuracy_{net}"][:len(accuracies)], atol=0.02)


PERCENTILES = (15.0, 50.0, 85.0)


def test_summary_thresholds_and_drift():
    steps = list(range(0, 10_001, 250))
    accuracy = [min(0.95, s / 5000) for s in steps]
    flat = [[-1.0, 0.0, 1.0]] * len(steps)
    moving = [[-1.0 - s / 1000, -s / 1000, 1.0 - s / 2000] for s in steps]
    history = {"steps": steps, "accuracy_plain": accuracy, "accuracy_bn": accuracy,
               "percentiles_plain": moving, "percentiles_bn": flat}
    summary = summarize(history, PERCENTILES)
    assert summary["steps_to_0.80_plain"] == 4000 and summary["steps_to_0.90_bn"] == 4500
    assert summary["final_accuracy_bn"] == pytest.approx(0.95)
    assert summary["final_evaluations"] == 10 and summary["drift_from_step"] == 5000
    assert summary["median_drift_bn"] == 0.0 and summary["spread_drift_bn"] == 0.0
    assert summary["median_drift_plain"] == pytest.approx(-5.0)        # -10 - (-5)
    assert summary["spread_drift_plain"] == pytest.approx(2.5)         # 12.5 - 10


@pytest.mark.parametrize("last_step, evaluations, drift", [
    (100, 1, False), (2000, 8, False), (2500, 10, False), (6000, 10, False),
    (6250, 10, True)])
def test_summary_of_short_runs(last_step, evaluations, drift):
    """The untrained step-0 evaluation never enters the final accuracy; drift is reported
    only when the end window lies wholly after the window at step 5,000."""
    steps = list(range(0, last_step + 1, 250)) if last_step >= 250 else [0, last_step]
    accuracy = [0.1] + [0.9] * (len(steps) - 1)          # step 0: chance
    spread = [[-s / 1000, 0.0, s / 1000] for s in steps]
    history = {"steps": steps, "accuracy_plain": accuracy, "accuracy_bn": accuracy,
               "percentiles_plain": spread, "percentiles_bn": spread}
    summary = summarize(history, PERCENTILES)
    assert summary["final_accuracy_bn"] == pytest.approx(0.9)       # not pulled down by 0.1
    assert summary["final_evaluations"] == evaluations
    assert (summary["drift_from_step"] is not None) == drift
    assert (summary["spread_drift_plain"] is not None) == drift
    if drift:   # end window 5,250..6,250 (mean 5,750), start window 4,000..5,000 (mean 4,500)
        assert summary["spread_drift_plain"] == pytest.approx(2 * (5.75 - 4.5))


def test_printed_summary_of_a_short_run(embedded):
    """`--steps 100`: one trained evaluation, said so; no drift rows, and why."""
    result = run_experiment(embedded, Settings(steps=100, seeds=2), progress=False)
    printed = format_summary(result)
    assert "last 1 evals" in printed and "seed 0" in printed and "mean" in printed
    assert "drift, step" not in printed and "needs at least 6250 steps" in printed
    assert "short run" in printed
    for run in result["runs"]:
        assert run["summary"]["final_accuracy_bn"] == run["history"]["accuracy_bn"][-1]


def test_figure_written(short_torch_run, tmp_path):
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib")
    from batchnorm.paper.plot import plot_figure1
    path = plot_figure1(short_torch_run, tmp_path / "figure1.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("seeds", [1, 3])
def test_figure_legends_hide_no_data(short_torch_run, seeds):
    """Every legend lies outside every panel, so no curve can be under it; panel (a) draws a
    mean line and a band per network, (b) and (c) three percentile lines per seed."""
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib")
    import matplotlib.pyplot as plt

    from batchnorm.paper.plot import draw_figure1
    result = dict(short_torch_run, runs=short_torch_run["runs"][:seeds])
    figure = draw_figure1(result)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    axes = figure.axes
    legends = [axis.get_legend() for axis in axes if axis.get_legend() is not None]
    assert len(legends) == 2
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for axis in axes:
            assert not box.overlaps(axis.get_window_extent(renderer)), axis.get_title()
    assert len(axes[0].lines) == 2 and len(axes[0].collections) == (2 if seeds > 1 else 0)
    assert len(axes[1].lines) == len(axes[2].lines) == 3 * seeds
    plt.close(figure)


def test_cli_end_to_end_on_idx_directory(tmp_path, capsys):
    """`batchnorm paper --mnist DIR`: reads the IDX files, trains, writes the JSON and the PNG."""
    from batchnorm.cli import main
    _write_mnist_dir(tmp_path, gz=True, n_train=90, n_test=40)
    out = tmp_path / "out"
    assert main(["paper", "--mnist", str(tmp_path), "--steps", "20", "--engine", "numpy",
                 "--seed", "4", "--seeds", "2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "final test accuracy" in printed and "steps to test accuracy 0.90" in printed
    assert "seed 4" in printed and "seed 5" in printed
    result = json.loads((out / "figure1.json").read_text())
    assert result["train_size"] == 90 and result["test_size"] == 40
    assert result["seeds"] == [4, 5]
    assert [run["history"]["steps"] for run in result["runs"]] == [[0, 20], [0, 20]]
    assert result["settings"]["engine"] == "numpy"
    if (out / "figure1.png").exists():      # written when matplotlib is installed
        assert (out / "figure1.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_single_seed_torch_with_bound(tmp_path, capsys):
    """`--seeds 1`: one seed, no mean column; the torch engine reports the matmul floor."""
    from batchnorm.cli import main
    out = tmp_path / "out"
    assert main(["paper", "--steps", "30", "--seeds", "1", "--seed", "2", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "seed 2" in printed and "mean of" not in printed.split("\n\n")[1]
    assert "the same matrix products alone" in printed
    result = json.loads((out / "figure1.json").read_text())
    assert result["seeds"] == [2] and len(result["runs"]) == 1
    assert result["engine_details"]["matmul_ms_per_step"] > 0


def test_bad_seeds_rejected(capsys):
    from batchnorm.cli import main
    assert main(["paper", "--seeds", "0", "--quiet"]) == 2
    assert "seeds must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("before", [False, True], ids=["off", "on"])
def test_torch_training_flushes_denormals_and_restores(before):
    """The torch engine trains with denormals flushed (the BN network's softmax underflows into
    them and slows the matmuls); the mode the caller had is restored after, whatever it was."""
    from batchnorm.paper.torch_engine import denormals_flushed
    tiny = torch.finfo(torch.float32).tiny
    torch.set_flush_denormal(before)
    try:
        with denormals_flushed():
            assert torch.tensor(tiny / 4).item() == 0.0
            assert (torch.tensor([tiny]) / 4).item() == 0.0
        assert (torch.tensor(tiny / 4).item() == 0.0) == before
    finally:
        torch.set_flush_denormal(False)
