"""A model zoo with the shapes of real architectures, small enough for fast tests.

Each factory returns (model, example_input). Biases are switched on where real code often
leaves them on (the redundant ones the tools should find); torch.nn's BN and batchnorm's BN are
both used, including the fused BatchNormReLU / BatchNormAddReLU. Importable by the CLI as
`tests.zoo:resnet_basic` from the repository root.
"""

import torch
import torch.nn.functional as F
from torch import nn

import batchnorm

GENERATOR_SEED = 0


def _randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial running stats and affine parameters, so folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


class BasicBlock(nn.Module):
    """ResNet basic block with a strided 1x1 downsample; ends in batchnorm's fused BN+add+ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=True)
        self.bn2 = batchnorm.BatchNormAddReLU2d(c_out)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=True),
                                        batchnorm.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out), self.downsample(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck 1x1 -> 3x3 -> 1x1 (x4) with downsample; torch.nn BN, mostly bias=False."""

    def __init__(self, c_in: int, width: int, stride: int = 2) -> None:
        super().__init__()
        c_out = width * 4
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=True), nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                        nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


def resnet_basic():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), batchnorm.BatchNormReLU2d(8), BasicBlock(8, 16))
    return _randomize_bn(model), torch.randn(4, 3, 12, 12)


def resnet_bottleneck():
    model = nn.Sequential(Bottleneck(8, 4), Bottleneck(16, 4, stride=1))
    return _randomize_bn(model), torch.randn(4, 8, 10, 10)


def vgg_bn():
    """VGG with BN: conv-BN-ReLU stacks, a conv whose bias reaches BN through a max pool, the
    classifier Linear -> BatchNorm1d (on flattened features) -> ReLU -> Dropout -> Linear."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), batchnorm.BatchNormReLU2d(8),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.MaxPool2d(2), batchnorm.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10),
    )
    return _randomize_bn(model), torch.randn(4, 3, 16, 16)


class InvertedResidual(nn.Module):
    """MobileNetV2: 1x1 expand, 3x3 depthwise (groups = channels), 1x1 linear projection, skip."""

    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        hidden = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=True), nn.BatchNorm2d(hidden),
                                    nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=True),
                                       batchnorm.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=True), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


def mobilenet_v2():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                          InvertedResidual(8), InvertedResidual(8))
    return _randomize_bn(model), torch.randn(4, 3, 16, 16)


class DenseLayer(nn.Module):
    """DenseNet-BC layer: BN-ReLU-conv1x1-BN-ReLU-conv3x3 on the concatenation of all before."""

    def __init__(self, c_in: int, growth: int, bias: bool = False) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, 4 * growth, 1, bias=True)
        self.norm2 = batchnorm.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=bias)

    def forward(self, features):
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    """bias=True gives each layer's 3x3 conv a bias: the last layer's reaches only the
    transition's BN, through the concatenation; every earlier one is read by several later
    concatenations (several users) and stays."""

    def __init__(self, c_in: int = 8, growth: int = 4, layers: int = 3, bias: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(c_in + i * growth, growth, bias)
                                    for i in range(layers))
        c_out = c_in + layers * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(c_out), nn.ReLU(),
                                        nn.Conv2d(c_out, c_out // 2, 1, bias=False),
                                        nn.AvgPool2d(2))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return self.transition(torch.cat(features, 1))


def densenet_block():
    return _randomize_bn(DenseBlock()), torch.randn(4, 8, 8, 8)


def densenet_concat():
    return _randomize_bn(DenseBlock(bias=True)), torch.randn(4, 8, 8, 8)


class InceptionBlock(nn.Module):
    """Inception-style block: four parallel branches concatenated on channels, then one fused
    BN + ReLU over all 16 channels. Branches: 1x1; 1x1 -> BN -> ReLU -> 3x3; 3x3 max pool -> 1x1;
    1x1 -> ReLU (the one bias the BN does not cancel)."""

    def __init__(self, c_in: int = 8) -> None:
        super().__init__()
        self.branch1 = nn.Conv2d(c_in, 4, 1, bias=True)
        self.branch3 = nn.Sequential(nn.Conv2d(c_in, 4, 1, bias=True), nn.BatchNorm2d(4),
                                     nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, bias=True))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(c_in, 4, 1, bias=True))
        self.branch_relu = nn.Sequential(nn.Conv2d(c_in, 2, 1, bias=True), nn.ReLU())
        self.bn = batchnorm.BatchNormReLU2d(16)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        branches = [self.branch1(x), self.branch3(x), self.branch_pool(x), self.branch_relu(x)]
        return self.head(self.bn(torch.cat(branches, dim=1)))


def inception_block():
    return _randomize_bn(InceptionBlock()), torch.randn(4, 8, 8, 8)


class SumMerge(nn.Module):
    """Convolutions summed before one BN: an FPN merge (lateral 1x1 conv + upsampled 1x1 conv of
    the coarser level), a scaled difference of two 3x3 convs, and a sum in which one branch
    passes a ReLU (only the other branch's bias is redundant); a 1x1 head the last BN folds into."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.lateral = nn.Conv2d(c, c, 1, bias=True)
        self.top = nn.Conv2d(2 * c, c, 1, bias=True)
        self.merge_bn = nn.BatchNorm2d(c)
        self.left = nn.Conv2d(c, c, 3, padding=1, bias=True)
        self.right = nn.Conv2d(c, c, 3, padding=1, bias=True)
        self.diff_bn = batchnorm.BatchNorm2d(c)
        self.linear_branch = nn.Conv2d(c, c, 1, bias=True)
        self.relu_branch = nn.Conv2d(c, c, 1, bias=True)
        self.mixed_bn = nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x, coarse):
        top = F.interpolate(self.top(coarse), scale_factor=2, mode="nearest")
        y = F.relu(self.merge_bn(self.lateral(x) + top))
        y = F.relu(self.diff_bn((self.left(y) - self.right(y)) * 0.5))
        y = self.mixed_bn(self.linear_branch(y) + F.relu(self.relu_branch(y)))
        return self.head(y)


