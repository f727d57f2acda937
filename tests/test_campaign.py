"""Campaigns: metrics, statistics, reproducibility, resume after SIGKILL."""

from __future__ import annotations

import copy
import json
import os
import signal
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import wait_for_trials
from ftcnn.campaigns import campaign as C
from ftcnn.injection import faults as F
from ftcnn.campaigns import trials
from ftcnn.campaigns.metrics import Golden, leveugle_sample_size, mean_ci, trial_metrics

HERE = Path(__file__).parent


def test_trial_metrics_count_nan_rows_as_due_sdc_and_wrong() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    golden = Golden(labels, torch.tensor([0, 1, 2, 0]))  # 3 of 4 right
    logits = torch.eye(10)[[0, 2, 2, 3]] * 5
    logits[2, 2] = float("nan")  # argmax picks the NaN's index 2, the right class: must count as wrong
    assert logits[2].argmax().item() == 2
    m = trial_metrics(logits, golden)
    assert m["accuracy"] == 0.5  # inputs 0 and 3 (3 is a lucky fix of a golden mistake)
    assert m["due"] == 0.25
    # SDC: input 1 changed (1->2), input 2 NaN, input 3 changed (0->3)
    assert m["sdc"] == 0.75
    # critical: golden right and faulty wrong: inputs 1 and 2
    assert m["critical_sdc"] == 0.5


def test_trial_metrics_accuracy_includes_lucky_fixes() -> None:
    labels = torch.tensor([0, 1])
    golden = Golden(labels, torch.tensor([1, 1]))
    m = trial_metrics(torch.eye(10)[[0, 1]], golden)
    assert m["accuracy"] == 1.0 and m["sdc"] == 0.5 and m["critical_sdc"] == 0.0


def test_mean_ci_against_scipy_t_interval() -> None:
    from scipy import stats
    x = [0.9, 0.8, 0.85, 0.7, 0.95]
    mean, std, (low, high) = mean_ci(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert mean == pytest.approx(np.mean(x)) and std == pytest.approx(np.std(x, ddof=1))
    assert (low, high) == pytest.approx(ref)


def test_leveugle_sample_size() -> None:
    # large population: the normal approximation t^2 p(1-p)/e^2 = 9604 at 1%/95%
    assert leveugle_sample_size(10**12, 0.01, 0.95) == 9604
    # small population: never more than the population
    assert leveugle_sample_size(100, 0.01, 0.95) <= 100


def _run(tiny_model, tiny_data, out, **kw):
    x, y = tiny_data
    config = C.CampaignConfig(**{"bers": (1e-3, 1e-2), "trials": 20, "seed": 3, **kw})
    return C.run_campaign(tiny_model, x, y, config, out, progress=False)


def test_campaign_is_reproducible_from_its_seed(tiny_model, tiny_data, tmp_path) -> None:
    a = _run(tiny_model, tiny_data, tmp_path / "a")
    b = _run(tiny_model, tiny_data, tmp_path / "b")
    assert a["results"] == b["results"]
    c = _run(tiny_model, tiny_data, tmp_path / "c", seed=4)
    assert a["results"] != c["results"]
    row = a["results"][1]
    for key in ("ber", "trials", "accuracy_mean", "accuracy_std", "accuracy_ci", "sdc_mean", "sdc_ci",
                "critical_sdc_mean", "due_mean", "confidence", "ci_method"):
        assert key in row
    assert row["trials"] == 20 and row["accuracy_ci"][0] <= row["accuracy_mean"] <= row["accuracy_ci"][1]
    # 20 trials: the bounded interval, valid at that size (issue 22)
    assert a["confidence"] == 0.95 and a["ci_method"] == row["ci_method"] == "betting (fixed n)"
    on_disk = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(a["results"]))
    assert on_disk["seed"] == 3 and "torch" in on_disk["versions"] and on_disk["config"]["bers"] == [1e-3, 1e-2]
    csv_lines = (tmp_path / "a" / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("ber,")


def test_campaign_leaves_model_unchanged(tiny_model, tiny_data, tmp_path) -> None:
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    _run(tiny_model, tiny_data, tmp_path / "a", bers=(0.05,), trials=5)
    _run(tiny_model, tiny_data, tmp_path / "b", bers=(0.05,), trials=5, dtype="int8")
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]) and v.numpy().tobytes() == before[k].numpy().tobytes()


