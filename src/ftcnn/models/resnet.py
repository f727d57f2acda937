"""ResNets (He et al., 2016) in their CIFAR form: 3x3 stem, no stem max pool."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import check_args, scaled


class BasicBlock(nn.Module):
    """Two 3x3 convs plus shortcut.

    Every part is a named submodule (and each ReLU its own instance) so forward hooks,
    torch.fx and Torch-Pruning's dependency graph see the whole block; the shortcut is an
    empty ``nn.Sequential`` for the identity and a 1x1 conv + BN projection when the shape
    changes (option B of the paper).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) plus shortcut; stride on the 3x3 as in torchvision."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)
        self.relu3 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class ResNet(nn.Module):
    """Stem conv-BN-ReLU, one ``layerN`` Sequential per stage, global average pool, fc.

    The first stage keeps the resolution and each later one halves it, so CIFAR 32x32
    ends at 4x4 (4 stages) or 8x8 (3 stages) and even 8x8 inputs never reach 0.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: Sequence[int],
                 planes: Sequence[int], num_classes: int = 10, in_channels: int = 3,
                 input_size: int = 32, width: float = 1.0) -> None:
        super().__init__()
        check_args(num_classes, in_channels, input_size, width)
        planes = [scaled(p, width) for p in planes]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=False)
        in_planes = planes[0]
        for i, (n, p) in enumerate(zip(num_blocks, planes), start=1):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 1 and j == 0) else 1
                blocks.append(block(in_planes, p, stride))
                in_planes = p * block.expansion
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.num_stages = len(num_blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He init (fan_out) as in the paper and torchvision; PyTorch's default init trains
        # noticeably slower for deep BN ResNets.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        if self.num_stages == 4:
            x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet18(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
             width: float = 1.0) -> nn.Module:
    """ResNet-18, BasicBlock [2, 2, 2, 2], 64-512 channels (the common CIFAR variant)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512],
                  num_classes, in_channels, input_size, width)


def resnet20(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
             width: float = 1.0) -> nn.Module:
    """ResNet-20 of He et al.'s CIFAR experiments (16-32-64 channels, 3x3 BasicBlocks),
    with projection (option B) instead of zero-padding shortcuts so every shortcut is an
    ordinary, prunable layer."""
    return ResNet(BasicBlock, [3, 3, 3], [16, 32, 64],
                  num_classes, in_channels, input_size, width)


def resnet50(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
             width: float = 1.0) -> nn.Module:
    """ResNet-50, Bottleneck [3, 4, 6, 3] with expansion 4, CIFAR stem."""
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512],
                  num_classes, in_channels, input_size, width)
