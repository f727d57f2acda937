"""Registry models: shapes, width scaling, fx tracing, user builders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn
from torch.nn.modules.utils import _pair

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


# --- flatten size by arithmetic (issue 24: loading a checkpoint on the meta device must not
# run a dummy forward, which imports torch._dynamo, ~1 s of start-up) ---

FLAT_SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 13, 15, 27, 28, 29, 31, 32, 33, 40]  # odd sides: pools floor/ceil


def _features_of(model: nn.Module) -> nn.Module:
    """What the classifier sees: features, then the average pool where there is one."""
    avgpool = getattr(model, "avgpool", None)
    return model.features if avgpool is None else nn.Sequential(model.features, avgpool)


@pytest.mark.parametrize("name", ["lenet5", "alexnet", "vgg11", "vgg16"])
def test_flat_features_arithmetic_equals_forward(name: str) -> None:
    from ftcnn.models._common import flat_features_by_arithmetic, flat_features_by_forward

    checked = 0
    for channels in (1, 3):
        for size in FLAT_SIZES:
            for width in ((0.01, 0.25, 1.0) if name == "lenet5" else (0.01, 0.125)):
                try:
                    model = build(name, in_channels=channels, input_size=size, width=width)
                except RuntimeError:  # too small for this network: the arithmetic must say so too
                    continue
                features = _features_of(model)
                by_arithmetic = flat_features_by_arithmetic(features, channels, size)
                assert by_arithmetic is not None, (name, channels, size, width)
                assert by_arithmetic == flat_features_by_forward(features, channels, size), \
                    (name, channels, size, width)
                checked += 1
    assert checked >= len(FLAT_SIZES)


def _layer_grid() -> list[nn.Module]:
    """Conv and pool settings around the edges: stride, padding, dilation, ceil_mode, tuples."""
    layers: list[nn.Module] = []
    for kernel in (1, 2, 3, 5):
        for stride in (1, 2, 3):
            for padding in (0, 1, 2):
                for dilation in (1, 2):
                    layers.append(nn.Conv2d(2, 3, kernel, stride=stride, padding=padding, dilation=dilation))
                    for ceil_mode in (False, True):
                        layers.append(nn.MaxPool2d(kernel, stride=stride, padding=padding,
                                                   dilation=dilation, ceil_mode=ceil_mode))
                for ceil_mode in (False, True):
                    layers.append(nn.AvgPool2d(kernel, stride=stride, padding=padding, ceil_mode=ceil_mode))
    layers += [nn.Conv2d(2, 4, (3, 1), stride=(2, 1), padding=(1, 0)), nn.MaxPool2d((2, 3)),
               nn.AdaptiveAvgPool2d(4), nn.AdaptiveAvgPool2d((None, 2)), nn.AdaptiveMaxPool2d(3),
               nn.BatchNorm2d(2), nn.ReLU(), nn.Dropout(0.5), nn.Identity()]
    return layers


def test_flat_features_arithmetic_matches_every_layer_setting() -> None:
    from ftcnn.models._common import flat_features_by_arithmetic, flat_features_by_forward

    compared = 0
    for layer in _layer_grid():
        stack = nn.Sequential(layer, nn.ReLU())
        for size in (1, 2, 3, 4, 5, 6, 7, 9):
            by_arithmetic = flat_features_by_arithmetic(stack, 2, size)
            try:
                by_forward = flat_features_by_forward(stack, 2, size)
            except RuntimeError:  # the forward refuses: the arithmetic must not invent a size
                assert by_arithmetic is None, (layer, size)
                continue
            if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)) and any(
                    2 * p > k for p, k in zip(_pair(layer.padding), _pair(layer.kernel_size))):
                continue  # left to the forward on purpose (its own padding check)
            assert by_arithmetic == by_forward, (layer, size)
            compared += 1
    assert compared > 500


def test_flat_features_falls_back_to_forward_for_unknown_layers() -> None:
    from ftcnn.models._common import flat_features, flat_features_by_arithmetic

    class Halve(nn.Module):  # a layer the arithmetic cannot know
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[..., ::2, ::2]

    class MyConv(nn.Conv2d):  # a subclass may change the shape in its forward
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[..., :1, :1]

    for features, expected in [(nn.Sequential(nn.Conv2d(1, 4, 3), Halve()), 4 * 3 * 3),
                               (nn.Sequential(MyConv(1, 4, 3)), 4),
                               (nn.Sequential(nn.Conv2d(3, 4, 3)), None)]:  # channel mismatch
        assert flat_features_by_arithmetic(features, 1, 8) is None
        if expected is None:
            with pytest.raises(RuntimeError):
                flat_features(features, 1, 8)
        else:
            assert flat_features(features, 1, 8) == expected
    hooked = nn.Sequential(nn.Conv2d(1, 4, 3))
    hooked[0].register_forward_hook(lambda module, args, out: out[..., :2, :2])
    assert flat_features_by_arithmetic(hooked, 1, 8) is None and flat_features(hooked, 1, 8) == 16


@pytest.mark.parametrize("name", sorted(MODELS))
def test_builders_run_no_forward_and_keep_parameter_shapes(name: str) -> None:
    """Every built-in model builds without a dummy forward (even on the meta device, as
    checkpoint.load does), with the same parameter shapes as a plain build."""
    kwargs = {"in_channels": 1, "input_size": 28, "width": TEST_WIDTH[name]}
    plain = {k: v.shape for k, v in build(name, **kwargs).state_dict().items()}

    def no_forward(module: nn.Module, args: object) -> None:
        raise AssertionError(f"dummy forward through {type(module).__name__} while building {name}")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(no_forward)
    try:
        with torch.device("meta"):
            on_meta = build(name, **kwargs)
    finally:
        handle.remove()
    assert {k: v.shape for k, v in on_meta.state_dict().items()} == plain


# --- a model built for other inputs than the data's (issue 24): one line, not a traceback ---

@pytest.mark.parametrize("how", [["--restrict", "zero"], ["--check-weights", "zero"], ["--tmr", "full"]])
def test_harden_refuses_data_of_another_shape(how: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import ftcnn
    from _helpers import assert_one_line_refusal, cli_in_process

    checkpoint = tmp_path / "u5.pt"  # a LeNet-5 for 28x28 inputs, given 8x8 digits
    model = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=28)
    ftcnn.save(model, checkpoint, data="mnist5k")
    output = tmp_path / "hardened.pt"
    r = cli_in_process(monkeypatch, capsys, "harden", str(checkpoint), "--data", "digits", "--ratio", "0",
                       *how, "-o", str(output))
    assert_one_line_refusal(r, "model does not accept inputs of shape 1x8x8")
    assert not output.exists() and list(tmp_path.iterdir()) == [checkpoint]


def test_harden_shape_check_changes_no_state() -> None:
    from ftcnn.protection import hardening

    torch.manual_seed(0)  # BatchNorm and dropout: what a forward in train mode would change
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                          nn.Linear(4 * 6 * 6, 10)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not accept inputs of shape 1x28x28"):
        hardening.harden(model, ratio=0, restrict="zero", calibration=torch.zeros(4, 1, 28, 28) + 1e3)
    calibration = torch.randn(8, 1, 8, 8)
    rng = torch.get_rng_state()
    hardened = hardening.harden(model, ratio=0, restrict="zero", calibration=calibration)
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout mask drawn
    assert model.training  # the check put the mode back
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no BatchNorm update
    with torch.no_grad():
        assert torch.equal(hardened.eval()(calibration), model.eval()(calibration))
