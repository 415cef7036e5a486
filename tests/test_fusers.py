"""torch's fusers on converted models give what they give on the torch.nn model: the same fused
module types, the same outputs (float64), in eval (fuse_modules, fx fuse, fuse_conv_bn_eval) and
for quantization-aware training (fuse_modules_qat)."""

import copy

import pytest
import torch
from torch.ao.quantization import fuse_modules, fuse_modules_qat
from torch.fx.experimental.optimization import fuse as fx_fuse

import batchnorm

F64 = torch.float64


class _Net(torch.nn.Module):
    """Every (layer, BN[, ReLU]) pair torch's fuse_modules table knows, one of each rank."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1, self.b1 = nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)
        self.c2, self.b2, self.r2 = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU()
        self.c3, self.b3 = nn.Conv3d(3, 2, 2), nn.BatchNorm3d(2)
        self.t2, self.bt = nn.ConvTranspose2d(3, 4, 2), nn.BatchNorm2d(4)
        self.lin, self.bl = nn.Linear(6, 7), nn.BatchNorm1d(7)
        self.b4, self.r4 = nn.BatchNorm2d(3), nn.ReLU()

    def forward(self, x1, x2, x3, x4):
        return (self.b1(self.c1(x1)), self.r2(self.b2(self.c2(x2))), self.b3(self.c3(x3)),
                self.bt(self.t2(x2)), self.bl(self.lin(x4)), self.r4(self.b4(x2)))


GROUPS = [["c1", "b1"], ["c2", "b2", "r2"], ["c3", "b3"], ["t2", "bt"], ["lin", "bl"],
          ["b4", "r4"]]


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(4, 3, 9, generator=g, dtype=F64),
            torch.randn(4, 3, 6, 6, generator=g, dtype=F64),
            torch.randn(2, 3, 4, 4, 4, generator=g, dtype=F64),
            torch.randn(8, 6, generator=g, dtype=F64))


def _trained_pair():
    """A torch.nn model with non-trivial statistics and affine parameters, and its converted
    copy."""
    torch.manual_seed(0)
    net = _Net().double()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    for _ in range(3):
        net(*(x * 2 + 1 for x in _inputs()))
    ours = batchnorm.convert(copy.deepcopy(net))
    assert type(ours.b2) is batchnorm.BatchNorm2d
    return net, ours


def _types(model):
    """Module types by name: a layer left unfused is ours in one model, torch's in the other."""
    return [type(m).__name__ for m in model.modules()]


def _assert_same(a, b):
    for ya, yb in zip(a(*_inputs()), b(*_inputs()), strict=True):
        torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)


def test_fuse_modules_eval_as_on_torch():
    net, ours = _trained_pair()
    fused_torch = fuse_modules(net.eval(), GROUPS)
    fused_ours = fuse_modules(ours.eval(), GROUPS)
    assert _types(fused_ours) == _types(fused_torch)
    # Every group fused: only the BNs inside torch's BNReLU2d remain (a torch.nn layer on the
    # converted layer's state), none of ours.
    assert not any(type(m).__module__.startswith("batchnorm") for m in fused_ours.modules())
    _assert_same(fused_ours, fused_torch)
    _assert_same(fused_ours, net)  # folding changed nothing


def test_fuse_modules_qat_as_on_torch():
    net, ours = _trained_pair()
    groups = [g for g in GROUPS if g[0] != "t2"]  # torch has no QAT fusion for ConvTranspose
    b2 = ours.b2
    fused_torch = fuse_modules_qat(net.train(), groups)
    fused_ours = fuse_modules_qat(ours.train(), groups)
    assert _types(fused_ours) == _types(fused_torch)
    # The QAT modules hold torch.nn layers with our layers' state (fuse_modules_qat copies the
    # model unless inplace=True).
    assert type(fused_ours.c2) is torch.ao.nn.intrinsic.ConvBnReLU2d
    assert type(fused_ours.c2[1]) is torch.nn.BatchNorm2d
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(fused_ours.c2[1], name), getattr(b2, name))
    _assert_same(fused_ours.eval(), fused_torch.eval())


def test_fuse_modules_takes_our_fused_relu_layer_as_bn_then_relu():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNormReLU2d(4)).double()
    net(torch.randn(4, 3, 6, 6, dtype=F64) * 3)
    net.eval()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    expected = net(x)
    fused = fuse_modules(copy.deepcopy(net), [["0", "1"]])
    assert type(fused[0]) is torch.ao.nn.intrinsic.ConvReLU2d
    torch.testing.assert_close(fused(x), expected, rtol=1e-12, atol=1e-12)
    assert (expected == 0).any()  # the ReLU is really there


