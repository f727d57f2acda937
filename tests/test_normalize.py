"""Preprocessing is explicit (issue 23, item 1): `--normalize {none,dataset,MEAN/STD}` and its API
twins, recorded in every checkpoint and summary; a model is measured with the normalisation it was
saved with, an old checkpoint as before, a contradiction refused in one line, a golden accuracy far
below the recorded one warned about, and fine-tuning never changes the preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ftcnn
from _helpers import assert_one_line_refusal, cli_in_process
from ftcnn import checkpoint, data, train
from ftcnn.flows import pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent


def _raw_digits(split: str) -> np.ndarray:
    """The digits split as stored (0..16), taken the way ftcnn splits it."""
    from sklearn.datasets import load_digits

    x = load_digits().images.reshape(-1, 1, 8, 8)
    tr, te, _, _ = data._split("digits", "", 0)
    return x[tr if split == "train" else te]


# --- data.load -----------------------------------------------------------------------------------

def test_none_gives_the_raw_inputs_and_dataset_stays_the_default() -> None:
    raw = data.load("digits", "test", normalize="none").tensors[0]
    assert torch.equal(raw, torch.from_numpy(_raw_digits("test").astype(np.float32)))
    default = data.load("digits", "test").tensors[0]
    assert not torch.equal(default, raw) and abs(float(data.load("digits", "train").tensors[0].mean())) < 1e-4
    # the resolved `dataset` record (what train stores) gives exactly today's tensors
    record = data.resolve_normalize("digits").record()
    assert record["kind"] == "dataset" and len(record["mean"]) == len(record["std"]) == 1
    assert torch.equal(data.load("digits", "test", normalize=record).tensors[0], default)
    assert torch.equal(data.load("digits", "test", normalize=json.loads(json.dumps(record))).tensors[0], default)
    # MEAN/STD: fixed constants, per channel or one for all
    fixed = data.load("digits", "test", normalize="0/16").tensors[0]
    assert torch.equal(fixed, raw / 16)
    with data.normalized("none"):  # a command's block: every load without normalize= follows it
        assert torch.equal(data.load("digits", "test").tensors[0], raw)
    assert torch.equal(data.load("digits", "test").tensors[0], default)  # and only inside it


@pytest.mark.parametrize("text, kind, mean, std", [
    ("none", "none", (), ()), (" Dataset ", "dataset", (), ()), ("0.5/0.25", "fixed", (0.5,), (0.25,)),
    ("0.49,0.48,0.45/0.25,0.24,0.26", "fixed", (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),
])
def test_parse(text, kind, mean, std) -> None:
    norm = data.parse_normalize(text)
    assert (norm.kind, norm.mean, norm.std) == (kind, mean, std)
    assert data.parse_normalize(norm.record()) == norm  # the record round-trips


@pytest.mark.parametrize("value, match", [
    ("standard", "takes none, dataset or MEAN/STD"), ("0.5", "takes none, dataset or MEAN/STD"),
    ("1/2/3", "takes none, dataset or MEAN/STD"), ("a/1", "takes none, dataset or MEAN/STD"),
    ("0.5/0", "std must be > 0"), ("0.5/-1", "std must be > 0"), ("nan/1", "finite"), ("1,2/1", "2 means but 1"),
    ({"kind": "zscore"}, "kind must be"), ({"kind": "fixed", "mean": [0.0]}, "std must be"),
    ({"kind": "fixed", "mean": [0.0] * 65, "std": [1.0] * 65}, "1 to 64"), ({"kind": "none", "mean": [1]}, "no mean"),
    ({"kind": "none", "code": "x"}, "unknown field"), (["none"], "not list"),
])
def test_parse_refusals_are_one_line(value, match) -> None:
    with pytest.raises(data.DatasetError, match=match) as info:
        data.parse_normalize(value)
    assert "\n" not in str(info.value)


def test_constants_must_fit_the_channels() -> None:
    with pytest.raises(data.DatasetError, match="digits has 1 channel"):
        data.load("digits", "test", normalize="0.5,0.5,0.5/0.2,0.2,0.2")


# --- checkpoints ----------------------------------------------------------------------------------

def test_save_records_and_load_round_trips(tmp_path) -> None:
    net = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8)
    ftcnn.save(net, tmp_path / "a.pt", normalize="0/16")
    assert checkpoint.meta(ftcnn.load(tmp_path / "a.pt"))["normalize"] == {"kind": "fixed", "mean": [0.0],
                                                                           "std": [16.0]}
    ftcnn.save(net, tmp_path / "b.pt")  # nothing said, no block: no record (read as dataset)
    assert "normalize" not in checkpoint.meta(ftcnn.load(tmp_path / "b.pt"))
    with data.normalized("none"):
        ftcnn.save(net, tmp_path / "c.pt")  # inside a command's block: its normalisation
    loaded = ftcnn.load(tmp_path / "c.pt")
    assert checkpoint.meta(loaded)["normalize"] == {"kind": "none"}
    # a model keeps its record through hardening and pruning (they copy it), even in another block
    hard = ftcnn.harden(loaded, None, ratio=0.0, restrict="zero", calibration=torch.randn(16, 1, 8, 8))
    pruned = ftcnn.prune(loaded, ratio=0.25, criterion="l1", input_shape=(1, 8, 8))
    with data.normalized("dataset"):
        ftcnn.save(hard, tmp_path / "h.pt")
        ftcnn.save(pruned, tmp_path / "p.pt")
    for name in ("h.pt", "p.pt"):
        assert checkpoint.meta(ftcnn.load(tmp_path / name))["normalize"] == {"kind": "none"}, name
    with pytest.raises(ValueError, match="normalize="):
        ftcnn.save(net, tmp_path / "d.pt", normalize="0.5")
    assert not (tmp_path / "d.pt").exists()


def test_a_malformed_record_is_one_checkpoint_error(tmp_path) -> None:
    net = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8)
    ftcnn.save(net, tmp_path / "m.pt")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    blob["meta"] = json.dumps({"normalize": {"kind": "fixed", "mean": [0.0], "std": [0.0]}})
    torch.save(blob, tmp_path / "m.pt")
    with pytest.raises(checkpoint.CheckpointError, match="normalisation record: every std must be > 0"):
        ftcnn.load(tmp_path / "m.pt")


def test_an_old_checkpoint_without_a_record_is_measured_as_before(tmp_path, capsys) -> None:
    net = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8)
    norm = pipeline.input_normalization(net, "digits")
    assert norm == data.resolve_normalize("digits", "dataset") and norm.kind == "dataset"
    assert "normalize" not in capsys.readouterr().err  # ftcnn's own builder: nothing to say
    with data.normalized(norm):
        assert torch.equal(data.load("digits", "test").tensors[0], data.load("digits", "test",
                                                                               normalize="dataset").tensors[0])


# --- the command line -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(digits_lenet5) -> Path:
    """LeNet-5 trained by `ftcnn train` on the digits: the run's shared one (conftest), read only."""
    return digits_lenet5


