"""Issue 14: every long command says its run time up front (one line, before the work), the
campaign file is recorded in the run folder, and compare's latency carries its spread. Issue 23
(item 2): a stopping campaign's estimate follows its target, not its cap (the pilot's spread, a
fake clock), a fixed one's comes from trials timed first, and --precision names its inputs per trial."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sqlite3
import statistics

import pytest
from torch import nn

from ftcnn import checkpoint, progress
from ftcnn.campaigns import campaign
from ftcnn.flows import compare, pipeline
from ftcnn.protection import cost, protect as P, vulnerability
from ftcnn.reporting import report
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_wording_for_every_estimate() -> None:
    assert progress.expected(150, "campaigns", "x") == "expected: at most ~2 min of campaigns (x)"
    assert progress.expected(12.4, "trials", "y") == "expected: at most ~12 s of trials (y)"
    assert progress.expected(0.04, "fi scoring", "z") == "expected: at most ~0.0 s of fi scoring (z)"


def test_campaign_estimate_counts_trials_left_and_says_the_cap() -> None:
    fixed = campaign.CampaignConfig(bers=(1e-4, 1e-3), trials=10)
    line = campaign.expected_time(fixed, 10, [range(4), []], 0.5, 100)  # 6 + 10 trials left
    assert line.startswith("expected: at most ~8.0 s of trials (2 ber points x 10 trials of 100 inputs: 16 to run")
    auto = campaign.CampaignConfig(bers=(1e-4,), trials=None)
    line = campaign.expected_time(auto, 300, [range(50)], 0.1, 100)
    assert "x at most 300 trials (the cap of --trials auto)" in line and "300 to run" in line
    assert line.endswith("the trials expected follow the pilot)")


def test_precision_estimate_names_the_inputs_of_one_trial() -> None:
    """Issue 23 item 2: '--precision says "of 1000 inputs" where each trial uses 100'."""
    config = campaign.CampaignConfig(bers=(1e-4,), precision=0.01)
    assert config.inputs_per_trial == 100
    line = campaign.expected_time(config, 500, [[]], 1.0, 1000)
    assert "of 100 inputs (a block of 1000)" in line and "of 1000 inputs" not in line
    assert line.startswith("expected: at most ~50 s")  # 500 trials x 1.0 s x 100/1000


class FakeClock:
    """A clock the test moves by hand: estimates are checked without real timing."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeBar:
    def __init__(self) -> None:
        self.total: int | None = None
        self.n = 0

    def refresh(self) -> None:
        pass


def _formula(trials: int, variance: float, margin: float = 0.01, confidence: float = 0.95) -> int:
    log_term = math.log(2 / (1 - confidence))
    return math.ceil(max(2 * variance * log_term / margin ** 2, log_term / margin))


def test_auto_estimate_after_the_pilot_is_the_formula_and_updates() -> None:
    """A fake --trials auto point: nothing is expected during the pilot, the bar counts to it; after
    it, the expected stop is the formula from the pilot's variance (the cap named apart), with the
    time left from the fake clock's seconds per trial; bad trials later move the bar's total and,
    past a 2x change, are said again."""
    clock, bar, said = FakeClock(), FakeBar(), []
    estimate = progress.StopEstimate(bar, 18445, "ber 0.0001", said.append, clock=clock)
    clock.now += 7.0  # set-up before the pilot: not trials, not in the rate
    pilot = progress.auto_pilot(0.01, 0.95)
    assert pilot == 50
    estimate.pilot(pilot)
    assert bar.total == pilot
    spread = progress.RunningSpread()
    outcomes = [0.97, 0.95] * 23 + [0.5, 0.96] * 2  # the pilot: 50 trials, two bad
    for i, x in enumerate(outcomes):
        clock.now += 0.2
        estimate.ran_trials(1)
        spread.add(x)
        estimate.update(progress.auto_expected_trials(spread.n, spread.variance, 0.01, 0.95, 18445), spread.n)
        if i < len(outcomes) - 1:
            assert not said and bar.total == pilot
    variance = statistics.variance(outcomes)
    assert spread.variance == pytest.approx(variance)
    want = _formula(50, variance)
    assert estimate.expected == want == bar.total and 369 < want < 18445
    assert said == [(f"expected: ber 0.0001: ~{want} trials expected, at most 18445 (50 done, from the pilot's "
                     f"spread); ~{progress._duration(0.2 * (want - 50))} left (0.2 s per trial so far)")]
    spread.add(0.9)  # a small move: the bar follows, nothing said
    estimate.update(progress.auto_expected_trials(spread.n, spread.variance, 0.01, 0.95, 18445), spread.n)
    assert bar.total == _formula(spread.n, spread.variance) != want and len(said) == 1
    for _ in range(10):  # catastrophic trials: the expectation more than doubles, said again
        spread.add(0.0)
        estimate.update(progress.auto_expected_trials(spread.n, spread.variance, 0.01, 0.95, 18445), spread.n)
    assert bar.total == _formula(spread.n, spread.variance) > 2 * want
    assert len(said) > 1 and all("updated from the spread so far" in line for line in said[1:])
    totals = [int(line.split("~")[1].split()[0]) for line in said]
    assert all(b > 2 * a for a, b in zip(totals, totals[1:]))  # each said again only past 2x
    # identical outcomes: the floor log(2/alpha)/margin; never past the cap, never below the trials run
    assert progress.auto_expected_trials(50, 0.0, 0.01, 0.95, 10 ** 6) == 369
    assert progress.auto_expected_trials(50, 0.25, 0.01, 0.95, 500) == 500
    assert progress.auto_expected_trials(49, 0.25, 0.01, 0.95, 500) is None
    assert progress.auto_expected_trials(400, 0.0, 0.01, 0.95, 10 ** 6) == 400
    assert progress.auto_pilot(0.05, 0.95) == 50 and progress.auto_pilot(0.2, 0.95) == 18  # <= the floor


