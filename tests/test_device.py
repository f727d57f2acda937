"""``--device`` on every command that computes (issue 14).

Without a GPU: a CUDA device is refused in one line, exit 2, before any work or file; an
explicit ``device="cpu"`` gives exactly the default's numbers. With one (tests marked
``cuda``, skipped here): CUDA gives the CPU's accuracies and the CPU's scores within float
tolerance, and every file is saved from CPU tensors.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from _helpers import assert_one_line_refusal, cli_in_process, run_cli
from ftcnn import checkpoint, cli, fingerprint, train
from ftcnn.flows import pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="cuda:7 may exist on a GPU machine")

# every command that computes, with the least arguments it parses (the checkpoint need not exist:
# the device is checked first, so a missing file is never reached)
COMMANDS = {
    "train": ["train", "--model", "lenet5", "--data", "digits", "-o", "{out}/m.pt"],
    "analyze": ["analyze", "{out}/none.pt", "-o", "{out}/s.json"],
    "harden": ["harden", "{out}/none.pt", "--tmr", "full", "-o", "{out}/h.pt"],
    "prune": ["prune", "{out}/none.pt", "-o", "{out}/p.pt"],
    "pipeline": ["pipeline", "{out}/none.pt", "-o", "{out}/run"],
    "inject": ["inject", "{out}/none.pt", "--ber", "1e-5", "-o", "{out}/run"],
    "compare": ["compare", "{out}/none.pt", "-o", "{out}/run"],
    "demo": ["demo", "-o", "{out}/run"],
    "protect": ["protect", "{out}/none.pt", "-o", "{out}/run"],
    "study": ["study", "--models", "lenet5", "--data", "digits", "-o", "{out}/run"],
}






def test_every_computing_command_takes_device() -> None:
    names = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    assert set(COMMANDS) | {"report"} == names  # report only reads files
    for c in cli.app.registered_commands:
        takes = "device" in inspect.signature(c.callback).parameters
        assert takes == ((c.name or c.callback.__name__) in COMMANDS), c.name


@no_cuda
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_missing_gpu_is_one_line_before_any_work(command, tmp_path, monkeypatch, capsys) -> None:
    args = [a.format(out=tmp_path) for a in COMMANDS[command]] + ["--device", "cuda:7"]
    r = cli_in_process(monkeypatch, capsys, *args)
    assert_one_line_refusal(r, "device cuda:7 is not available")
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing created


def test_an_unknown_device_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    r = cli_in_process(monkeypatch, capsys, *[a.format(out=tmp_path) for a in COMMANDS["harden"]], "--device", "gpu9")
    assert_one_line_refusal(r, "unknown device 'gpu9'")
    assert list(tmp_path.iterdir()) == []


@no_cuda
def test_a_missing_gpu_in_a_real_process(tmp_path) -> None:
    """The same as a user sees it: exit status 2, one line, no traceback (the CLI run in process)."""
    r = run_cli("analyze", str(tmp_path / "none.pt"), "--device", "cuda:7", "-o", str(tmp_path / "s.json"))
    assert_one_line_refusal(r, "device cuda:7 is not available here (no CUDA GPU); use --device cpu")
    assert list(tmp_path.iterdir()) == []


# --- the API: device="cpu" is the default, number for number -----------------------------------

@pytest.fixture(scope="module")
def digits_net(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("device") / "lenet.pt"
    pipeline.train_checkpoint("lenet5", "digits", path, epochs=1, seed=1, threads=1)
    return path


def test_on_device_gives_the_model_back(tiny_model) -> None:
    before = fingerprint.model_digest(tiny_model)
    with train.on_device(tiny_model, "cpu") as m:
        assert m is tiny_model
    assert train.model_device(tiny_model).type == "cpu"
    assert fingerprint.model_digest(tiny_model) == before


def test_explicit_cpu_trains_the_default_model(digits_net, tmp_path) -> None:
    acc = pipeline.train_checkpoint("lenet5", "digits", tmp_path / "cpu.pt", epochs=1, seed=1, threads=1,
                                    device="cpu")
    a, b = checkpoint.load(digits_net), checkpoint.load(tmp_path / "cpu.pt")
    assert fingerprint.model_digest(a) == fingerprint.model_digest(b)
    assert checkpoint.meta(a) == checkpoint.meta(b) and checkpoint.meta(b)["test_accuracy"] == acc


def test_explicit_cpu_scores_and_hardens_as_the_default(digits_net, tmp_path) -> None:
    net = checkpoint.load(digits_net)
    settings = {"samples": 32, "seed": 0}
    default = pipeline.analyze_checkpoint(net, "digits", method="gain", settings=settings)
    on_cpu = pipeline.analyze_checkpoint(net, "digits", method="gain", settings=settings, device="cpu")
    assert default["layers"] == on_cpu["layers"] and default["settings"] == on_cpu["settings"]
    scores = tmp_path / "gain.json"
    pipeline.analyze_checkpoint(net, "digits", method="gain", settings=settings, output=scores)
    common = dict(scores=scores, ratio=0.2, restrict="clamp", range_margin=0.1, calibration_size=200)
    r0 = pipeline.harden_checkpoint(net, "digits", tmp_path / "h0.pt", **common)
    r1 = pipeline.harden_checkpoint(net, "digits", tmp_path / "h1.pt", device="cpu", **common)
    h0, h1 = checkpoint.load(tmp_path / "h0.pt"), checkpoint.load(tmp_path / "h1.pt")
    assert fingerprint.model_digest(h0) == fingerprint.model_digest(h1)
    assert r0["test_accuracy"] == r1["test_accuracy"] and r0["protected"] == r1["protected"]
    assert train.model_device(net).type == "cpu"


# --- with a GPU: the CPU's numbers within float tolerance, files from CPU tensors --------------

@cuda
def test_cuda_evaluates_and_scores_as_the_cpu(digits_net) -> None:
    from ftcnn import data

    net = checkpoint.load(digits_net)
    test_set = data.load("digits", "test")
    assert train.evaluate(net, test_set, device="cuda") == train.evaluate(net, test_set)
    assert train.model_device(net).type == "cpu"  # lent to the GPU, given back
    settings = {"samples": 64, "seed": 0}
    cpu = pipeline.analyze_checkpoint(net, "digits", method="gain", settings=settings)
    gpu = pipeline.analyze_checkpoint(net, "digits", method="gain", settings=settings, device="cuda")
    assert cpu["layers"].keys() == gpu["layers"].keys()
    for name in cpu["layers"]:
        torch.testing.assert_close(torch.tensor(gpu["layers"][name]), torch.tensor(cpu["layers"][name]),
                                   rtol=1e-3, atol=1e-6)
    l1_cpu = pipeline.analyze_checkpoint(net, "digits", method="l1")
    l1_gpu = pipeline.analyze_checkpoint(net, "digits", method="l1", device="cuda")
    for name in l1_cpu["layers"]:
        torch.testing.assert_close(torch.tensor(l1_gpu["layers"][name]), torch.tensor(l1_cpu["layers"][name]))


@cuda
def test_cuda_hardens_as_the_cpu(digits_net, tmp_path) -> None:
    from ftcnn import data

    net = checkpoint.load(digits_net)
    common = dict(ratio=0.0, restrict="zero", range_margin=0.1, calibration_size=200)
    r_cpu = pipeline.harden_checkpoint(net, "digits", tmp_path / "cpu.pt", **common)
    r_gpu = pipeline.harden_checkpoint(net, "digits", tmp_path / "gpu.pt", device="cuda", **common)
    assert train.model_device(net).type == "cpu"
    assert r_gpu["original_test_accuracy"] == r_cpu["original_test_accuracy"]
    a, b = checkpoint.load(tmp_path / "cpu.pt"), checkpoint.load(tmp_path / "gpu.pt")  # loads: CPU tensors
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sb[k].device.type == "cpu"
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6)  # profiled ranges: float tolerance
    x, _ = data.load("digits", "test").tensors
    torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-5)
    assert abs(r_gpu["test_accuracy"] - r_cpu["test_accuracy"]) <= 2 / len(x)


@cuda
def test_cuda_trains_and_prunes_to_cpu_files(digits_net, tmp_path) -> None:
    """Training on a GPU draws other dropout masks and sums in another order: not the CPU's bits,
    but a working model saved from CPU tensors, as good within a few points."""
    acc = pipeline.train_checkpoint("lenet5", "digits", tmp_path / "gpu.pt", epochs=1, seed=1, threads=1,
                                    device="cuda")
    cpu_acc = checkpoint.meta(checkpoint.load(digits_net))["test_accuracy"]
    assert abs(acc - cpu_acc) < 0.1
    net = checkpoint.load(tmp_path / "gpu.pt")
    assert all(t.device.type == "cpu" for t in net.state_dict().values())
    meta = pipeline.prune_checkpoint(net, "digits", tmp_path / "pruned.pt", ratio=0.3, finetune_epochs=1,
                                     samples=64, device="cuda")
    pruned = checkpoint.load(tmp_path / "pruned.pt")
    assert meta["params_after"] < meta["params_before"]
    assert all(t.device.type == "cpu" for t in pruned.state_dict().values())


@cuda
def test_cuda_from_the_command_line(digits_net, tmp_path) -> None:
    r = run_cli("analyze", str(digits_net), "--samples", "32", "--device", "cuda", "-o", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("harden", str(digits_net), "--tmr", "full", "--device", "cuda", "-o", str(tmp_path / "t.pt"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(t.device.type == "cpu" for t in checkpoint.load(tmp_path / "t.pt").state_dict().values())