def test_trials_match_an_independent_naive_evaluation(tiny_model, tiny_data, tmp_path) -> None:
    """Re-draw trial 2's faults, inject with a deep copy and evaluate by hand."""
    import copy
    from ftcnn.injection import faults as F
    x, y = tiny_data
    config = C.CampaignConfig(bers=(5e-4,), trials=3, seed=11)
    C.run_campaign(tiny_model, x, y, config, tmp_path, progress=False)
    db = sqlite3.connect(tmp_path / C.DB_NAME)
    acc, n_faults, sites = db.execute("SELECT accuracy, n_faults, sites FROM trials WHERE trial=2").fetchone()
    faulty = copy.deepcopy(tiny_model)
    memory = F.parameter_memory(faulty)
    faults = C.draw_trial_faults(memory, config, 5e-4, 2)
    assert n_faults > 0
    assert faults.count == n_faults and json.loads(sites) == [list(s) for s in faults.as_list()]
    params = dict(faulty.named_parameters())
    for name, index, bit in faults.as_list():  # independent path: numpy views, one site at a time
        arr = params[name].data.view(-1).numpy().view(np.uint32)
        arr[index] ^= np.uint32(1 << bit)
    with torch.no_grad():
        logits = faulty(x)
    finite = torch.isfinite(logits).all(1)
    right = (logits.argmax(1) == y) & finite
    assert acc == pytest.approx(right.float().mean().item())


def test_resume_skips_finished_trials_and_extends(tiny_model, tiny_data, tmp_path) -> None:
    first = _run(tiny_model, tiny_data, tmp_path, trials=10)
    n = sqlite3.connect(tmp_path / C.DB_NAME).execute("SELECT COUNT(*) FROM trials").fetchone()[0]
    assert n == 20
    again = _run(tiny_model, tiny_data, tmp_path, trials=10)
    assert again["results"] == first["results"]
    longer = _run(tiny_model, tiny_data, tmp_path, trials=20)
    assert longer["results"] == _run(tiny_model, tiny_data, tmp_path / "fresh", trials=20)["results"]
    with pytest.raises(ValueError, match="different campaign"):
        _run(tiny_model, tiny_data, tmp_path, seed=99)


def test_sigkilled_campaign_resumes_to_the_same_summary(tiny_model, tiny_data, tmp_path) -> None:
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(HERE / "_kill_target.py"), str(killed)], env=env)
    db_path = killed / C.DB_NAME
    wait_for_trials(proc, db_path, at_least=30)
    assert proc.poll() is None, "campaign finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survived = sqlite3.connect(db_path).execute("SELECT COUNT(*) FROM trials").fetchone()[0]
    assert 30 <= survived < 800
    assert not (killed / "summary.json").exists()
    x, y = tiny_data
    config = C.CampaignConfig(bers=(1e-3, 1e-2), trials=400, seed=7)
    resumed = C.run_campaign(tiny_model, x, y, config, killed, progress=False)
    whole = C.run_campaign(tiny_model, x, y, config, tmp_path / "whole", progress=False)
    assert resumed["results"] == whole["results"]


def test_auto_trials_stop_when_ci_is_narrow(tiny_model, tiny_data, tmp_path) -> None:
    x, y = tiny_data
    config = C.CampaignConfig(bers=(0.0, 1e-2), trials=None, ci_half_width=0.05, seed=0)
    s = C.run_campaign(tiny_model, x, y, config, tmp_path, progress=False)
    zero, noisy = s["results"]
    # no fault: identical trials (std 0) must not stop the run at the minimum (the old t-rule did)
    assert config.min_trials < zero["trials"] < 1000
    assert zero["accuracy_ci"][0] <= zero["accuracy_mean"] <= zero["accuracy_ci"][1]
    assert s["ci_method"] == zero["ci_method"] == "betting confidence sequence"
    half = (noisy["accuracy_ci"][1] - noisy["accuracy_ci"][0]) / 2
    assert half <= 0.05 or noisy["trials"] == leveugle_sample_size(10**9, 0.05)
    assert noisy["trials"] > config.min_trials


def test_fault_free_shortcut_is_exact(tiny_model, tiny_data, tmp_path) -> None:
    fast = _run(tiny_model, tiny_data, tmp_path / "fast", bers=(1e-4,), trials=30)
    plain = _run(tiny_model, tiny_data, tmp_path / "plain", bers=(1e-4,), trials=30, skip_fault_free=False)
    assert fast["results"] == plain["results"]


@pytest.mark.parametrize("kwargs, match", [
    ({"bers": (1.5,)}, r"bers must lie in \[0, 1\] \(got 1.5\)"), ({"bers": (-0.1,)}, "bers must lie in"),
    ({"trials": 0}, "trials"),
    ({"bers": (), "counts": ()}, "fault rates"), ({"dtype": "int4"}, "dtype"),
])
def test_bad_config_is_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        C.CampaignConfig(**{"bers": (1e-3,), **kwargs})


def test_counts_campaign(tiny_model, tiny_data, tmp_path) -> None:
    s = _run(tiny_model, tiny_data, tmp_path, bers=(), counts=(1, 3), trials=5)
    assert [r["count"] for r in s["results"]] == [1.0, 3.0]
    assert [r["n_faults_mean"] for r in s["results"]] == [1.0, 3.0]


