"""BatchNorm folded into the conv before it (issue 21, "ResNet-class networks"): the deployed form.

The folded model computes the original's logits within float tolerance (ResNet-20, VGG-11 and a
user model, at initialisation and with non-trivial running statistics), holds no unattacked float
memory, reloads from its checkpoint, and a checkpoint whose fold names a module that is no
BatchNorm (or no conv, or nothing) is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import ftcnn
from _helpers import assert_one_line_refusal, cli_in_process
from ftcnn import checkpoint
from ftcnn.injection import graph
from ftcnn.protection import fold, hardening
from ftcnn.injection import faults as F
from ftcnn.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL, ATOL = 1e-4, 1e-5
SHAPE = (1, 8, 8)  # the built-in digits


class UserBNNet(nn.Module):
    """A user's residual network: conv-BN pairs (one conv with a bias), a BatchNorm after the
    residual sum (cannot be folded: its input is no conv's) and a conv whose output two
    modules read (folding its BN would change the other reader)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 6, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.conv_bn = nn.BatchNorm2d(6)
        self.sum_bn = nn.BatchNorm2d(6)
        self.tap = nn.Conv2d(6, 6, 1)
        self.tap_bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * input_size * input_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem_bn(self.stem(x)))
        h = self.sum_bn(h + self.conv_bn(self.conv(h)))
        t = self.tap(h)
        return self.fc((self.tap_bn(t) + t).flatten(1))


def user_bn_net(num_classes: int = 10, in_channels: int = 1, input_size: int = 8) -> nn.Module:
    """The builder ``ftcnn.load(..., allow_builder="test_fold:user_bn_net")`` trusts."""
    torch.manual_seed(0)
    return UserBNNet(num_classes, in_channels, input_size)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "user":
        return user_bn_net()
    width = 0.5 if name == "resnet20" else 0.25
    return ftcnn.build(name, num_classes=10, in_channels=1, input_size=8, width=width)


def _trained_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affine values far from their initial 0/1, as after training."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.05)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def _inputs() -> torch.Tensor:
    return torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("statistics", ["init", "trained"])
@pytest.mark.parametrize("name", ["resnet20", "vgg11", "user"])
def test_folding_is_exact_within_float_tolerance(name: str, statistics: str) -> None:
    model = _model(name)
    if statistics == "trained":
        _trained_statistics(model)
    model.eval()
    x = _inputs()
    folded = fold.fold_batchnorm(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=RTOL, atol=ATOL)
    left = [n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # every BatchNorm after a conv is gone; the user's one after a sum and the one whose conv
    # output is read twice stay (and stay attacked)
    assert left == (["sum_bn", "tap_bn"] if name == "user" else [])
    assert type(folded) is type(model) and not folded.training


@pytest.mark.parametrize("name", ["resnet20", "vgg11"])
def test_a_folded_model_has_no_unattacked_float_memory(name: str) -> None:
    model = _trained_statistics(_model(name)).eval()
    before = F.memory_coverage(model, F.parameter_memory(model, include_bn=False).stored)["unattacked_memory"]
    assert any(k.endswith("running_var") for k in before)  # what folding removes
    folded = fold.fold_batchnorm(model)
    coverage = F.memory_coverage(folded, F.parameter_memory(folded, include_bn=False).stored)
    assert coverage["unattacked_memory"] == {} and coverage["unattacked_bits"] == 0


def test_the_fold_keeps_names_and_a_conv_without_bias_gains_an_attacked_bias() -> None:
    model = _model("resnet20").eval()
    folded = fold.fold_batchnorm(model)
    assert model.conv1.bias is None and folded.conv1.bias is not None
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.layer2[0].shortcut[1], nn.Identity)
    targets = graph.fault_targets(folded)
    assert "conv1.bias" in targets and "layer2.0.shortcut.0.bias" in targets
    assert {n for n, _ in model.named_parameters() if "bn" not in n and "shortcut.1" not in n} \
        <= set(dict(folded.named_parameters()))
    assert model.conv1.bias is None and isinstance(model.bn1, nn.BatchNorm2d)  # the input is untouched


def test_a_model_in_training_mode_or_untraceable_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="training mode.*call model.eval") as info:
        fold.fold_batchnorm(_model("resnet20").train())
    assert "\n" not in str(info.value)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent: fx cannot trace

    with pytest.raises(ValueError, match="torch.fx cannot trace") as info:
        fold.fold_batchnorm(Branchy().eval())
    assert "\n" not in str(info.value)


def test_a_conv_called_twice_or_a_hooked_batchnorm_is_not_folded() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + self.conv(x)

    assert fold.foldable(Twice().eval()) == {}
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    assert fold.foldable(net) == {"1": "0"}
    net[1].register_forward_hook(lambda *a: None)
    assert fold.foldable(net) == {}
    assert fold.foldable(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))) == {}


