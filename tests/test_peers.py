"""The conventions of the tools users come from (issue 23, item 5): activation faults per input
image (PyTorchFI), ``example_inputs=``/``ignored_layers=``/global pruning (Torch-Pruning), and a
warning when a user builder's arguments do not take the data's shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ftcnn
from ftcnn.campaigns import activations as A, campaign
from _helpers import assert_one_line_refusal, cli_in_process
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


# --- activation faults per input (PyTorchFI's convention) ------------------------------------------

def _faults_per_input(plan: A.ActivationPlan, n_inputs: int) -> np.ndarray:
    per = np.zeros(n_inputs, dtype=np.int64)
    for lf in plan.layers.values():
        np.add.at(per, lf.sample, 1)
    return per


def test_per_input_count_gives_every_input_exactly_n_faults(tiny_data) -> None:
    x, _ = tiny_data
    outputs = A.probe(make_tiny_model().eval(), x)
    n = len(x) + 150  # more than one block of inputs, the last one cut
    for count in (1, 3):
        plan = A.draw_activation_faults(outputs, count=count, n_inputs=n, seed=4, trial=2, per_input=True)
        assert (_faults_per_input(plan, n) == count).all() and plan.count == count * n
        sites = [(s, name, i, b) for name, lf in plan.layers.items() for s, i, b in zip(lf.sample, lf.index, lf.bit)]
        assert len(set(sites)) == len(sites)  # distinct sites within each input
        for lf in plan.layers.values():  # sorted by input, as the hooks read them
            assert (np.diff(lf.sample) >= 0).all()
        # input i's faults do not depend on how many inputs the trial evaluates
        fewer = A.draw_activation_faults(outputs, count=count, n_inputs=10, seed=4, trial=2, per_input=True)
        for name, lf in fewer.layers.items():
            whole = plan.layers[name]
            keep = whole.sample < 10
            assert (lf.index == whole.index[keep]).all() and (lf.sample == whole.sample[keep]).all()
    # the old convention: N across the whole evaluation, most inputs untouched
    spread = A.draw_activation_faults(outputs, count=1, n_inputs=n, seed=4, trial=2)
    assert spread.count == 1 and _faults_per_input(spread, n).sum() == 1
    with pytest.raises(ValueError, match="--per-input"):
        A.draw_activation_faults(outputs, count=1, mode="permanent", per_input=True)
    with pytest.raises(ValueError, match="--per-input"):
        A.draw_activation_faults(outputs, ber=1e-3, n_inputs=n, per_input=True)


def test_per_input_campaign_is_recorded_and_hits_every_input(tiny_data, tmp_path) -> None:
    x, y = tiny_data
    config = campaign.CampaignConfig(counts=(2,), trials=2, target="activations", per_input=True, seed=1)
    summary = campaign.run_campaign(make_tiny_model().eval(), x, y, config, tmp_path / "a", progress=False)
    assert summary["config"]["per_input"] is True
    assert summary["results"][0]["n_faults_mean"] == 2 * len(x)
    plain = campaign.CampaignConfig(counts=(2,), trials=2, target="activations", seed=1)
    assert "per_input" not in plain.recorded()  # campaigns without it keep their identity
    with pytest.raises(ValueError, match="--per-input"):
        campaign.CampaignConfig(counts=(1,), per_input=True)
    with pytest.raises(ValueError, match="--per-input"):
        campaign.CampaignConfig(bers=(1e-3,), per_input=True, target="activations")


@pytest.fixture(scope="module")
def untrained_digits_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("peers") / "lenet.pt"
    ftcnn.save(ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8), path)
    return path


def test_inject_per_input_flag(untrained_digits_checkpoint, tmp_path, monkeypatch, capsys) -> None:
    common = ("inject", str(untrained_digits_checkpoint), "--data", "digits", "--target", "activations",
              "--count", "1", "--trials", "2", "--limit", "30", "--threads", "1")
    r = cli_in_process(monkeypatch, capsys, *common, "--per-input", "-o", str(tmp_path / "per"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "per" / "summary.json").read_text())
    assert summary["config"]["per_input"] is True and summary["results"][0]["n_faults_mean"] == 30
    r = cli_in_process(monkeypatch, capsys, *common, "-o", str(tmp_path / "spread"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "spread" / "summary.json").read_text())
    assert "per_input" not in summary["config"] and summary["results"][0]["n_faults_mean"] == 1
    r = cli_in_process(monkeypatch, capsys, "inject", str(untrained_digits_checkpoint), "--data", "digits",
                       "--count", "1", "--per-input", "-o", str(tmp_path / "bad"))
    assert_one_line_refusal(r, "--per-input")


# --- Torch-Pruning's conventions ----------------------------------------------------------------------

def _lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8)


def _widths(model: torch.nn.Module) -> dict[str, int]:
    return {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def test_prune_takes_example_inputs_and_ignored_layers() -> None:
    from ftcnn.protection import pruning

    model = _lenet()
    by_shape = pruning.prune(model, ratio=0.5, criterion="l1", input_shape=(1, 8, 8))
    by_example = pruning.prune(model, ratio=0.5, criterion="l1", example_inputs=torch.randn(1, 1, 8, 8))
    assert _widths(by_example) == _widths(by_shape) != _widths(model)
    first = next(iter(_widths(model)))
    second = list(_widths(model))[1]
    old = pruning.prune(model, ratio=0.5, criterion="l1", input_shape=(1, 8, 8), protect=[first, second])
    by_name = pruning.prune(model, ratio=0.5, criterion="l1", input_shape=(1, 8, 8), ignored_layers=[first, second])
    by_module = pruning.prune(model, ratio=0.5, criterion="l1", input_shape=(1, 8, 8),
                              ignored_layers=[model.get_submodule(first), model.get_submodule(second)])
    assert _widths(old) == _widths(by_name) == _widths(by_module)
    assert _widths(by_name)[second] == _widths(model)[second] != _widths(by_shape)[second]
    for kwargs, match in [({"example_inputs": torch.randn(1, 8, 8)}, "example_inputs must be a batch"),
                          ({"example_inputs": torch.randn(1, 1, 8, 8), "input_shape": (1, 9, 9)}, "disagree"),
                          ({}, "give input_shape"),
                          ({"input_shape": (1, 8, 8), "ignored_layers": [first], "protect": [first]}, "not both"),
                          ({"input_shape": (1, 8, 8), "ignored_layers": [torch.nn.Linear(2, 2)]}, "not a module"),
                          ({"input_shape": (1, 8, 8), "global_pruning": True, "ratio": {first: 0.5}}, "per-layer")]:
        with pytest.raises(ValueError, match=match):
            pruning.prune(model, **{"ratio": 0.5, "criterion": "l1", **kwargs})


def test_global_pruning_ranks_all_layers_together(tmp_path) -> None:
    """One ranking: the same share of channels overall, taken where the scores (each group's relative
    to its mean, Torch-Pruning's default) are lowest: a layer with half its channels near zero loses
    that half, more than the ratio; the layers whose channels all score alike lose the rest."""
    from ftcnn.protection import pruning

    model = _lenet()
    before = _widths(model)
    names = list(before)
    eligible = names[1:-1]  # the first layer and the classifier are kept
    skewed = eligible[0]
    scores = {n: [1.0] * w for n, w in before.items()}
    half = before[skewed] // 2
    scores[skewed] = [0.001] * half + [1.0] * (before[skewed] - half)
    ratio = 0.25
    local = pruning.prune(model, scores, ratio=ratio, input_shape=(1, 8, 8))
    pruned = pruning.prune(model, scores, ratio=ratio, input_shape=(1, 8, 8), global_pruning=True)
    after = _widths(pruned)
    removed = {n: before[n] - after[n] for n in eligible}
    total = sum(before[n] for n in eligible)
    assert sum(removed.values()) == int(ratio * total) > half  # the same ratio overall
    assert removed[skewed] == half > before[skewed] - _widths(local)[skewed]  # more than the local ratio
    assert after[names[0]] == before[names[0]] and after[names[-1]] == before[names[-1]]
    assert pruned(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    ftcnn.save(pruned, tmp_path / "global.pt")  # the recorded history rebuilds it
    assert _widths(ftcnn.load(tmp_path / "global.pt")) == after


# --- a user builder whose arguments are named otherwise ---------------------------------------------

USER_MODULE = '''
from torch import nn


class MyNet(nn.Module):
    def __init__(self, n_classes: int = 10, in_ch: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 4, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, n_classes))

    def forward(self, x):
        return self.head(self.conv(x))


class Named(MyNet):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__(num_classes, in_channels)


class Widened(MyNet):
    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__(num_classes, 1)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> Path:
    (tmp_path / "peer_nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("peer_nets", None)
    module = importlib.import_module("peer_nets")
    torch.manual_seed(0)
    torch.save(module.MyNet().state_dict(), tmp_path / "state.pt")
    return tmp_path / "state.pt"


def test_builder_with_other_argument_names_is_warned_in_one_line(user_module, capsys) -> None:
    from ftcnn import checkpoint
    from ftcnn.flows import pipeline

    with pytest.warns(checkpoint.BuilderArgumentsWarning, match="takes n_classes, in_ch but not num_classes, "
                      "in_channels, input_size"):
        checkpoint.from_state_dict(user_module, "peer_nets:MyNet", num_classes=10, in_channels=1, input_size=8)
    capsys.readouterr()
    model = pipeline.load_model(user_module, "peer_nets:MyNet", "digits")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: peer_nets:MyNet takes n_classes, in_ch"), err
    assert "num_classes=10" in lines[0] and ".py" not in lines[0]
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    # names that match, or a deliberate partial signature: silent
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", checkpoint.BuilderArgumentsWarning)
        for builder in ("peer_nets:Named", "peer_nets:Widened"):
            checkpoint.from_state_dict(user_module, builder, num_classes=10, in_channels=1, input_size=8)
    assert checkpoint.builder_arguments_warning("b", ["num_classes", "in_ch"], {"num_classes": 10, "in_channels": 1},
                                                {"num_classes": 10}).startswith("b takes in_ch but not in_channels")
    assert checkpoint.builder_arguments_warning("b", [], {"num_classes": 10}, {}) is None


# --- MRFI's per-layer rates, for parameters too --------------------------------------------------------

def test_per_layer_rates_for_parameters_draw_only_where_they_say() -> None:
    from ftcnn.injection import faults as F

    memory = F.parameter_memory(_lenet())
    rates = F.layer_rates(memory, 0.0, {"features.0": 0.05})
    assert rates["features.0.weight"] == rates["features.0.bias"] == 0.05 and rates["classifier.4.weight"] == 0.0
    for seed in range(5):
        faults = F.draw_faults(memory, np.random.default_rng(seed), ber=0.0, rates=rates)
        assert faults.sites and {name.rpartition(".")[0] for name in faults.sites} == {"features.0"}
    # a map that gives every layer the global rate draws exactly what no map draws
    same = F.layer_rates(memory, 1e-3, {layer: 1e-3 for layer in ("features.0", "classifier.2")})
    for seed in range(3):
        a = F.draw_faults(memory, np.random.default_rng(seed), ber=1e-3)
        b = F.draw_faults(memory, np.random.default_rng(seed), ber=1e-3, rates=same)
        assert a.sites.keys() == b.sites.keys()
        assert all(np.array_equal(a.sites[k][0], b.sites[k][0]) and np.array_equal(a.sites[k][1], b.sites[k][1])
                   for k in a.sites)
    with pytest.raises(ValueError, match="holds no fault target"):
        F.layer_rates(memory, 0.0, {"features.1": 0.1})


def test_inject_ber_per_layer_on_parameters(untrained_digits_checkpoint, tmp_path, monkeypatch, capsys) -> None:
    common = ("inject", str(untrained_digits_checkpoint), "--data", "digits", "--ber", "0", "--trials", "3",
              "--limit", "30", "--threads", "1")
    r = cli_in_process(monkeypatch, capsys, *common, "--ber-per-layer", "features.0=0.01", "-o", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["config"]["ber_per_layer"] == [["features.0", 0.01]]
    assert summary["results"][0]["n_faults_mean"] > 0  # the global rate is 0: every fault is the layer's
    r = cli_in_process(monkeypatch, capsys, *common, "--ber-per-layer", "nope=0.1", "-o", str(tmp_path / "b"))
    assert_one_line_refusal(r, "holds no fault target")
