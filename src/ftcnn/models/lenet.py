"""LeNet-5 (LeCun et al., 1998) with ReLU and max pooling, the usual modern reading."""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_args, flat_features, scaled


class LeNet5(nn.Module):
    """Two conv/pool stages and three fully connected layers.

    conv1 gets padding 2 for inputs <= 28 so that 28x28 MNIST reaches the classic 5x5x16
    feature map (the 1998 network was fed 32x32). conv2 is padded only when its input is
    smaller than its kernel (e.g. 8x8 sklearn digits), and the pools use ``ceil_mode`` so a
    1x1 map stays 1x1; on 28 and 32 inputs both changes are no-ops.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                 width: float = 1.0) -> None:
        super().__init__()
        check_args(num_classes, in_channels, input_size, width)
        c1, c2 = scaled(6, width), scaled(16, width)
        f1, f2 = scaled(120, width), scaled(84, width)
        pad1 = 2 if input_size <= 28 else 0
        size = -(-(input_size + 2 * pad1 - 4) // 2)  # after conv1 + ceil-mode pool
        pad2 = 0 if size >= 5 else 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5, padding=pad1),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(c1, c2, kernel_size=5, padding=pad2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        n_flat = flat_features(self.features, in_channels, input_size)
        self.classifier = nn.Sequential(
            nn.Linear(n_flat, f1),
            nn.ReLU(inplace=False),
            nn.Linear(f1, f2),
            nn.ReLU(inplace=False),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def lenet5(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
           width: float = 1.0) -> nn.Module:
    """Smallest registry model: the quick sanity-check network for fault campaigns."""
    return LeNet5(num_classes, in_channels, input_size, width)
