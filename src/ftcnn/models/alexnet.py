"""AlexNet (Krizhevsky et al., 2012) adapted to small images."""

from __future__ import annotations

from torch import nn

from ._common import PooledClassifier, check_args, flat_features, scaled


class AlexNet(PooledClassifier):
    """CIFAR-style AlexNet: the five convolutions 64-192-384-256-256 and three max pools
    of the original, but with a stride-1 3x3 first conv (an 11x11/4 stem would erase a
    32x32 image) and 1024-1024 hidden linear layers instead of 4096-4096, as is common for
    CIFAR variants; 4096-wide layers would make the classifier ~95% of the parameters.

    Pools use ``ceil_mode`` so 28 -> 14 -> 7 -> 4 and 8 -> 4 -> 2 -> 1. For inputs larger
    than 32 an adaptive average pool brings the last feature map down to 4x4, keeping the
    classifier the same size as at 32x32 (torchvision does the same at 6x6); for 32 and 28
    inputs the map is already 4x4 and the pool is the identity.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                 width: float = 1.0) -> None:
        super().__init__()
        check_args(num_classes, in_channels, input_size, width)
        c = [scaled(n, width) for n in (64, 192, 384, 256, 256)]
        hidden = scaled(1024, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c[0], kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(c[0], c[1], kernel_size=5, padding=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(c[1], c[2], kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(c[2], c[3], kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(c[3], c[4], kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        side = input_size
        for _ in range(3):
            side = -(-side // 2)
        self.avgpool = nn.AdaptiveAvgPool2d(min(side, 4))
        n_flat = flat_features(nn.Sequential(self.features, self.avgpool), in_channels, input_size)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(n_flat, hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=False),
            nn.Linear(hidden, num_classes),
        )


def alexnet(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
            width: float = 1.0) -> nn.Module:
    """Plain (no BatchNorm, no shortcut) deep-ish network with large fully connected layers,
    a useful contrast to the ResNets in vulnerability studies."""
    return AlexNet(num_classes, in_channels, input_size, width)
