"""The protection search (issue 12): budgets hold, selection never sees test data, strict JSON.

A LeNet-5 trained for a few epochs on the built-in 8x8 digits; campaigns of a
few trials at BER 1e-3 (where the candidates differ clearly).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ftcnn import checkpoint, data, files, splits, train
from ftcnn.campaigns import campaign
from ftcnn.flows import pipeline
from ftcnn.protection import protect as P
from tests._helpers import run_cli

BER = 1e-3
TRIALS = 3


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "test")


@pytest.fixture(scope="module")
def lenet(digits, tmp_path_factory):
    info = data.info("digits")
    train.seed_everything(0)
    net = checkpoint.build("lenet5", num_classes=10, in_channels=info.in_channels, input_size=info.input_size)
    train.fit(net, digits[0], epochs=5, progress=False)
    path = tmp_path_factory.mktemp("protect") / "lenet5.pt"
    checkpoint.save(net, path, data="digits")
    return checkpoint.load(path), path


def _strict(text: str):
    def refuse(name: str):
        raise ValueError(f"bare {name}")
    return json.loads(text, parse_constant=refuse)


def test_validation_split_is_stratified_disjoint_and_seeded():
    y = torch.arange(100) % 4
    x = torch.arange(100.0).reshape(100, 1)
    (xf, yf), (xv, yv) = splits.validation_split(x, y, 0.2, seed=1)
    assert len(xv) == 20 and len(xf) == 80
    assert torch.bincount(yv).tolist() == [5, 5, 5, 5]
    assert set(xf.flatten().tolist()).isdisjoint(xv.flatten().tolist())
    again = splits.validation_split(x, y, 0.2, seed=1)[1][0]
    assert torch.equal(again, xv)
    with pytest.raises(ValueError, match="fraction"):
        splits.validation_split(x, y, 1.0)


def test_calibration_subset_is_the_cli_rule():
    x = torch.randn(50, 1, 4, 4)
    expected = x[torch.randperm(50, generator=torch.Generator().manual_seed(3))[:7]]
    assert torch.equal(pipeline.calibration_subset(x, 7, seed=3), expected)


def test_compare_and_harden_profile_the_same_calibration_subset(tmp_path):
    """One calibration rule (issue 11): `ftcnn harden` reproduces `compare`'s restricted variant bit for bit."""
    from ftcnn import fingerprint
    from ftcnn.flows import compare
    from ftcnn.protection import hardening

    info = data.info("digits")
    torch.manual_seed(0)
    net = checkpoint.build("lenet5", num_classes=info.num_classes, in_channels=info.in_channels,
                           input_size=info.input_size)
    train_set = data.load("digits", "train")
    config = compare.CompareConfig(seed=2, range_margin=0.1, calibration_size=300)
    variant = next(v for v in compare.default_variants() if v.name == "restrict")
    built = compare.build_variant(variant, net, {"layers": {}}, train_set, config,
                                  tuple(train_set.tensors[0].shape[1:]), tmp_path)
    pipeline.harden_checkpoint(net, "digits", tmp_path / "h.pt", ratio=0.0, restrict="zero", range_margin=0.1,
                               calibration_size=300, seed=2)
    hardened = checkpoint.load(tmp_path / "h.pt")
    assert fingerprint.model_digest(built) == fingerprint.model_digest(hardened)
    other_seed = pipeline.calibration_subset(train_set.tensors[0], 300, seed=3)
    assert fingerprint.model_digest(hardening.harden(net, ratio=0.0, restrict="zero", range_margin=0.1,
                                                  calibration=other_seed)) != fingerprint.model_digest(built)


def test_harden_keeps_the_old_margin_keyword_for_one_release():
    from ftcnn import fingerprint
    from ftcnn.protection import hardening

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    x = torch.randn(20, 1, 4, 4)
    new = hardening.harden(net, ratio=0.0, restrict="clamp", range_margin=0.3, calibration=x)
    with pytest.warns(DeprecationWarning, match="range_margin"):
        old = hardening.harden(net, ratio=0.0, restrict="clamp", margin=0.3, calibration=x)
    assert fingerprint.model_digest(old) == fingerprint.model_digest(new)
    assert fingerprint.model_digest(new) != fingerprint.model_digest(
        hardening.harden(net, ratio=0.0, restrict="clamp", calibration=x))


