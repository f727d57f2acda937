"""BatchNorm is memory, attacked by default (issue 21, "ResNet-class networks").

A deployed ResNet reads its BatchNorm weights, biases and running statistics at every inference.
They were outside the fault space by default, and the running statistics always. Now they are
fault targets unless ``--no-include-bn`` (``include_bn=False``) leaves them out; BatchNorm's int64
``num_batches_tracked`` (never read in eval) is recorded as unattacked memory. A model without
BatchNorm keeps the configuration, identity and numbers it had.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import ftcnn
from _helpers import assert_one_line_refusal, cli_in_process
from ftcnn.campaigns import campaign as C
from ftcnn import data
from ftcnn.campaigns import campaign_file
from ftcnn.injection import graph
from ftcnn.injection import faults as F

pytestmark = pytest.mark.usefixtures("one_thread")


def bn_net() -> nn.Module:
    """Conv, BatchNorm with running statistics far from 0/1 (as after training), ReLU, Linear."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 64, 10))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.load("digits", "test").tensors
    return x[:40], y[:40]


def test_running_statistics_are_fault_targets_and_the_counter_is_not() -> None:
    targets = graph.fault_targets(bn_net(), include_bn=True)
    assert [n for n in targets if n.startswith("1.")] == ["1.weight", "1.bias", "1.running_mean", "1.running_var"]
    assert "1.num_batches_tracked" not in targets
    # the campaigns' memory map takes them by default; include_bn=False leaves all four out
    assert "1.running_var" in F.parameter_memory(bn_net()).stored
    assert not any(n.startswith("1.") for n in F.parameter_memory(bn_net(), include_bn=False).stored)


def test_a_flip_of_a_running_var_bit_changes_the_output(digits) -> None:
    """A targeted fault in the running variance (exponent bit 23: the variance doubles or halves)
    changes the eval logits, and is undone bit for bit."""
    net = bn_net()
    x = digits[0]
    memory = F.parameter_memory(net)
    with torch.no_grad():
        golden = net(x)
        with F.injected(memory, F.targeted([("1.running_var", 0, 23)])):
            assert not torch.equal(net[1].running_var, bn_net()[1].running_var)
            faulty = net(x)
        assert torch.equal(net(x), golden)
    assert not torch.allclose(faulty, golden)


def test_campaigns_attack_batchnorm_by_default(digits, tmp_path: Path) -> None:
    config = C.CampaignConfig(bers=(1e-3,), trials=1, seed=0, shortcut=False, batch_trials=1)
    assert config.include_bn is True
    summary = C.run_campaign(bn_net(), *digits, config, tmp_path / "run", progress=False)
    assert summary["config"]["include_bn"] is True
    assert summary["memory"]["unattacked_memory"] == {"1.num_batches_tracked": 1}
    # activation faults hit no memory: include_bn means nothing there and is False; asking for it is refused
    assert C.CampaignConfig(bers=(1e-3,), target="activations").include_bn is False
    with pytest.raises(ValueError, match="--include-bn is for parameter faults"):
        C.CampaignConfig(bers=(1e-3,), target="activations", include_bn=True)


def test_a_model_without_batchnorm_keeps_its_configuration(digits, tmp_path: Path) -> None:
    """Both choices attack the same bits of LeNet-5: its summary and run identity say
    ``include_bn: false`` as before, so its numbers and resumable run folders stay as they were."""
    lenet = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.25)
    config = C.CampaignConfig(bers=(1e-3,), trials=2, seed=0)
    assert config.for_model(lenet).include_bn is False and config.for_model(bn_net()) is config
    default = C.run_campaign(lenet, *digits, config, tmp_path / "default", progress=False)
    before = C.run_campaign(lenet, *digits, C.CampaignConfig(bers=(1e-3,), trials=2, seed=0, include_bn=False),
                            tmp_path / "default", progress=False)  # the same folder resumes: same identity
    assert default["config"]["include_bn"] is False
    assert default["results"] == before["results"]


def test_inject_attacks_batchnorm_unless_told_not_to(tmp_path: Path, monkeypatch, capsys) -> None:
    torch.manual_seed(0)
    ftcnn.save(ftcnn.build("resnet20", num_classes=10, in_channels=1, input_size=8, width=0.25), tmp_path / "r.pt")
    common = ("--data", "digits", "--ber", "1e-4", "--trials", "1", "--threads", "1", "--limit", "40")
    r = cli_in_process(monkeypatch, capsys, "inject", str(tmp_path / "r.pt"), *common, "-o", str(tmp_path / "on"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert summary["config"]["include_bn"] is True
    assert all(n.endswith("num_batches_tracked") for n in summary["memory"]["unattacked_memory"])
    assert "warning:" not in r.stderr
    r = cli_in_process(monkeypatch, capsys, "inject", str(tmp_path / "r.pt"), *common, "--no-include-bn",
                       "-o", str(tmp_path / "off"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "off" / "summary.json").read_text())
    assert summary["config"]["include_bn"] is False
    assert "bn1.running_var" in summary["memory"]["unattacked_memory"]
    assert "BatchNorm ones: --include-bn, the default, attacks them" in r.stderr
    r = cli_in_process(monkeypatch, capsys, "inject", str(tmp_path / "r.pt"), *common, "--target", "activations",
                       "--include-bn", "-o", str(tmp_path / "act"))
    assert_one_line_refusal(r, "--include-bn is for parameter faults")


def test_a_campaign_file_attacks_batchnorm_unless_it_says_false(tmp_path: Path) -> None:
    base = 'checkpoint = "m.pt"\noutput = "run"\nber = [1e-5]\n'
    (tmp_path / "default.toml").write_text(base)
    (tmp_path / "off.toml").write_text(base + "include_bn = false\n")
    assert campaign_file.inject_settings({}, (), tmp_path / "default.toml").config.include_bn is True
    assert campaign_file.inject_settings({}, (), tmp_path / "off.toml").config.include_bn is False
    # a typed --no-include-bn overrides the file's key
    (tmp_path / "on.toml").write_text(base + "include_bn = true\n")
    assert campaign_file.inject_settings({"include_bn": False}, ["include_bn"],
                                         tmp_path / "on.toml").config.include_bn is False


def test_shortcut_and_batched_trials_give_the_plain_numbers_with_statistics_faulted(digits, tmp_path) -> None:
    """Faults in BatchNorm statistics only (two BatchNorms of a ResNet-20, exponent bits): the
    trials from a cut and the batched trials compute what the plain forward does."""
    torch.manual_seed(0)
    resnet = ftcnn.build("resnet20", num_classes=10, in_channels=1, input_size=8, width=0.25).eval()
    results = []
    for how in ({"shortcut": False, "batch_trials": 1}, {"shortcut": True, "batch_trials": 1},
                {"shortcut": True, "batch_trials": 4}):
        config = C.CampaignConfig(counts=(1, 3), trials=8, seed=0, batch_size=40, bits=tuple(range(23, 32)),
                                  layers=("layer1.0.bn2", "layer2.0.bn1"), **how)
        summary = C.run_campaign(resnet, *digits, config, tmp_path / str(len(results)), progress=False)
        assert summary["memory"]["fault_target_bits"] == (4 * 4 + 4 * 8) * 32  # 4 tensors per BatchNorm
        results.append([(r["accuracy_mean"], r["sdc_mean"], r["due_mean"]) for r in summary["results"]])
    assert results[0] == results[1] == results[2]
    assert results[0][1][1] > 0  # the statistics' faults did change predictions
