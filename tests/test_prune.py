"""Structured pruning: the right channels go, the rest computes exactly as before,
residual networks stay consistent, and pruned checkpoints round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ftcnn
from _helpers import run_cli
from ftcnn import checkpoint
from ftcnn.protection.pruning import channel_groups, l1_scores, plan, prune

SHAPE = (1, 8, 8)


def plain_stack(seed: int = 0) -> nn.Module:
    """conv -> relu -> conv -> relu -> flatten -> linear -> relu -> linear, no BatchNorm."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 10))


def random_scores(model: nn.Module, seed: int = 1) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(m.weight.shape[0], generator=g).tolist()
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def kept(n: int, removed: list[int]) -> list[int]:
    return [i for i in range(n) if i not in set(removed)]


def lowest_k(values, k: int) -> list[int]:
    """Independent reference: indices of the k smallest values (no ties in random data)."""
    return sorted(np.argsort(np.asarray(values))[:k].tolist())


def test_channel_counts_round_down_and_protection() -> None:
    model = plain_stack()
    pruned = prune(model, ratio=0.3, criterion="l1", input_shape=SHAPE)
    # first conv protected, 8 -> 8 - floor(2.4) = 6, 12 -> 12 - floor(3.6) = 9, classifier kept
    assert [pruned[0].out_channels, pruned[2].out_channels, pruned[6].out_features, pruned[8].out_features] \
        == [6, 6, 9, 10]
    assert pruned[2].in_channels == 6 and pruned[6].in_features == 6 * 16 and pruned[8].in_features == 9
    assert pruned(torch.randn(3, *SHAPE)).shape == (3, 10)
    # the original is untouched
    assert model[2].out_channels == 8 and model[6].out_features == 12
    # protect overrides the default: now the first conv is pruned too, the classifier never
    all_pruned = prune(model, ratio=0.5, criterion="l1", protect=[], input_shape=SHAPE)
    assert [all_pruned[0].out_channels, all_pruned[2].out_channels, all_pruned[8].out_features] == [3, 4, 10]
    # ratio 1 keeps one channel per layer; ratio 0 keeps everything
    assert prune(model, ratio=1.0, criterion="l1", input_shape=SHAPE)[2].out_channels == 1
    assert prune(model, ratio=0.0, criterion="l1", input_shape=SHAPE)[2].out_channels == 8


def test_per_layer_ratios() -> None:
    pruned = prune(plain_stack(), ratio={"2": 0.5}, criterion="l1", input_shape=SHAPE)
    assert [pruned[2].out_channels, pruned[6].out_features] == [4, 12]


