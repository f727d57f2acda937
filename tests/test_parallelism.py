"""The thread policy (issue 24, ``ftcnn.campaigns.parallelism``): every core for a lone job, a fair share next to
other jobs or load, what the person sets wins, the choice is recorded, and it never changes a number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _helpers import cli_in_process
from ftcnn.campaigns import campaign as C
from ftcnn import checkpoint
from ftcnn.campaigns import distributed, parallelism
from ftcnn.campaigns.parallelism import Machine

LENET_PARAMS = 60_000  # LeNet-5's order of size: above TINY_MODEL_PARAMS


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_omp(monkeypatch):
    """No OMP_NUM_THREADS: the policy decides (the test runner's shell may set it)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def fake_machine(monkeypatch, cores: int, busy: float = 0.0, others: int = 0) -> None:
    """The policy sees ``cores`` cores, ``busy`` of them kept busy, ``others`` other ftcnn jobs."""
    monkeypatch.setattr(parallelism, "probe", lambda: Machine(cores, busy, others))
    monkeypatch.setattr(parallelism, "cores", lambda: cores)


@pytest.mark.parametrize("cores, busy, others, threads", [
    (1, 0.0, 0, 1),   # one core: one thread
    (1, 0.0, 1, 1),   # one core and another job: still one
    (2, 0.0, 0, 2),   # idle 2 cores, one job: both (issue 24: half the machine sat idle)
    (8, 0.0, 0, 8),   # idle 8 cores: all
    (2, 0.3, 0, 2),   # a little background noise takes no core
    (2, 0.0, 1, 1),   # two ftcnn jobs on 2 cores: one each (no thrashing)
    (2, 2.0, 3, 1),   # four jobs on 2 cores: one each, never zero
    (8, 0.0, 1, 4),   # two jobs on 8 cores: half each
    (8, 1.0, 3, 2),   # four jobs on 8 cores: a quarter each
    (2, 1.0, 0, 1),   # one core busy with other work: the free one
    (8, 6.4, 0, 2),   # 6 of 8 busy: the 2 free
    (8, 7.9, 0, 1),   # all busy: still one
])
def test_policy_on_faked_cores_and_load(cores, busy, others, threads) -> None:
    chosen = parallelism.choose(Machine(cores, busy, others), LENET_PARAMS)
    assert (chosen.threads, chosen.workers, chosen.chosen_by) == (threads, 1, "policy")
    assert ("every core" in chosen.why) == (others == 0 and busy < 0.5), chosen.why


def test_a_tiny_model_gets_one_thread() -> None:
    chosen = parallelism.choose(Machine(8, 0.0, 0), parallelism.TINY_MODEL_PARAMS - 1)
    assert chosen.threads == 1 and "too small" in chosen.why
    assert parallelism.choose(Machine(8, 0.0, 0), None).threads == 8  # not known yet: the machine decides


def test_load_is_the_smaller_of_the_average_and_a_sample(monkeypatch) -> None:
    """The 1-minute average lags a job that just ended; a sample catches a passing spike: the policy
    counts a core busy only when both say so."""
    monkeypatch.setattr(parallelism, "other_ftcnn_jobs", lambda: 0)
    monkeypatch.setattr(parallelism.os, "getloadavg", lambda: (1.9, 1.5, 1.0))
    monkeypatch.setattr(parallelism, "busy_now", lambda: 0.05)   # the previous job ended a moment ago
    assert parallelism.probe().busy_cores == 0.05
    monkeypatch.setattr(parallelism.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    monkeypatch.setattr(parallelism, "busy_now", lambda: 1.8)    # a passing spike
    assert parallelism.probe().busy_cores == 0.1
    monkeypatch.setattr(parallelism, "busy_now", lambda: None)   # no /proc/stat: the average alone
    assert parallelism.probe().busy_cores == 0.1


def test_what_the_person_sets_wins(monkeypatch, no_omp) -> None:
    def must_not_probe() -> Machine:
        raise AssertionError("a typed setting needs no look at the machine")

    monkeypatch.setattr(parallelism, "probe", must_not_probe)
    monkeypatch.setattr(parallelism, "cores", lambda: 8)
    typed = parallelism.plan(LENET_PARAMS, threads=3)
    assert (typed.threads, typed.workers, typed.chosen_by) == (3, 1, "--threads")
    assert parallelism.plan(LENET_PARAMS, threads=6, workers=2).threads == 3   # the run's 6 split in 2
    workers = parallelism.plan(LENET_PARAMS, workers=4)
    assert (workers.threads, workers.workers, workers.chosen_by) == (2, 4, "--workers")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    env = parallelism.plan(LENET_PARAMS)
    assert (env.threads, env.chosen_by) == (5, "OMP_NUM_THREADS")
    assert parallelism.plan(LENET_PARAMS, threads=2).threads == 2                # the flag beats the variable
    monkeypatch.setenv("OMP_NUM_THREADS", "100000")                             # --threads' limit holds
    assert parallelism.plan(LENET_PARAMS).threads == 8 * parallelism.THREADS_PER_CORE
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")                               # not a number: ignored
    monkeypatch.setattr(parallelism, "probe", lambda: Machine(8, 0.0, 1))
    assert parallelism.plan(LENET_PARAMS).threads == 4


def test_apply_sets_torch_and_remembers_why(monkeypatch, no_omp, keep_threads) -> None:
    fake_machine(monkeypatch, cores=2)
    assert distributed.apply_threads(None, checkpoint.build("lenet5")) == 2 == torch.get_num_threads()
    assert parallelism.applied().chosen_by == "policy"
    assert distributed.apply_threads(1) == 1 == torch.get_num_threads()
    assert parallelism.applied().chosen_by == "--threads"
    with pytest.raises(ValueError, match="threads"):
        distributed.apply_threads(0)


@pytest.mark.parametrize("argv, is_ftcnn", [
    ([b"/venv/bin/python3.11", b"-m", b"ftcnn", b"inject", b"m.pt"], True),
    ([b"/venv/bin/ftcnn", b"demo"], True),
    ([b"/venv/bin/python", b"/venv/bin/ftcnn", b"inject"], True),
    ([b"python", b"-c", b"from multiprocessing.spawn import spawn_main"], False),  # our own workers
    ([b"vim", b"ftcnn"], False),
    ([b"python", b"-m", b"pytest", b"tests/test_ftcnn.py"], False),
    ([], False),
])
def test_ftcnn_jobs_are_known_by_their_command_line(argv, is_ftcnn) -> None:
    assert parallelism.is_ftcnn_command(argv) is is_ftcnn


def test_other_jobs_are_counted_from_proc(monkeypatch, tmp_path) -> None:
    def process(pid: int, *argv: bytes) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(argv) + b"\0")

    process(101, b"python", b"-m", b"ftcnn", b"inject")
    process(102, b"/usr/bin/ftcnn", b"demo")
    process(103, b"bash")
    import os
    process(os.getpid(), b"python", b"-m", b"ftcnn", b"inject")  # this job is not another
    (tmp_path / "self").mkdir()
    monkeypatch.setattr(parallelism, "PROC", tmp_path)
    assert parallelism.other_ftcnn_jobs() == 2


# --- as a user runs it: the record, the line, the numbers ------------------------------------------

@pytest.fixture
def lenet_digits(tmp_path) -> Path:
    """An untrained LeNet-5 for the 8x8 digits (no training needed: the numbers only have to agree)."""
    path = tmp_path / "lenet.pt"
    torch.manual_seed(0)
    checkpoint.save(checkpoint.build("lenet5", num_classes=10, in_channels=1, input_size=8), path, data="digits")
    return path


def _inject(monkeypatch, capsys, model: Path, out: Path, *extra: str) -> dict:
    r = cli_in_process(monkeypatch, capsys, "inject", str(model), "--ber", "1e-4", "1e-3", "--seed", "3",
                       "--limit", "200", *extra, "-o", str(out))
    assert r.returncode == 0, r.stderr
    return json.loads((out / "summary.json").read_text())


def test_the_summary_records_the_choice_and_why(monkeypatch, capsys, lenet_digits, tmp_path, no_omp,
                                                keep_threads) -> None:
    fake_machine(monkeypatch, cores=2)
    alone = _inject(monkeypatch, capsys, lenet_digits, tmp_path / "alone", "--trials", "3")["execution"]
    assert alone["threads"] == 2 and alone["workers"] == 1
    assert alone["threads_policy"] == {"chosen_by": "policy", "why": "every core of 2: no other ftcnn job, cores idle",
                                       "cores": 2, "busy_cores": 0.0, "other_ftcnn_jobs": 0}
    fake_machine(monkeypatch, cores=2, others=1)
    shared = _inject(monkeypatch, capsys, lenet_digits, tmp_path / "shared", "--trials", "3")["execution"]
    assert shared["threads"] == 1 and "fair share" in shared["threads_policy"]["why"]
    typed = _inject(monkeypatch, capsys, lenet_digits, tmp_path / "typed", "--trials", "3", "--threads", "2")
    assert typed["execution"]["threads"] == 2 and typed["execution"]["threads_policy"]["chosen_by"] == "--threads"


def test_a_terminal_is_told_the_choice_once(monkeypatch, capsys, lenet_digits, tmp_path, no_omp,
                                            keep_threads) -> None:
    from ftcnn import progress

    fake_machine(monkeypatch, cores=2)
    r = cli_in_process(monkeypatch, capsys, "inject", str(lenet_digits), "--ber", "1e-3", "--trials", "2",
                       "--limit", "50", "-o", str(tmp_path / "quiet"))
    assert r.returncode == 0 and "threads:" not in r.stderr  # a log file: summary.json says it
    monkeypatch.setattr(progress, "is_terminal", lambda stream=None: True)
    r = cli_in_process(monkeypatch, capsys, "inject", str(lenet_digits), "--ber", "1e-3", "--trials", "2",
                       "--limit", "50", "-o", str(tmp_path / "told"))
    assert r.returncode == 0, r.stderr
    told = [line for line in r.stderr.splitlines() if line.startswith("threads:")]
    assert told == ["threads: 2 torch threads (every core of 2: no other ftcnn job, cores idle)"]


@pytest.mark.parametrize("budget", [["--trials", "8"], ["--precision", "0.05"]])
def test_the_policy_never_changes_a_number(monkeypatch, capsys, lenet_digits, tmp_path, no_omp, keep_threads,
                                           budget) -> None:
    """The policy's parallel choice (every core of an idle 2-core machine) gives the one-thread campaign's
    numbers exactly, fixed trials and --precision alike."""
    fake_machine(monkeypatch, cores=2)
    policy = _inject(monkeypatch, capsys, lenet_digits, tmp_path / "policy", *budget)
    assert policy["execution"]["threads"] == 2
    one = _inject(monkeypatch, capsys, lenet_digits, tmp_path / "one", *budget, "--threads", "1", "--workers", "1")
    assert one["execution"]["threads"] == 1
    assert policy["results"] == one["results"]
    # faults that changed predictions were compared, not only golden results
    assert any(r["accuracy_ci"][0] < r["accuracy_ci"][1] for r in one["results"])


def test_the_api_records_what_the_caller_set(tiny_model, tiny_data, tmp_path, keep_threads) -> None:
    x, y = tiny_data
    torch.set_num_threads(1)
    s = C.run_campaign(tiny_model, x, y, C.CampaignConfig(bers=(1e-3,), trials=2, threads=2), tmp_path / "a",
                       progress=False)
    assert (s["execution"]["threads"], s["execution"]["threads_policy"]["chosen_by"]) == (2, "--threads")
    parallelism.remember(parallelism.Plan(3, 1, "policy", "a plan of some earlier command"))
    s = C.run_campaign(tiny_model, x, y, C.CampaignConfig(bers=(1e-3,), trials=2), tmp_path / "b", progress=False)
    assert (s["execution"]["threads"], s["execution"]["threads_policy"]["chosen_by"]) == (1, "caller")


def test_a_running_job_follows_the_machine(monkeypatch, no_omp) -> None:
    """A job that started alone gives a core back when another ftcnn job starts and takes it again
    when that one ends; what a person set is never changed."""
    start = parallelism.Plan(2, 1, "policy", "alone", Machine(2, 0.0, 0), LENET_PARAMS)
    parallelism.remember(start)
    monkeypatch.setattr(parallelism, "REBALANCE_S", 0.0)
    follow = parallelism.rebalance(2)
    assert follow is not None
    monkeypatch.setattr(parallelism, "probe", lambda: Machine(2, 0.9, 1))
    assert follow.due() == 1
    assert follow.due() is None                      # same answer: nothing to change
    monkeypatch.setattr(parallelism, "probe", lambda: Machine(2, 0.0, 0))
    assert follow.due() == 2
    assert [c["threads"] for c in follow.record()["changes"]] == [1, 2]
    assert follow.record()["chosen_by"] == "policy"
    parallelism.remember(parallelism.Plan(2, 1, "--threads", "--threads 2"))
    assert parallelism.rebalance(2) is None          # typed: never changed
    parallelism.remember(start)
    assert parallelism.rebalance(1) is None          # the caller changed torch's threads since


def test_following_the_machine_changes_no_number(monkeypatch, lenet_digits, tmp_path, no_omp, keep_threads) -> None:
    """Threads changed between trials (another job started) give the one-thread campaign's numbers."""
    from ftcnn import data as D
    from ftcnn.flows import pipeline

    model = checkpoint.load(lenet_digits).eval()
    with pipeline.inputs_for(model, "digits"):
        x, y = D.load("digits", "test").tensors[:2]
    x, y = x[:200], y[:200]
    config = C.CampaignConfig(bers=(1e-4, 1e-3), trials=8, seed=3)
    torch.set_num_threads(1)
    one = C.run_campaign(model, x, y, config, tmp_path / "one", progress=False)
    torch.set_num_threads(2)
    parallelism.remember(parallelism.Plan(2, 1, "policy", "alone", Machine(2, 0.0, 0), LENET_PARAMS))
    monkeypatch.setattr(parallelism, "REBALANCE_S", 0.0)
    monkeypatch.setattr(parallelism, "probe", lambda: Machine(2, 0.9, 1))  # another job has started
    moved = C.run_campaign(model, x, y, config, tmp_path / "moved", progress=False)
    assert torch.get_num_threads() == 2  # the caller's threads back when the campaign ends
    assert moved["execution"]["threads"] == 2
    assert moved["execution"]["threads_policy"]["changes"][0]["threads"] == 1
    assert moved["results"] == one["results"]
