"""Settings that size the work have limits, checked before any work (issue 19, items 5 and 8).

One rule table (``ftcnn.rules``, issue 20) is asked by CampaignConfig, the campaign file
and every command's flags: trials <= ``MAX_TRIALS``, threads <= cores x
``THREADS_PER_CORE``, workers <= cores, precision and CI half-width >=
``MIN_CI_HALF_WIDTH``, unique points, seed >= 0. A flag is refused as it is
parsed, in one ``error:`` line naming it, before any checkpoint is read or any
folder made (the checkpoints below do not even exist: a later check would name
them instead). Each case reproduces a hole of the pre-issue-19 code.
"""

from __future__ import annotations

import itertools
import json
import tracemalloc
from pathlib import Path
from typing import Iterable, Iterator

import pytest
import torch

import ftcnn
from ftcnn.campaigns import campaign, campaign_file as CF, distributed, metrics, stopping, trials as T
from ftcnn.protection import hardening, pruning, vulnerability
from ftcnn.campaigns.trials import CampaignConfig

from _helpers import assert_one_line_refusal, cli_in_process
from conftest import make_tiny_model
from test_hostile_checkpoints import seed_checkpoints

MANY_THREADS = str(T.cores() * T.THREADS_PER_CORE + 1)
MANY_WORKERS = str(T.cores() + 1)


# --- every command, every limited flag: one line naming the flag, nothing made ------------------

def _commands(tmp: Path) -> dict[str, list[str]]:
    missing = str(tmp / "missing.pt")
    return {
        "train": ["train", "--model", "lenet5", "--data", "digits", "--epochs", "1", "-o", str(tmp / "out")],
        "analyze": ["analyze", missing, "--method", "l1", "-o", str(tmp / "out")],
        "harden": ["harden", missing, "--tmr", "full", "-o", str(tmp / "out")],
        "prune": ["prune", missing, "-o", str(tmp / "out")],
        "pipeline": ["pipeline", missing, "-o", str(tmp / "out")],
        "inject": ["inject", missing, "--ber", "1e-3", "-o", str(tmp / "out")],
        "compare": ["compare", "--model", "lenet5", "--data", "digits", "-o", str(tmp / "out")],
        "demo": ["demo", "-o", str(tmp / "out")],
        "protect": ["protect", missing, "-o", str(tmp / "out")],
        "study": ["study", "-o", str(tmp / "out")],
    }


CASES = [  # (commands, extra arguments, the flag the error names)
    (("train", "analyze", "harden", "prune", "pipeline", "inject", "compare", "demo", "protect"),
     ["--seed", "-1"], "--seed"),
    (("train", "analyze", "harden", "prune", "pipeline", "inject", "compare", "demo", "protect", "study"),
     ["--threads", "100000"], "--threads"),
    (("inject",), ["--threads", MANY_THREADS], "--threads"),
    (("inject", "compare", "demo", "protect", "pipeline", "study"), ["--trials", "999999999999"], "--trials"),
    (("inject", "compare", "demo", "protect", "pipeline", "study"), ["--trials", "0"], "--trials"),
    (("compare",), ["--bit-trials", "999999999999"], "--bit-trials"),
    (("inject",), ["--workers", MANY_WORKERS], "--workers"),
    (("inject",), ["--workers", "0"], "--workers"),
    (("inject",), ["--precision", "1e-9"], "--precision"),
    (("inject",), ["--trials", "auto", "--ci-half-width", "1e-9"], "--ci-half-width"),
    (("inject",), ["--ber", "1e-3", "1e-3"], "--ber"),
    (("compare",), ["--ber", "1e-4", "1e-3", "1e-4"], "--ber"),
    (("inject",), ["--count", "1", "2", "1"], "--count"),
    # every setting with a rule (issue 20), refused as parsed, before the checkpoint is looked for
    (("inject", "analyze"), ["--confidence", "95"], "--confidence"),
    (("inject", "compare", "study"), ["--ber", "2"], "--ber"),
    (("protect", "pipeline"), ["--ber", "2"], "--ber"),
    (("prune", "pipeline"), ["--criterion", "magic"], "--criterion"),
    (("inject", "compare"), ["--target", "weights"], "--target"),
    (("harden", "compare"), ["--range-margin", "-1"], "--range-margin"),
    (("prune", "pipeline", "compare", "study"), ["--finetune-epochs", "-1"], "--finetune-epochs"),
    (("pipeline", "compare", "study"), ["--prune-ratio", "1"], "--prune-ratio"),
    (("pipeline", "compare"), ["--harden-ratio", "1.5"], "--harden-ratio"),
    (("harden", "protect", "pipeline"), ["--batch", "0"], "--batch"),
    (("compare",), ["--report-ber", "2"], "--report-ber"),
]