def test_kept_computation_is_exact() -> None:
    """Zero the pruned filters' weights and biases in the full model: after the ReLU those
    channels contribute nothing downstream, so the full and the pruned model must agree."""
    model = plain_stack()
    scores = random_scores(model)
    pruned = prune(model, ratio=0.5, scores=scores, input_shape=SHAPE)
    zeroed = plain_stack()
    with torch.no_grad():
        for idx in (2, 6):
            n = zeroed[idx].weight.shape[0]
            removed = lowest_k(scores[str(idx)], n // 2)
            zeroed[idx].weight[removed] = 0
            zeroed[idx].bias[removed] = 0
    x = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = zeroed(x), pruned(x)
        assert not torch.allclose(model(x), got, atol=1e-3)  # pruning did change the unzeroed model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_vulnerability_removes_lowest_scored_channels() -> None:
    model = plain_stack()
    scores = random_scores(model, seed=5)
    pruned = prune(model, ratio=0.5, criterion="vulnerability", scores={"method": "gain", "layers": scores},
                   input_shape=SHAPE)
    keep2 = kept(8, lowest_k(scores["2"], 4))
    keep6 = kept(12, lowest_k(scores["6"], 6))
    assert torch.equal(pruned[2].weight, model[2].weight[keep2])
    assert torch.equal(pruned[2].bias, model[2].bias[keep2])
    assert torch.equal(pruned[6].weight, model[6].weight[keep6][:, torch.arange(8 * 16).view(8, 16)[keep2].flatten()])
    assert torch.equal(pruned[8].weight, model[8].weight[:, keep6])


def test_l1_removes_smallest_norm_channels() -> None:
    model = plain_stack()
    norms2 = model[2].weight.detach().abs().sum(dim=(1, 2, 3))
    norms6 = model[6].weight.detach().abs().sum(dim=1)
    pruned = prune(model, ratio=0.25, criterion="l1", input_shape=SHAPE)
    assert torch.equal(pruned[2].weight, model[2].weight[kept(8, lowest_k(norms2, 2))])
    assert torch.equal(pruned[6].weight[:, 0], model[6].weight[kept(12, lowest_k(norms6, 3)), 0])


def test_coupled_residual_layers_share_indices() -> None:
    """In ResNet-20's second stage, the three conv2 layers and the projection shortcut feed
    the same additions: one index set, chosen by the sum of their normalised scores."""
    model = ftcnn.build("resnet20", in_channels=3, input_size=16, width=0.5)
    shape = (3, 16, 16)
    groups = {g.root: g for g in channel_groups(model, shape)}
    coupled = ("layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2")
    assert set(groups["layer2.0.conv2"].layers) == set(coupled)
    assert groups["layer1.0.conv1"].layers == ("layer1.0.conv1",)
    scores = random_scores(model, seed=7)
    combined = sum(np.asarray(scores[n]) / np.sum(scores[n]) for n in coupled)
    n = model.layer2[0].conv2.out_channels
    keep = kept(n, lowest_k(combined, n // 2))
    pruned = prune(model, ratio=0.5, scores=scores, input_shape=shape)
    assert torch.equal(pruned.layer2[0].shortcut[0].weight, model.layer2[0].shortcut[0].weight[keep])
    for block in range(3):
        conv1, conv2 = f"layer2.{block}.conv1", f"layer2.{block}.conv2"
        inner = kept(len(scores[conv1]), lowest_k(scores[conv1], len(scores[conv1]) // 2))
        assert torch.equal(pruned.get_submodule(conv2).weight, model.get_submodule(conv2).weight[keep][:, inner])
        assert torch.equal(pruned.get_submodule(f"layer2.{block}.bn2").weight,
                           model.get_submodule(f"layer2.{block}.bn2").weight[keep])
    # the stem is protected by default, so the first stage's residual width stays
    assert pruned.layer1[0].conv2.out_channels == model.layer1[0].conv2.out_channels


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "resnet50"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_resnets_prune_and_run(name: str, ratio: float) -> None:
    model = ftcnn.build(name, in_channels=3, input_size=8, width=0.25)
    shape = (3, 8, 8)
    pruned = prune(model, ratio=ratio, criterion="l1", input_shape=shape)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    pruned.eval()
    with torch.no_grad():
        assert pruned(torch.randn(2, *shape)).shape == (2, 10)
    for group in channel_groups(pruned, shape):  # coupled layers still agree in width
        widths = {pruned.get_submodule(l).weight.shape[0] for l in group.layers}
        assert len(widths) == 1


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = ftcnn.build("resnet20", in_channels=1, input_size=8, width=0.25)
    pruned = prune(model, ratio=0.5, scores=random_scores(model), input_shape=(1, 8, 8))
    path = tmp_path / "pruned.pt"
    ftcnn.save(pruned, path, note="x")
    loaded = ftcnn.load(path)
    assert checkpoint.get_spec(loaded)["transforms"][0]["kind"] == "prune"
    x = torch.randn(4, 1, 8, 8)
    pruned.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    # pruning twice stacks two transforms and still round-trips
    twice = prune(loaded, ratio=0.3, criterion="l1", input_shape=(1, 8, 8))
    ftcnn.save(twice, path)
    again = ftcnn.load(path)
    assert len(checkpoint.get_spec(again)["transforms"]) == 2
    twice.eval()
    with torch.no_grad():
        assert torch.equal(again(x), twice(x))


def test_pruned_then_hardened_round_trip(tmp_path: Path) -> None:
    from ftcnn.protection import hardening
    model = ftcnn.build("lenet5", in_channels=1, input_size=8)
    pruned = prune(model, ratio=0.4, criterion="l1", input_shape=(1, 8, 8))
    hardened = hardening.harden(pruned, l1_scores(pruned), ratio=0.2, correction="min")
    path = tmp_path / "ph.pt"
    ftcnn.save(hardened, path)
    loaded = ftcnn.load(path)
    assert [t["kind"] for t in checkpoint.get_spec(loaded)["transforms"]] == ["prune", "harden"]
    x = torch.randn(4, 1, 8, 8)
    hardened.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), hardened(x))
        assert torch.equal(hardened(x), pruned.eval()(x))  # hardening adds no error without faults
    with pytest.raises(ValueError, match="prune before hardening"):
        prune(hardened, ratio=0.2, criterion="l1", input_shape=(1, 8, 8))


@pytest.mark.parametrize("kwargs, match", [
    ({"ratio": 1.5, "criterion": "l1"}, "outside"),
    ({"ratio": -0.1, "criterion": "l1"}, "outside"),
    ({"ratio": 0.3, "criterion": "magic"}, "criterion 'magic' is not one of vulnerability, l1"),
    ({"ratio": 0.3}, "needs scores"),
    ({"ratio": 0.3, "scores": {"2": [1.0] * 8}}, "no score for layer '6'"),
    ({"ratio": 0.3, "scores": {"2": [1.0] * 7, "6": [1.0] * 12}}, "has 8 output channels"),
    ({"ratio": 0.3, "criterion": "l1", "protect": ["nolayer"]}, "unknown layer 'nolayer'"),
    ({"ratio": {"nolayer": 0.3}, "criterion": "l1"}, "unknown layer 'nolayer'"),
    ({"ratio": {"8": 0.3}, "criterion": "l1"}, "cannot be pruned"),
    ({"ratio": 0.3, "criterion": "l1", "input_shape": (8, 8)}, "input_shape"),
])
def test_bad_input(kwargs, match) -> None:
    kwargs = {"input_shape": SHAPE, **kwargs}
    with pytest.raises(ValueError, match=match):
        prune(plain_stack(), **kwargs)


def test_coupled_layers_need_one_ratio() -> None:
    model = ftcnn.build("resnet20", in_channels=1, input_size=8, width=0.25)
    with pytest.raises(ValueError, match="same pruning ratio"):
        plan(model, ratio={"layer2.0.conv2": 0.5, "layer2.1.conv2": 0.2}, criterion="l1", input_shape=(1, 8, 8))
    removals = plan(model, ratio={"layer2.1.conv2": 0.5}, criterion="l1", input_shape=(1, 8, 8))
    assert [root for root, _ in removals] == ["layer2.0.conv2"]  # the whole coupled group follows


# --------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def digits_model(digits_lenet5) -> Path:
    """The run's shared LeNet-5 (conftest): read only, outputs go under tmp_path."""
    return digits_lenet5


def test_prune_cli(digits_model: Path, tmp_path: Path) -> None:
    from ftcnn import data, train
    from ftcnn.protection import vulnerability

    original = ftcnn.load(digits_model)
    # scores that make channels 0..7 of features.3 and 0..59 of classifier.0 the least vulnerable
    scores = {name: [float(i + 1) for i in range(len(v))] for name, v in l1_scores(original).items()}
    vulnerability.save_scores({"method": "gain", "settings": {}, "layers": scores}, tmp_path / "s.json")
    out = tmp_path / "pruned.pt"
    r = run_cli("prune", str(digits_model), "--scores", str(tmp_path / "s.json"), "--ratio", "0.5",
                "--finetune-epochs", "0", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "accuracy: original" in r.stdout and "params 21,386 ->" in r.stdout
    pruned = ftcnn.load(out)
    assert torch.equal(pruned.features[3].weight, original.features[3].weight[8:])  # features.0 protected
    meta = checkpoint.meta(pruned)
    test_set = data.load("digits", "test")
    assert meta["accuracy_original"] == pytest.approx(train.evaluate(original, test_set))
    assert meta["accuracy_before_finetune"] == meta["test_accuracy"] == pytest.approx(train.evaluate(pruned, test_set))
    assert meta["params_after"] == sum(p.numel() for p in pruned.parameters()) < meta["params_before"]
    assert meta["removed_channels"] == {"features.3": 8, "classifier.0": 60, "classifier.2": 42}

    # l1 with per-layer ratios, --keep lists, gain scored on the fly, one fine-tune epoch
    out2 = tmp_path / "pruned2.pt"
    r = run_cli("prune", str(digits_model), "--criterion", "l1", "--layer-ratio", "features.0=0.5",
                "classifier.0=0.25", "--keep", "classifier.2", "--finetune-epochs", "1", "-o", str(out2))
    assert r.returncode == 0, r.stderr
    assert checkpoint.meta(ftcnn.load(out2))["removed_channels"] == {"features.0": 3, "classifier.0": 30}


@pytest.mark.parametrize("args, match", [
    (["--ratio", "1.5"], "outside [0, 1]"),
    (["--keep", "nolayer"], "unknown layer 'nolayer'"),
    (["--layer-ratio", "features.3"], "name=ratio"),
])
def test_prune_cli_bad_input(digits_model: Path, tmp_path: Path, args, match) -> None:
    r = run_cli("prune", str(digits_model), *args, "--finetune-epochs", "0", "-o", str(tmp_path / "p.pt"))
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.stderr
    assert not (tmp_path / "p.pt").exists()


def test_pipeline_cli(digits_model: Path, tmp_path: Path) -> None:
    from ftcnn import data, train

    out = tmp_path / "pipe"
    args = ["pipeline", str(digits_model), "--prune-ratio", "0.5", "--harden-ratio", "0.1", "--finetune-epochs",
            "1", "--samples", "32", "-o", str(out)]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    files = ["scores_original.json", "pruned.pt", "scores_pruned.json", "hardened.pt", "hardened_unpruned.pt",
             "summary.json"]
    assert all((out / f).exists() for f in files)
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert list(stages) == ["original", "pruned", "pruned_finetuned", "hardened_pruned", "hardened_unpruned"]
    test_set = data.load("digits", "test")
    loaded = {"pruned_finetuned": ftcnn.load(out / "pruned.pt"), "hardened_pruned": ftcnn.load(out / "hardened.pt"),
              "hardened_unpruned": ftcnn.load(out / "hardened_unpruned.pt"), "original": ftcnn.load(digits_model)}
    for stage, model in loaded.items():
        assert stages[stage]["accuracy"] == pytest.approx(train.evaluate(model, test_set))
        assert stages[stage]["params"] == sum(p.numel() for p in model.parameters())
    # hardening changes nothing without faults; pruning shrinks the hardened model
    assert stages["hardened_pruned"]["accuracy"] == stages["pruned_finetuned"]["accuracy"]
    assert stages["hardened_unpruned"]["accuracy"] == stages["original"]["accuracy"]
    assert stages["hardened_pruned"]["macs"] < stages["hardened_unpruned"]["macs"]
    assert [t["kind"] for t in checkpoint.get_spec(loaded["hardened_pruned"])["transforms"]] == ["prune", "harden"]
    # resumable (in-process, to save a start-up): nothing is redone; other settings are refused
    from ftcnn.flows.pipeline import prune_and_harden

    mtimes = {f: (out / f).stat().st_mtime_ns for f in files}
    train_set = data.load("digits", "train")
    again = prune_and_harden(loaded["original"], train_set, test_set, out, prune_ratio=0.5, harden_ratio=0.1,
                             finetune_epochs=1, samples=32, record={"data": "digits"})
    assert again["stages"]["pruned"] == stages["pruned"]
    assert mtimes == {f: (out / f).stat().st_mtime_ns for f in files}
    with pytest.raises(ValueError, match=r"other settings \(prune_ratio\)"):
        prune_and_harden(loaded["original"], train_set, test_set, out, prune_ratio=0.4, harden_ratio=0.1,
                         finetune_epochs=1, samples=32, record={"data": "digits"})


def test_interleaved_latency_orders_models() -> None:
    """The pipeline's latency helper (ftcnn.protection.cost): one median per model, and 8x the work is slower."""
    from ftcnn.protection.cost import interleaved_latency

    torch.manual_seed(0)
    small = nn.Sequential(nn.Flatten(), nn.Linear(64, 256))
    big = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), *[nn.Linear(256, 256) for _ in range(8)])
    threads = torch.get_num_threads()
    lat = interleaved_latency({"small": small, "big": big}, SHAPE, batch=128, rounds=5, threads=1)
    assert torch.get_num_threads() == threads  # restored
    assert set(lat) == {"small", "big"} and 0 < lat["small"] < lat["big"]
