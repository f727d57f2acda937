"""Registry models: shapes, width scaling, fx tracing, user builders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from ftcnn.models import MODELS, build, load_builder, model_names

SHAPES = [(1, 28, 10), (3, 32, 10), (1, 8, 10)]
# Keep the big networks small so the whole file stays fast on 2 CPU cores.
TEST_WIDTH = {"lenet5": 1.0, "resnet20": 1.0, "alexnet": 0.25, "vgg11": 0.25,
              "vgg16": 0.25, "resnet18": 0.125, "resnet50": 0.125}
TESTS_DIR = Path(__file__).resolve().parent


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names() -> None:
    assert model_names() == sorted(MODELS)
    assert set(MODELS) >= {"lenet5", "alexnet", "vgg11", "vgg16", "resnet18", "resnet20",
                           "resnet50"}
    assert set(TEST_WIDTH) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels,size,classes", SHAPES)
def test_forward_shapes(name: str, channels: int, size: int, classes: int) -> None:
    torch.manual_seed(0)
    model = build(name, num_classes=classes, in_channels=channels, input_size=size,
                  width=TEST_WIDTH[name])
    x = torch.randn(2, channels, size, size)
    model.train()
    assert model(x).shape == (2, classes)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_other_num_classes(name: str) -> None:
    model = build(name, num_classes=7, in_channels=3, input_size=32, width=TEST_WIDTH[name])
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_width_reduces_parameters(name: str) -> None:
    full = n_params(build(name, in_channels=3, input_size=32, width=1.0))
    small = n_params(build(name, in_channels=3, input_size=32, width=0.25))
    assert small < full


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_width_still_builds(name: str) -> None:
    model = build(name, in_channels=1, input_size=8, width=0.01)
    assert model.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fx_trace_and_no_inplace_relu(name: str) -> None:
    model = build(name, in_channels=3, input_size=32, width=TEST_WIDTH[name]).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    for module in model.modules():
        assert not getattr(module, "inplace", False), f"in-place {type(module).__name__}"


def test_known_parameter_counts() -> None:
    # Published CIFAR-10 figures for these architectures.
    assert n_params(build("lenet5", in_channels=3, input_size=32)) == 62_006
    assert n_params(build("resnet20", in_channels=3, input_size=32)) == 272_474


def test_resnet_blocks_have_named_parts() -> None:
    model = build("resnet20", width=0.5)
    block = model.layer2[0]
    for part in ("conv1", "bn1", "conv2", "bn2", "shortcut"):
        assert isinstance(getattr(block, part), nn.Module)
    assert isinstance(block.shortcut, nn.Sequential) and len(block.shortcut) == 2
    assert isinstance(model.layer1[0].shortcut, nn.Sequential) and len(model.layer1[0].shortcut) == 0
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_torch_pruning_dependency_graph() -> None:
    import torch_pruning as tp  # a hard dependency: a broken import must fail, not skip
    for name in ("resnet20", "vgg11"):
        model = build(name, in_channels=3, input_size=32, width=0.25).eval()
        before = n_params(model)
        pruner = tp.pruner.MagnitudePruner(
            model, torch.randn(1, 3, 32, 32), importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=[m for m in model.modules() if isinstance(m, nn.Linear)])
        pruner.step()
        assert n_params(model) < before
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'nope'; choose from: .*resnet20"):
        build("nope")


def test_bad_width() -> None:
    with pytest.raises(ValueError, match="width"):
        build("lenet5", width=0)


def test_user_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    builder = load_builder("user_models:tiny")
    model = builder(num_classes=4, in_channels=1, input_size=8, width=1.0)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    assert build("user_models:tiny", num_classes=3).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert load_builder("resnet20") is MODELS["resnet20"]


@pytest.mark.parametrize("spec,pattern", [
    ("no_such_module_xyz:fn", r"cannot import module 'no_such_module_xyz'"),
    ("user_models:missing", r"has no attribute 'missing'"),
    ("user_models:NOT_CALLABLE", r"not a callable"),
    ("user_models:", r"malformed model spec"),
])
def test_user_builder_errors(monkeypatch: pytest.MonkeyPatch, spec: str, pattern: str) -> None:
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    with pytest.raises(ValueError, match=pattern) as info:
        load_builder(spec)
    assert "\n" not in str(info.value)


def test_user_builder_must_return_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    with pytest.raises(ValueError, match="not nn.Module"):
        build("user_models:not_a_model")