def test_the_old_margin_names_of_the_configs_and_of_fi_work_for_one_release(tiny_model, tiny_data):
    """Issue 11: ``margin`` meant three things; each now has its own name, and the old keyword still
    works (same result) with a DeprecationWarning for one release."""
    from ftcnn.campaigns import campaign
    from ftcnn.flows import compare
    from ftcnn.protection import vulnerability

    with pytest.warns(DeprecationWarning, match="ci_half_width"):
        old = campaign.CampaignConfig(bers=(1e-3,), trials=None, margin=0.03)
    assert old == campaign.CampaignConfig(bers=(1e-3,), trials=None, ci_half_width=0.03)
    assert "margin" not in old.recorded() and old.recorded()["ci_half_width"] == 0.03
    with pytest.warns(DeprecationWarning, match="range_margin"):
        assert compare.CompareConfig(margin=0.3).range_margin == 0.3
    x, y = tiny_data
    new = vulnerability.analyze(tiny_model, x[:8], y[:8], "fi", samples=8, sample_margin=0.2)
    with pytest.warns(DeprecationWarning, match="sample_margin"):
        old_fi = vulnerability.analyze(tiny_model, x[:8], y[:8], "fi", samples=8, margin=0.2)
    assert old_fi["layers"] == new["layers"] and old_fi["settings"]["sample_margin"] == 0.2


def test_pareto_flags_on_a_hand_made_example():
    points = [(1.00, 0.20),   # cheapest: on the front
              (1.05, 0.90),   # on the front
              (1.05, 0.85),   # dominated by the previous (same cost, less accurate)
              (1.10, 0.90),   # dominated (costlier, same accuracy)
              (1.20, 0.95),   # on the front
              (3.00, 0.93)]   # dominated
    assert P.pareto_front(points) == [True, True, False, False, True, False]
    assert P.pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [True, True]  # equal points dominate nothing


def test_exposure_weights_scores_by_stored_values():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 3, bias=False))
    e = P.exposure(net, {"0": [1.0, 2.0], "2": [1.0, 1.0, 0.5]})
    assert e["0"].tolist() == [10.0, 20.0] and e["2"].tolist() == [8.0, 8.0, 4.0]


def test_candidates_include_weight_checks_only_when_offered():
    without = [c.name for c in P.candidates(weight_checks=False)]
    assert not any("weights" in n for n in without) and without[0] == "none" and without[-1] == "full_tmr"
    with_checks = P.candidates(weight_checks=True)
    assert any(c.settings and c.settings.get("check_weights") == "zero" for c in with_checks)
    # codes behind the weight check need it; the codes alone are baselines either way (issue 21)
    coded = [c for c in P.candidates(weight_checks=False, codes=True) if "code" in (c.settings or {})]
    assert [c.name for c in coded] == ["weight_tmr", "ecc", "parity"] and all(c.baseline for c in coded)


