"""Files ftcnn writes (strict JSON, the umask's mode, atomic) and its logs in files
(bounded progress, no escape codes, tables at full width)."""

from __future__ import annotations

import io
import json
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ftcnn import checkpoint, files, progress
from _helpers import run_cli

ESC = "\x1b"


def _strict(text: str):
    """A strict parser, as browsers' JSON.parse: NaN/Infinity are errors."""
    def refuse(name: str):
        raise ValueError(f"bare {name}")
    return json.loads(text, parse_constant=refuse)


# --- strict JSON -----------------------------------------------------------------------------

def test_write_json_is_strict_and_notes_nonfinite(tmp_path) -> None:
    blob = {"a": float("nan"), "b": [1.0, float("inf"), -float("inf")], "c": np.float32(0.5),
            "d": np.int64(3), "e": (1, 2), "f": np.array([1.5, np.nan]), "g": torch.tensor(2.0),
            "h": Path("x/y"), "ok": 0.25}
    path = tmp_path / "s.json"
    files.write_json(path, blob)
    data = _strict(path.read_text())
    assert data["a"] is None and data["b"] == [1.0, None, None] and data["f"] == [1.5, None]
    assert data["c"] == 0.5 and data["d"] == 3 and data["e"] == [1, 2] and data["g"] == 2.0
    assert data["h"] == "x/y" and data["ok"] == 0.25
    note = data["nonfinite"]
    assert note["count"] == 4 and "a" in note["fields"] and "b[1]" in note["fields"]
    assert "null" in note["note"]
    # nothing to note: no extra field; and the encoder itself can never emit NaN
    files.write_json(path, {"x": 1.0})
    assert _strict(path.read_text()) == {"x": 1.0}
    with pytest.raises(ValueError):
        json.dumps({"x": math.nan}, allow_nan=False)
    assert files.loads_strict('{"x": null}') == {"x": None}
    with pytest.raises(ValueError, match="NaN"):
        files.loads_strict('{"x": NaN}')


# --- modes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_umask_mode(tmp_path, mask, mode) -> None:
    old = os.umask(mask)
    try:
        files.write_text(tmp_path / "a.txt", "x")
        files.write_json(tmp_path / "a.json", {"x": 1})
        model = checkpoint.build("lenet5", num_classes=10, in_channels=1, input_size=8)
        checkpoint.save(model, tmp_path / "m.pt")
    finally:
        os.umask(old)
    for name in ("a.txt", "a.json", "m.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.txt", "m.pt"]  # no temp file left


def test_checkpoint_keeps_atomic_write_importable(tmp_path) -> None:
    assert checkpoint.atomic_write is files.atomic_write
    with pytest.raises(RuntimeError):
        files.atomic_write(tmp_path / "x", lambda tmp: (_ for _ in ()).throw(RuntimeError("boom")))
    assert list(tmp_path.iterdir()) == []  # a failed write leaves nothing, not a half file


# --- a small inject + compare + analyze run: every JSON strict, every file 0644 ------------

@pytest.fixture(scope="module")
def digits_model(digits_lenet5) -> Path:
    """The run's shared LeNet-5 (conftest): read only, the runs write under tmp_path."""
    return digits_lenet5


