"""The command line: the issue's commands, and one clear line for each bad input."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from _helpers import run_cli, train_digits_model


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "lenet.pt"
    r = train_digits_model(path, epochs=2)
    assert "test accuracy" in r.stdout
    return path


def test_inject_end_to_end(digits_model, tmp_path) -> None:
    out = tmp_path / "inj"
    r = run_cli("inject", str(digits_model), "--ber", "1e-5", "1e-3", "--trials", "4", "--seed", "0",
                "-o", str(out))
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [row["ber"] for row in summary["results"]] == [1e-5, 1e-3]
    assert summary["config"]["data"] == "digits"  # taken from the checkpoint
    assert "accuracy" in r.stdout and "1e-05" in r.stdout
    assert (out / "summary.csv").exists() and (out / "results.sqlite").exists()


def _assert_clean_failure(r: subprocess.CompletedProcess, match: str) -> None:
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr  # one line, no traceback
    assert lines[0].startswith("error:") and match in lines[0], lines[0]


@pytest.mark.parametrize("args, match", [
    (["--ber", "2"], "outside [0, 1]"),
    (["--ber", "1e-3", "--trials", "0"], "trials"),
    (["--ber", "1e-3", "--data", "nosuchdata"], "nosuchdata"),
    (["--ber", "1e-3", "--data", "mnist5k"], "shape"),
    (["--ber", "1e-3", "--layers", "nolayer"], "unknown layer 'nolayer'"),
])
def test_inject_bad_input(digits_model, tmp_path, args, match) -> None:
    out = tmp_path / "run"
    r = run_cli("inject", str(digits_model), *args, "--trials" if "--trials" not in args else "--seed",
                "2" if "--trials" not in args else "0", "-o", str(out))
    _assert_clean_failure(r, match)
    assert not (out / "summary.json").exists()


def test_inject_missing_and_corrupt_checkpoint(tmp_path) -> None:
    _assert_clean_failure(run_cli("inject", str(tmp_path / "none.pt"), "--ber", "1e-3", "-o",
                                  str(tmp_path / "o")), "not found")
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    _assert_clean_failure(run_cli("inject", str(bad), "--ber", "1e-3", "-o", str(tmp_path / "o")),
                          "not a loadable")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(digits_model, tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    r = run_cli("inject", str(digits_model), "--ber", "1e-3", "--trials", "2", "-o", str(locked / "run"))
    _assert_clean_failure(r, "cannot create")


def test_unwritable_output_folder_as_root(digits_model, tmp_path) -> None:
    """A path under a regular file can never be created, even by root."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("inject", str(digits_model), "--ber", "1e-3", "--trials", "2", "-o", str(blocker / "run"))
    _assert_clean_failure(r, "cannot create output folder")
    r = run_cli("train", "--model", "lenet5", "--data", "digits", "--epochs", "1", "-o",
                str(blocker / "m.pt"))
    _assert_clean_failure(r, "does not exist")


def test_train_unknown_model(tmp_path) -> None:
    _assert_clean_failure(run_cli("train", "--model", "nonet", "--data", "digits", "-o",
                                  str(tmp_path / "m.pt")), "unknown model 'nonet'")
    assert not (tmp_path / "m.pt").exists()


def test_multi_value_expansion() -> None:
    from ftcnn.cli import _expand_multi_values
    assert _expand_multi_values(["inject", "m.pt", "--ber", "1e-6", "1e-5", "-o", "x"]) == \
        ["inject", "m.pt", "--ber", "1e-6", "--ber", "1e-5", "-o", "x"]
    assert _expand_multi_values(["inject", "--layers", "a.b", "c", "m.pt"]) == \
        ["inject", "--layers", "a.b", "--layers", "c", "m.pt"]
