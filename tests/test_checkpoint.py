"""Checkpoints round-trip any model ftcnn makes, and never run code they carry."""

from __future__ import annotations

import os

import pytest
import torch

import ftcnn
from ftcnn.checkpoint import CheckpointError


@pytest.mark.parametrize("name", ["lenet5", "vgg11", "resnet20"])
def test_round_trip_rebuilds_the_architecture(name, tmp_path) -> None:
    model = ftcnn.build(name, num_classes=10, in_channels=1, input_size=28, width=0.25)
    path = tmp_path / "m.pt"
    ftcnn.save(model, path, note="hello")
    loaded = ftcnn.load(path)
    assert type(loaded) is type(model)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), loaded(x))
    assert ftcnn.checkpoint.meta(loaded)["note"] == "hello"


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["FTCNN_PWNED"],))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("FTCNN_PWNED", str(marker))
    path = tmp_path / "evil.pt"
    model = ftcnn.build("lenet5", in_channels=1, input_size=28)
    blob = {"format": "ftcnn/1", "spec": "{}", "meta": "{}", "state_dict": model.state_dict(),
            "payload": _Evil()}
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="safe loader"):
        ftcnn.load(path)
    assert not marker.exists()
    # the same file, unpickled unsafely, would have run the payload: the test is real
    with open(path, "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.exists()


def test_missing_corrupt_and_foreign_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        ftcnn.load(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a loadable"):
        ftcnn.load(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not an ftcnn checkpoint"):
        ftcnn.load(foreign)
    truncated = tmp_path / "trunc.pt"
    ftcnn.save(ftcnn.build("lenet5", in_channels=1, input_size=28), truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(CheckpointError):
        ftcnn.load(truncated)


def test_save_is_atomic(tmp_path, monkeypatch) -> None:
    model = ftcnn.build("lenet5", in_channels=1, input_size=28)
    path = tmp_path / "m.pt"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        ftcnn.save(model, path)
    assert os.listdir(tmp_path) == []


def test_user_builder_round_trip(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    module = tmp_path / "my_nets.py"
    module.write_text("from torch import nn\n"
                      "def tiny(num_classes=10, in_channels=1, input_size=8, width=1.0):\n"
                      "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels*input_size**2, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = ftcnn.build("my_nets:tiny", num_classes=3)
    ftcnn.save(model, tmp_path / "u.pt")
    with pytest.raises(CheckpointError, match="allow_builder='my_nets:tiny'"):
        ftcnn.load(tmp_path / "u.pt")  # importing a user module runs its code: only by name
    loaded = ftcnn.load(tmp_path / "u.pt", allow_builder="my_nets:tiny")
    assert torch.equal(loaded[1].weight, model[1].weight)
