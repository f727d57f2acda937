"""Threads that fit the machine (issue 13): ``--threads``, the default rule, the worker split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _helpers import run_cli, train_digits_model
from ftcnn.campaigns import campaign as C
from ftcnn import models
from ftcnn.campaigns import distributed, parallelism


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_worker_split_and_typed_threads(monkeypatch, keep_threads) -> None:
    """Workers split the run's threads (or every core); a typed count is set as given.
    (The default rule, the policy on faked machines: tests/test_parallelism.py.)"""
    monkeypatch.setattr(parallelism, "cores", lambda: 8)
    assert distributed.worker_threads(4) == 2
    assert distributed.worker_threads(2, 6) == 3             # a run given 6 threads, 2 workers
    assert distributed.worker_threads(4, 2) == 1
    assert distributed.apply_threads(None, models.build("lenet5"), workers=4) == 2  # workers split the cores
    assert distributed.apply_threads(3) == 3 and torch.get_num_threads() == 3
    with pytest.raises(ValueError, match="threads"):
        distributed.apply_threads(0)


def test_threads_is_execution_not_identity(tiny_model, tiny_data, tmp_path, keep_threads) -> None:
    a = C.CampaignConfig(bers=(1e-3,), trials=2, threads=1)
    assert a.identity() == C.CampaignConfig(bers=(1e-3,), trials=2, threads=2).identity()
    with pytest.raises(ValueError, match="threads"):
        C.CampaignConfig(bers=(1e-3,), threads=0)
    torch.set_num_threads(1)
    x, y = tiny_data
    s = C.run_campaign(tiny_model, x, y, C.CampaignConfig(bers=(1e-3,), trials=2, threads=2), tmp_path,
                       progress=False)
    assert {k: s["execution"][k] for k in ("workers", "threads")} == {"workers": 1, "threads": 2}
    assert s["execution"]["threads_policy"]["chosen_by"] == "--threads"
    assert torch.get_num_threads() == 1  # the API restores the caller's setting


def test_workers_split_the_threads(tiny_model, tiny_data, keep_threads) -> None:
    """Each spawned worker runs with the run's threads divided among the workers."""
    x, y = tiny_data
    config = C.CampaignConfig(bers=(1e-3,), trials=2, workers=2, threads=2)
    pool = distributed.ProcessExecutor(tiny_model, x, y, config)
    try:
        assert [pool.pool.submit(torch.get_num_threads).result(timeout=300) for _ in range(2)] == [1, 1]
    finally:
        pool.close()


def test_cli_threads_reach_torch(tmp_path: Path) -> None:
    """`--threads` (and the default) as a user runs it: the summary says what torch ran with."""
    model = tmp_path / "m.pt"
    train_digits_model(model, 1)
    args = ["inject", str(model), "--data", "digits", "--ber", "1e-4", "--trials", "3", "--limit", "50"]
    r = run_cli(*args, "--threads", "2", "-o", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["execution"]["threads"] == 2
    r = run_cli(*args, "-o", str(tmp_path / "b"), threads=1)  # OMP_NUM_THREADS=1, set by the person
    assert r.returncode == 0, r.stderr
    execution = json.loads((tmp_path / "b" / "summary.json").read_text())["execution"]
    assert execution["threads"] == 1 and execution["threads_policy"]["chosen_by"] == "OMP_NUM_THREADS"
    r = run_cli(*args, "--threads", "0", "-o", str(tmp_path / "c"))
    assert r.returncode == 2 and "threads" in r.stderr.lower()


@pytest.mark.parametrize("command", ["train", "inject", "analyze", "harden", "prune", "pipeline", "compare", "demo"])
def test_every_long_command_takes_threads(command: str) -> None:
    r = run_cli(command, "--help")
    assert r.returncode == 0 and "--threads" in r.stdout
