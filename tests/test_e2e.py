"""bench/e2e.py's models: each converted model's training step matches torch.nn's."""

import pytest
import torch

from batchnorm.bench import e2e


@pytest.mark.parametrize("name", ["resnet-64", "levit-like", "mlp-bn"])
def test_small_models_step_like_torch_nn(name):
    factory, shape = e2e.E2E_MODELS[name]
    small = (4, *shape[1:])
    row = e2e._model_row(name, factory, small, "contiguous", False, rounds=1, repeat=1)
    assert row["correct"], row
    assert row["torch_ms"] > 0 and row["ours_ms"] > 0 and row["no_bn_ms"] > 0


def test_token_models_have_batchnorm1d_on_tokens():
    bns = [m for m in e2e.levit_like().modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 8  # qkv, proj and two MLP projections in each of two blocks
