"""Model registry.

Every builder takes the same keywords, ``(num_classes=10, in_channels=3, input_size=32,
width=1.0)``, so campaigns, hardening and pruning code can treat built-in and user models
alike. ``width`` multiplies every hidden channel count and hidden linear width (rounded,
at least 1), which is how tests and quick experiments get small versions of big networks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from .alexnet import alexnet
from .lenet import lenet5
from .resnet import resnet18, resnet20, resnet50
from .vgg import vgg11, vgg16

Builder = Callable[..., nn.Module]

MODELS: dict[str, Builder] = {
    "lenet5": lenet5,
    "alexnet": alexnet,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "resnet50": resnet50,
}

__all__ = ["MODELS", "Builder", "build", "load_builder", "model_names"]


def model_names() -> list[str]:
    """Registry names, sorted, for CLI choices and error messages."""
    return sorted(MODELS)


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown model {name!r}; choose from: {', '.join(model_names())} "
        "(or give a user builder as 'package.module:function')"
    )


def load_builder(spec: str) -> Builder:
    """Resolve a registry name or a user ``"package.module:function"`` to a builder.

    User builders let people run the whole toolkit on their own architecture without
    editing this package; the function should accept the same keywords as the built-ins.
    Every failure is a one-line ``ValueError`` because the CLI shows it verbatim.
    """
    spec = spec.strip()
    if spec in MODELS:
        return MODELS[spec]
    if ":" not in spec:
        raise _unknown(spec)
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"malformed model spec {spec!r}; expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the user's module, report it as such
        detail = " ".join(str(exc).split())
        raise ValueError(
            f"cannot import module {module_name!r} for model spec {spec!r}: "
            f"{type(exc).__name__}: {detail}"
        ) from exc
    obj: object = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(
                f"module {module_name!r} has no attribute {attr_path!r} (model spec {spec!r})"
            ) from None
    if not callable(obj):
        raise ValueError(f"model spec {spec!r} names a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[return-value]


def build(name: str, **kwargs: object) -> nn.Module:
    """Build a model by registry name (or user spec) with the common builder keywords."""
    builder = load_builder(name)
    model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model builder {name!r} returned {type(model).__name__}, not nn.Module")
    return model
