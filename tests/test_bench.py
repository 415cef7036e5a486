"""`batchnorm bench` end to end on one tiny shape: table, JSON / CSV, the correctness gate."""

import csv
import json

import pytest
import torch

from batchnorm import bench
from batchnorm.cli import main


def test_bench_tiny_run_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = main(["bench", "--shapes", "4x3x5x5", "--providers", "ours,torch", "--threads", "1",
                   "--repeat", "2", "--rounds", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "vs torch" in printed and "x roofline" in printed and "THP_MEM_ALLOC_ENABLE" in printed
    data = json.loads(out.read_text())
    rows = data["rows"]
    # 2 layouts x 4 modes; the fused-ReLU mode also times ours unfused
    assert len(rows) == 8
    assert {r["mode"] for r in rows} == set(bench.MODES)
    for row in rows:
        assert row["ours_correct"] and row["torch_correct"]
        assert row["ours_ms"] > 0 and row["speedup_vs_torch"] > 0 and row["roofline_ms"] > 0
        # the copy of the same input, timed in the same rounds, sets the roofline
        assert row["copy_ms"] > 0 and row["ours_vs_copy"] == row["ours_ms"] / row["copy_ms"]
        assert row["attempts"] >= 1
    relu = [r for r in rows if r["mode"] == "relu-fwd-bwd"]
    assert all("speedup_vs_unfused" in r for r in relu)
    assert data["machine"]["THP_MEM_ALLOC_ENABLE"] in ("unset", "0", "1")


def test_bench_csv(tmp_path):
    out = tmp_path / "bench.csv"
    status = main(["bench", "--shapes", "6x4", "--modes", "eval-fwd", "--providers", "ours",
                   "--threads", "1", "--repeat", "1", "--rounds", "1", "--out", str(out)])
    assert status == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and rows[0]["shape"] == "6x4" and rows[0]["mode"] == "eval-fwd"


def test_bench_flags_a_wrong_kernel(monkeypatch, capsys):
    """The correctness gate: a provider whose output differs is reported WRONG, exit status 1."""
    import batchnorm.functional as functional

    real = functional.batch_norm

    def off_by_a_bit(*args, **kwargs):
        return real(*args, **kwargs) * 1.01

    monkeypatch.setattr(functional, "batch_norm", off_by_a_bit)
    status = main(["bench", "--shapes", "4x3x5x5", "--layouts", "contiguous", "--modes",
                   "train-fwd", "--providers", "ours,torch", "--threads", "1", "--repeat", "1",
                   "--rounds", "1"])
    assert status == 1 and "WRONG" in capsys.readouterr().out


def test_bench_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="shapes"):
        main(["bench", "--shapes", "4xfoo"])
    with pytest.raises(SystemExit, match="providers"):
        main(["bench", "--providers", "numpy", "--shapes", "4x3"])
    assert torch.get_num_threads() >= 1


def test_bench_residual_mode_and_resnet_totals(tmp_path):
    """add-relu-fwd-bwd on the CPU, and the ResNet-50 totals for a shape of its table."""
    out = tmp_path / "bench.json"
    status = main(["bench", "--shapes", "2x2048x7x7", "--layouts", "contiguous", "--modes",
                   "eval-fwd,add-relu-fwd-bwd", "--providers", "ours,torch", "--threads", "1",
                   "--repeat", "1", "--rounds", "1", "--out", str(out)])
    assert status == 0
    data = json.loads(out.read_text())
    residual = [r for r in data["rows"] if r["mode"] == "add-relu-fwd-bwd"]
    assert residual and residual[0]["ours_correct"] and residual[0]["ours-unfused_correct"]
    assert all(r["layers"] == bench.RESNET50_BN[(2048, 7, 7)] for r in data["rows"])
    (total, _) = sorted(data["totals"], key=lambda t: t["mode"])
    assert total["layers"] == 4 and total["ms"]["ours"] == 4 * residual[0]["ours_ms"]


def test_bench_verification_compares_a_prefix_never_more():
    from batchnorm.bench import cases

    mode = cases.MODE_TABLE["add-relu-fwd-bwd"]
    inputs = cases.make_inputs((4, 3, 5), "contiguous", torch.float32, torch.device("cpu"), True)
    expected = cases.reference(mode, inputs)
    got = cases.PROVIDERS["ours"].case(mode, inputs)()
    assert len(got) == len(expected) == 5  # y, d input, d weight, d bias, d residual
    assert cases.verify(got, expected, mode, torch.float32)
    assert cases.verify(got[:4], expected, mode, torch.float32)
    assert not cases.verify(got + got[:1], expected, mode, torch.float32)
    assert not cases.verify((got[0] * 1.01,), expected, mode, torch.float32)


def test_bench_device_arguments():
    with pytest.raises(SystemExit, match="--self-check is the dry run of the cuda path"):
        main(["bench", "--self-check"])
    with pytest.raises(SystemExit, match="providers on cpu"):
        main(["bench", "--providers", "ours,ours-kernels", "--shapes", "4x3"])
    with pytest.raises(SystemExit, match="modes"):
        main(["bench", "--modes", "train_fwd", "--shapes", "4x3"])  # one spelling: train-fwd
    with pytest.raises(SystemExit, match="dtypes"):
        main(["bench", "--device", "cuda", "--dtypes", "float8", "--quick"])
    with pytest.raises(SystemExit, match="CPU only"):
        main(["bench", "--device", "cuda", "--e2e"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without CUDA")
def test_bench_cuda_skips_without_cuda(capsys):
    assert main(["bench", "--device", "cuda", "--quick"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_bench_e2e_step_is_checked_and_timed():
    from batchnorm.bench import e2e

    row = e2e._model_row("small-cnn", e2e.small_cnn, (4, 3, 16, 16), "channels_last",
                         compile=False, rounds=1, repeat=1)
    assert row["correct"] and row["ours_ms"] > 0 and row["no_bn_ms"] > 0
    assert 0 < row["speedup_vs_torch"]


@pytest.mark.parametrize("spreads,attempts,noisy", [([0.5, 0.05], 2, False),
                                                    ([0.5, 0.3, 0.4], 3, True),
                                                    ([0.01], 1, False)])
def test_bench_reruns_noisy_rows(monkeypatch, spreads, attempts, noisy):
    """A row whose spread makes its ratios unreliable is measured again, at most NOISY_RERUNS
    more times; the calmest attempt is kept, and one still noisy is marked so."""
    from batchnorm.bench import report, timing

    assert report.NOISY_RERUNS == 2
    calls = []

    def fake_interleaved(fns, device_type, repeat, rounds):
        assert report.COPY in fns  # the copy is timed with the providers
        spread = spreads[len(calls)]
        calls.append(spread)
        ms = {name: 1.0 + len(calls) for name in fns}
        return ms, {name: spread for name in fns}

    monkeypatch.setattr(timing, "interleaved_ms", fake_interleaved)
    case = {"device": "cpu", "shape": "4x3x5x5", "layout": "contiguous", "dtype": "float32",
            "mode": "eval-fwd", "threads": 1, "layers": 0, "bytes": 1200}
    settings = {"providers": ["ours", "torch"], "repeat": 1, "rounds": 1}
    r = bench._measure(case, (4, 3, 5, 5), torch.float32, torch.device("cpu"), settings)
    assert len(calls) == r["attempts"] == attempts
    assert r["noisy"] is noisy and r["spread"] == min(calls)
    assert r["copy_ms"] == r["ours_ms"]
