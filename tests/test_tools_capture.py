"""The tools on models torch.fx cannot trace symbolically: the patterns of transformers' vision
and audio models (a channel-count check that raises, int(x.shape[...]) arithmetic for a reshape,
keyword-only inputs, dict outputs, BatchNorm1d over tokens after a transpose), captured with the
example's concrete shapes, stripped and folded exactly."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.cli import main
from batchnorm.tools import TraceError, fold_bn, inspect_model, strip_redundant_biases
from batchnorm.tools.capture import CONCRETE, SYMBOLIC
from batchnorm.tools.tracing import traced_copy

TOL = dict(rtol=1e-10, atol=1e-10)  # float64: the surgery regroups sums, a few ulps


class Embeddings(nn.Module):
    """transformers-style embeddings: the channel count is checked in Python."""

    def __init__(self, channels: int = 3, width: int = 8) -> None:
        super().__init__()
        self.num_channels = channels
        self.convolution = nn.Conv2d(channels, width, 3, padding=1, bias=True)
        self.normalization = batchnorm.BatchNorm2d(width)
        self.second = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.second_norm = nn.BatchNorm2d(width)

    def forward(self, pixel_values):
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError("the channel dimension of the pixel values does not match the "
                             "configuration")
        h = F.relu(self.normalization(self.convolution(pixel_values)))
        return F.relu(self.second_norm(self.second(h)))


class TokenNet(nn.Module):
    """Keyword-only inputs, shape arithmetic, BatchNorm1d over tokens after a transpose, a dict
    output; the conv bias before a BN sits behind the channel check."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embeddings = Embeddings(width=width)
        self.mixer = nn.Linear(width, width, bias=True)
        self.token_norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, 5)

    def forward(self, *, pixel_values, scale=None):
        h = self.embeddings(pixel_values)  # (N, C, H, W)
        batch, channels = h.shape[0], h.shape[1]
        tokens = int(h.shape[2]) * int(h.shape[3])
        h = h.reshape(batch, channels, tokens).transpose(1, 2)  # (N, L, C)
        h = self.mixer(h).transpose(1, 2)  # (N, C, L): C features are the BN's channels
        h = self.token_norm(h)
        if scale is not None:  # not given: fixed at its default, None
            h = h * scale
        pooled = h.mean(-1)  # (N, C)
        return {"last_hidden_state": h, "logits": self.head(pooled)}


def token_net():
    """For the command line: (model, keyword inputs)."""
    torch.manual_seed(0)
    model = _randomized(TokenNet())
    return model, {"pixel_values": torch.randn(4, 3, 5, 6)}


