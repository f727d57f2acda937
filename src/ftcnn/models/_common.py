"""Helpers shared by the model builders (kept private so the registry stays the public surface)."""

from __future__ import annotations

import torch
from torch import nn


def scaled(channels: int, width: float) -> int:
    """Width-scaled size; never 0 so that aggressive widths still give a valid network."""
    return max(1, int(round(channels * width)))


def check_args(num_classes: int, in_channels: int, input_size: int, width: float) -> None:
    """Fail at build time with one readable line rather than deep inside a conv shape error."""
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if int(in_channels) < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if int(input_size) < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    if not float(width) > 0:
        raise ValueError(f"width must be > 0, got {width}")


def flat_features(features: nn.Module, in_channels: int, input_size: int) -> int:
    """Flatten size found by a dummy forward, so no input resolution is ever hard-coded."""
    was_training = features.training
    features.eval()  # BatchNorm refuses 1-value batches in train mode
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, in_channels, input_size, input_size))
    finally:
        features.train(was_training)
    return int(out[0].numel())


class PooledClassifier(nn.Module):
    """features -> avgpool -> flatten -> classifier: the forward VGG and AlexNet share
    (subclasses set the three submodules)."""

    features: nn.Module
    avgpool: nn.Module
    classifier: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)
