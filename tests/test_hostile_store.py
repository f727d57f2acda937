"""A run folder's results.sqlite is untrusted input (issue 19, item 3; design §8).

The reproductions of the issue: copy a finished 6-trial run, delete its summary.json, edit the
database, rerun the same command. Every edit used to be believed (7 trials and a 71% mean from a
row ``trial=-7, accuracy=5.0``; a 125% mean; ``nan%``; old trials adopted under a new identity; a
``sqlite3.OperationalError`` traceback). Each is now one ``error:`` line naming the file and the
field, exit status 2, and nothing is written. A linked results.sqlite (even a dangling link) is
refused before SQLite opens it. A fuzzer edits a few hundred rows: each edit is refused in one
line or, when the edited row is still a valid trial, the summary is the mean of the rows.

Golden predictions (item 6) live here too: they follow the NaN/Inf rule of faulty ones, and a
model whose fault-free logits are not finite is refused in one line naming the first one.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ftcnn
from _helpers import assert_one_line_refusal, cli_in_process
from ftcnn.campaigns import campaign as C
from ftcnn import data
from ftcnn.campaigns import metrics, store
from ftcnn.protection import vulnerability

pytestmark = pytest.mark.usefixtures("one_thread")

BER = 1e-3
TRIALS = 6


def _command(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["inject", str(checkpoint), "--data", "digits", "--ber", str(BER), "--trials", str(TRIALS),
            "--seed", "0", "--threads", "1", "-o", str(out), *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """An untrained LeNet-5 (width 0.25) checkpoint and its finished 6-trial run on the digits."""
    folder = tmp_path_factory.mktemp("finished")
    torch.manual_seed(0)
    checkpoint = folder / "d.pt"
    ftcnn.save(ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.25), checkpoint)
    mp = pytest.MonkeyPatch()
    try:
        from ftcnn import cli

        mp.setattr("sys.argv", ["ftcnn", *_command(checkpoint, folder / "run")])
        try:
            cli.main()
        except SystemExit as exc:
            assert exc.code in (0, None)
    finally:
        mp.undo()
    assert (folder / "run" / store.DB_NAME).is_file()
    return checkpoint, folder / "run"


def _edited_copy(finished: tuple[Path, Path], tmp_path: Path, *statements: str) -> Path:
    """A copy of the finished run without its summary, the database edited by ``statements``."""
    run = tmp_path / "run"
    shutil.copytree(finished[1], run)
    for name in ("summary.json", "summary.csv"):
        (run / name).unlink()
    db = sqlite3.connect(run / store.DB_NAME)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()
    return run


def _rerun(monkeypatch, capsys, finished: tuple[Path, Path], run: Path):
    return cli_in_process(monkeypatch, capsys, *_command(finished[0], run))


def test_the_unedited_copy_resumes_as_a_finished_run(finished, tmp_path, monkeypatch, capsys) -> None:
    """The control: the copy without its summary gives the original numbers back."""
    run = _edited_copy(finished, tmp_path)
    r = _rerun(monkeypatch, capsys, finished, run)
    assert r.returncode == 0, r.stderr
    got, original = (json.loads((f / "summary.json").read_text())["results"] for f in (run, finished[1]))
    assert got == original and got[0]["trials"] == TRIALS


@pytest.mark.parametrize("statements, field", [
    # the reproductions: 7 trials and a 71.43% mean; 125.00%; nan%
    (["INSERT INTO trials SELECT point, -7, n_faults, 5.0, top5, sdc, critical_sdc, due, sites, seconds "
      "FROM trials WHERE trial = 0"], "trial = -7"),
    (["UPDATE trials SET accuracy = 7.5"], "accuracy = 7.5"),
    (["UPDATE trials SET accuracy = NULL WHERE trial = 2"], "accuracy = None"),
    (["UPDATE trials SET sdc = -0.25 WHERE trial = 1"], "sdc = -0.25"),
    (["UPDATE trials SET due = 'x' WHERE trial = 1"], "due = 'x'"),
    (["UPDATE trials SET n_faults = -1 WHERE trial = 1"], "n_faults = -1"),
    (["UPDATE trials SET trial = 2.5 WHERE trial = 1"], "trial = 2.5"),
    # a row at a point the campaign does not have
    (["UPDATE trials SET point = 0.5 WHERE trial = 3"], "point = 0.5"),
    (["UPDATE trials SET sites = x'00ff' WHERE trial = 3"], "sites"),
    (["INSERT INTO strata_trials SELECT 9, point, trial, n_faults, accuracy, top5, sdc, critical_sdc, due, "
      "sites, seconds FROM trials WHERE trial = 0"], "stratum = 9"),
])
def test_an_edited_row_is_refused_in_one_line(finished, tmp_path, monkeypatch, capsys, statements,
                                              field) -> None:
    run = _edited_copy(finished, tmp_path, *statements)
    r = _rerun(monkeypatch, capsys, finished, run)
    assert_one_line_refusal(r, field)
    assert store.DB_NAME in r.stderr and "is not valid" in r.stderr
    assert not (run / "summary.json").exists()  # nothing written from an edited file


def test_trials_without_an_identity_row_are_not_adopted(finished, tmp_path, monkeypatch, capsys) -> None:
    """The identity row deleted: the old trials used to be adopted under the new identity."""
    run = _edited_copy(finished, tmp_path, "DELETE FROM meta")
    r = _rerun(monkeypatch, capsys, finished, run)
    assert_one_line_refusal(r, "holds trials but no identity row")
    # nothing adopted: the file still has no identity, and a reader of the folder says "not this campaign"
    assert sqlite3.connect(run / store.DB_NAME).execute("SELECT COUNT(*) FROM meta").fetchone()[0] == 0
    assert store.stored_identity(run) == {}


@pytest.mark.parametrize("statements, message", [
    (["ALTER TABLE trials DROP COLUMN seconds"], "table 'trials' has other columns"),
    (["ALTER TABLE trials RENAME TO old_trials"], "unexpected table 'old_trials'"),
    (["ALTER TABLE trials ADD COLUMN extra TEXT"], "table 'trials' has other columns"),
    (["CREATE TRIGGER t AFTER INSERT ON trials BEGIN DELETE FROM meta; END"], "unexpected trigger 't'"),
    (["CREATE VIEW v AS SELECT * FROM trials"], "unexpected view 'v'"),
    (["INSERT INTO meta VALUES ('note', 'x')"], "unexpected meta key 'note'"),
])
def test_another_schema_is_refused_in_one_line(finished, tmp_path, monkeypatch, capsys, statements,
                                               message) -> None:
    run = _edited_copy(finished, tmp_path, *statements)
    r = _rerun(monkeypatch, capsys, finished, run)
    assert_one_line_refusal(r, message)
    assert "OperationalError" not in r.stderr and not (run / "summary.json").exists()


def test_a_file_that_is_no_database_is_one_line(finished, tmp_path, monkeypatch, capsys) -> None:
    run = _edited_copy(finished, tmp_path)
    (run / store.DB_NAME).write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    for side in ("-wal", "-shm"):
        (run / (store.DB_NAME + side)).unlink(missing_ok=True)
    assert_one_line_refusal(_rerun(monkeypatch, capsys, finished, run), store.DB_NAME)


def test_a_linked_database_is_refused_before_sqlite_opens_it(finished, tmp_path, monkeypatch, capsys) -> None:
    """A link named results.sqlite would make SQLite write wherever it points; a dangling one
    used to create its target."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "linked"
    run.mkdir()
    (run / store.DB_NAME).symlink_to(elsewhere / "created.sqlite")  # dangling
    r = cli_in_process(monkeypatch, capsys, *_command(finished[0], run))
    assert_one_line_refusal(r, "is a symbolic link")
    assert not (elsewhere / "created.sqlite").exists() and list(elsewhere.iterdir()) == []

    shutil.copy(finished[1] / store.DB_NAME, elsewhere / "real.sqlite")
    before = (elsewhere / "real.sqlite").read_bytes()
    (run / store.DB_NAME).unlink()
    (run / store.DB_NAME).symlink_to(elsewhere / "real.sqlite")  # to an existing database
    assert_one_line_refusal(cli_in_process(monkeypatch, capsys, *_command(finished[0], run)), "symbolic link")
    assert (elsewhere / "real.sqlite").read_bytes() == before
    with pytest.raises(ValueError, match="symbolic link"):
        store.stored_identity(run)

    # SQLite's side files are opened with it: a linked WAL is refused the same way
    plain = _edited_copy(finished, tmp_path / "wal")
    (plain / (store.DB_NAME + "-wal")).unlink(missing_ok=True)
    (plain / (store.DB_NAME + "-wal")).symlink_to(elsewhere / "wal")
    assert_one_line_refusal(_rerun(monkeypatch, capsys, finished, plain), "-wal is a symbolic link")
    assert not (elsewhere / "wal").exists()