def _randomized(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def _inputs(seed: int, shape=(4, 3, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5}


def _net():
    torch.manual_seed(0)
    return _randomized(TokenNet()).double()


def _assert_same_training(original: nn.Module, new: nn.Module, steps: int = 3) -> None:
    """A few SGD steps of both in float64: dict outputs, input and parameter gradients equal at
    every step; eval outputs equal afterwards."""
    original, new = copy.deepcopy(original).train(), copy.deepcopy(new).train()
    sgd_a = torch.optim.SGD(original.parameters(), lr=0.1)
    sgd_b = torch.optim.SGD(new.parameters(), lr=0.1)
    for step in range(steps):
        x_a = _inputs(10 + step)["pixel_values"].requires_grad_()
        x_b = x_a.detach().clone().requires_grad_()
        out_a, out_b = original(pixel_values=x_a), new(pixel_values=x_b)
        assert out_a.keys() == out_b.keys()
        for key in out_a:
            torch.testing.assert_close(out_b[key], out_a[key], **TOL)
        g = torch.Generator().manual_seed(step)
        loss_weights = {k: torch.randn(v.shape, generator=g, dtype=v.dtype)
                        for k, v in out_a.items()}
        sgd_a.zero_grad(), sgd_b.zero_grad()
        sum((out_a[k] * w).sum() for k, w in loss_weights.items()).backward()
        sum((out_b[k] * w).sum() for k, w in loss_weights.items()).backward()
        torch.testing.assert_close(x_b.grad, x_a.grad, **TOL)
        params_a = dict(original.named_parameters())
        for name, p in new.named_parameters():
            torch.testing.assert_close(p.grad, params_a[name].grad, **TOL, msg=name)
        sgd_a.step(), sgd_b.step()
    original.eval(), new.eval()
    x = _inputs(99)
    for key, value in original(**x).items():
        torch.testing.assert_close(new(**x)[key], value, **TOL)


def test_symbolic_tracing_fails_and_the_concrete_capture_takes_over():
    for training in (True, False):
        traced = traced_copy(_net(), _inputs(0), training)
        assert traced.capture == CONCRETE and traced.shape_specialized
        assert len(traced.attempts) == 1 and SYMBOLIC in traced.attempts[0]
        assert "embeddings (Embeddings)" in traced.attempts[0]  # where symbolic tracing failed
        targets = {str(n.target) for n in traced.graph_module.graph.nodes
                   if n.op == "call_module"}
        assert {"embeddings.convolution", "embeddings.normalization", "mixer",
                "token_norm"} <= targets  # BN, Conv and Linear stay module calls


def test_strip_through_shape_code_is_exact_over_training_steps():
    model = _net()
    stripped, report = strip_redundant_biases(model, _inputs(0))
    assert {(r.layer, r.bn) for r in report.removed} == {
        ("embeddings.convolution", "embeddings.normalization"), ("mixer", "token_norm")}
    assert dict(report.skipped)["head"].endswith("is a model output before reaching any "
                                                 "batch norm")
    assert report.captures == {"training": CONCRETE, "eval": CONCRETE}
    assert "specialized to the example input's shapes" in report.summary()
    assert stripped.mixer.bias is None and stripped.embeddings.convolution.bias is None
    assert type(stripped) is TokenNet  # the model's own class, its Python kept
    _assert_same_training(model, stripped)


def test_fold_behind_the_channel_check_is_exact_in_eval():
    model = _net()
    folded, report = fold_bn(model, _inputs(0))
    assert {(p.bn, p.layer) for p in report.folded} == {
        ("embeddings.normalization", "embeddings.convolution"),
        ("embeddings.second_norm", "embeddings.second")}
    assert "token_norm" in dict(report.skipped)  # after a transpose, not a Conv/Linear output
    assert report.capture == CONCRETE and not report.graph_module
    assert type(folded) is TokenNet and not any(m.training for m in folded.modules())
    model.eval()
    for seed in range(3):
        x = _inputs(seed)
        for key, value in model(**x).items():
            torch.testing.assert_close(folded(**x)[key], value, **TOL)
    with pytest.raises(ValueError, match="channel dimension"):  # its Python still runs
        folded(pixel_values=torch.randn(2, 4, 5, 6, dtype=torch.float64))


def test_inspect_names_the_capture_and_why_each_bn_does_or_does_not_strip(capsys):
    inspection = inspect_model(_net(), _inputs(0))
    assert inspection.captures == {"training": CONCRETE, "eval": CONCRETE}
    rows = {r["bn"]: r for r in inspection.rows}
    assert rows["embeddings.normalization"]["redundant_bias"] == "embeddings.convolution"
    assert rows["token_norm"]["redundant_bias"] == "mixer"
    assert rows["embeddings.second_norm"]["redundant_bias"] == (
        "no: embeddings.second (Conv2d) before it has no bias")
    assert rows["token_norm"]["fold"].startswith("no: after call_method transpose")
    assert main(["inspect", "tests.test_tools_capture:token_net"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graph: torch.fx concrete (specialized to the example input's shapes")
    assert "3 BN layers; 2 redundant biases; 2 foldable" in out


class _Layerdrop(nn.Module):
    """Draws a random number in Python in training mode (transformers' layerdrop): the graph
    cannot be checked against the model in training mode, in eval it can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if self.training and bool(torch.rand([]) < 0.5):  # the skip decided outside the graph
            return h
        return self.drop(h) + h


def test_random_draws_outside_the_graph_refuse_training_mode_only():
    model = _Layerdrop().double()
    x = _inputs(0, (2, 3, 6, 6))["pixel_values"]
    for seed in range(8):  # whichever branch the draw during tracing takes
        torch.manual_seed(seed)
        with pytest.raises(TraceError, match="draws random numbers the graph does not"):
            strip_redundant_biases(model, x)
    folded, report = fold_bn(model, x)
    assert len(report.folded) == 1 and report.max_abs_diff < 1e-12
    inspection = inspect_model(model, x)
    assert inspection.strip_error is not None and "training" in inspection.strip_error
    assert inspection.rows[0]["redundant_bias"].startswith("no: no training-mode graph")


def test_control_flow_on_values_is_still_refused_by_both_captures():
    class ValueBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.conv(x)
            return self.bn(F.relu(h) if h.mean() > 0 else h)  # the branch reads values

    model = ValueBranch().double()
    x = _inputs(0, (2, 3, 6, 6))["pixel_values"]
    with pytest.raises(TraceError, match=r"\(1\) torch.fx symbolic.*\(2\) torch.fx concrete"):
        strip_redundant_biases(model, x)
    with pytest.raises(TraceError, match="control flow"):
        fold_bn(model, x)


def test_keyword_inputs_must_fit_forward():
    with pytest.raises(TraceError, match="does not fit TokenNet.forward"):
        fold_bn(_net(), {"pixels": torch.randn(2, 3, 5, 6, dtype=torch.float64)})
