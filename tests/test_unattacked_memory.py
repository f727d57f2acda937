"""Unattacked memory is reported truthfully (issue 19, item 7).

A user model with an ``nn.Conv1d`` and a raw ``nn.Parameter`` had values no fault ever hit, yet
its summary said ``unattacked_memory: {}`` and ``unattacked_bits: 0``: only protection buffers
were listed. Now every parameter and buffer outside the fault space is listed (name ->
elements, each piece of memory once) with its size in bits, and ``ftcnn inject`` says in one
warning line when learned float values are among them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import ftcnn
from _helpers import cli_in_process
from ftcnn.campaigns import campaign as C
from ftcnn import data
from ftcnn.injection import faults as F

pytestmark = pytest.mark.usefixtures("one_thread")


class Conv1dNet(nn.Module):
    """Conv2d and Linear (attacked) around an ``nn.Conv1d`` and a raw scale parameter (not)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.mix = nn.Conv1d(4, 4, 1)                # 16 + 4 values
        self.scale = nn.Parameter(torch.ones(4, 1))  # 4 values
        self.fc = nn.Linear(4 * input_size * input_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(2)
        return self.fc((self.mix(h) * self.scale).flatten(1))


def conv1d_net(num_classes: int = 10, in_channels: int = 1, input_size: int = 8) -> nn.Module:
    """The builder ``ftcnn inject --model test_unattacked_memory:conv1d_net`` trusts."""
    torch.manual_seed(0)
    return Conv1dNet(num_classes, in_channels, input_size)


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 64, 10)).eval()


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.load("digits", "test").tensors
    return x[:40], y[:40]


def _memory(model: nn.Module, digits, folder: Path, **settings) -> dict:
    config = C.CampaignConfig(bers=(1e-3,), trials=1, seed=0, shortcut=False, batch_trials=1, **settings)
    return C.run_campaign(model, *digits, config, folder, progress=False)["memory"]


def test_a_conv1d_and_a_raw_parameter_are_listed(digits, tmp_path) -> None:
    """The issue's reproduction: their values were never attacked, yet ``unattacked_memory: {}``."""
    net = conv1d_net()
    memory = _memory(net, digits, tmp_path / "run")
    assert memory["unattacked_memory"] == {"mix.weight": 16, "mix.bias": 4, "scale": 4}
    assert memory["unattacked_bits"] == 32 * 24
    # attacked and unattacked together are the whole model, each value once
    total = sum(p.numel() for p in net.parameters())
    assert memory["fault_target_bits"] + memory["unattacked_bits"] == 32 * total


def test_batchnorm_parameters_and_statistics_are_listed(digits, tmp_path) -> None:
    """BatchNorm is attacked by default (``include_bn``, issue 21): its parameters and running
    statistics are fault targets, and only its int64 batch counter (never read in eval) is
    unattacked memory; with ``include_bn=False`` all of it is."""
    counter = {"1.num_batches_tracked": 1}
    default = _memory(bn_net(), digits, tmp_path / "default")
    assert default["unattacked_memory"] == counter and default["unattacked_bits"] == 64
    left_out = _memory(bn_net(), digits, tmp_path / "no_bn", include_bn=False)
    assert left_out["unattacked_memory"] == {"1.weight": 4, "1.bias": 4, "1.running_mean": 4,
                                             "1.running_var": 4, **counter}
    assert left_out["unattacked_bits"] == 32 * 16 + 64  # num_batches_tracked is an int64


def test_layers_left_out_tied_weights_and_storage_formats(digits, tmp_path) -> None:
    lenet = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.25)
    # every parameter of plain LeNet-5 is attacked, in any storage format (int8 attacks copies)
    for dtype in ("float32", "int8"):
        memory = _memory(lenet, digits, tmp_path / dtype, dtype=dtype)
        assert memory["unattacked_memory"] == {} and memory["unattacked_bits"] == 0, dtype
    # --layers: the layers left out are memory no fault hits
    only = _memory(lenet, digits, tmp_path / "layers", layers=("classifier.4",))
    assert set(only["unattacked_memory"]) == {n for n, _ in lenet.named_parameters()} - {
        "classifier.4.weight", "classifier.4.bias"}
    # a weight tied between two layers is one piece of memory, attacked through either name
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))
    tied[3].weight = tied[1].weight
    assert F.memory_coverage(tied, F.parameter_memory(tied).stored)["unattacked_memory"] == {}
    assert F.memory_coverage(tied, [])["unattacked_memory"] == {
        "1.weight": 4096, "1.bias": 64, "3.bias": 64, "5.weight": 640, "5.bias": 10}


def test_activation_campaigns_leave_all_parameter_memory_alone(digits, tmp_path) -> None:
    memory = _memory(conv1d_net(), digits, tmp_path / "act", target="activations")
    assert set(memory["unattacked_memory"]) == {n for n, _ in conv1d_net().named_parameters()}


def test_inject_warns_in_one_line_when_float_parameters_are_not_attacked(tmp_path, monkeypatch, capsys) -> None:
    ftcnn.save(conv1d_net(), tmp_path / "user.pt", builder="test_unattacked_memory:conv1d_net",
               kwargs={"num_classes": 10, "in_channels": 1, "input_size": 8})
    r = cli_in_process(monkeypatch, capsys, "inject", str(tmp_path / "user.pt"), "--model",
                       "test_unattacked_memory:conv1d_net", "--data", "digits", "--ber", "1e-4", "--trials", "1",
                       "--threads", "1", "--limit", "40", "-o", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 24 of 2,634 float parameter values are never attacked: scale, mix.weight, "
                        "mix.bias; summary.json lists them under memory.unattacked_memory"], r.stderr
    # every parameter attacked: no warning
    ftcnn.save(ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.25), tmp_path / "l.pt")
    r = cli_in_process(monkeypatch, capsys, "inject", str(tmp_path / "l.pt"), "--data", "digits", "--ber", "1e-4",
                       "--trials", "1", "--threads", "1", "--limit", "40", "-o", str(tmp_path / "lenet"))
    assert r.returncode == 0 and "warning:" not in r.stderr, r.stderr


def test_the_warning_names_batchnorm_and_its_flag() -> None:
    memory = F.parameter_memory(bn_net(), include_bn=False)
    coverage = F.memory_coverage(bn_net(), memory.stored)
    line = F.unattacked_warning(bn_net(), coverage["unattacked_memory"])
    assert line is not None and line.startswith("8 of ") and "1.weight, 1.bias" in line and "--include-bn" in line
    assert "running_mean" not in line  # buffers are recorded, not warned about