def test_protect_fits_the_budget_and_never_reads_test(lenet, digits, monkeypatch, tmp_path):
    net, _ = lenet
    (train_set, test_set) = digits
    x, y = train_set.tensors
    (_, _), (x_val, y_val) = splits.validation_split(x, y, 0.2, seed=0)
    seen = []
    real = campaign.run_campaign

    def spy(model, inputs, labels, *args, **kwargs):
        seen.append((inputs, labels))
        return real(model, inputs, labels, *args, **kwargs)

    monkeypatch.setattr(campaign, "run_campaign", spy)
    space = P.candidates(restricts=[("zero", 0.1)], corrections=["min"], weight_checks=False)
    result = P.protect(net, x, y, ber=BER, max_macs=1.1, max_latency=50.0, trials=TRIALS, space=space,
                       work_dir=tmp_path / "work")
    assert len(seen) == sum(r["validation"] is not None for r in result.records) >= 3
    for inputs, labels in seen:  # every selection campaign ran on the validation split, nothing else
        assert torch.equal(inputs, x_val) and torch.equal(labels, y_val)
    test_rows = {tuple(r.tolist()) for r in test_set.tensors[0].flatten(1)}
    assert not any(tuple(r.tolist()) in test_rows for r in x_val.flatten(1))
    chosen = result.record(result.chosen)
    assert chosen["within_budget"] and chosen["macs_ratio"] <= 1.1 and chosen["latency_ratio"] <= 50.0
    assert result.record("full_tmr")["macs_ratio"] > 3 and not result.record("full_tmr")["within_budget"]
    assert result.chosen != "full_tmr"
    # the choice (issue 21): shown within tolerance of the most accurate, paired by trial, and the
    # cheapest such; every evaluated candidate within budget records why it lost or won
    eligible = [r for r in result.records if r["within_budget"] and r["validation"]]
    assert chosen["choice"]["versus_best"]["within_tolerance"]
    tied = [r for r in eligible if r["choice"]["versus_best"]["within_tolerance"]]
    assert chosen["macs_ratio"] == min(r["macs_ratio"] for r in tied)
    assert all(len(r["validation"]["trial_accuracy"]) == TRIALS for r in eligible)
    dup = result.record("dup_min+restrict_zero_m0.1")
    assert (dup["validation"] is None) or dup["macs_ratio"] <= 1.1  # budget-filled duplication fits too

    seen.clear()
    test = P.evaluate_test(result, *test_set.tensors)
    assert all(torch.equal(i, test_set.tensors[0]) for i, _ in seen) and len(seen) == 1
    assert set(test[result.chosen]["bers"]) == {f"{BER:g}", f"{10 * BER:g}"}

    paths = P.write_result(result, tmp_path / "out", data="digits")
    blob = _strict(paths["front"].read_text())
    assert blob["chosen"] == result.chosen and blob["reason"]
    assert {c["name"] for c in blob["candidates"]} == {c.name for c in space}
    assert paths["plot"].stat().st_size > 10_000
    reloaded = checkpoint.load(paths["model"])
    xt = test_set.tensors[0][:64]
    assert torch.equal(reloaded(xt), result.model(xt))


@pytest.mark.skipif(not P.weight_checks_available(), reason="harden has no check_weights yet")
def test_weight_checks_count_once_per_forward(lenet, digits):
    """A weight check runs once per forward: the budgeted MACs share it over the batch,
    the batch-1 figure counts it whole; both are recorded."""
    net, _ = lenet
    x, y = digits[0].tensors
    space = [c for c in P.candidates(restricts=[], corrections=[], weight_checks=True)
             if c.name in ("none", "weights_zero")]
    result = P.protect(net, x, y, ber=BER, max_macs=1.15, trials=2, space=space, measure_latency=False)
    rec = result.record("weights_zero")
    assert rec["weight_checks"] > 0
    assert 1.0 < rec["macs_ratio"] < rec["cost"]["macs_ratio_batch1"]
    assert rec["cost"]["batch"] == rec["batch"] == 128 and rec["cost"]["macs_ratio"] == rec["macs_ratio"]
    assert rec["macs_ratio"] <= 1.15 and rec["within_budget"]


def test_front_json_is_strict_even_with_nan():
    result = P.ProtectResult("a", "why", [{"name": "a", "x": float("nan"), "y": np.float32(1.5),
                                          "z": float("inf")}], {}, {"ber": 1e-4})
    blob = _strict(P.front_json(result))
    assert blob["candidates"][0]["x"] is None and blob["candidates"][0]["y"] == 1.5
    assert blob["candidates"][0]["z"] is None


def test_budget_errors_are_one_line_before_any_work():
    with pytest.raises(ValueError, match="max_macs must be a finite ratio"):
        P.check_budget(float("nan"), None, 1e-4, 10)
    with pytest.raises(ValueError, match="below 1"):  # a ratio to the model itself: nothing costs less
        P.check_budget(0.5, None, 1e-4, 10)
    P.check_budget(0.5, None, 1e-4, 10, at_least_one=False)  # the pipeline's, relative to the unpruned original
    with pytest.raises(ValueError, match="batch"):
        P.check_budget(1.15, None, 1e-4, 10, batch=0)
    with pytest.raises(ValueError, match="max latency"):
        P.check_budget(1.15, 0.0, 1e-4, 10)
    with pytest.raises(ValueError, match=r"ber must lie in \(0, 0\.1\]"):  # ftcnn.rules' one message
        P.check_budget(1.15, None, 0.0, 10)


