"""The pure folding functions against torch.nn layers in float64, every layout flag."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchnorm.tools import absorb_bias, bn_scale_shift, fold_bn_into_next_weights, fold_bn_weights

TOLERANCES = {torch.float64: dict(rtol=1e-11, atol=1e-11),
              torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _bn(c, dtype, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm1d(c, affine=affine, eps=1e-3).to(dtype).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.1)
        if affine:
            bn.weight.copy_(torch.randn(c, generator=g))  # negative gammas included
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn


def _apply_bn(bn, y):
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


LAYERS = [
    lambda: nn.Linear(5, 7),
    lambda: nn.Conv1d(4, 6, 3, dilation=2),
    lambda: nn.Conv2d(4, 6, 3, groups=2, stride=2),
    lambda: nn.Conv2d(6, 6, 3, groups=6, bias=False),  # depthwise
    lambda: nn.Conv3d(2, 4, 2),
    lambda: nn.ConvTranspose1d(4, 6, 3, stride=2),
    lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, dilation=2),
    lambda: nn.ConvTranspose3d(3, 6, 2, groups=3, bias=False),
]


def _input(layer, dtype):
    if isinstance(layer, nn.Linear):
        return torch.randn(3, layer.in_features, dtype=dtype)
    spatial = (7,) * len(layer.kernel_size)
    return torch.randn(3, layer.in_channels, *spatial, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("make", LAYERS)
def test_fold_bn_weights_matches_layer_then_bn(make, affine, dtype):
    torch.manual_seed(0)
    layer = make().to(dtype)
    c_out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    bn = _bn(c_out, dtype, affine)
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    w, b = fold_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                           bn.weight, bn.bias, transposed=transposed,
                           groups=getattr(layer, "groups", 1))
    assert w.dtype == dtype and w.shape == layer.weight.shape
    x = _input(layer, dtype)
    expected = _apply_bn(bn, layer(x))
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias = nn.Parameter(b)
    torch.testing.assert_close(layer(x), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 3), lambda: nn.Conv1d(6, 4, 3),
                                  lambda: nn.Conv2d(6, 4, 3, groups=2, dilation=2),
                                  lambda: nn.Conv2d(6, 6, 3, groups=6, bias=False),
                                  lambda: nn.Conv3d(6, 2, 2, stride=2)])
def test_fold_bn_into_next_weights_matches_bn_then_layer(make):
    dtype = torch.float64
    torch.manual_seed(1)
    layer = make().to(dtype)
    bn = _bn(6, dtype)
    x = _input(layer, dtype)
    expected = layer(_apply_bn(bn, x))
    w, b = fold_bn_into_next_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var,
                                     bn.eps, bn.weight, bn.bias, groups=getattr(layer, "groups", 1))
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias = nn.Parameter(b)
    torch.testing.assert_close(layer(x), expected, **TOLERANCES[dtype])


def test_bn_scale_shift_is_eval_batch_norm():
    bn = _bn(5, torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    scale, shift = bn_scale_shift(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    torch.testing.assert_close(scale * x + shift, _apply_bn(bn, x), **TOLERANCES[torch.float64])


def test_channel_mismatch_is_a_clear_error():
    bn = _bn(5, torch.float64)
    with pytest.raises(ValueError, match="5 channels but the layer before it has 7"):
        fold_bn_weights(torch.randn(7, 3), None, bn.running_mean, bn.running_var, bn.eps,
                        bn.weight, bn.bias)


def test_absorb_bias_keeps_the_running_mean_offset_through_updates():
    # running_mean follows batch means; stripping c shifts every batch mean by -c
    rm = torch.randn(4, dtype=torch.float64)
    c = torch.randn(4, dtype=torch.float64)
    rm_stripped = absorb_bias(rm, c)
    for momentum in (0.1, 1 / 3):
        batch_mean = torch.randn(4, dtype=torch.float64)
        rm = (1 - momentum) * rm + momentum * batch_mean
        rm_stripped = (1 - momentum) * rm_stripped + momentum * (batch_mean - c)
    torch.testing.assert_close(rm_stripped, rm - c)
