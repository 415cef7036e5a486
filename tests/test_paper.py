"""batchnorm paper: data loading, both engines, the summary and the JSON, the CLI's errors."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from batchnorm.paper import data as paper_data
from batchnorm.paper.experiment import (
    Settings,
    batch_stream,
    initial_weights,
    run_experiment,
    summarize,
)

# float64 end to end (NumPy engine vs torch autograd, both float64): only rounding differs.
GRADIENT_TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-12)}


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
    from batchnorm.paper.numpy_engine import NumpyNet
    # std 0.3 rather than 0.01: larger activations exercise every term of the backward pass
    settings = Settings(init_std=0.3, seed=3)
    init = initial_weights(settings)
    batch = next(batch_stream(len(embedded.y_train), settings.batch_size, seed=3))
    x, y = embedded.x_train[batch].astype(np.float64), embedded.y_train[batch]
    net = NumpyNet(init, batch_norm=batch_norm, settings=settings)
    loss, grads = net.gradients(x, y, update_running=False)
    expected_loss, expected = _autograd_gradients(init, settings, x, y, batch_norm)
    tolerance = GRADIENT_TOLERANCE[torch.float64]
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    assert sorted(grads) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(grads[name], expected[name], **tolerance, err_msg=name)
        assert np.abs(expected[name]).max() > 1e-8, f"{name}: a gradient of zero tests nothing"


# ----------------------------------------------------------------------------------------------
# Short runs: BN ahead, both engines agree, the JSON


SHORT = 750   # steps; the BN network passes 0.85 within ~250 while the plain one is near chance


@pytest.fixture(scope="module")
def short_torch_run(embedded):
    return run_experiment(embedded, Settings(steps=SHORT, eval_every=250), progress=False)


def test_short_run_bn_ahead(short_torch_run):
    summary = short_torch_run["summary"]
    history = short_torch_run["history"]
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
    assert set(result) >= {"settings", "data", "train_size", "test_size", "wall_seconds",
                           "history", "summary"}
    settings = result["settings"]
    assert settings["steps"] == SHORT and settings["batch_size"] == 60
    assert settings["hidden"] == [100, 100, 100] and settings["lr"] == 0.5
    history = result["history"]
    assert history["steps"] == list(range(0, SHORT + 1, 250))
    for key in ("accuracy_plain", "accuracy_bn", "percentiles_plain", "percentiles_bn"):
        assert len(history[key]) == len(history["steps"])
    assert all(len(p) == 3 for p in history["percentiles_bn"])
    summary = result["summary"]
    for net in ("plain", "bn"):
        for key in ("final_accuracy", "steps_to_0.80", "steps_to_0.85", "steps_to_0.90",
                    "median_drift", "spread_drift"):
            assert f"{key}_{net}" in summary
    assert summarize(result) == summary      # the summary is recomputable from the numbers


def test_numpy_engine_same_picture(embedded, short_torch_run):
    """The specification path gives the torch path's curves within float32-vs-64 noise."""
    steps = 250
    result = run_experiment(embedded, Settings(steps=steps, engine="numpy"), progress=False)
    torch_history = short_torch_run["history"]
    for net in ("plain", "bn"):
        ours = result["history"][f"accuracy_{net}"]
        theirs = torch_history[f"accuracy_{net}"][:len(ours)]
        np.testing.assert_allclose(ours, theirs, atol=0.02)


def test_summary_thresholds_and_drift():
    steps = list(range(0, 10_001, 250))
    accuracy = [min(0.95, s / 5000) for s in steps]
    flat = [[-1.0, 0.0, 1.0]] * len(steps)
    moving = [[-1.0 - s / 1000, -s / 1000, 1.0 - s / 2000] for s in steps]
    result = {"settings": {"percentiles": [15.0, 50.0, 85.0]},
              "history": {"steps": steps, "accuracy_plain": accuracy, "accuracy_bn": accuracy,
                          "percentiles_plain": moving, "percentiles_bn": flat}}
    summary = summarize(result)
    assert summary["steps_to_0.80_plain"] == 4000 and summary["steps_to_0.90_bn"] == 4500
    assert summary["final_accuracy_bn"] == pytest.approx(0.95)
    assert summary["median_drift_bn"] == 0.0 and summary["spread_drift_bn"] == 0.0
    assert summary["median_drift_plain"] == pytest.approx(-5.0)        # -10 - (-5)
    assert summary["spread_drift_plain"] == pytest.approx(2.5)         # 12.5 - 10


def test_figure_written(short_torch_run, tmp_path):
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib")
    from batchnorm.paper.plot import plot_figure1
    path = plot_figure1(short_torch_run, tmp_path / "figure1.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_end_to_end_on_idx_directory(tmp_path, capsys):
    """`batchnorm paper --mnist DIR`: reads the IDX files, trains, writes the JSON and the PNG."""
    from batchnorm.cli import main
    _write_mnist_dir(tmp_path, gz=True, n_train=90, n_test=40)
    out = tmp_path / "out"
    assert main(["paper", "--mnist", str(tmp_path), "--steps", "20", "--engine", "numpy",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "final test accuracy" in printed and "steps to test accuracy 0.90" in printed
    result = json.loads((out / "figure1.json").read_text())
    assert result["train_size"] == 90 and result["test_size"] == 40
    assert result["history"]["steps"] == [0, 20]
    assert result["settings"]["engine"] == "numpy"
    if (out / "figure1.png").exists():      # written when matplotlib is installed
        assert (out / "figure1.png").read_bytes()[:4] == b"\x89PNG"
