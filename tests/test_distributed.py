"""Parallel campaigns (design §9): worker processes and Ray give the sequential numbers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import wait_for_trials
from ftcnn.campaigns import campaign as C
from ftcnn.campaigns import distributed

HERE = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(model, data, out, **kw):
    x, y = data
    config = C.CampaignConfig(**{"bers": (1e-3, 1e-2), "trials": 30, "seed": 3, **kw})
    return C.run_campaign(model, x, y, config, out, progress=False)


def test_two_workers_give_the_sequential_summary(tiny_model, tiny_data, tmp_path) -> None:
    one = _run(tiny_model, tiny_data, tmp_path / "one")
    two = _run(tiny_model, tiny_data, tmp_path / "two", workers=2)
    assert two["results"] == one["results"]
    db = sqlite3.connect(tmp_path / "two" / C.DB_NAME)
    assert db.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 60
    # the stored fault sites are those of the sequential run too
    rows = lambda p: sqlite3.connect(p / C.DB_NAME).execute(  # noqa: E731
        "SELECT point, trial, n_faults, accuracy, sites FROM trials ORDER BY point, trial").fetchall()
    assert rows(tmp_path / "two") == rows(tmp_path / "one")


def test_auto_trials_with_workers_stop_where_the_sequential_run_stops(tiny_model, tiny_data, tmp_path) -> None:
    kw = dict(bers=(0.0, 1e-2), trials=None, ci_half_width=0.05, seed=0)
    one = _run(tiny_model, tiny_data, tmp_path / "one", **kw)
    two = _run(tiny_model, tiny_data, tmp_path / "two", workers=2, **kw)
    assert two["results"] == one["results"]
    assert one["results"][1]["trials"] > 10


TRIALS = 150  # per point, as in _kill_workers_target.py


def test_killed_campaign_with_workers_resumes(tiny_model, tiny_data, tmp_path) -> None:
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(HERE / "_kill_workers_target.py"), str(killed)],
                            env=env, start_new_session=True)
    db_path = killed / C.DB_NAME
    try:
        wait_for_trials(proc, db_path, at_least=30)
        assert proc.poll() is None, "campaign finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, as a ^C'd job would go
        proc.wait()
    survived = sqlite3.connect(db_path).execute("SELECT COUNT(*) FROM trials").fetchone()[0]
    assert 30 <= survived < 2 * TRIALS
    assert not (killed / "summary.json").exists()
    x, y = tiny_data
    config = C.CampaignConfig(bers=(1e-3, 1e-2), trials=TRIALS, seed=7, workers=2)
    resumed = C.run_campaign(tiny_model, x, y, config, killed, progress=False)
    whole = C.run_campaign(tiny_model, x, y, C.CampaignConfig(bers=(1e-3, 1e-2), trials=TRIALS, seed=7),
                           tmp_path / "whole", progress=False)
    assert resumed["results"] == whole["results"]


def test_missing_ray_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(ValueError, match="pip install 'ftcnn\\[ray\\]'"):
        distributed.import_ray()


def test_ray_gives_the_sequential_summary(tiny_model, tiny_data, tmp_path) -> None:
    pytest.importorskip("ray")
    one = _run(tiny_model, tiny_data, tmp_path / "one")
    on_ray = _run(tiny_model, tiny_data, tmp_path / "ray", ray=True, workers=2)
    assert on_ray["results"] == one["results"]
    assert sqlite3.connect(tmp_path / "ray" / C.DB_NAME).execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 60


def test_worker_threads_split_the_cores() -> None:
    cores = distributed.cores()
    assert distributed.worker_threads(1) == cores
    assert distributed.worker_threads(cores * 2) == 1
    assert [len(c) for c in distributed.chunks([(0.1, t) for t in range(7)], 3)] == [3, 3, 1]
