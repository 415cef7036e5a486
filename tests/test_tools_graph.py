"""What the graph analysis must report, and what it must leave alone."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.tools import TraceError, fold_bn, strip_redundant_biases
from batchnorm.tools.biases import find_redundant_biases
from batchnorm.tools.folding import plan_folds
from batchnorm.tools.tracing import traced_copy

X4 = torch.randn(2, 3, 8, 8, dtype=torch.float64)


def _redundant(model, x=X4):
    found, skipped = find_redundant_biases(traced_copy(model.double(), x, False))
    return {f.layer for f in found}, dict(skipped)


def _folds(model, x=X4):
    plans, skipped = plan_folds(traced_copy(model.double(), x, False))
    return {p.bn: p for p in plans}, dict(skipped)


class Lambda(nn.Module):
    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for k, v in modules.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.fn(self, x)


def seq(*layers):
    return nn.Sequential(*layers)


# ---- cases that must be left alone ---------------------------------------------------------

def test_relu_between_is_not_redundant():
    found, skipped = _redundant(seq(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    assert found == set() and "does not commute" in skipped["0"]


def test_output_used_twice_is_not_redundant():
    def forward(s, x):
        y = s.conv(x)
        return s.bn(y) + y  # y also reaches the output directly: its bias matters
    model = Lambda(forward, conv=nn.Conv2d(3, 4, 3, padding=1), bn=nn.BatchNorm2d(4))
    found, skipped = _redundant(model)
    assert found == set() and "2 users" in skipped["conv"]
    assert _folds(model)[0] == {}


def test_shared_module_is_neither_stripped_nor_folded():
    def forward(s, x):
        return s.bn1(s.conv(x)) + s.bn2(s.conv(x))  # pytorch#197539: conv called twice
    model = Lambda(forward, conv=nn.Conv2d(3, 4, 3), bn1=nn.BatchNorm2d(4), bn2=nn.BatchNorm2d(4))
    found, skipped = _redundant(model)
    assert found == set() and "called 2 times" in skipped["conv"]
    plans, not_folded = _folds(model)
    assert plans == {} and "called 2 times" in not_folded["bn1"]
    folded, report = fold_bn(model, X4)
    assert report.max_abs_diff < 1e-12


def test_module_registered_under_two_names_counts_as_shared():
    conv = nn.Conv2d(3, 4, 3)
    model = Lambda(lambda s, x: s.bn1(s.a(x)) + s.bn2(s.b(x)), a=conv, b=conv,
                   bn1=nn.BatchNorm2d(4), bn2=nn.BatchNorm2d(4))
    assert _redundant(model)[0] == set()


def test_bn_called_twice_is_left_alone():
    model = Lambda(lambda s, x: s.bn(s.c1(x)) + s.bn(s.c2(x)), c1=nn.Conv2d(3, 4, 3),
                   c2=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4))
    found, skipped = _redundant(model)
    assert found == set() and "called 2 times" in skipped["c1"]


@pytest.mark.parametrize("between, why", [
    (nn.Dropout(0.1), "does not commute"),            # random mask multiplies the shift
    (nn.ZeroPad2d(1), "not a per-channel constant"),   # padded zeros do not carry the bias
    (nn.ConstantPad2d(1, 3.0), "not a per-channel constant"),  # nor does any padded constant
    (nn.AvgPool2d(3, 1, padding=1), "not a per-channel constant"),  # counts padded zeros
    (nn.Sigmoid(), "does not commute"),
])
def test_non_commuting_ops_between(between, why):
    found, skipped = _redundant(seq(nn.Conv2d(3, 4, 3), between, nn.BatchNorm2d(4)))
    assert found == set() and why in skipped["0"], skipped


@pytest.mark.parametrize("between", [
    nn.MaxPool2d(3, 2, padding=1), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(3), nn.Dropout(0.0),
    nn.Upsample(scale_factor=2, mode="bilinear"), nn.ReflectionPad2d(1), nn.Identity(),
])
def test_commuting_ops_between_are_stripped_exactly(between):
    model = seq(nn.Conv2d(3, 4, 3), between, nn.BatchNorm2d(4)).double()
    found, _ = _redundant(model)
    assert found == {"0"}
    stripped, _ = strip_redundant_biases(model, X4)
    for training in (True, False):
        a, b = model.train(training), stripped.train(training)
        torch.testing.assert_close(b(X4), a(X4), rtol=1e-10, atol=1e-10)


def test_constant_pad_with_zero_is_not_redundant_even_if_the_bias_is_zero():
    model = seq(nn.Conv2d(3, 4, 3), nn.ZeroPad2d(1), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[0].bias.zero_()  # structure decides, not today's values
    assert _redundant(model)[0] == set()


def test_linear_features_must_be_the_bn_channels():
    x3 = torch.randn(4, 5, 6, dtype=torch.float64)  # (N, L, F): Linear acts on F, BN1d on L
    model = seq(nn.Linear(6, 6), nn.BatchNorm1d(5))
    found, skipped = _redundant(model, x3)
    assert found == set() and "not a per-channel constant" in skipped["0"]
    assert "not the BN's channel dim" in _folds(model, x3)[1]["1"]
    # transposed to (N, F, L), the features are BN's channels again
    model = Lambda(lambda s, x: s.bn(s.fc(x).transpose(1, 2)), fc=nn.Linear(6, 6),
                   bn=nn.BatchNorm1d(6))
    assert _redundant(model, x3)[0] == {"fc"}
    stripped, report = strip_redundant_biases(model.double(), x3)
    assert report.max_abs_diff < 1e-12


def test_flatten_maps_the_bias_onto_bn1d_features():
    x = torch.randn(4, 3, 1, 1, dtype=torch.float64)
    model = seq(nn.Conv2d(3, 5, 1), nn.Flatten(), nn.BatchNorm1d(5)).double()
    assert _redundant(model, x)[0] == {"0"}
    # flattening H*W > 1 gives BN1d(C*H*W) channels c*HW + s: each still one conv channel's bias
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    model = seq(nn.Conv2d(3, 5, 1), nn.Flatten(), nn.BatchNorm1d(20)).double()
    found = find_redundant_biases(traced_copy(model, x, False))[0]
    torch.testing.assert_close(found[0].channel_bias,
                               model[0].bias.detach().repeat_interleave(4))
    stripped, report = strip_redundant_biases(model, x)
    model.train(), stripped.train()
    torch.testing.assert_close(stripped(x), model(x), rtol=1e-10, atol=1e-10)


def test_residual_input_is_not_the_bn_input():
    model = Lambda(lambda s, x: s.bn(s.a(x), s.b(x)), a=nn.Conv2d(3, 4, 3),
                   b=nn.Conv2d(3, 4, 3), bn=batchnorm.BatchNormAddReLU2d(4))
    found, skipped = _redundant(model)
    assert found == {"a"} and "residual" in skipped["b"]


def test_conv_transpose_groups_fold_and_strip():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    model = seq(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2), nn.BatchNorm2d(6))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1), model[1].running_var.uniform_(0.5, 2)
    folded, report = fold_bn(model.double(), x)
    assert len(report.folded) == 1 and report.max_abs_diff < 1e-12


def test_fold_into_next_conv_only_without_zero_padding():
    for padding, mode, expect in ((0, "zeros", True), (1, "zeros", False), (1, "replicate", True)):
        model = seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=padding, padding_mode=mode,
                                                 groups=1))
        with torch.no_grad():
            model[0].running_mean.uniform_(-1, 1), model[0].weight.uniform_(0.5, 2)
        folded, report = fold_bn(model.double(), X4)
        assert (len(report.folded) == 1) == expect, report.summary()
        assert report.max_abs_diff < 1e-12


def test_grouped_next_conv_fold():
    model = seq(batchnorm.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2, dilation=2))
    with torch.no_grad():
        model[0].running_mean.uniform_(-1, 1), model[0].bias.uniform_(-1, 1)
    folded, report = fold_bn(model.double(), torch.randn(2, 4, 9, 9, dtype=torch.float64))
    assert report.folded[0].direction == "into next" and report.max_abs_diff < 1e-12


def test_functional_batch_norm_is_folded():
    class FunctionalBN(nn.Module):  # pytorch#122070: F.batch_norm in the forward
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("mean", torch.randn(4))
            self.register_buffer("var", torch.rand(4) + 0.5)
            self.gamma, self.beta = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta)

    model = FunctionalBN().double().eval()
    folded, report = fold_bn(model, X4)
    assert report.graph_module and len(report.folded) == 1
    assert report.max_abs_diff < 1e-12
    assert set(folded.state_dict()) == {"conv.weight", "conv.bias"}
    assert "batch_norm" not in folded.code
    assert not any(m.training for m in folded.modules())  # the GraphModule too


def test_bn_without_running_stats_is_not_folded_but_its_bias_is_redundant():
    model = seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert "batch statistics" in _folds(model)[1]["1"]
    assert _redundant(model)[0] == {"0"}
    stripped, report = strip_redundant_biases(model.double(), X4)
    assert report.max_abs_diff < 1e-12


def test_untraceable_model_names_what_failed():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # control flow on a tensor's value

    model = seq(nn.Conv2d(3, 4, 3), nn.Sequential(Branchy()), nn.BatchNorm2d(4))
    with pytest.raises(TraceError, match=r"1\.0 \(Branchy\)"):
        strip_redundant_biases(model, X4)
    with pytest.raises(TraceError, match="could not trace"):
        fold_bn(model, X4)


def test_branch_on_training_counts_only_when_both_modes_prove_it():
    def forward(s, x):
        y = s.conv(x)
        return s.bn(F.relu(y) if s.training else y)
    model = Lambda(forward, conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4))
    stripped, report = strip_redundant_biases(model.double(), X4)
    assert report.removed == [] and stripped.conv.bias is not None


@pytest.mark.parametrize("make_bn", [
    lambda: nn.BatchNorm2d(4, momentum=None),  # cumulative average
    lambda: batchnorm.BatchNorm2d(4, momentum=0.5),
    lambda: batchnorm.BatchNormReLU2d(4),
])
def test_strip_keeps_running_stats_offset_for_every_momentum(make_bn):
    torch.manual_seed(0)
    model = seq(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), make_bn()).double()
    stripped, report = strip_redundant_biases(model, X4)
    c = report.removed[0].channel_bias
    model.train(), stripped.train()
    for step in range(3):
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64) + step
        torch.testing.assert_close(stripped(x), model(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stripped[2].running_mean, model[2].running_mean - c)
    torch.testing.assert_close(stripped[2].running_var, model[2].running_var)
    model.eval(), stripped.eval()
    torch.testing.assert_close(stripped(X4), model(X4), rtol=1e-10, atol=1e-10)


def test_frozen_buffers_with_tracking_off_are_still_shifted():
    model = seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double()
    model[1].track_running_stats = False  # buffers kept and used in eval, no longer updated
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    stripped, report = strip_redundant_biases(model, X4)
    assert len(report.removed) == 1
    for training in (True, False):
        model.train(training), stripped.train(training)
        torch.testing.assert_close(stripped(X4), model(X4), rtol=1e-10, atol=1e-10)


def test_forward_hooks_are_not_seen_by_the_graph_so_the_layer_is_left_alone():
    model = seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[0].register_forward_hook(lambda m, args, out: torch.relu(out))
    found, skipped = _redundant(model)
    assert found == set() and "forward hooks" in skipped["0"]
    assert "forward hooks" in _folds(model)[1]["1"]


def test_one_conv_absorbs_the_bn_before_and_the_bn_after():
    model = seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, groups=1), batchnorm.BatchNormReLU2d(4))
    with torch.no_grad():
        for bn in (model[0], model[2]):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(-2, 2), bn.bias.uniform_(-1, 1)
    folded, report = fold_bn(model.double(), X4)
    assert {(p.bn, p.direction) for p in report.folded} == {("0", "into next"),
                                                            ("2", "into previous")}
    assert report.max_abs_diff < 1e-12
    assert isinstance(folded[0], nn.Identity) and isinstance(folded[2], nn.ReLU)


def test_a_path_that_mixes_batch_samples_is_not_reported():
    # summing over the batch passes the bias on scaled by N: exact for no running_mean fix
    model = Lambda(lambda s, x: s.bn(s.conv(x).sum(0, keepdim=True)), conv=nn.Conv2d(3, 4, 3),
                   bn=nn.BatchNorm2d(4))
    found, skipped = _redundant(model)
    assert found == set() and "samples of the batch are mixed" in skipped["conv"]
    # a reshape that keeps each sample's block is fine
    model = Lambda(lambda s, x: s.bn(s.conv(x).reshape(x.size(0), 4, -1)),
                   conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm1d(4))
    assert _redundant(model)[0] == {"conv"}


# ---- concatenation and sums: biases meeting one BN -------------------------------------------

def _strip_exactly(model, x=X4, steps=3):
    """Strip, then train both for a few SGD steps: outputs, input and parameter gradients equal in
    training, and eval outputs equal afterwards. Returns the report."""
    model = model.double()
    stripped, report = strip_redundant_biases(model, x)
    xs = x if isinstance(x, tuple) else (x,)
    sgd_a = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd_b = torch.optim.SGD(stripped.parameters(), lr=0.1)
    model.train(), stripped.train()
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        inputs_a = [(torch.randn(t.shape, generator=g, dtype=t.dtype) + step).requires_grad_()
                    for t in xs]
        inputs_b = [t.detach().clone().requires_grad_() for t in inputs_a]
        out_a, out_b = model(*inputs_a), stripped(*inputs_b)
        torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-10)
        weights = torch.randn(out_a.shape, generator=g, dtype=out_a.dtype)
        sgd_a.zero_grad(), sgd_b.zero_grad()
        (out_a * weights).sum().backward(), (out_b * weights).sum().backward()
        for t_a, t_b in zip(inputs_a, inputs_b, strict=True):
            torch.testing.assert_close(t_b.grad, t_a.grad, rtol=1e-10, atol=1e-10)
        params_a = dict(model.named_parameters())
        for name, p in stripped.named_parameters():
            torch.testing.assert_close(p.grad, params_a[name].grad, rtol=1e-10, atol=1e-10)
        sgd_a.step(), sgd_b.step()
    model.eval(), stripped.eval()
    torch.testing.assert_close(stripped(*xs), model(*xs), rtol=1e-10, atol=1e-10)
    return report


def test_channel_concatenation_maps_each_bias_onto_its_slice_of_bn_channels():
    model = Lambda(lambda s, x: s.bn(torch.cat([s.a(x), s.pool(s.b(x))], dim=1)),
                   a=nn.Conv2d(3, 4, 3, padding=1), b=nn.Conv2d(3, 2, 3, padding=1),
                   pool=nn.MaxPool2d(3, 1, 1), bn=nn.BatchNorm2d(6)).double()
    found = {f.layer: f for f in find_redundant_biases(traced_copy(model, X4, False))[0]}
    assert set(found) == {"a", "b"}
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    a_bias, b_bias = model.a.bias.detach(), model.b.bias.detach()
    torch.testing.assert_close(found["a"].channel_bias, torch.cat([a_bias, zeros[0, :2]]))
    torch.testing.assert_close(found["b"].channel_bias, torch.cat([zeros[0], b_bias]))
    assert found["a"].channels == [0, 1, 2, 3] and found["b"].channels == [4, 5]
    assert found["b"].joins == ["cat"]
    report = _strip_exactly(model)
    assert report.parameters_removed == 6


def test_concatenation_of_linear_features_before_bn1d():
    x = torch.randn(6, 5, dtype=torch.float64)
    model = Lambda(lambda s, x: s.bn(torch.cat((s.a(x), s.b(x)), 1)), a=nn.Linear(5, 3),
                   b=nn.Linear(5, 4), bn=batchnorm.BatchNorm1d(7))
    assert _redundant(model, x)[0] == {"a", "b"}
    _strip_exactly(model, x)


def test_concatenation_along_another_dim_is_not_per_channel():
    model = Lambda(lambda s, x: s.bn(torch.cat([s.a(x), s.b(x)], dim=2)),
                   a=nn.Conv2d(3, 4, 3), b=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4))
    found, skipped = _redundant(model)
    assert found == set() and "not a per-channel constant" in skipped["a"]


def test_two_convs_summed_into_one_bn_lose_both_biases_and_running_mean_takes_the_sum():
    model = Lambda(lambda s, x: s.bn(s.a(x) + s.b(x)), a=nn.Conv2d(3, 4, 3),
                   b=nn.Conv2d(3, 4, 3, dilation=1), bn=nn.BatchNorm2d(4)).double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    stripped, report = strip_redundant_biases(model, X4)
    assert {r.layer for r in report.removed} == {"a", "b"}
    expected = model.bn.running_mean - model.a.bias - model.b.bias
    torch.testing.assert_close(stripped.bn.running_mean, expected.detach())
    _strip_exactly(model)


def test_difference_negates_and_a_number_scales_the_constant():
    model = Lambda(lambda s, x: s.bn((s.a(x) - s.b(x)) / 4 + 1.5), a=nn.Conv2d(3, 4, 3),
                   b=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4)).double()
    found = {f.layer: f for f in find_redundant_biases(traced_copy(model, X4, False))[0]}
    torch.testing.assert_close(found["a"].channel_bias, model.a.bias.detach() / 4)
    torch.testing.assert_close(found["b"].channel_bias, -model.b.bias.detach() / 4)
    _strip_exactly(model)
    # the same with torch functions and methods: torch.sub(b, a).mul(-2), torch.neg
    model = Lambda(lambda s, x: s.bn(torch.neg(torch.sub(s.b(x), s.a(x)).mul(-2))),
                   a=nn.Conv2d(3, 4, 3), b=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4)).double()
    found = {f.layer: f for f in find_redundant_biases(traced_copy(model, X4, False))[0]}
    torch.testing.assert_close(found["a"].channel_bias, -2 * model.a.bias.detach())
    torch.testing.assert_close(found["b"].channel_bias, 2 * model.b.bias.detach())
    _strip_exactly(model)


def test_only_the_provable_branch_of_a_sum_is_stripped():
    model = Lambda(lambda s, x: s.bn(s.a(x) + F.relu(s.b(x))), a=nn.Conv2d(3, 4, 3),
                   b=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4))
    found, skipped = _redundant(model)
    assert found == {"a"} and "does not commute" in skipped["b"]
    report = _strip_exactly(model)
    assert [r.layer for r in report.removed] == ["a"]


def test_a_sum_with_the_residual_of_a_fused_bn_keeps_the_residual_branch():
    model = Lambda(lambda s, x: s.bn(s.a(x) + s.b(x), s.c(x)), a=nn.Conv2d(3, 4, 3),
                   b=nn.Conv2d(3, 4, 3), c=nn.Conv2d(3, 4, 3), bn=batchnorm.BatchNormAddReLU2d(4))
    found, skipped = _redundant(model)
    assert found == {"a", "b"} and "residual" in skipped["c"]
    _strip_exactly(model)


@pytest.mark.parametrize("forward, layer, why", [
    # a second user of the biased output, in the join itself or elsewhere; a shared module
    (lambda s, x: (lambda y: s.bn(s.a(x) + y) + y.sum())(s.b(x)), "b", "2 users"),
    (lambda s, x: (lambda y: s.bn(y + F.relu(y)))(s.a(x)), "a", "2 users"),
    (lambda s, x: (lambda y: s.bn8(torch.cat([y, y], 1)))(s.a(x)), "a", "more than once"),
    (lambda s, x: s.bn8(torch.cat([s.a(x), s.a(x)], 1)), "a", "called 2 times"),
    # zero padding after the join: padded positions do not carry the bias
    (lambda s, x: s.bn(F.pad(s.a(x) + s.b(x), (1, 1, 1, 1))), "a", "not a per-channel constant"),
    # factors that are not numbers in the code
    (lambda s, x: s.bn(s.a(x) * s.scale), "a", "other than a number"),
    (lambda s, x: s.bn(s.a(x) * x.size(0)), "a", "other than a number"),
    (lambda s, x: s.bn(s.a(x) * s.b(x)), "a", "other than a number"),
    (lambda s, x: s.bn(1 / s.a(x)), "a", "divides by"),
    (lambda s, x: s.bn(torch.div(s.a(x), 2, rounding_mode="floor")), "a", "rounds"),
])
def test_joins_that_do_not_pass_the_constant_on(forward, layer, why):
    model = Lambda(forward, a=nn.Conv2d(3, 4, 3), b=nn.Conv2d(3, 4, 3),
                   bn=nn.BatchNorm2d(4), bn8=nn.BatchNorm2d(8),
                   scale=nn.Parameter(torch.rand(4, 1, 1) + 1))
    found, skipped = _redundant(model)
    assert layer not in found and why in skipped[layer], skipped


def test_bias_meeting_two_bns_through_a_shared_sum_stays():
    def forward(s, x):
        y = s.a(x) + s.b(x)
        return s.bn1(y) + s.bn2(y)  # y has two users: each BN would need its own correction
    model = Lambda(forward, a=nn.Conv2d(3, 4, 3), b=nn.Conv2d(3, 4, 3), bn1=nn.BatchNorm2d(4),
                   bn2=nn.BatchNorm2d(4))
    found, skipped = _redundant(model)
    assert found == set() and "2 users" in skipped["a"] and "2 users" in skipped["b"]


def test_amax_with_another_tensor_argument_is_a_reason_not_a_crash():
    """torch.amax(..., out=t) reads a second traced tensor, whose values the trace did not keep:
    the bias is skipped with a reason (it used to raise AttributeError)."""
    model = Lambda(lambda s, x: s.bn(torch.amax(s.a(x), dim=(2, 3), keepdim=True,
                                                out=torch.empty(2, 4, 1, 1, dtype=x.dtype))),
                   a=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4))
    found, skipped = _redundant(model)
    assert found == set() and "another tensor argument" in skipped["a"]