def test_sqlite_errors_are_one_line_valueerrors(tmp_path) -> None:
    """``sqlite3.Error`` never escapes the store: reading or writing trials names the file."""
    run = tmp_path / "run"
    run.mkdir()
    db = store.open_db(run, {"format": store.IDENTITY_FORMAT}, (BER,))
    db.execute("DROP TABLE trials")  # as if the file changed under the run
    with pytest.raises(ValueError, match=f"run database {run / store.DB_NAME}: no such table: trials"):
        store.done_trials(db, BER)
    db.close()


# --- a fuzzer over the stored rows ------------------------------------------------------------

HOSTILE_VALUES: list[Any] = [-1, -7, 0, 1, 2, 5, 7.5, -0.0, 1.0000001, 0.5, float("inf"), float("-inf"), None,
                             "x", "0.5", b"\x00", 2 ** 62, -(2 ** 62), 1e308, 3.0, BER, 1e-300]


def _payloads(marker: Path) -> list[str]:
    """Text that would write ``marker`` if anything evaluated, executed or shelled a stored value."""
    return [f"__import__('os').system('touch {marker}')", f"$(touch {marker})",
            json.dumps([[f"__import__('pathlib').Path('{marker}').touch()", 0, 0]])]
COLUMNS = ("point", "trial", "n_faults", "accuracy", "top5", "sdc", "critical_sdc", "due", "sites", "seconds")