def test_a_folded_checkpoint_reloads_and_computes_the_same(tmp_path: Path) -> None:
    model = _trained_statistics(_model("resnet20")).eval()
    folded = fold.fold_batchnorm(model)
    ftcnn.save(folded, tmp_path / "folded.pt")
    loaded = ftcnn.load(tmp_path / "folded.pt")
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))
    transform = checkpoint.get_spec(loaded)["transforms"][-1]
    assert transform["kind"] == "fold_bn" and transform["layers"]["bn1"] == "conv1"
    # a user model (its builder trusted by name), with the BatchNorms that stay
    described = checkpoint.describe(user_bn_net(), "test_fold:user_bn_net",  # named before folding
                                    {"num_classes": 10, "in_channels": 1, "input_size": 8})
    user = fold.fold_batchnorm(_trained_statistics(described).eval())
    ftcnn.save(user, tmp_path / "user.pt")
    again = ftcnn.load(tmp_path / "user.pt", allow_builder="test_fold:user_bn_net")
    with torch.no_grad():
        assert torch.equal(again(x), user(x))


def test_harden_fold_bn_protects_the_folded_form_and_reloads(tmp_path: Path) -> None:
    model = _trained_statistics(_model("resnet20")).eval()
    hardened = hardening.harden(model, ratio=0, check_weights="zero", fold_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in hardened.modules())
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(hardened(x), model(x), rtol=RTOL, atol=ATOL)
    kinds = [t["kind"] for t in checkpoint.get_spec(hardened)["transforms"]]
    assert kinds == ["fold_bn", "harden"]
    coverage = F.memory_coverage(hardened, F.parameter_memory(hardened).stored)
    assert coverage["unattacked_memory"] == {}
    ftcnn.save(hardened, tmp_path / "hard.pt")
    with torch.no_grad():
        assert torch.equal(ftcnn.load(tmp_path / "hard.pt")(x), hardened(x))
    # without the flag nothing is folded (the default keeps existing hardened models as they were)
    plain = hardening.harden(model, ratio=0, check_weights="zero")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == 21


def _forged(tmp_path: Path, layers: object, **extra: object) -> Path:
    """A folded ResNet-20 checkpoint whose fold transform is replaced."""
    folded = fold.fold_batchnorm(_model("resnet20").eval())
    ftcnn.save(folded, tmp_path / "ok.pt")
    blob = torch.load(tmp_path / "ok.pt", weights_only=True)
    spec = json.loads(blob["spec"])
    spec["transforms"][-1] = {"kind": "fold_bn", "layers": layers, **extra}
    blob["spec"] = json.dumps(spec)
    torch.save(blob, tmp_path / "bad.pt")
    return tmp_path / "bad.pt"


HOSTILE = [
    ({"conv1": "conv1"}, {}, "'conv1', which is no BatchNorm2d"),
    ({"nope": "conv1"}, {}, "'nope', which is no BatchNorm2d"),
    ({"": "conv1"}, {}, "which is no BatchNorm2d"),
    ({"bn1": "fc"}, {}, "into 'fc', which is no Conv2d"),
    ({"bn1": "missing.conv"}, {}, "which is no Conv2d"),
    ({"layer2.0.bn1": "conv1"}, {}, "output channels"),
    ({"bn1": "conv1", "layer1.0.bn1": "conv1"}, {}, "two BatchNorms into one conv"),
    ([["bn1", "conv1"]], {}, "layers must be a JSON object"),
    ({"bn1": 3}, {}, "map names"),
    ({"bn1": "conv1"}, {"code": "os.system"}, "unknown field 'code' in fold_bn transform"),
]


@pytest.mark.parametrize("layers, extra, message", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_a_hostile_fold_transform_is_refused_in_one_line(tmp_path: Path, layers, extra, message) -> None:
    path = _forged(tmp_path, layers, **extra)
    with pytest.raises(CheckpointError) as info:
        ftcnn.load(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_cli_refuses_a_hostile_fold_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    path = _forged(tmp_path, {"fc": "conv1"})
    r = cli_in_process(monkeypatch, capsys, "harden", str(path), "--ratio", "0", "--check-weights", "zero",
                       "--data", "digits", "-o", str(tmp_path / "out.pt"))
    assert_one_line_refusal(r, "'fc', which is no BatchNorm2d")
    assert not (tmp_path / "out.pt").exists()


def test_ftcnn_harden_fold_bn(tmp_path: Path, monkeypatch, capsys) -> None:
    model = _trained_statistics(_model("resnet20")).eval()
    ftcnn.save(model, tmp_path / "r.pt", data="digits")
    r = cli_in_process(monkeypatch, capsys, "harden", str(tmp_path / "r.pt"), "--ratio", "0", "--check-weights",
                       "zero", "--fold-bn", "--threads", "1", "--calibration-size", "16",
                       "-o", str(tmp_path / "h.pt"))
    assert r.returncode == 0, r.stderr
    assert "BatchNorm folded into the conv before it: 21 layers" in r.stdout
    hardened = ftcnn.load(tmp_path / "h.pt")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in hardened.modules())
    record = checkpoint.meta(hardened)["hardening"]
    assert record["folded_bn"]["bn1"] == "conv1" and len(record["folded_bn"]) == 21
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(hardened(x), model(x), rtol=RTOL, atol=ATOL)
