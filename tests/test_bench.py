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
