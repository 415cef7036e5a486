"""recalibrate ("precise BN") against an independent float64 computation; diagnose's flags."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.tools import diagnose, recalibrate
from tests.zoo import ZOO

TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-10)}
TOL = TOLERANCES[torch.float64]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
                         nn.Conv2d(4, 5, 3), batchnorm.BatchNorm2d(5, momentum=None),
                         nn.Flatten(), nn.Linear(5 * 4 * 4, 6),
                         nn.BatchNorm1d(6, track_running_stats=False)).double()


def _batches(sizes=(3, 5, 2), shift=0.0):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64) * 2 + 1 + shift
            for n in sizes]


def _reference_stats(model, batches):
    """Pooled mean and unbiased variance of each BN's input, recomputed by hand: the network in
    training mode, each batch normalized upstream by its own statistics."""
    inputs1, inputs2 = [], []
    for x in batches:
        h1 = model[0](x)
        inputs1.append(h1)
        h = F.relu(F.batch_norm(h1, None, None, model[1].weight, model[1].bias, True))
        inputs2.append(model[3](h))
    out = []
    for hs in (inputs1, inputs2):
        flat = torch.cat([h.transpose(0, 1).reshape(h.shape[1], -1) for h in hs], 1)
        out.append((flat.mean(1), flat.var(1, unbiased=True)))
    return out


def test_recalibrate_is_the_pooled_mean_and_unbiased_variance():
    model = _net()
    batches = _batches()
    params = {k: v.clone() for k, v in model.named_parameters()}
    tracked = [model[1].num_batches_tracked.clone(), model[4].num_batches_tracked.clone()]
    model.eval()
    with torch.no_grad():
        expected = _reference_stats(model, batches)
    report = recalibrate(model, batches)
    assert report.layers == ["1", "4"] and report.batches == 3
    assert report.samples["1"] == 10 * 6 * 6
    assert [name for name, _ in report.skipped] == ["7"]
    for bn, (mean, var) in zip((model[1], model[4]), expected, strict=True):
        torch.testing.assert_close(bn.running_mean, mean, **TOL)
        torch.testing.assert_close(bn.running_var, var, **TOL)
    assert model[1].momentum == 0.3 and model[4].momentum is None
    assert not model.training and not any(m.training for m in model.modules())
    assert torch.equal(model[1].num_batches_tracked, tracked[0])
    assert torch.equal(model[4].num_batches_tracked, tracked[1])
    assert all(torch.equal(p, params[k]) for k, p in model.named_parameters())


def test_recalibrate_does_not_depend_on_how_the_first_layer_batches_are_split():
    # the first BN's input does not depend on batching: one batch of 10 or three give the same
    model_a, model_b = _net(), _net()
    batches = _batches()
    recalibrate(model_a, batches)
    recalibrate(model_b, [torch.cat(batches)])
    torch.testing.assert_close(model_a[1].running_var, model_b[1].running_var,
                               **TOL)
    torch.testing.assert_close(model_a[1].running_mean, model_b[1].running_mean,
                               **TOL)


def test_recalibrate_needs_batches():
    with pytest.raises(ValueError, match="no batches"):
        recalibrate(_net(), [])


def test_diagnose_flags_stale_statistics_and_clears_recalibrated_ones():
    model = _net()
    # never trained: running stats are the initial (0, 1) and num_batches_tracked is 0. The
    # statistics decide: layer 1's input happens to fit (0, 1) within the thresholds (mean
    # 0.45 sd off, variance x1.47), layer 4's does not, and the zero counter is named as why
    report = diagnose(model, _batches())
    assert [d.flagged for d in report.layers] == [False, True]
    assert report.layers[0].num_batches_tracked == 0 and report.layers[0].why == ""
    assert report.layers[1].why.startswith("never updated") and "variance" in report.layers[1].why
    assert report.layers[1].cause == "initial"
    assert "The first to run is 4:" in report.summary and "recalibrate" in report.summary
    assert [name for name, _ in report.not_checked] == ["7"]
    # recalibrated on one large batch, in eval mode each layer sees what it was calibrated on
    # (up to running_var being the unbiased variance): nothing is flagged, the counter still 0
    data = _batches(sizes=(64,))
    recalibrate(model, data)
    report = diagnose(model, data)
    assert not any(d.flagged for d in report.layers), report.table()
    assert report.layers[0].mean_shift < 1e-8 and "describe these batches" in report.summary
    # a shifted input distribution: the first layer is flagged and named first in the summary
    state = copy.deepcopy(model.state_dict())
    report = diagnose(model, _batches(sizes=(16,), shift=5.0))
    assert report.layers[0].flagged and "The first to run is 1:" in report.summary
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["resnet_basic", "densenet_concat", "inception_block",
                                  "sum_merge", "mlp"])
def test_recalibrate_then_diagnose_on_the_same_batches_is_healthy(name):
    # a model never trained (num_batches_tracked 0 everywhere) with stale running statistics
    torch.manual_seed(0)
    model, x = ZOO[name]()
    model = model.double()
    xs = x if isinstance(x, tuple) else (x,)
    g = torch.Generator().manual_seed(3)
    batches = [tuple(torch.randn(16, *t.shape[1:], generator=g, dtype=torch.float64) * 3 + 2
                     for t in xs) for _ in range(4)]
    before = diagnose(model, batches)
    assert any(d.flagged for d in before.layers) and "recalibrate" in before.summary
    recalibrate(model, batches)
    after = diagnose(model, batches)
    assert all(d.num_batches_tracked == 0 for d in after.layers)
    assert not any(d.flagged for d in after.layers), after.table()
    assert "describe these batches" in after.summary and "recalibrate" not in after.summary


def test_a_zero_counter_alone_does_not_flag_a_layer():
    # statistics that fit (set by hand, as weights converted from elsewhere come) with the
    # counter at 0: healthy; the same counter with statistics that do not fit: named as the cause
    model = nn.Sequential(nn.BatchNorm2d(3)).double()
    data = _batches(sizes=(32,))
    flat = data[0].transpose(0, 1).reshape(3, -1)
    with torch.no_grad():
        model[0].running_mean.copy_(flat.mean(1)), model[0].running_var.copy_(flat.var(1))
    assert int(model[0].num_batches_tracked) == 0
    assert not diagnose(model, data).layers[0].flagged
    with torch.no_grad():
        model[0].running_mean.add_(5.0)
    layer = diagnose(model, data).layers[0]
    # statistics that are not the initial (0, 1) were set by someone: not "never updated"
    assert layer.flagged and layer.cause == "data" and "never updated" not in layer.why
    assert "mean off" in layer.why


# ---- diagnose after recalibrate: inputs that differ between training and eval mode -----------

class _ModesDiffer(nn.Module):
    """A LeViT-like stack in miniature: BN over tokens after a transpose, then dropout or a BN
    whose batch statistics vary from batch to batch, then more BN layers."""

    def __init__(self, dropout: float):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8)
        self.drop = nn.Dropout(dropout)
        self.fc2, self.bn2 = nn.Linear(8, 8, bias=False), batchnorm.BatchNorm1d(8)

    def forward(self, x):  # (N, L, 6)
        h = self.bn1(self.fc1(x).transpose(1, 2)).transpose(1, 2)  # BN over tokens: (N, 8, L)
        h = self.drop(F.relu(h))
        return self.bn2(self.fc2(h).transpose(1, 2))


def _token_batches(spread: float):
    # each batch's mean moves by up to `spread`: per-batch normalization differs from pooled
    g = torch.Generator().manual_seed(5)
    return [torch.randn(4, 5, 6, generator=g, dtype=torch.float64) + spread * (i - 1.5)
            for i in range(4)]


@pytest.mark.parametrize("dropout, spread, upstream", [
    (0.7, 0.0, "dropout drop (p=0.7)"),     # dropout before bn2: its variance differs in eval
    (0.0, 4.0, "1 BN layer (bn1)"),         # bn1 normalizes each batch by its own mean
])
def test_diagnose_after_recalibrate_names_the_mode_difference_not_recalibrate(
        dropout, spread, upstream):
    torch.manual_seed(0)
    model = _ModesDiffer(dropout).double()
    batches = _token_batches(spread)
    recalibrate(model, batches)
    report = diagnose(model, batches)
    flagged = [d for d in report.layers if d.flagged]
    assert [d.name for d in flagged] == ["bn2"], report.table()
    assert flagged[0].cause == "modes" and "never updated" not in report.summary
    assert "differs between training and eval mode" in flagged[0].why
    assert upstream in report.summary, report.summary
    # never the step just taken: plain recalibrate is named only as what would not help
    assert "would not change this" in report.summary
    assert 'recalibrate(model, batches, mode="eval")' in report.summary
    assert "re-estimate the statistics" not in report.summary
    # the remedy it names fits every layer's statistics to its eval-mode input
    recalibrate(model, batches, mode="eval")
    after = diagnose(model, batches)
    assert not any(d.flagged for d in after.layers), after.table()
    assert "describe these batches" in after.summary


def test_recalibrate_in_eval_mode_is_each_layers_pooled_eval_input():
    torch.manual_seed(0)
    model = _ModesDiffer(0.5).double()
    batches = _token_batches(4.0)
    report = recalibrate(model, batches, mode="eval")
    assert report.layers == ["bn1", "bn2"]
    # by hand: bn1's statistics from its input, then bn2's input with bn1 in eval mode using them
    model.eval()
    with torch.no_grad():
        h1 = [model.fc1(x).transpose(1, 2) for x in batches]  # (N, 8, L)
        flat1 = torch.cat([h.transpose(0, 1).reshape(8, -1) for h in h1], 1)
        torch.testing.assert_close(model.bn1.running_mean, flat1.mean(1), **TOL)
        torch.testing.assert_close(model.bn1.running_var, flat1.var(1), **TOL)
        h2 = [model.fc2(F.relu(model.bn1(h).transpose(1, 2))).transpose(1, 2) for h in h1]
        flat2 = torch.cat([h.transpose(0, 1).reshape(8, -1) for h in h2], 1)
        torch.testing.assert_close(model.bn2.running_mean, flat2.mean(1), **TOL)
        torch.testing.assert_close(model.bn2.running_var, flat2.var(1), **TOL)
    assert all(int(m.num_batches_tracked) == 0 for m in (model.bn1, model.bn2))
    with pytest.raises(ValueError, match="'train' or 'eval'"):
        recalibrate(model, batches, mode="inference")