def test_train_records_dataset_with_its_constants(trained) -> None:
    record = checkpoint.meta(ftcnn.load(trained))["normalize"]
    assert record == data.resolve_normalize("digits").record()
    assert record["kind"] == "dataset" and record["std"][0] > 1


def test_bad_normalize_is_one_line_before_any_work(monkeypatch, capsys, tmp_path) -> None:
    for command in (["inject", "missing.pt", "--ber", "1e-4"], ["harden", "missing.pt", "--ratio", "0"],
                    ["train", "--model", "lenet5", "--data", "digits"], ["protect", "missing.pt"]):
        r = cli_in_process(monkeypatch, capsys, *command, "--normalize", "0.5/0", "-o", str(tmp_path / "o"))
        assert_one_line_refusal(r, "--normalize: every std must be > 0")
    assert not (tmp_path / "o").exists()


def test_a_contradicting_normalize_is_refused(monkeypatch, capsys, trained, tmp_path) -> None:
    r = cli_in_process(monkeypatch, capsys, "inject", str(trained), "--normalize", "none", "--ber", "1e-4",
                       "--trials", "2", "-o", str(tmp_path / "inj"))
    assert_one_line_refusal(r, "--normalize none contradicts the checkpoint, which records dataset (")
    assert not (tmp_path / "inj").exists()
    # the same preprocessing typed again is fine; the summary records the inputs' normalisation
    r = cli_in_process(monkeypatch, capsys, "inject", str(trained), "--normalize", "dataset", "--ber", "1e-4",
                       "--trials", "2", "-o", str(tmp_path / "inj"))
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr  # golden accuracy is what train recorded
    summary = json.loads((tmp_path / "inj" / "summary.json").read_text())
    assert summary["config"]["normalize"] == checkpoint.meta(ftcnn.load(trained))["normalize"]


