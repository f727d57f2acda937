"""Bring your own model: the README's example (a user ResNet-like module) runs as
written through the API and the CLI, and saving/loading a user model keeps the
trust rules (its code is imported only when the caller names it)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ftcnn
from _helpers import run_cli
from ftcnn import checkpoint
from ftcnn.protection import hardening, vulnerability

README = Path(__file__).resolve().parent.parent / "README.md"
USER_NORMALIZE = {"kind": "fixed", "mean": [0.0], "std": [16.0]}  # the README's `normalize="0/16"`
FTCNN = Path(sys.executable).parent / "ftcnn"  # the installed command, as a user runs it (not python -m)


def _block(marker: str, lang: str) -> str:
    found = re.search(rf"<!-- {marker} -->\s*```{lang}\n(.*?)```", README.read_text(), re.S)
    assert found, f"README lost its {marker} block"
    return found.group(1)


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    """A folder holding the README's mymodels.py, after running its API example there."""
    folder = tmp_path_factory.mktemp("byo")
    (folder / "mymodels.py").write_text(_block("byo-module", "python"))
    (folder / "api_example.py").write_text(_block("byo-api", "python"))
    r = subprocess.run([sys.executable, "api_example.py"], cwd=folder, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accuracy at BER 1e-4" in r.stdout
    return folder


def test_api_example(user_folder) -> None:
    summary = json.loads((user_folder / "runs" / "mine_api" / "summary.json").read_text())
    assert summary["results"][0]["trials"] == 10
    blob = checkpoint.read(user_folder / "mine_hardened.pt")
    assert blob["spec"]["builder"] == "mymodels:TinyResNet"
    assert [t["kind"] for t in blob["spec"]["transforms"]] == ["prune", "harden"]
    # the user's preprocessing (x / 16) is recorded, and kept through pruning and hardening (issue 23)
    assert blob["meta"]["normalize"] == USER_NORMALIZE
    assert checkpoint.read(user_folder / "mine.pt")["meta"]["normalize"] == USER_NORMALIZE


def test_cli_example(user_folder) -> None:
    if not FTCNN.is_file():
        pytest.skip("the ftcnn command is not installed beside this interpreter")
    commands = [line for line in _block("byo-cli", "bash").splitlines() if line.startswith("ftcnn ")]
    assert len(commands) >= 5
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only --model makes mymodels importable
    env["OMP_NUM_THREADS"] = "1"
    first = subprocess.run([str(FTCNN), *shlex.split(commands[0])[1:]], cwd=user_folder, capture_output=True,
                           text=True, timeout=600, env=env)  # the installed command, as a user runs it
    assert first.returncode == 0, f"{commands[0]}\n{first.stderr[-3000:]}"
    for line in commands[1:]:  # the rest in process (seconds of imports each otherwise)
        r = run_cli(*shlex.split(line)[1:], cwd=user_folder, threads=1)
        assert r.returncode == 0, f"{line}\n{r.stderr[-3000:]}"
    summary = json.loads((user_folder / "runs" / "mine_cli" / "summary.json").read_text())
    assert summary["results"][0]["trials"] == 10
    assert (user_folder / "runs" / "mine_cmp" / "report.html").is_file()
    blob = checkpoint.read(user_folder / "mine_hardened_cli.pt")
    assert blob["spec"]["builder"] == "mymodels:tiny_resnet"
    assert blob["spec"]["kwargs"] == {"num_classes": 10, "in_channels": 1, "input_size": 8}
    # ftcnn measures the user's model exactly as its owner did: the golden accuracy of mine.pt, on the
    # normalisation it was saved with, equals the accuracy the user's own evaluation recorded (issue 23)
    own = checkpoint.read(user_folder / "mine.pt")["meta"]["test_accuracy"]
    golden = json.loads((user_folder / "runs" / "mine_own" / "summary.json").read_text())["golden_accuracy"]
    assert golden == pytest.approx(own, abs=1e-6) and own > 0.8  # the same count of right answers
    for name in ("mine_pruned.pt", "mine_hardened_cli.pt"):  # --normalize 0/16 recorded and kept
        assert checkpoint.read(user_folder / name)["meta"]["normalize"] == USER_NORMALIZE, name
    compared = json.loads((user_folder / "runs" / "mine_cmp" / "summary.json").read_text())
    assert compared["golden_accuracy"] == pytest.approx(own, abs=1e-6)


def _one_line_error(r: subprocess.CompletedProcess, match: str) -> None:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert match in lines[0] and "\x1b" not in lines[0], lines[0]


def test_cli_state_dict_errors(user_folder, monkeypatch) -> None:
    if not FTCNN.is_file():
        pytest.skip("the ftcnn command is not installed beside this interpreter")
    run = lambda *a: run_cli(*a, cwd=user_folder, threads=1)
    out = str(user_folder / "x.json")
    # without --model a state dict is refused, and says how to load it
    _one_line_error(run("analyze", "mine_state.pt", "--data", "digits", "-o", out), "--model")
    _one_line_error(run("analyze", "mine_state.pt", "--model", "mymodels:tiny_resnet", "-o", out), "--data")
    # the wrong builder: the tensors do not fit (strict)
    _one_line_error(run("analyze", "mine_state.pt", "--model", "ftcnn.models:lenet5", "--data", "digits",
                        "-o", out), "do not fit")
    # a pickled model: the safe loader refuses it in one line, no escape codes
    spec = importlib.util.spec_from_file_location("mymodels", user_folder / "mymodels.py")
    mymodels = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mymodels", mymodels)  # pickled by reference, as its owner would
    spec.loader.exec_module(mymodels)
    torch.save(mymodels.TinyResNet(10, 1), user_folder / "pickled.pt")
    _one_line_error(run("analyze", "pickled.pt", "--model", "mymodels:tiny_resnet", "--data", "digits",
                        "-o", out), "safe loader")


# --- the API's save on models of your own -------------------------------------------------

class Local(nn.Module):  # a class in an importable module (this test file)
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_save_by_class_and_trust(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import test_byo_model as me  # the name load will import

    model = me.Local(num_classes=7)
    with pytest.raises(ValueError, match="builder="):
        ftcnn.save(model, tmp_path / "m.pt")  # how to rebuild it is not known
    ftcnn.save(model, tmp_path / "m.pt", kwargs={"num_classes": 7})
    with pytest.raises(checkpoint.CheckpointError, match="allow_builder='test_byo_model:Local'"):
        ftcnn.load(tmp_path / "m.pt")  # user code is never imported unasked
    back = ftcnn.load(tmp_path / "m.pt", allow_builder="test_byo_model:Local")
    assert type(back) is me.Local and back.fc.out_features == 7
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    # wrong kwargs fail at save time, not at load time
    with pytest.raises(ValueError, match="does not rebuild"):
        ftcnn.save(me.Local(num_classes=7), tmp_path / "bad.pt", kwargs={"num_classes": 3})
    assert not (tmp_path / "bad.pt").exists()


def test_save_with_builder_and_refusals(tmp_path) -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10))
    ftcnn.save(net, tmp_path / "t.pt", builder="user_models:tiny", kwargs={"num_classes": 10})
    back = ftcnn.load(tmp_path / "t.pt", allow_builder="user_models:tiny")
    assert checkpoint.get_spec(back)["builder"] == "user_models:tiny"

    class Inner(nn.Module):
        def forward(self, x):
            return x
    with pytest.raises(ValueError, match="cannot name the builder"):
        ftcnn.save(Inner(), tmp_path / "i.pt", kwargs={})
    assert checkpoint.get_spec(net)["builder"] == "user_models:tiny"  # save named it: harden/prune record now
    with pytest.raises(ValueError, match="already records builder"):
        ftcnn.save(net, tmp_path / "o.pt", builder="user_models:other")
    fresh = nn.Sequential(*(copy.deepcopy(m) for m in net))
    with pytest.raises(ValueError, match="JSON scalar"):
        ftcnn.save(fresh, tmp_path / "j.pt", builder="user_models:tiny", kwargs={"layers": [10]})
    # hardened before being described: the transform could not be recorded
    x = torch.randn(16, 3, 8, 8)
    hard = hardening.harden(fresh, vulnerability.analyze(fresh, x, torch.randint(0, 10, (16,)), samples=16),
                         ratio=0.2)
    with pytest.raises(ValueError, match="describe the original"):
        ftcnn.save(hard, tmp_path / "h.pt", builder="user_models:tiny", kwargs={"num_classes": 10})


def test_verbs_compose(tmp_path) -> None:
    """harden and prune take the whole result of analyze (and still the layer map)."""
    from ftcnn.protection import pruning

    model = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    result = vulnerability.analyze(model, x, y, samples=32)
    a = hardening.harden(model, result, ratio=0.2)
    b = hardening.harden(model, result["layers"], ratio=0.2)
    assert hardening.protected(a) == hardening.protected(b)
    pruned = pruning.prune(model, ratio=0.25, scores=result, input_shape=(1, 8, 8))
    ftcnn.save(pruned, tmp_path / "p.pt")
    assert [t["kind"] for t in checkpoint.get_spec(ftcnn.load(tmp_path / "p.pt"))["transforms"]] == ["prune"]