@pytest.mark.parametrize("commands, extra, flag", CASES, ids=[f"{c[0][0]}{' '.join(c[1])}" for c in CASES])
def test_limits_are_checked_as_flags_are_parsed(tmp_path, monkeypatch, capsys, commands, extra, flag) -> None:
    table = _commands(tmp_path)
    for command in commands:
        args = table[command]
        if command == "inject" and extra[0] in ("--ber", "--count"):  # the command's own --ber goes
            args = [a for a in args if a not in ("--ber", "1e-3")]
        r = cli_in_process(monkeypatch, capsys, *args, *extra)
        assert_one_line_refusal(r, flag)
        assert not (tmp_path / "out").exists(), (command, extra)


def test_valid_values_pass_the_flag_checks(tmp_path, monkeypatch, capsys) -> None:
    """At the limits, the flags pass (the error is then the missing checkpoint's)."""
    args = ["inject", str(tmp_path / "missing.pt"), "--ber", "1e-3", "1e-2", "--seed", "0",
            "--threads", str(T.cores() * T.THREADS_PER_CORE), "--workers", str(T.cores()),
            "--trials", str(T.MAX_TRIALS), "-o", str(tmp_path / "out")]
    assert_one_line_refusal(cli_in_process(monkeypatch, capsys, *args), "missing.pt")
    args = ["inject", str(tmp_path / "missing.pt"), "--ber", "1e-3", "--precision", str(T.MIN_CI_HALF_WIDTH),
            "-o", str(tmp_path / "out")]
    assert_one_line_refusal(cli_in_process(monkeypatch, capsys, *args), "missing.pt")


# --- the same rules from a campaign file (naming the key) and from the API ---------------------

@pytest.mark.parametrize("line, key", [
    ("trials = 999999999999", "trials"),
    ("threads = 100000", "threads"),
    (f"workers = {T.cores() + 1}", "workers"),
    ("trials = \"auto\"\nci_half_width = 1e-9", "ci_half_width"),
    ("precision = 1e-9", "precision"),
    ("seed = -1", "seed"),
])
def test_campaign_file_keys_have_the_same_limits(tmp_path, monkeypatch, capsys, line, key) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"ber = [1e-3]\n{line}\n")
    with pytest.raises(ValueError, match=f"campaign file: {key}: must"):
        CF.load_campaign_file(path)
    r = cli_in_process(monkeypatch, capsys, "inject", str(tmp_path / "missing.pt"), "--config", str(path),
                       "-o", str(tmp_path / "out"))
    assert_one_line_refusal(r, f"campaign file: {key}")
    assert not (tmp_path / "out").exists()


def test_duplicate_points_in_a_campaign_file(tmp_path) -> None:
    for text, key in (("ber = [1e-3, 1e-3]\n", "ber"), ("count = [4, 1, 4]\n", "count")):
        (tmp_path / "c.toml").write_text(text)
        with pytest.raises(ValueError, match=f"campaign file: {key}: names .* twice"):
            CF.load_campaign_file(tmp_path / "c.toml")