def sum_merge():
    return _randomize_bn(SumMerge()), (torch.randn(4, 8, 8, 8), torch.randn(4, 16, 4, 4))


class UNetDecoder(nn.Module):
    """U-Net decoder step: ConvTranspose upsampling (grouped), concat with the skip, two convs;
    and a final ConvTranspose -> BN."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2, groups=2, bias=True)
        self.up_bn = batchnorm.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(2 * c, c, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect", bias=True)
        self.bn2 = batchnorm.BatchNormReLU2d(c)
        self.out = nn.ConvTranspose2d(c, 4, 3, stride=2, padding=1, output_padding=1)
        self.out_bn = nn.BatchNorm2d(4)

    def forward(self, x, skip):
        up = F.relu(self.up_bn(self.up(x)))
        y = F.relu(self.bn1(self.conv1(torch.cat([up, skip], 1))))
        return self.out_bn(self.out(self.bn2(self.conv2(y))))


def unet_decoder():
    return _randomize_bn(UNetDecoder()), (torch.randn(4, 16, 5, 5), torch.randn(4, 8, 10, 10))


def mlp():
    """MLP with BatchNorm1d: an input BN folding into the next Linear, Linear -> BN -> ReLU."""
    model = nn.Sequential(nn.BatchNorm1d(12), nn.Linear(12, 32), batchnorm.BatchNorm1d(32),
                          nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          nn.Linear(32, 5))
    return _randomize_bn(model), torch.randn(8, 12)


def audio_1d():
    """1d audio conv net: dilated Conv1d, depthwise Conv1d, a BN feeding an unpadded conv."""
    model = nn.Sequential(
        nn.Conv1d(2, 8, 5, stride=2, bias=True), batchnorm.BatchNormReLU1d(8),
        nn.Conv1d(8, 8, 3, dilation=2, padding=2, groups=8, bias=True), nn.BatchNorm1d(8),
        nn.ReLU(), nn.BatchNorm1d(8), nn.Conv1d(8, 16, 3, bias=True),  # BN -> conv, no padding
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 4),
    )
    return _randomize_bn(model), torch.randn(4, 2, 40)


def conv3d():
    """3d conv net: Conv3d -> BN3d, strided conv, ConvTranspose3d -> BN3d."""
    model = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1, bias=True), nn.BatchNorm3d(4), nn.ReLU(),
        nn.Conv3d(4, 8, 3, stride=2, padding=1, bias=True), batchnorm.BatchNormReLU3d(8),
        nn.ConvTranspose3d(8, 4, 2, stride=2, bias=True), batchnorm.BatchNorm3d(4),
    )
    return _randomize_bn(model), torch.randn(2, 1, 6, 6, 6)


ZOO = {f.__name__: f for f in (resnet_basic, resnet_bottleneck, vgg_bn, mobilenet_v2,
                               densenet_block, unet_decoder, mlp, audio_1d, conv3d,
                               densenet_concat, inception_block, sum_merge)}