def test_random_value_trials_are_exact_on_every_path(tiny_model, tiny_data, tmp_path) -> None:
    """A fault mode that draws numbers (faults.FAULT_MODES["random-value"]): one trial recomputed
    by hand (its generator, the sites, one uniform per site, the weights set by hand on a copy),
    and the shortcut and batched trials equal to the plain path."""
    x, y = tiny_data
    config = C.CampaignConfig(bers=(0.02,), trials=6, seed=1, batch_size=64, mode="random-value",
                              shortcut=False, batch_trials=1)
    runner = trials.prepare(tiny_model, x, y, config)
    faults, metrics = runner.run(0.02, 4)
    rng = np.random.default_rng(np.random.SeedSequence([1, int(np.float64(0.02).view(np.uint64)), 4]))
    sites = F.draw_faults(runner.memory, rng, ber=0.02, mode="flip").sites
    by_hand = copy.deepcopy(tiny_model)
    params = dict(by_hand.named_parameters())
    with torch.no_grad():
        for name, (index, _) in sites.items():
            values = rng.uniform(-1.0, 1.0, size=len(index))
            for i, v in reversed(list(zip(index.tolist(), values.tolist()))):  # the first site wins
                params[name].view(-1)[i] = float(np.float32(v))
    assert faults.count == sum(len(i) for i, _ in sites.values()) > 0
    assert metrics == trial_metrics(by_hand(x), runner.golden)
    runs = {}
    for label, extra in {"plain": {}, "shortcut": {"shortcut": True},
                         "batched": {"shortcut": True, "batch_trials": 3}}.items():
        runs[label] = C.run_campaign(tiny_model, x, y, replace(config, **extra), tmp_path / label,
                                     progress=False)["results"]
    assert runs["shortcut"] == runs["plain"] == runs["batched"]
    assert runs["plain"][0]["sdc_mean"] > 0  # the faults did bite


def test_resuming_a_finished_campaign_reuses_its_summary_without_preparing(tiny_model, tiny_data, tmp_path,
                                                                          monkeypatch) -> None:
    """Issue 14: a finished run resumes at the cost of its identity check (no golden inference, no
    trace); the summary is the one stored, byte for byte. A different record, or one more trial, runs."""
    from ftcnn.campaigns import activations

    x, y = tiny_data
    config = C.CampaignConfig(bers=(1e-3, 1e-2), trials=4, seed=0)
    first = C.run_campaign(tiny_model, x, y, config, tmp_path, record={"data": "tiny"}, progress=False)
    stored = (tmp_path / "summary.json").read_bytes()
    prepared = []
    real = activations.campaign_runner

    def counting(*args, **kwargs):
        prepared.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(activations, "campaign_runner", counting)
    again = C.run_campaign(tiny_model, x, y, config, tmp_path, record={"data": "tiny"}, progress=False)
    assert not prepared and again == json.loads(stored) and (tmp_path / "summary.json").read_bytes() == stored
    assert again["results"] == json.loads(json.dumps(first["results"]))
    C.run_campaign(tiny_model, x, y, config, tmp_path, record={"data": "renamed"}, progress=False)
    assert len(prepared) == 1  # another record: summarised anew (no trial re-run)
    more = C.run_campaign(tiny_model, x, y, replace(config, trials=5), tmp_path, progress=False)
    assert len(prepared) == 2 and all(r["trials"] == 5 for r in more["results"])


def test_a_resumed_run_says_what_it_found(tiny_model, tiny_data, tmp_path) -> None:
    """Rerunning a campaign says how many trials it found committed (issue 23: a finished rerun
    said nothing), and the numbers are those of a run that never stopped."""
    x, y = tiny_data

    def said(trials: int) -> tuple[list[str], dict]:
        lines: list[str] = []
        config = C.CampaignConfig(bers=(1e-3, 1e-2), trials=trials, seed=3)
        summary = C.run_campaign(tiny_model, x, y, config, tmp_path, progress=False, announce=lines.append)
        return lines, summary

    first, _ = said(10)
    assert not any(line.startswith("resumed") for line in first) and len(first) == 1
    again, _ = said(10)
    assert again == [f"resumed: all 20 trials were already committed in {tmp_path / C.DB_NAME}; "
                     "its summary is returned, nothing runs"]
    longer, summary = said(15)
    assert longer[0] == f"resumed: 20 trials found committed in {tmp_path / C.DB_NAME}; they are not run again"
    assert "10 to run" in longer[1]
    assert summary["results"] == _run(tiny_model, tiny_data, tmp_path / "fresh", trials=15)["results"]