def test_no_candidate_fits_is_a_clear_error(lenet, digits):
    net, _ = lenet
    x, y = digits[0].tensors
    space = [c for c in P.candidates(restricts=[("zero", 0.1)], corrections=[], weight_checks=False)
             if c.name != "none"]
    with pytest.raises(ValueError, match="no candidate fits the budget"):
        P.protect(net, x, y, ber=BER, max_macs=1.0, trials=2, space=space, measure_latency=False)


def test_prune_and_protect_stays_within_the_original_cost(lenet, digits, tmp_path):
    net, _ = lenet
    train_set, test_set = digits
    result = pipeline.prune_and_protect(net, train_set, test_set, tmp_path / "e2e", prune_ratio=0.3,
                                        finetune_epochs=1, max_macs=1.0, ber=BER, trials=TRIALS,
                                        measure_latency=False)
    chosen = result.record(result.chosen)
    assert chosen["macs_ratio"] <= 1.0  # relative to the ORIGINAL, unpruned model
    assert result.record("none")["macs_ratio"] < 0.9
    blob = _strict((tmp_path / "e2e" / "front.json").read_text())
    e2e = blob["end_to_end"]
    assert set(e2e["clean_test"]) == {"original", "pruned", "protected"}
    assert math.isfinite(e2e["original_test"]["bers"][f"{BER:g}"]["accuracy"])
    assert (tmp_path / "e2e" / "pruned.pt").is_file() and (tmp_path / "e2e" / "protected.pt").is_file()


@pytest.mark.parametrize("args, message", [
    (["--max-macs", "-1"], "max_macs"),
    (["--max-macs", "nan"], "max_macs"),
    (["--max-macs", "0.15"], "below 1"),
    (["--batch", "0"], "--batch"),
    (["--max-latency", "0"], "max latency ratio"),
    (["--max-memory", "0.9"], "max_memory 0.9 is below 1"),
    (["--max-memory", "inf"], "max_memory must be a finite ratio"),
])
def test_cli_protect_bad_budgets_are_one_line_errors(lenet, tmp_path, args, message):
    _, path = lenet
    r = run_cli("protect", str(path), *args, "-o", str(tmp_path / "out"), threads=1)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_pipeline_end_to_end_rejects_a_bad_budget(lenet, tmp_path):
    _, path = lenet
    r = run_cli("pipeline", str(path), "--max-macs", "0", "-o", str(tmp_path / "e2e"), threads=1)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: max_macs must be a finite ratio > 0"), r.stderr


# --- issue 24: raced validation campaigns, time-capped latency timing ---------------------------------

def _space(*names: str) -> list[P.Candidate]:
    by_name = {c.name: c for c in P.candidates(restricts=[("zero", 0.1)], corrections=["min"])}
    return [by_name[n] for n in names]


RACED = 40  # trials: stages of 10, 20 and 40


