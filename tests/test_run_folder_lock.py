"""One writer per run folder, and pieces checked against their own content (issue 19, items 4 and 8).

The issue's reproductions: two ``compare`` runs on one folder both exited 0, one deleting the
other's campaign database, the folder ending with one run's model and the other's results; and a
``models/restrict.pt`` replaced by another protected model was published as "restrict". Here a
second run on a held folder refuses in one line and changes nothing, the lock dies with its
holder (SIGKILL included), and a replaced piece is rebuilt and said so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

import ftcnn
from ftcnn import checkpoint, data, files, fingerprint, train
from ftcnn.campaigns import campaign as C, store
from ftcnn.flows import compare, pipeline
from ftcnn.protection import hardening

from _helpers import assert_one_line_refusal, cli_in_process

pytestmark = pytest.mark.usefixtures("one_thread")

IN_USE = "is in use by another ftcnn run"
# the smallest comparison that has a protected variant: one BER, one bit, no fine-tune
CONFIG = compare.CompareConfig(bers=(1e-3,), trials=2, bit_trials=1, bits=(30,), score_samples=16,
                               latency_repeats=1, finetune_epochs=0, variants=("baseline", "restrict"))


def _digits_lenet() -> torch.nn.Module:
    train.seed_everything(0)
    model = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.5)
    train.fit(model, data.load("digits", "train"), epochs=1, seed=0, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _digits_lenet()


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "d.pt"
    ftcnn.save(model, path, data="digits")
    return path


@pytest.fixture(scope="module")
def finished(model, tmp_path_factory) -> tuple[Path, dict]:
    """A finished comparison (copied by the tests that change it) and its summary."""
    out = tmp_path_factory.mktemp("finished") / "cmp"
    return out, compare.run_compare(model, "digits", out, CONFIG)


def _rows(summary: dict) -> list:
    """A comparison's rows as its summary.json holds them (an undefined ratio is null, and equal)."""
    return files.jsonable(summary["variants"])


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folder``: modification time and content digest."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _hold(*folders: Path) -> subprocess.Popen:
    """Another process holding ``folders`` with ftcnn's own lock until its stdin closes or it is killed."""
    code = ("import contextlib, sys\nfrom ftcnn import files\nwith contextlib.ExitStack() as held:\n"
            f"    for f in {[str(f) for f in folders]!r}:\n        held.enter_context(files.exclusive_folder(f))\n"
            "    print('held', flush=True)\n    sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# --- a second run on a held folder ---------------------------------------------------------

COMMANDS = {
    "inject": ["inject", "{ckpt}", "--ber", "1e-3", "--trials", "1", "-o", "{out}"],
    "compare": ["compare", "{ckpt}", "--ber", "1e-3", "--trials", "2", "--bit-trials", "1", "--bits", "30",
                "--variants", "baseline,restrict", "--finetune-epochs", "0", "--range-margin", "0.3",
                "-o", "{out}"],
    "pipeline": ["pipeline", "{ckpt}", "--finetune-epochs", "0", "-o", "{out}"],
    "protect": ["protect", "{ckpt}", "--trials", "1", "-o", "{out}"],
    "demo": ["demo", "--epochs", "1", "--trials", "1", "-o", "{out}"],
    "analyze": ["analyze", "{ckpt}", "--compare", "l1", "--against", "gain", "--samples", "16",
                "--scores-dir", "{out}", "-o", "{out}/agreement.json"],  # a scores folder: one writer too
    "report": ["report", "{out}"],  # redraws a finished comparison: not while a compare writes it
}


@pytest.fixture(scope="module")
def held(finished, tmp_path_factory) -> Iterator[tuple[dict[str, Path], subprocess.Popen]]:
    """One folder per command, each with content (compare's: a finished comparison), all held by
    one other process."""
    root = tmp_path_factory.mktemp("held")
    folders = {name: root / name for name in COMMANDS}
    for name, folder in folders.items():
        if name in ("compare", "report"):
            shutil.copytree(finished[0], folder)
        else:
            folder.mkdir()
            (folder / "earlier.txt").write_text("an earlier run's file\n")
    proc = _hold(*folders.values())
    yield folders, proc
    proc.kill()
    proc.wait(timeout=30)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_second_run_on_a_held_folder_refuses_in_one_line_and_changes_nothing(
        command, held, ckpt, monkeypatch, capsys) -> None:
    folders, holder = held
    out = folders[command]
    before = _snapshot(out)
    r = cli_in_process(monkeypatch, capsys, *[a.format(ckpt=ckpt, out=out) for a in COMMANDS[command]])
    assert_one_line_refusal(r, f"{out} {IN_USE} (pid {holder.pid})")
    assert "not recorded" not in r.stderr and "recomputing" not in r.stderr  # it read no piece
    assert _snapshot(out) == before


def test_the_compare_race_ends_with_one_writer_and_one_refusal(ckpt, tmp_path, monkeypatch, capsys) -> None:
    """The issue's race: two compares with other --range-margin on one folder, started together.
    The first holds the folder to the end; the second refuses; the folder is the first one's."""
    out = tmp_path / "cmp"
    first = [a.format(ckpt=ckpt, out=out) for a in COMMANDS["compare"]]
    first[first.index("--range-margin") + 1] = "0.1"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ftcnn", *first], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lock = out / files.LOCK_NAME
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if lock.exists() and lock.read_text().strip() == str(proc.pid):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    second = [a.format(ckpt=ckpt, out=out) for a in COMMANDS["compare"]]  # --range-margin 0.3
    r = cli_in_process(monkeypatch, capsys, *second)
    assert_one_line_refusal(r, f"{out} {IN_USE} (pid {proc.pid})")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["range_margin"] == 0.1
    key = json.loads(pipeline.key_path(out / "models" / "restrict.pt").read_text())
    assert key["margin"] == 0.1  # the model, its key and the results: one run's
    identity = C.stored_identity(out / "campaigns" / "restrict")
    assert identity["model"] == fingerprint.model_digest(checkpoint.load(out / "models" / "restrict.pt"))


# --- the lock is released --------------------------------------------------------------------

def test_the_lock_is_released_when_a_run_ends(finished, model, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(finished[0], out)  # the fixture's run has ended
    again = compare.run_compare(model, "digits", out, CONFIG)  # a second run afterwards works
    assert "recomputing" not in capsys.readouterr().err
    assert _rows(again) == _rows(finished[1])
    with files.exclusive_folder(out):  # a new lock on the file: the run's flock is gone, not just forgotten
        pass
    assert not files._held_folders


def test_the_lock_dies_with_its_holder(tmp_path) -> None:
    out = tmp_path / "run"
    proc = _hold(out)
    with pytest.raises(ValueError, match=f"{IN_USE} \\(pid {proc.pid}\\)"):
        with files.exclusive_folder(out):
            pass
    proc.send_signal(signal.SIGKILL)  # no exit handler runs: the OS drops the lock
    proc.wait(timeout=30)
    with files.exclusive_folder(out):
        assert (out / files.LOCK_NAME).read_text().strip() == str(os.getpid())


def test_nested_holds_in_one_run_share_the_lock(tmp_path) -> None:
    """``compare_run`` holds the folder and calls ``run_compare``, which holds it again."""
    with files.exclusive_folder(tmp_path / "run") as out:
        with files.exclusive_folder(out):
            pass
        with files.exclusive_folder(tmp_path / "run" / ".." / "run"):  # the same folder by another path
            pass
        assert files._held_folders  # still held by the outer block
    assert not files._held_folders


def test_a_planted_lock_link_is_refused_not_followed(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    target = tmp_path / "elsewhere.txt"
    (out / files.LOCK_NAME).symlink_to(target)  # dangling: following it would create the target
    with pytest.raises(ValueError, match="cannot lock output folder"):
        with files.exclusive_folder(out):
            pass
    assert not target.exists()


# --- pieces checked against their own content ------------------------------------------------

def test_a_replaced_piece_is_rebuilt_and_said(finished, model, tmp_path, capsys) -> None:
    """The issue's reproduction: another protected model copied over models/restrict.pt of a
    finished comparison was not rebuilt; costs and campaigns ran on it and were published as
    "restrict". It is rebuilt now, and costs and campaigns are those of the rebuilt model."""
    out = tmp_path / "cmp"
    shutil.copytree(finished[0], out)
    restrict_path = out / "models" / "restrict.pt"
    original = fingerprint.model_digest(checkpoint.load(restrict_path))
    x_train = data.load("digits", "train").tensors[0]
    foreign = hardening.harden(model, None, ratio=0.0, restrict="zero", range_margin=0.3,
                               calibration=pipeline.calibration_subset(x_train, 1000, 0))
    checkpoint.save(foreign, restrict_path)
    assert fingerprint.model_digest(checkpoint.load(restrict_path)) != original
    capsys.readouterr()

    summary = compare.run_compare(model, "digits", out, CONFIG)
    log = capsys.readouterr().err
    assert "models/restrict.pt does not match its key: rebuilt" in log, log
    assert fingerprint.model_digest(checkpoint.load(restrict_path)) == original
    assert C.stored_identity(out / "campaigns" / "restrict")["model"] == original
    assert _rows(summary) == _rows(finished[1])  # costs and results of the real "restrict"


def test_a_key_records_its_piece_and_a_changed_or_unrecorded_piece_is_not_current(tmp_path, capsys) -> None:
    piece = tmp_path / "scores.json"
    piece.write_text('{"layers": {}}\n')
    key = {"model": "abc", "seed": 0}
    pipeline.store_key(piece, key)
    stored = json.loads(pipeline.key_path(piece).read_text())
    assert stored[pipeline.CONTENT_FIELD] == hashlib.sha256(piece.read_bytes()).hexdigest()
    assert pipeline.is_current(piece, key, "scores")

    piece.write_text('{"layers": {"conv1": [1.0]}}\n')  # same inputs, other content
    assert not pipeline.is_current(piece, key, "scores")
    assert f"{tmp_path.name}/scores.json does not match its key: rebuilt" in capsys.readouterr().err
    assert not pipeline.key_path(piece).exists()  # dropped: a crash cannot make it look current

    pipeline.store_key(piece, key)
    old = json.loads(pipeline.key_path(piece).read_text())
    del old[pipeline.CONTENT_FIELD]  # a key an older ftcnn wrote: its piece's content is unknown
    pipeline.key_path(piece).write_text(json.dumps(old))
    assert not pipeline.is_current(piece, key, "scores")
    assert "recomputing scores: its content digest was not recorded" in capsys.readouterr().err


def test_a_stale_campaign_is_discarded_by_the_store(tmp_path) -> None:
    """``compare`` no longer deletes a campaign's files by name: ``store.discard_run`` does."""
    run = tmp_path / "campaign"
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10))
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 10
    C.run_campaign(net, x, y, C.CampaignConfig(bers=(1e-2,), trials=2, seed=0), run, progress=False)
    (run / "notes.txt").write_text("mine\n")
    assert (run / C.DB_NAME).exists() and (run / "summary.json").exists()
    store.discard_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert C.stored_identity(run) is None