def _small_run(folder: Path, classes: int = 10) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor,
                                                         C.CampaignConfig]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, classes))
    x, y = data.load("digits", "test").tensors
    x, y = x[:40], y[:40] % classes
    config = C.CampaignConfig(bers=(BER, 1e-2), trials=4, seed=0, shortcut=False, batch_trials=1)
    C.run_campaign(net, x, y, config, folder, progress=False)
    return net, x, y, config


def test_fuzzed_rows_are_refused_or_summarised_truthfully(tmp_path) -> None:
    """300 edits of one field of one stored row (values from a hostile list): each is a clean
    one-line refusal naming the file, or the row is still a valid trial and the summary is the
    mean of the stored rows, every share in [0, 1]. Nothing runs: a marker never appears."""
    base = tmp_path / "base"
    net, x, y, config = _small_run(base)
    marker = tmp_path / "PWNED"
    rng = random.Random(0)
    refused = accepted = 0
    for case in range(300):
        run = tmp_path / f"fuzz{case % 4}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        (run / "summary.json").unlink()
        column, value = rng.choice(COLUMNS), rng.choice(HOSTILE_VALUES + _payloads(marker))
        db = sqlite3.connect(run / store.DB_NAME)
        try:
            db.execute(f"UPDATE trials SET {column} = ? WHERE rowid = ?", (value, rng.randint(1, 8)))
            db.commit()
        except sqlite3.IntegrityError:  # a duplicate (point, trial): SQLite itself refused the edit
            continue
        finally:
            db.close()
        try:
            summary = C.run_campaign(net, x, y, config, run, progress=False)
        except ValueError as exc:
            message = str(exc)
            assert "\n" not in message and str(run / store.DB_NAME) in message, message
            assert "sqlite3" not in message
            refused += 1
            continue
        accepted += 1
        rows = sqlite3.connect(run / store.DB_NAME).execute(
            "SELECT point, trial, accuracy FROM trials ORDER BY point, trial").fetchall()
        for row in summary["results"]:
            mine = [a for p, t, a in rows if p == row["ber"] and 0 <= t < config.trials]
            assert row["trials"] == len(mine) and math.isclose(row["accuracy_mean"], float(np.mean(mine)))
            for key in ("accuracy_mean", "sdc_mean", "critical_sdc_mean", "due_mean"):
                assert 0.0 <= row[key] <= 1.0
        assert all(isinstance(t, int) and t >= 0 for _, t, _ in rows)
    assert not marker.exists()
    assert refused > 100 and accepted > 20, (refused, accepted)