def test_fixed_estimate_is_the_timed_sample_times_the_trials_left() -> None:
    """A fixed campaign's line: per point, the trials left after the sample x that point's measured rate."""
    config = campaign.CampaignConfig(bers=(1e-6, 1e-4), trials=100)
    rates = {1e-6: (3, 0.01), 1e-4: (3, 0.1)}
    line = campaign.expected_time(config, 100, [range(10), []], 99.0, 1000, rates)
    # (100 - 10 - 3) x 0.01 + (100 - 3) x 0.1 = 0.87 + 9.7 = 10.57 s
    assert line.startswith("expected: ~11 s of trials (2 ber points x 100 trials of 1000 inputs: 190 to run, "
                           "6 of them timed first (0.055 s per trial; each point at its own rate))")


def _auto_config(**kw) -> campaign.CampaignConfig:
    return campaign.CampaignConfig(bers=(3e-3,), trials=None, ci_half_width=0.05, seed=3, **kw)


def test_auto_campaign_bar_counts_toward_the_expected_stop(tiny_data, tmp_path, monkeypatch) -> None:
    """A real (tiny) auto campaign: the bar's total is the expectation from its own trials (not the
    cap), said in one line with the cap apart; the campaign's numbers are those of a silent run."""
    x, y = tiny_data
    bars: list = []
    real_bar = progress.bar
    monkeypatch.setattr(progress, "bar", lambda *a, **k: bars.append(real_bar(*a, **k)) or bars[-1])
    said: list[str] = []
    summary = campaign.run_campaign(make_tiny_model().eval(), x, y, _auto_config(), tmp_path / "a",
                                    progress=True, announce=said.append)
    trials = summary["results"][0]["trials"]
    runner = campaign.prepare(make_tiny_model().eval(), x, y, _auto_config())
    budget = campaign.trial_budget(_auto_config(), runner.memory)
    lines = [s for s in said if "trials expected, at most" in s]
    assert len(lines) == 1 and f"at most {budget} " in lines[0] and trials < budget
    (bar,) = bars
    assert bar.total < budget and bar.total >= trials  # counts toward the stop, not the cap
    quiet = campaign.run_campaign(make_tiny_model().eval(), x, y, _auto_config(), tmp_path / "b", progress=False)
    assert quiet["results"] == summary["results"]


def test_precision_estimate_is_the_designs_size_after_the_pilot(tiny_data, tmp_path, monkeypatch) -> None:
    """--precision: the bar counts to the pilot, then to pilot + the final sizes the design fixed from it;
    the line says that total and the cap; the total equals the trials the summary reports."""
    x, y = tiny_data
    bars: list = []
    real_bar = progress.bar
    monkeypatch.setattr(progress, "bar", lambda *a, **k: bars.append(real_bar(*a, **k)) or bars[-1])
    said: list[str] = []
    config = campaign.CampaignConfig(bers=(1e-3,), precision=0.05, seed=2)
    summary = campaign.run_campaign(make_tiny_model().eval(), x, y, config, tmp_path / "p",
                                    progress=True, announce=said.append)
    trials = summary["results"][0]["trials"]
    (line,) = [s for s in said if "trials expected, at most" in s]
    assert f"~{trials} trials expected, at most " in line
    assert bars[0].total == trials


def _digits_model() -> nn.Module:
    net = make_tiny_model().eval()  # 1x8x8 inputs, 10 classes: the built-in digits
    checkpoint.set_spec(net, {"builder": "tests.tiny"})
    return net


