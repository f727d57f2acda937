"""Stopping rules as objects (issue 20): each of ``Fixed``, ``Auto`` and ``Precision`` owns its
budget, its run, its summary row and its time estimate; a new rule is one class."""

from __future__ import annotations

import math
import sqlite3
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest
import torch

from ftcnn.campaigns import campaign, stopping, strata, trials
from ftcnn.campaigns.distributed import Executor
from ftcnn.campaigns.metrics import CI_BETTING, SequentialEstimate
from ftcnn.campaigns.store import DB_NAME, commit_result, done_trials, open_db, run_identity

from conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

BER = 1e-3


def _data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g)


def _leveugle(population: int, margin: float, confidence: float) -> int:
    """Leveugle et al.'s size, written out again with the standard library's normal quantile."""
    t = NormalDist().inv_cdf(0.5 + confidence / 2)
    return max(1, math.ceil(population / (1 + margin ** 2 * (population - 1) / (t ** 2 * 0.25))))


def test_the_config_chooses_one_rule() -> None:
    assert type(stopping.rule(trials.CampaignConfig(bers=(BER,), trials=5))) is stopping.Fixed
    assert type(stopping.rule(trials.CampaignConfig(bers=(BER,), trials=None))) is stopping.Auto
    assert type(stopping.rule(trials.CampaignConfig(bers=(BER,), precision=0.05))) is stopping.Precision
    assert [r.capped for r in (stopping.Fixed, stopping.Auto, stopping.Precision)] == [False, True, True]


def test_each_rule_owns_its_budget() -> None:
    x, y = _data()
    runner = trials.prepare(make_tiny_model(), x, y, trials.CampaignConfig(bers=(BER,)))
    bits = sum(p.numel() for p in runner.model.parameters()) * 32
    assert runner.space.total_bits() == bits
    fixed = trials.CampaignConfig(bers=(BER,), trials=17)
    auto = trials.CampaignConfig(bers=(BER,), trials=None, ci_half_width=0.02, confidence=0.9)
    precise = trials.CampaignConfig(bers=(BER,), precision=0.03)
    assert stopping.rule(fixed).budget(runner.space) == 17
    assert stopping.rule(auto).budget(runner.space) == _leveugle(bits, 0.02, 0.9)
    assert stopping.rule(precise).budget(runner.space) == _leveugle(bits, 0.03, 0.95)
    assert campaign.trial_budget(auto, runner.memory) == _leveugle(bits, 0.02, 0.9)  # the memory as before


def test_fixed_and_auto_rows_come_from_their_trials(tmp_path) -> None:
    """A fixed row is the plain mean of its trials (run here one by one); an auto row counts the
    trials up to the sequential stop and gives the betting interval; only a fixed run is
    ``finished`` without its fault space."""
    x, y = _data()
    model = make_tiny_model()
    fixed = trials.CampaignConfig(bers=(BER,), trials=4, seed=2)
    summary = campaign.run_campaign(model, x, y, fixed, tmp_path / "fixed", progress=False)
    runner = trials.prepare(make_tiny_model(), x, y, fixed)
    expected = [runner.run(BER, t)[1]["accuracy"] for t in range(4)]
    assert summary["results"][0]["accuracy_mean"] == pytest.approx(float(np.mean(expected)), abs=1e-12)
    db = sqlite3.connect(tmp_path / "fixed" / DB_NAME)
    try:
        assert stopping.Fixed(fixed).finished(db)
        assert not stopping.Fixed(trials.CampaignConfig(bers=(BER,), trials=5)).finished(db)
        auto = trials.CampaignConfig(bers=(BER,), trials=None, ci_half_width=0.3, min_trials=2, seed=2)
        assert not stopping.Auto(auto).finished(db)
    finally:
        db.close()
    row = campaign.run_campaign(model, x, y, auto, tmp_path / "auto", progress=False)["results"][0]
    assert row["ci_method"] == CI_BETTING
    stop = stopping.auto_stop(iter(expected + [runner.run(BER, t)[1]["accuracy"] for t in range(4, 400)]),
                              auto, stopping.rule(auto).budget(runner.space))
    assert isinstance(stop, SequentialEstimate) and row["trials"] == stop.trials
    assert row["accuracy_ci"] == pytest.approx([stop.low, stop.high])