def test_legitimate_folders_still_resume(tmp_path) -> None:
    """What ftcnn itself writes passes the checks: NULL top-5 (fewer than 10 classes), trial
    indices past a smaller budget (the budget is no part of the identity), a resumed run."""
    net, x, y, config = _small_run(tmp_path / "three", classes=3)
    again = C.run_campaign(net, x, y, config, tmp_path / "three", progress=False)
    assert again["results"][0]["top5_mean"] is None and again["results"][0]["trials"] == 4
    smaller = C.run_campaign(net, x, y, C.CampaignConfig(bers=(BER, 1e-2), trials=2, seed=0, shortcut=False,
                                                         batch_trials=1), tmp_path / "three", progress=False)
    assert smaller["results"][0]["trials"] == 2


# --- golden predictions (item 6) --------------------------------------------------------------

def test_golden_predictions_follow_the_nan_rule_and_refuse_non_finite_logits() -> None:
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(metrics.golden_predictions(logits), logits.argmax(dim=1))  # finite: argmax, bit for bit
    assert torch.equal(metrics.golden_predictions(logits), metrics.safe_predictions(logits)[0])
    logits[7, 4], logits[9, 1] = float("inf"), float("nan")
    with pytest.raises(ValueError, match=r"inf for input 7, class 4"):
        metrics.golden_predictions(logits)
    with pytest.raises(ValueError, match=r"input 23, class 4"):  # rows reordered: the input's position
        metrics.golden_predictions(logits, input_index=list(range(16, 66)))


def _nan_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.25)
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias[3] = float("nan")  # one NaN weight: every input's class-3 logit is NaN
    ftcnn.save(net, tmp_path / "nan.pt")
    return tmp_path / "nan.pt"


@pytest.mark.parametrize("target", ["parameters", "activations"])
def test_a_model_with_non_finite_golden_logits_is_refused(tmp_path, monkeypatch, capsys, target) -> None:
    """The issue's reproduction: one NaN weight, --count 0, used to print
    ``0.00% acc | SDC 100.00% | DUE 100.00%`` against a 10.03% golden accuracy."""
    r = cli_in_process(monkeypatch, capsys, "inject", str(_nan_model(tmp_path)), "--data", "digits", "--count",
                       "0", "--trials", "2", "--threads", "1", "--target", target, "-o", str(tmp_path / "run"))
    assert_one_line_refusal(r, "output is not finite: nan for input 0, class 3")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_the_non_finite_input_is_named_where_trials_take_blocks(tmp_path) -> None:
    """With ``inputs_per_trial`` the rows are evaluated in a seeded order; the message names
    the input's position in the data, not the row's."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = data.load("digits", "test").tensors
    x, y = x[:60].clone(), y[:60]
    x[41, 0, 2, 2] = float("nan")
    config = C.CampaignConfig(bers=(BER,), trials=1, seed=0, inputs_per_trial=10)
    with pytest.raises(ValueError, match=r"for input 41, class 0"):
        C.prepare(net, x, y, config)


def test_fi_scores_refuse_non_finite_golden_logits(tmp_path) -> None:
    """``analyze --method fi`` is a fault-injection campaign per channel: the same golden rule."""
    net = ftcnn.load(_nan_model(tmp_path))
    x, y = data.load("digits", "test").tensors
    with pytest.raises(ValueError, match="output is not finite: nan for input 0, class 3"):
        vulnerability.fi(net, x[:20], y[:20], samples=4)


@pytest.mark.parametrize("identity", [
    '{"format": 2, "model": 5, "data": {"a": 1}, "config": [1, 2]}',
    '{"format": 2, "model": null, "config": {"seed": "x"}}',
    '[' * 100000,
    '"just a string"',
])
def test_a_forged_identity_row_is_a_difference_not_a_traceback(finished, tmp_path, monkeypatch, capsys,
                                                               identity) -> None:
    run = _edited_copy(finished, tmp_path, f"UPDATE meta SET value = '{identity}' WHERE key = 'identity'")
    assert_one_line_refusal(_rerun(monkeypatch, capsys, finished, run), "holds a different campaign")