def test_golden_far_below_the_recorded_accuracy_warns(monkeypatch, capsys, tmp_path) -> None:
    net = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8)  # untrained: ~10%
    ftcnn.save(net, tmp_path / "claims.pt", data="digits", test_accuracy=0.99)
    rng = torch.get_rng_state()
    r = cli_in_process(monkeypatch, capsys, "analyze", str(tmp_path / "claims.pt"), "--method", "l1",
                       "-o", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "below the 99.00% recorded" in warnings[0] and "--normalize" in warnings[0]
    assert torch.equal(rng, torch.get_rng_state())  # the check draws nothing from the global RNG


def small_cnn(num_classes: int = 10, in_channels: int = 1) -> torch.nn.Module:
    """A user's builder ("test_normalize:small_cnn"): conv, pool, linear for 8x8 inputs."""
    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, num_classes))


def _user_state_dict(folder: Path) -> tuple[Path, float]:
    """A user's model trained in their own loop on digits scaled by /16 (no standardisation), kept as a
    state dict; returns it and the user's own test accuracy on the same inputs."""
    torch.manual_seed(0)
    model = small_cnn()
    train_set = data.load("digits", "train", normalize="none")
    x, y = train_set.tensors
    train.fit(model, torch.utils.data.TensorDataset(x / 16, y), epochs=4, progress=False)
    x_test, y_test = data.load("digits", "test", normalize="none").tensors
    with torch.inference_mode():
        accuracy = (model.eval()(x_test / 16).argmax(1) == y_test).float().mean().item()
    path = folder / "user_state.pt"
    torch.save(model.state_dict(), path)
    return path, accuracy


def test_a_user_model_is_measured_as_its_owner_measures_it(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    state, own = _user_state_dict(tmp_path)
    base = ("--model", "test_normalize:small_cnn", "--data", "digits", "--ber", "1e-4", "--trials", "2")
    # without a record or --normalize: the default, said in one note
    r = cli_in_process(monkeypatch, capsys, "inject", str(state), *base, "-o", str(tmp_path / "default"))
    assert r.returncode == 0, r.stderr
    assert "--normalize dataset" in r.stderr and "--normalize none" in r.stderr
    r = cli_in_process(monkeypatch, capsys, "inject", str(state), *base, "--normalize", "0/16",
                       "-o", str(tmp_path / "own"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "own" / "summary.json").read_text())
    assert summary["golden_accuracy"] == own > 0.85  # exactly the user's own evaluation
    assert summary["config"]["normalize"] == {"kind": "fixed", "mean": [0.0], "std": [16.0]}
    default = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert default["golden_accuracy"] < own - 0.05  # standardised inputs are not what it was trained on


def test_prune_and_harden_keep_the_preprocessing(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    state, own = _user_state_dict(tmp_path)
    trust = ("--model", "test_normalize:small_cnn")
    r = cli_in_process(monkeypatch, capsys, "prune", str(state), *trust, "--data", "digits", "--normalize", "0/16",
                       "--criterion", "l1", "--ratio", "0.25", "--finetune-epochs", "1", "-o", str(tmp_path / "pruned.pt"))
    assert r.returncode == 0, r.stderr
    assert "--normalize" not in r.stderr  # typed: no note
    original = float(r.stdout.split("accuracy: original ")[1].split("%")[0]) / 100
    assert original == pytest.approx(own, abs=1e-4)  # measured on the owner's inputs
    pruned = checkpoint.meta(ftcnn.load(tmp_path / "pruned.pt", allow_builder="test_normalize:small_cnn"))
    assert pruned["normalize"] == {"kind": "fixed", "mean": [0.0], "std": [16.0]}
    # the pruned file's record is used without --normalize, and its recorded accuracy matches
    r = cli_in_process(monkeypatch, capsys, "harden", str(tmp_path / "pruned.pt"), *trust, "--ratio", "0",
                       "--restrict", "zero", "-o", str(tmp_path / "hard.pt"))
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr and "note" not in r.stderr
    hard = checkpoint.meta(ftcnn.load(tmp_path / "hard.pt", allow_builder="test_normalize:small_cnn"))
    assert hard["normalize"] == pruned["normalize"]
    r = cli_in_process(monkeypatch, capsys, "harden", str(tmp_path / "pruned.pt"), *trust, "--ratio", "0",
                       "--normalize", "dataset", "--restrict", "zero", "-o", str(tmp_path / "other.pt"))
    assert_one_line_refusal(r, "contradicts the checkpoint")