def test_fx_fuse_as_on_torch():
    net, ours = _trained_pair()
    fused_torch, fused_ours = fx_fuse(net.eval()), fx_fuse(ours.eval())


    def bn_left(model):
        return [type(m).__name__ for m in model.modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    # fx fuse folds (Conv, BN) and (Linear, BN); the BN after ConvTranspose and the one on the
    # input stay, in both models.
    assert bn_left(fused_ours) == bn_left(fused_torch) == ["BatchNorm2d", "BatchNorm2d"]
    _assert_same(fused_ours, fused_torch)
    _assert_same(fused_ours, net)


def test_fx_fuse_leaves_fused_relu_layers():
    """fx fuse would replace the BN node by the conv's output, dropping a fused ReLU."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNormReLU2d(4)).double()
    net(torch.randn(4, 3, 6, 6, dtype=F64))
    net.eval()
    fused = fx_fuse(net)
    assert any(type(m) is batchnorm.BatchNormReLU2d for m in fused.modules())
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    torch.testing.assert_close(fused(x), net(x))


def test_fuse_conv_bn_eval_reads_our_layer():
    conv = torch.nn.Conv2d(3, 4, 3).double().eval()
    bn = batchnorm.BatchNorm2d(4).double()
    bn(torch.randn(4, 4, 5, 5, dtype=F64) + 2)
    bn.eval()
    fused = torch.nn.utils.fuse_conv_bn_eval(conv, bn)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    torch.testing.assert_close(fused(x), bn(conv(x)))


def test_registration_is_idempotent_and_additive():
    from torch.ao.quantization import fuser_method_mappings as mappings
    from torch.fx.experimental import optimization

    from batchnorm import fusers

    before = dict(mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD)
    assert fusers.register() == {"fuse_modules": True, "fx_fuse": True}
    assert mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD == before
    assert optimization.matches_module_pattern.__wrapped__.__module__ == optimization.__name__
    assert before[(torch.nn.Conv2d, torch.nn.BatchNorm2d)] is mappings.fuse_conv_bn


def _hooked_net(conv_bn, relu):
    """conv -> bn (-> relu), a pre-hook on the first module and a hook on the last, recording."""
    calls = []
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 4, 3), conv_bn(4)] + ([torch.nn.ReLU()] if relu else [])
    net = torch.nn.Sequential(*layers).double()
    net[0].register_forward_pre_hook(lambda m, args: calls.append("pre"))
    net[-1].register_forward_hook(lambda m, args, out: calls.append("post"))
    net[1].register_forward_hook(lambda m, args, out: calls.append("bn"))
    return net, calls


@pytest.mark.parametrize("qat", [False, True], ids=["eval", "qat"])
@pytest.mark.parametrize("relu", [False, True], ids=["conv-bn", "conv-bn-relu"])
def test_hooks_fire_as_on_the_torch_nn_model(qat, relu):
    """torch's fuser moves the first module's pre-hooks and the last one's hooks to the fused
    module: the converted model's hooks fire exactly as the torch.nn model's do."""
    fuse = fuse_modules_qat if qat else fuse_modules
    names = ["0", "1", "2"] if relu else ["0", "1"]
    fired = []
    for convert in (False, True):
        net, calls = _hooked_net(torch.nn.BatchNorm2d, relu)
        if convert:
            batchnorm.convert(net)
        net.train(qat)
        fused = fuse(net, [names])
        fused(torch.randn(2, 3, 6, 6, dtype=F64))
        fired.append(calls)
    assert fired[1] == fired[0], fired


def test_fx_quantization_fuses_after_to_torch():
    # FX graph-mode quantization matches torch.nn's classes exactly (its pattern table is built
    # from them), so it leaves our layers unfused; batchnorm.to_torch(model) first gives the
    # fused modules it builds for the torch.nn model (the README says so).
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    class ConvBNReLU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    x = torch.randn(4, 3, 8, 8)

    def fused(model) -> bool:  # whether the conv and the BN became one QAT module (ConvBn2d)
        prepared = prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"), (x,))
        prepared(x)
        return any(type(m).__name__.startswith("ConvBn") for m in prepared.modules())

    converted = batchnorm.convert(ConvBNReLU())
    assert fused(ConvBNReLU())
    assert not fused(copy.deepcopy(converted))
    assert fused(batchnorm.to_torch(converted))
