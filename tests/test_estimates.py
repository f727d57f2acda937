"""Issue 14: every long command says its run time up front (one line, before the work), the
campaign file is recorded in the run folder, and compare's latency carries its spread."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

from ftcnn import campaign, checkpoint, compare, cost, pipeline, progress, protect as P, report, vulnerability
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
    assert "expected: at most ~" in err and "1 ber point x 2 trials of 40 inputs: 2 to run" in err
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
