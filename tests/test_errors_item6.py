"""Error messages that fell short (issue 23, item 6): each mistake is one ``error:`` line that
names the flag or the file, given before any work (nothing written). Each case reproduced a
silent drop, an unclear line or a late refusal of the pre-fix code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import ftcnn
from ftcnn import checkpoint
from ftcnn.campaigns import campaign_file as CF
from ftcnn.checkpoint import CheckpointError

from _helpers import assert_one_line_refusal, cli_in_process


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """An untrained, small LeNet-5 for the 8x8 digits (no training needed to be refused)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "lenet.pt"
    ftcnn.save(ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.25), path,
               data="digits")
    return path


# 1. --precision with a typed --trials: refused, not silently dropped ------------------------------

def test_precision_and_typed_trials_are_refused(tmp_path, monkeypatch, capsys) -> None:
    r = cli_in_process(monkeypatch, capsys, "inject", str(tmp_path / "missing.pt"), "--ber", "1e-3",
                       "--precision", "0.01", "--trials", "50", "-o", str(tmp_path / "out"))
    assert_one_line_refusal(r, "--precision and --trials cannot be combined")
    assert not (tmp_path / "out").exists()


def test_precision_alone_still_sets_its_own_trials() -> None:
    """The default --trials (not typed) is replaced, as before: trials "auto"."""
    params = {"checkpoint_path": "m.pt", "output": "out", "ber": [1e-3], "trials": "100", "precision": 0.01}
    settings = CF.inject_settings(params, ["checkpoint_path", "output", "ber", "precision"])
    assert settings.config.precision == 0.01 and settings.config.trials is None
    with pytest.raises(ValueError, match="--precision and --trials cannot be combined"):
        CF.inject_settings(params, ["checkpoint_path", "output", "ber", "precision", "trials"])


# 2. --confidence 95 (a percentage) -------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["inject", "MISSING", "--ber", "1e-3"],
    ["analyze", "MISSING", "--method", "fi"],
])
@pytest.mark.parametrize("value", ["95", "0", "1"])
def test_confidence_outside_the_unit_interval(tmp_path, monkeypatch, capsys, command, value) -> None:
    args = [str(tmp_path / "missing.pt") if a == "MISSING" else a for a in command]
    r = cli_in_process(monkeypatch, capsys, *args, "--confidence", value, "-o", str(tmp_path / "out"))
    assert_one_line_refusal(r, "--confidence must lie in (0, 1): a share, e.g. 0.95")
    assert not (tmp_path / "out").exists()


# 3. a folder given as CHECKPOINT -------------------------------------------------------------

def test_a_folder_as_checkpoint_is_named_a_folder(tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    r = cli_in_process(monkeypatch, capsys, "inject", str(run), "--ber", "1e-3", "-o", str(tmp_path / "out"))
    assert_one_line_refusal(r, f"{run} is a folder, not a checkpoint file")
    assert "not found" not in r.stderr
    assert not (tmp_path / "out").exists()


# 4. a JSON (or other text) file given as CHECKPOINT ------------------------------------------------

@pytest.mark.parametrize("name, text, says", [
    ("summary.json", json.dumps({"points": [1, 2]}), "is not an ftcnn checkpoint (it is JSON text"),
    ("list.json", "\n  [1, 2, 3]", "is not an ftcnn checkpoint (it is JSON text"),
    ("notes.txt", "trained on digits, 5 epochs\n" * 400, "is not a loadable ftcnn checkpoint (it is text"),
])
def test_a_text_file_as_checkpoint(tmp_path, monkeypatch, capsys, name, text, says) -> None:
    path = tmp_path / name
    path.write_text(text)
    r = cli_in_process(monkeypatch, capsys, "inject", str(path), "--ber", "1e-3", "-o", str(tmp_path / "out"))
    assert_one_line_refusal(r, f"{path} {says}")
    assert "safe loader" not in r.stderr
    with pytest.raises(CheckpointError, match=re.escape(says)):
        checkpoint.read(path)


def test_real_checkpoints_still_load(small_checkpoint, tmp_path) -> None:
    """The text sniffing leaves torch's files (zip, and the legacy pickle format) alone."""
    assert checkpoint.read(small_checkpoint)["format"] == checkpoint.FORMAT
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(small_checkpoint, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert checkpoint.read(legacy)["format"] == checkpoint.FORMAT


# 5. harden without scores: the CLI's spelling ------------------------------------------------------

def test_harden_without_scores_names_the_flags(small_checkpoint, tmp_path, monkeypatch, capsys) -> None:
    r = cli_in_process(monkeypatch, capsys, "harden", str(small_checkpoint), "--ratio", "0.1",
                       "-o", str(tmp_path / "hard.pt"))
    assert_one_line_refusal(r, "--scores is needed")
    assert "--tmr full" in r.stderr and "tmr='full'" not in r.stderr
    assert not (tmp_path / "hard.pt").exists()


# 6. --bits outside the storage format: refused before the checkpoint loads ------------------------

@pytest.mark.parametrize("extra, says", [
    (["--bits", "32"], "--bits 32: float32 has bits 0..31"),
    (["--bits", "3", "16", "--dtype", "float16"], "--bits 16: float16 has bits 0..15"),
    (["--bits", "-1"], "--bits -1: float32 has bits 0..31"),
])
def test_bits_outside_the_format_refused_before_loading(tmp_path, monkeypatch, capsys, extra, says) -> None:
    # the checkpoint does not exist: a check after loading would name it instead
    r = cli_in_process(monkeypatch, capsys, "inject", str(tmp_path / "missing.pt"), "--ber", "1e-3", *extra,
                       "-o", str(tmp_path / "out"))
    assert_one_line_refusal(r, says)
    assert not (tmp_path / "out").exists()


def test_bits_inside_the_format_pass(tmp_path, monkeypatch, capsys) -> None:
    r = cli_in_process(monkeypatch, capsys, "inject", str(tmp_path / "missing.pt"), "--ber", "1e-3",
                       "--bits", "0", "31", "-o", str(tmp_path / "out"))
    assert_one_line_refusal(r, "missing.pt not found")