def test_precision_samples_one_pilot_trial_per_stratum_and_estimates_from_its_design(tmp_path) -> None:
    x, y = _data()
    config = trials.CampaignConfig(bers=(BER,), precision=0.05, seed=1)
    model = make_tiny_model()
    runner = trials.prepare(model, x, y, config)
    rule = stopping.rule(config)
    db = open_db(tmp_path, run_identity(model, x, y, config), config.points)
    try:
        live = [h for h, w in enumerate(strata.weights(runner.space.strata_layout(None), BER))
                if w > 0 and h != strata.KNOWN]
        assert rule.sample_tasks(db, BER, 100, [], runner) == [(BER, 0, h) for h in live]
        for result in runner.run_many(rule.sample_tasks(db, BER, 100, [], runner)):
            commit_result(db, result)
        assert rule.sample_tasks(db, BER, 100, [], runner) == []        # committed: not timed again
        assert not rule.finished(db)
    finally:
        db.close()
    assert rule.fewest_trials(len(live)) == (strata.PILOT + strata.MIN_FINAL) * len(live)
    line = rule.expected_time(500, [[]], 1.0, len(x), {BER: (len(live), 0.01)})
    assert f"x {rule.fewest_trials(len(live))} to 500 trials" in line and "the cap of --precision" in line


def test_each_rule_names_itself_in_the_estimate() -> None:
    fixed = stopping.rule(trials.CampaignConfig(bers=(BER,), trials=10))
    auto = stopping.rule(trials.CampaignConfig(bers=(BER,), trials=None))
    assert "cap" not in fixed.expected_time(10, [range(4)], 0.5, 100) and "6 to run" in \
        fixed.expected_time(10, [range(4)], 0.5, 100)
    assert "(the cap of --trials auto)" in auto.expected_time(300, [range(50)], 0.1, 100)
    assert campaign.expected_time(auto.config, 300, [range(50)], 0.1, 100) == \
        auto.expected_time(300, [range(50)], 0.1, 100)


class UntilFaulty(stopping.StoppingRule):
    """A rule of one class: trials in order until ``FAULTY`` of them held a fault (or the budget)."""

    name = "until faulty"
    capped = True
    FAULTY = 3

    @classmethod
    def applies(cls, config: trials.CampaignConfig) -> bool:
        return config.trials == 9

    def budget(self, space: Any) -> int:
        return 9

    def run_point(self, pool: Executor, db: sqlite3.Connection, point: float, budget: int, progress: bool,
                  runner: Any, announce: Any) -> None:
        faulty = 0
        for trial in range(budget):
            for result in pool.map([(point, trial)]):
                commit_result(db, result)
                faulty += result.n_faults > 0
            if faulty == self.FAULTY:
                return

    def row(self, db: sqlite3.Connection, point: float, budget: int, runner: Any) -> dict[str, Any]:
        return self._plain_row(db, point, budget)

    def counted(self, done: dict[int, dict[str, Any]], budget: int) -> tuple[list[dict[str, Any]], None]:
        return [done[t] for t in sorted(done)], None


def test_a_new_stopping_rule_is_one_class(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(stopping, "RULES", (UntilFaulty, *stopping.RULES))
    x, y = _data()
    config = trials.CampaignConfig(bers=(2e-4,), trials=9, seed=4)
    runner = trials.prepare(make_tiny_model(), x, y, config)
    counts = [runner.space.draw(2e-4, t).count for t in range(9)]
    expected = next(i + 1 for i in range(9) if sum(c > 0 for c in counts[:i + 1]) == UntilFaulty.FAULTY)
    assert expected < 9, counts   # the rule, not the budget, stops it
    summary = campaign.run_campaign(make_tiny_model(), x, y, config, tmp_path, progress=False)
    assert summary["results"][0]["trials"] == expected
    db = sqlite3.connect(tmp_path / DB_NAME)
    try:
        assert sorted(done_trials(db, 2e-4)) == list(range(expected))
    finally:
        db.close()