@pytest.mark.parametrize("kwargs, match", [
    ({"trials": T.MAX_TRIALS + 1}, "trials must lie in"),
    ({"threads": T.cores() * T.THREADS_PER_CORE + 1}, "threads must lie in"),
    ({"workers": T.cores() + 1}, "workers must lie in"),
    ({"precision": 1e-9}, "precision must lie in"),
    ({"trials": None, "ci_half_width": 1e-9}, "ci_half_width must lie in"),
    ({"seed": -1}, "seed must lie in"),
    ({"bers": (1e-3, 1e-3)}, "bers names 0.001 twice"),
    ({"bers": (), "counts": (2, 2)}, "counts names 2 twice"),
])
def test_campaign_config_has_the_same_limits(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        CampaignConfig(**{"bers": (1e-3,), **kwargs})


def test_threads_limit_in_the_library(keep_threads) -> None:
    with pytest.raises(ValueError, match="threads must lie in"):
        distributed.apply_threads(100_000)
    assert torch.get_num_threads() != 100_000


@pytest.fixture
def keep_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_precision_floor_fits_the_trial_cap() -> None:
    """The floor is where Leveugle's worst-case size (what --precision and --trials auto cap
    themselves at) meets the trial cap: any allowed half-width can finish."""
    huge = 10 ** 12  # bits of a very large model
    assert metrics.leveugle_sample_size(huge, T.MIN_CI_HALF_WIDTH, 0.95) <= T.MAX_TRIALS
    assert metrics.leveugle_sample_size(huge, T.MIN_CI_HALF_WIDTH / 2, 0.95) > T.MAX_TRIALS


# --- nothing O(trials) before the first trial -------------------------------------------------

class _FirstTasks:
    """An executor that takes a few tasks, then stops the campaign."""

    round_size = 1

    def __init__(self) -> None:
        self.seen: list[tuple[float, int]] = []
        self.listed = None

    def map(self, tasks: Iterable[tuple[float, int]]) -> Iterator[object]:
        self.listed = isinstance(tasks, (list, tuple))
        self.seen = list(itertools.islice(iter(tasks), 3))
        raise KeyboardInterrupt  # as a user would stop it


def test_a_million_trials_are_not_listed_before_the_first(monkeypatch) -> None:
    config = CampaignConfig(bers=(1e-4, 1e-3, 1e-2), trials=T.MAX_TRIALS)
    monkeypatch.setattr(stopping, "done_trials", lambda db, point: {0: {}} if point == 1e-4 else {})
    pool = _FirstTasks()
    tracemalloc.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            campaign._run_points(pool, None, config, T.MAX_TRIALS, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pool.listed is False and pool.seen == [(1e-4, 1), (1e-4, 2), (1e-4, 3)]  # trial 0 was done
    assert peak < 5_000_000, peak  # 3 million (point, trial) tuples would take ~250 MB


def test_executors_read_tasks_lazily() -> None:
    endless = ((0.1, t) for t in itertools.count())
    first = next(distributed.chunks(endless, 3))
    assert first == [(0.1, 0), (0.1, 1), (0.1, 2)]


# --- harden refuses the scores prune refuses ---------------------------------------------------

@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_harden_refuses_non_finite_scores_like_prune(bad) -> None:
    model = make_tiny_model()  # layers 0 (conv, 4 channels), 4 (16 neurons), 6 (10 outputs)
    scores = {"0": [1.0, 2.0, 3.0, 4.0], "4": [float(i) for i in range(16)], "6": [1.0] * 10}
    scores["4"][3] = bad
    for protect in (lambda: hardening.harden(model, scores, ratio=0.5),
                    lambda: pruning.prune(model, scores, ratio=0.3, input_shape=(1, 8, 8))):
        with pytest.raises(ValueError, match="scores for layer '4' contain NaN or Inf"):
            protect()


def test_harden_cli_refuses_infinity_in_a_scores_file(tmp_path, monkeypatch, capsys) -> None:
    """A score file edited to hold ``Infinity`` (valid JSON to Python): prune refused it, harden
    duplicated that channel first; now both refuse in one line."""
    lenet = seed_checkpoints(tmp_path)[0]
    vulnerability.save_scores({"method": "l1", "layers": vulnerability.l1(ftcnn.load(lenet))}, tmp_path / "s.json")
    blob = json.loads((tmp_path / "s.json").read_text())
    blob["layers"][list(blob["layers"])[1]][0] = float("inf")  # prune keeps the first layer whole
    (tmp_path / "s.json").write_text(json.dumps(blob))
    assert "Infinity" in (tmp_path / "s.json").read_text()
    for command, extra in (("harden", []), ("prune", ["--finetune-epochs", "0"])):
        out = tmp_path / f"{command}.pt"
        r = cli_in_process(monkeypatch, capsys, command, str(lenet), "--data", "digits", "--scores",
                           str(tmp_path / "s.json"), "--ratio", "0.5", *extra, "-o", str(out))
        assert_one_line_refusal(r, "Infinity (not a finite number)")  # refused as the file is read
        assert not out.exists()
