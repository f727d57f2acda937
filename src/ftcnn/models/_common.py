"""Helpers shared by the model builders (kept private so the registry stays the public surface)."""

from __future__ import annotations

import operator

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


# Layers that keep the (channels, height, width) shape whatever their settings.
_SHAPE_KEEPING: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Dropout, nn.Dropout2d,
)
Shape = tuple[int, int, int]  # (channels, height, width) of one sample


class _NotCovered(Exception):
    """A setting the arithmetic leaves to the forward (which reports it if it is wrong)."""


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _sliding_side(side: int, kernel: int, stride: int, padding: int, dilation: int,
                  ceil_mode: bool) -> int:
    """Output side of a conv or pool window, PyTorch's formula (``pooling_output_shape``):
    the last ceil-mode window must start inside the input or its left padding."""
    if stride < 1 or dilation < 1:
        raise _NotCovered  # the forward's error to report
    span = side + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= side + padding:
        out -= 1
    return out


def _conv_shape(conv: nn.Conv2d, shape: Shape) -> Shape:
    if conv.in_channels != shape[0] or isinstance(conv.padding, str):
        raise _NotCovered  # a channel mismatch is the forward's error; "same"/"valid" padding is rare
    sides = [_sliding_side(side, k, s, p, d, False) for side, k, s, p, d in zip(
        shape[1:], conv.kernel_size, conv.stride, conv.padding, conv.dilation)]
    return (conv.out_channels, sides[0], sides[1])


def _pool_shape(pool: nn.MaxPool2d | nn.AvgPool2d, shape: Shape) -> Shape:
    kernel, padding = _pair(pool.kernel_size), _pair(pool.padding)
    stride = _pair(pool.stride if pool.stride not in (None, ()) else pool.kernel_size)
    dilation = _pair(pool.dilation) if isinstance(pool, nn.MaxPool2d) else (1, 1)
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise _NotCovered  # refused by the forward, with its own message
    sides = [_sliding_side(side, k, s, p, d, bool(pool.ceil_mode)) for side, k, s, p, d in zip(
        shape[1:], kernel, stride, padding, dilation)]
    return (shape[0], sides[0], sides[1])


def _adaptive_shape(pool: nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d, shape: Shape) -> Shape:
    size = pool.output_size
    target = (size, size) if isinstance(size, int) else tuple(size)
    sides = [side if want is None else int(want) for side, want in zip(shape[1:], target)]
    return (shape[0], sides[0], sides[1])


def _output_shape(module: nn.Module, shape: Shape) -> Shape:
    """One sample's output shape from the layer settings alone; raises _NotCovered when
    this module (a subclass, a hook, a setting not modelled here) needs the real forward."""
    kind = type(module)  # exact types: a subclass may override forward
    if module._forward_hooks or module._forward_pre_hooks:
        raise _NotCovered
    if kind is nn.Sequential:
        for child in module:
            shape = _output_shape(child, shape)
        return shape
    if kind in _SHAPE_KEEPING:
        return shape
    if kind is nn.BatchNorm2d and module.num_features == shape[0]:
        return shape
    if kind is nn.Conv2d:
        return _conv_shape(module, shape)
    if kind in (nn.MaxPool2d, nn.AvgPool2d):
        return _pool_shape(module, shape)
    if kind in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
        return _adaptive_shape(module, shape)
    raise _NotCovered


def flat_features_by_arithmetic(features: nn.Module, in_channels: int, input_size: int) -> int | None:
    """Flatten size from the layer settings, or None when a layer is not covered or a map
    would be empty (the forward then raises its own error)."""
    try:  # operator.index: a size the dummy forward would refuse (28.5) is refused by it, as before
        side = operator.index(input_size)
        channels, height, width = _output_shape(features, (operator.index(in_channels), side, side))
    except (_NotCovered, TypeError):
        return None
    if min(channels, height, width) < 1:
        return None
    return channels * height * width


def flat_features_by_forward(features: nn.Module, in_channels: int, input_size: int) -> int:
    """Flatten size found by a dummy forward: works for any module, but on the meta device
    (how checkpoints are loaded) it imports torch._dynamo, ~1 s of start-up."""
    was_training = features.training
    features.eval()  # BatchNorm refuses 1-value batches in train mode
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, in_channels, input_size, input_size))
    finally:
        features.train(was_training)
    return int(out[0].numel())


def flat_features(features: nn.Module, in_channels: int, input_size: int) -> int:
    """Flatten size, so no input resolution is ever hard-coded: by arithmetic when every
    layer is covered (no forward, so loading a checkpoint stays fast), else by a forward."""
    by_arithmetic = flat_features_by_arithmetic(features, in_channels, input_size)
    if by_arithmetic is not None:
        return by_arithmetic
    return flat_features_by_forward(features, in_channels, input_size)


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
