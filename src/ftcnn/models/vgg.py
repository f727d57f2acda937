"""VGG (Simonyan & Zisserman, 2015) with BatchNorm, CIFAR style."""

from __future__ import annotations

from torch import nn

from ._common import PooledClassifier, check_args, scaled

# "M" is a 2x2 max pool; numbers are 3x3 conv output channels (configs A and D of the paper).
CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M"],
}


class VGG(PooledClassifier):
    """Conv3x3-BN-ReLU stacks, a global average pool and one Linear layer.

    Following the widely used CIFAR implementations, the 4096-4096 classifier of the
    ImageNet model is dropped and convolutions keep their bias (parameter counts then match
    published CIFAR VGG numbers, e.g. 9.2M for VGG-11 and 14.7M for VGG-16). Pools use
    ``ceil_mode`` so 28 -> 14 -> 7 -> 4 -> 2 -> 1 and 8x8 bottoms out at 1x1 instead of 0.
    """

    def __init__(self, config: list[int | str], num_classes: int = 10, in_channels: int = 3,
                 input_size: int = 32, width: float = 1.0) -> None:
        super().__init__()
        check_args(num_classes, in_channels, input_size, width)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = scaled(int(item), width)
                layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1),
                           nn.BatchNorm2d(out), nn.ReLU(inplace=False)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)


def vgg11(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
          width: float = 1.0) -> nn.Module:
    """VGG-11 (config A): the benchmark network for MNIST padded to CIFAR shape."""
    return VGG(CONFIGS["A"], num_classes, in_channels, input_size, width)


def vgg16(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
          width: float = 1.0) -> nn.Module:
    """VGG-16 (config D): deeper plain network, same classifier as VGG-11."""
    return VGG(CONFIGS["D"], num_classes, in_channels, input_size, width)