def test_inject_says_its_time_and_records_the_campaign_file(tmp_path, capsys) -> None:
    net = _digits_model()
    toml = tmp_path / "campaign.toml"
    toml.write_text('ber = [1e-3]\ntrials = 2\nseed = 1\n')
    config = campaign.CampaignConfig(bers=(1e-3,), trials=2, seed=1)
    out = tmp_path / "run"
    summary = pipeline.inject_checkpoint(net, "digits", config, out, limit=40, campaign_file=toml)
    err = capsys.readouterr().err
    assert "expected: ~" in err and "1 ber point x 2 trials of 40 inputs: 2 to run, 2 of them timed first" in err
    want = {"path": str(toml), "sha256": hashlib.sha256(toml.read_bytes()).hexdigest()}
    assert summary["campaign_file"] == want
    assert json.loads((out / "summary.json").read_text())["campaign_file"] == want
    # not identity: the same settings resume without the file (no refusal, same numbers), and say so
    again = pipeline.inject_checkpoint(net, "digits", config, out, limit=40)
    assert "campaign_file" not in again and again["results"] == summary["results"]
    assert "campaign_file" not in json.loads((out / "summary.json").read_text())
    third = pipeline.inject_checkpoint(net, "digits", config, out, limit=40, campaign_file=toml)
    assert third["campaign_file"] == want and third["results"] == summary["results"]


def test_fi_estimate_counts_the_forwards_fi_makes(tiny_data) -> None:
    """The count the estimate scales from == the forwards fi really runs (a hook counts them)."""
    net = make_tiny_model().eval()
    x, y = tiny_data
    settings = {"samples": 3, "pilot": 2, "bits": [30, 31], "seed": 0}
    calls = [0]
    net.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    vulnerability.fi(net, x, y, reuse=False, **settings)
    assert calls[0] == 1 + vulnerability.fi_forwards(net, **settings)  # + the golden forward
    forwards = calls[0] - 1
    line = pipeline.fi_expected_time(net, x, "cpu", settings)
    assert line.startswith("expected: at most ~") and f"{forwards} faulty forwards of 64 inputs" in line
    assert calls[0] == 2 + vulnerability.fi_forwards(net, **settings)  # the estimate's one timed inference


def test_protect_says_its_validation_time_first(tiny_data) -> None:
    net = make_tiny_model().eval()
    x, y = tiny_data
    said: list[str] = []
    space = [c for c in P.candidates(restricts=[("zero", 0.0)], corrections=[]) if c.name in ("none",)
             or c.name.startswith("restrict")][:2]
    P.protect(net, x, y, ber=1e-3, max_macs=1.5, trials=2, space=space, measure_latency=False, log=said.append)
    first = next(i for i, s in enumerate(said) if s.startswith("expected: at most ~"))
    assert "validation campaigns" in said[first] and f"{len(space)} candidates x 2 trials" in said[first]
    assert all(not s.startswith("campaign on validation") for s in said[:first])


def test_compare_latency_has_its_interquartile_range() -> None:
    assert cost.iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == [2.0, 4.0] and cost.iqr([2.0]) == [2.0, 2.0]
    nets = {"a": make_tiny_model(0).eval(), "b": make_tiny_model(1).eval()}
    measured = compare._measure_all(nets, (1, 8, 8), rounds=3)
    for m in measured.values():
        for b in (1, 128):
            lo, hi = m[f"latency_b{b}_ms_iqr"]
            assert lo <= m[f"latency_b{b}_ms"] <= hi
        assert set(cost.relative(m, m)) >= {"latency_b1_ms", "latency_b128_ms"}  # lists are not ratios
    assert report._iqr_text([1.2, 1.3]) == " (IQR 1.2-1.3)" and report._iqr_text(None) == ""


def test_the_timed_sample_changes_no_number(tiny_data, tmp_path) -> None:
    """The trials timed for the estimate are committed and not run again: the summary of a run that
    announces (and so samples first) equals that of a silent run, trial for trial in the store."""
    x, y = tiny_data
    config = campaign.CampaignConfig(bers=(1e-3, 1e-2), trials=6, seed=4)
    said: list[str] = []
    loud = campaign.run_campaign(make_tiny_model().eval(), x, y, config, tmp_path / "loud", progress=False,
                                 announce=said.append)
    quiet = campaign.run_campaign(make_tiny_model().eval(), x, y, config, tmp_path / "quiet", progress=False)
    assert loud["results"] == quiet["results"] and "6 of them timed first" in said[-1]
    rows = {}
    for folder in ("loud", "quiet"):
        with contextlib.closing(sqlite3.connect(tmp_path / folder / campaign.DB_NAME)) as db:
            rows[folder] = db.execute("select count(*) from trials").fetchone()[0]
    assert rows["loud"] == rows["quiet"] == 12  # no trial run twice