@pytest.fixture(scope="module")
def raced(lenet, digits, tmp_path_factory):
    """The same protect with racing on and off, every campaign call spied on: the unprotected model
    (hopeless at BER 1e-3: ~2% against ~84%), two protections and output TMR (over budget)."""
    net, _ = lenet
    x, y = digits[0].tensors
    space = _space("none", "restrict_zero_m0.1", "weights_zero+restrict_zero_m0.1", "full_tmr")
    out = {}
    for race in (True, False):
        calls: list[tuple[str, int]] = []
        real = campaign.run_campaign

        def spy(model, inputs, labels, config, folder, *args, calls=calls, real=real, **kwargs):
            calls.append((folder.name, config.trials))
            return real(model, inputs, labels, config, folder, *args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(campaign, "run_campaign", spy)
            said: list[str] = []
            result = P.protect(net, x, y, ber=BER, max_macs=1.15, trials=RACED, space=space, measure_latency=False,
                               race=race, work_dir=tmp_path_factory.mktemp("race"), log=said.append)
        out[race] = (result, calls, said)
    return out


def test_racing_stops_the_hopeless_and_the_over_budget_and_never_the_chosen(raced):
    result, calls, said = raced[True]
    assert P.race_stages(RACED) == [10, 20, 40] and result.config["race"]["stages"] == [10, 20, 40]
    none, tmr = result.record("none"), result.record("full_tmr")
    # the unprotected model is shown more than the tolerance below the most accurate, by the betting sequence
    assert none["raced"]["stopped_at"] in (10, 20) and none["validation"]["trials"] == none["raced"]["stopped_at"]
    assert none["raced"]["ci"][1] < -P.DEFAULT_TOLERANCE / 100 and none["raced"]["versus"] != "none"
    assert none["choice"]["why"].startswith("stopped early, never chosen")
    # a baseline over budget stops after the first stage: shown with its 10 trials
    assert tmr["raced"]["stopped_at"] == 10 and tmr["validation"]["trials"] == 10 and "over budget" in tmr["raced"]["why"]
    chosen = result.record(result.chosen)
    assert chosen["raced"] is None and chosen["validation"]["trials"] == RACED
    assert len(chosen["validation"]["trial_accuracy"]) == RACED
    # each campaign resumed stage by stage; the stopped ones were not run again
    assert [t for name, t in calls if name == "full_tmr"] == [10]
    assert [t for name, t in calls if name == result.chosen] == [10, 20, 40]
    assert [t for name, t in calls if name == "none"] == [10, 20, 40][:[10, 20].index(none["raced"]["stopped_at"]) + 1]
    assert result.config["race"]["stopped"] == {r["name"]: r["raced"]["stopped_at"] for r in result.records
                                                if r.get("raced")}
    # the log says stage by stage who stopped and why
    assert any(s.startswith("stage 1/3 done: stopped") and "full_tmr: over budget" in s for s in said)
    assert any("none: shown more than 0.25 points below" in s for s in said if s.startswith("stage "))
    assert any(s.startswith("expected: ~") and "raced in stages of 10/20/40 trials" in s for s in said)


def test_race_off_runs_every_trial_and_racing_changes_no_number_of_those_that_go_on(raced):
    off, calls, said = raced[False]
    on = raced[True][0]
    assert sorted(calls) == sorted((r["name"], RACED) for r in off.records if r["validation"] is not None)
    assert all("raced" not in r for r in off.records) and off.config["race"]["stages"] == [RACED]
    assert not any(s.startswith("stage ") for s in said)
    assert on.chosen == off.chosen and on.reason == off.reason
    for a, b in zip(on.records, off.records):
        if not a.get("raced"):  # the same trials, so the same numbers, byte for byte
            assert files.dumps_json(a["validation"]) == files.dumps_json(b["validation"])
            assert a["choice"] == b["choice"]
        else:
            assert b["validation"]["trials"] == RACED > a["validation"]["trials"]


def _record(name: str, accuracies: dict[int, float], macs: float, **extra) -> dict:
    values = list(accuracies.values())
    return {"name": name, "within_budget": True, "macs_ratio": macs, "latency_ratio": None,
            "validation": {"accuracy": sum(values) / len(values), "accuracy_ci": [0.0, 1.0],
                           "trial_accuracy": {str(t): a for t, a in accuracies.items()}}, **extra}


def test_choose_pairs_on_the_trials_both_ran():
    """A cheaper candidate stopped at 10 trials whose trials equal the best's on those 10 is shown within
    tolerance by the paired test (its mean over its own trials is 2.5 points lower: unpaired, it would lose);
    the same candidate stopped by the race is never chosen."""
    best = {t: 0.80 + 0.01 * (t % 3) for t in range(10)} | {t: 0.85 + 0.01 * (t % 3) for t in range(10, 20)}
    records = [_record("best", best, 1.1), _record("cheap", {t: best[t] for t in range(10)}, 1.0)]
    chosen, reason = P.choose(records, BER, 1.15, None)
    assert chosen == "cheap" and "vs best" in reason
    versus = records[1]["choice"]["versus_best"]
    assert versus["trials"] == 10 and versus["difference"] == 0.0 and versus["within_tolerance"]
    stopped = {"stopped_at": 10, "why": "shown more than 0.25 points below best"}
    records = [_record("best", best, 1.1), _record("cheap", {t: best[t] for t in range(10)}, 1.0, raced=stopped)]
    assert P.choose(records, BER, 1.15, None)[0] == "best"
    assert records[1]["choice"]["why"] == f"stopped early, never chosen: {stopped['why']}"


def test_race_stops_only_what_the_confidence_sequence_shows_below_the_tolerance():
    n = 20
    leader = _record("leader", {t: 0.9 for t in range(n)}, 1.1)
    hopeless = _record("hopeless", {t: 0.1 for t in range(n)}, 1.0)
    close = _record("close", {t: 0.9 - 0.005 * (t % 2) for t in range(n)}, 1.0)  # 0.25 points below
    over = {**_record("tmr", {t: 0.95 for t in range(n)}, 3.0), "within_budget": False}
    stops = P.race_stops([leader, hopeless, close, over], n)
    assert set(stops) == {"hopeless", "tmr"}
    assert stops["hopeless"]["versus"] == "leader" and stops["hopeless"]["ci"][1] < -0.0025
    assert stops["hopeless"]["difference"] == pytest.approx(-0.8)
    # 80 points below is not shown to be more than 90 points below: the tolerance is what it is tested against
    assert P.race_stops([leader, hopeless], n, tolerance=90.0) == {}
    # the leader is the most accurate choosable one (the baseline over budget is never the leader) and at
    # 9 pairs nothing can be shown yet: the sequence needs 10 pairs of the largest difference
    assert P.race_stops([leader, _record("zero", {t: 0.0 for t in range(9)}, 1.0)], 9) == {}
    assert set(P.race_stops([_record("lead", {t: 1.0 for t in range(10)}, 1.1),
                             _record("zero", {t: 0.0 for t in range(10)}, 1.0)], 10)) == {"zero"}


def test_race_must_be_a_switch(lenet, digits):
    net, _ = lenet
    with pytest.raises(ValueError, match="race must be true or false"):
        P.protect(net, *digits[0].tensors, trials=2, race=1)


def test_latency_timing_is_capped_and_the_baselines_over_budget_are_timed_apart(lenet, digits, monkeypatch):
    """The choosable candidates are timed without the baselines over budget (output TMR: x3 per round),
    which are timed with the reference in a share of the budget; every timing gets its budget."""
    net, _ = lenet
    x, y = digits[0].tensors
    groups: list[tuple[list[str], int, float]] = []
    real = P.cost.stable_latency

    def spy(models, input_shape, batch, **kwargs):
        groups.append((list(models), batch, kwargs["max_seconds"]))
        return real(models, input_shape, batch, **kwargs)

    monkeypatch.setattr(P.cost, "stable_latency", spy)
    monkeypatch.setattr(P, "LATENCY_SECONDS", 0.4)
    monkeypatch.setattr(P, "LATENCY_SECONDS_BATCH1", 0.2)
    space = _space("none", "restrict_zero_m0.1", "full_tmr")
    said: list[str] = []
    result = P.protect(net, x, y, ber=BER, max_macs=1.15, trials=2, space=space, log=said.append)
    # both estimates come before the timing starts: the timing's within its budgets, then the campaigns'
    estimate, timing = (next(i for i, s in enumerate(said) if s.startswith(start))
                        for start in ("expected: at most ~", "timing 3 candidates"))
    assert "of latency timing (3 candidates" in said[estimate] and "the 1 baseline over budget apart" in said[estimate]
    assert any("of validation campaigns" in s for s in said[estimate + 1:timing])
    assert groups == [(["__reference__", "restrict_zero_m0.1"], 128, 0.4), (["__reference__", "restrict_zero_m0.1"], 1, 0.2),
                      (["__reference__", "full_tmr"], 128, 0.1), (["__reference__", "full_tmr"], 1, 0.05)]
    latency = result.config["latency"]
    assert latency["max_seconds"] == {"128": 0.4, "1": 0.2} and latency["shown"]["names"] == ["full_tmr"]
    assert set(latency["stopped_by"].values()) <= {"agreement", "rounds", "time"}
    assert all(isinstance(s, float) for s in latency["seconds"].values())
    # the unprotected model IS the reference: its ratio is 1 by definition, not a second timing's noise
    assert result.record("none")["latency_ratio"] == 1.0
    assert result.record("full_tmr")["latency_ratio"] > 1 and result.record("restrict_zero_m0.1")["latency_ratio"]


def test_validation_trials_evaluate_one_paired_block(lenet, digits, tmp_path, monkeypatch):
    """``validation_inputs``: each validation campaign evaluates a seeded block of that many inputs per
    trial, and every candidate gets the same block at trial i (its config is identical but for the
    model): the choice stays paired. Recorded in the config; 0 is refused in one line."""
    net, _ = lenet
    x, y = digits[0].tensors
    seen = []
    real = P._campaign

    def spy(model, xs, ys, bers, trials, seed, folder, device="cpu", inputs_per_trial=None, **kw):
        seen.append((inputs_per_trial, seed, len(xs)))
        return real(model, xs, ys, bers, trials, seed, folder, device, inputs_per_trial=inputs_per_trial, **kw)

    monkeypatch.setattr(P, "_campaign", spy)
    space = [c for c in P.candidates(restricts=[("zero", 0.1)], corrections=[], weight_checks=False, codes=False)
             if c.name in ("none", "restrict_zero_m0.1")]
    result = P.protect(net, x, y, ber=BER, max_macs=1.15, trials=4, space=space, measure_latency=False,
                       validation_inputs=50, race=False, work_dir=tmp_path)
    assert result.config["validation_inputs_per_trial"] == 50
    assert len(seen) == 2 and len(set(seen)) == 1 and seen[0][0] == 50
    summary = json.loads((tmp_path / "validation" / "none" / "summary.json").read_text())
    assert summary["config"]["inputs_per_trial"] == 50
    with pytest.raises(ValueError, match="validation_inputs"):
        P.protect(net, x, y, ber=BER, trials=2, space=space, measure_latency=False, validation_inputs=0)


def test_test_campaigns_evaluate_blocks_of_test_inputs(lenet, tmp_path, monkeypatch):
    """``test_inputs`` (``--test-inputs``): protect_run's test campaigns evaluate a seeded block of
    that many test inputs per trial, recorded with each test entry and in the campaign's config;
    None evaluates every test input; 0 is refused in one line."""
    net, _ = lenet
    space = [c for c in P.candidates(restricts=[("zero", 0.1)], corrections=[], weight_checks=False, codes=False)
             if c.name in ("none", "restrict_zero_m0.1")]
    real = P.protect
    monkeypatch.setattr(P, "protect", lambda *a, **kw: real(*a, **{**kw, "space": space, "measure_latency": False}))
    result = P.protect_run(net, "digits", tmp_path / "blocks", ber=BER, trials=3, test_inputs=40)
    entry = result.test[result.chosen]
    assert entry["inputs_per_trial"] == 40 and entry["trials"] == 3
    summaries = list((tmp_path / "blocks" / "campaigns" / "test").rglob("summary.json"))
    assert summaries and all(json.loads(s.read_text())["config"]["inputs_per_trial"] == 40 for s in summaries)
    whole = P.protect_run(net, "digits", tmp_path / "whole", ber=BER, trials=3, test_inputs=None)
    assert whole.test[whole.chosen]["inputs_per_trial"] == len(data.load("digits", "test"))
    with pytest.raises(ValueError, match="test-inputs"):
        P.protect_run(net, "digits", tmp_path / "refused", ber=BER, trials=3, test_inputs=0)


def test_the_estimate_counts_the_golden_inference_of_the_whole_split(lenet, digits, tmp_path):
    """Trials on blocks: the estimate's unit is one block's inference, and each campaign's set-up
    (the golden inference of the whole validation split) is ``SETUP_INFERENCES`` x split / block
    of them, not ``SETUP_INFERENCES`` (which understated ResNet-20's validation about 2x)."""
    net, _ = lenet
    x, y = digits[0].tensors
    space = [c for c in P.candidates(restricts=[("zero", 0.1)], corrections=[], weight_checks=False, codes=False)
             if c.name in ("none", "restrict_zero_m0.1")]
    said: list[str] = []
    result = P.protect(net, x, y, ber=BER, max_macs=1.15, trials=4, space=space, measure_latency=False,
                       validation_inputs=50, race=False, work_dir=tmp_path, log=said.append)
    setup = P.SETUP_INFERENCES * result.config["validation_size"] / 50
    assert setup > P.SETUP_INFERENCES
    assert any(f"{setup:g} more per campaign set-up" in s for s in said), said
