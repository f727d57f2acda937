"""A user-side model module, imported by tests as "user_models:tiny" to exercise load_builder."""

from torch import nn

NOT_CALLABLE = 42


def tiny(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
         width: float = 1.0) -> nn.Module:
    hidden = max(1, round(8 * width))
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(hidden, num_classes),
    )


def not_a_model(**kwargs: object) -> str:
    return "nope"