def test_every_json_is_strict_and_every_file_0644(digits_model, tmp_path) -> None:
    runs = [
        ("inject", str(digits_model), "--ber", "1e-5", "1e-2", "--trials", "3", "--limit", "100",
         "-o", str(tmp_path / "inj")),
        ("compare", str(digits_model), "--ber", "1e-3", "--trials", "2", "--bit-trials", "1", "--bits", "30",
         "--variants", "baseline,harden_min", "--finetune-epochs", "0", "-o", str(tmp_path / "cmp")),
        ("analyze", str(digits_model), "--method", "gain", "--samples", "64", "-o", str(tmp_path / "gain.json")),
        ("analyze", str(digits_model), "--compare", "gain", "--against", "l1", "--samples", "64",
         "--scores-dir", str(tmp_path / "scores"), "-o", str(tmp_path / "agreement.json")),
    ]
    outputs = []
    old = os.umask(0o022)
    try:
        for args in runs:  # in process (seconds of imports each otherwise); the logs' own tests use processes
            r = run_cli(*args, threads=1)
            assert r.returncode == 0, r.stderr[-2000:]
            outputs.append(r.stdout + r.stderr)
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    jsons = [p for p in written if p.suffix == ".json"]
    assert len(jsons) >= 6, jsons  # summaries, scores, keys, agreement
    for p in jsons:
        _strict(p.read_text())  # raises on bare NaN/Infinity
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert not [p for p in written if p.name.endswith(".tmp")]
    # tables in a file are printed whole: no wrapped or cut column names
    for out in outputs:  # progress in a file: plain lines, never redrawn
        assert ESC not in out and "\r" not in out, out[-500:]
    assert "expected: at most ~" in outputs[1]  # compare says what its campaigns will cost, up front
    inject_out = outputs[0]
    header = [line for line in inject_out.splitlines() if "critical SDC" in line]
    assert header and max(len(line) for line in inject_out.splitlines()) > 80


# --- logs ------------------------------------------------------------------------------------

def test_train_redirected_writes_little_and_no_escape_codes(tmp_path) -> None:
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "ftcnn", "train", "--model", "lenet5", "--data", "digits",
                            "--epochs", "4", "-o", str(tmp_path / "m.pt")], stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    text = log.read_text()
    assert r.returncode == 0, text
    assert log.stat().st_size < 5000, text[:2000]
    assert ESC not in text and "\r" not in text
    assert "test accuracy" in text


def test_train_progress_lines_are_throttled(tmp_path) -> None:
    """With a short interval the plain lines do appear, one per interval at most."""
    log = tmp_path / "train.log"
    start = time.monotonic()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "ftcnn", "train", "--model", "lenet5", "--data", "digits",
                            "--epochs", "6", "-o", str(tmp_path / "m.pt")], stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "FTCNN_PROGRESS_SECONDS": "0.2"},
                           timeout=600)
    elapsed = time.monotonic() - start
    text = log.read_text()
    assert r.returncode == 0, text
    lines = [line for line in text.splitlines() if line.startswith("train epoch")]
    assert lines and all("%" in line for line in lines)
    assert len(lines) <= 2 * (elapsed / 0.2 + 2)  # each interval: one line, plus a closing one
    assert ESC not in text and "\r" not in text


def test_line_progress_throttles_and_closes(monkeypatch) -> None:
    out = io.StringIO()
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(progress, "_last_line", [0.0])
    bar = progress.LineProgress(range(100), desc="step", stream=out, every=5.0)
    for i in bar:
        clock[0] += 0.5  # 100 items, 0.5 s each: 50 s
        bar.set_postfix(loss=f"{i:.1f}")
    lines = out.getvalue().splitlines()
    assert 9 <= len(lines) <= 11  # one per 5 s, and the closing line
    assert lines[-1].endswith("done") and "100/100 (100%)" in lines[-1]
    assert "left" in lines[0] and "loss=" in lines[0]
    quiet = io.StringIO()  # a short step says nothing
    for _ in progress.LineProgress(range(3), desc="short", stream=quiet, every=5.0):
        clock[0] += 0.1
    assert quiet.getvalue() == ""


def test_bar_is_plain_when_not_a_terminal(monkeypatch) -> None:
    monkeypatch.setattr(progress, "is_terminal", lambda stream=None: False)
    assert isinstance(progress.bar(range(3), desc="x"), progress.LineProgress)
    assert progress.console().width == progress.FILE_WIDTH
    monkeypatch.setattr(progress, "is_terminal", lambda stream=None: True)
    assert not isinstance(progress.bar(range(3), desc="x"), progress.LineProgress)
