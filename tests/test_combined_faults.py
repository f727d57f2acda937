"""Memory and datapath faults in one trial (``target="both"``, ``ftcnn.campaigns.combined``; issue 22):
trial ``i`` holds exactly trial ``i``'s parameter faults of the parameter campaign and trial ``i``'s
activation faults of the activation campaign (the rows are paired), its accuracy is that of an
independent computation (faults written by hand, then ``activations.run_trial``), it resumes, and
bad settings are one-line refusals."""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest
import torch
from torch import nn

from ftcnn.campaigns import activations, campaign, campaign_file, combined
from ftcnn.campaigns.trials import CampaignConfig, draw_trial_faults
from ftcnn.injection import faults as F
from ftcnn.protection import hardening

pytestmark = pytest.mark.usefixtures("one_thread")

SEED, BER, RATE, TRIALS = 3, 3e-3, 2e-3, 6


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = small_cnn()(x).argmax(dim=1)
    return x, y


def config(**kw) -> CampaignConfig:
    return CampaignConfig(**{"bers": (BER,), "trials": TRIALS, "seed": SEED, "target": "both",
                             "activation_ber": RATE, **kw})


def test_a_combined_trial_holds_both_campaigns_faults_of_the_same_trial() -> None:
    x, y = data()
    runner = combined.campaign_runner(small_cnn(), x, y, config())
    assert isinstance(runner, combined.CombinedRunner)
    parameters = combined.campaign_runner(small_cnn(), x, y, CampaignConfig(bers=(BER,), trials=TRIALS, seed=SEED))
    datapath = combined.campaign_runner(small_cnn(), x, y, combined.as_activation_config(config()))
    for trial in range(TRIALS):
        both = runner.space.draw(BER, trial)
        assert both.parameters.as_list() == parameters.space.draw(BER, trial).as_list()
        assert both.activations.as_list() == datapath.space.draw(RATE, trial).as_list()
        assert both.count == both.parameters.count + both.activations.count > 0


def test_a_combined_trial_matches_an_independent_computation() -> None:
    """Faults written into a fresh copy by hand (``faults.apply`` of the documented draw), then the plain
    activation trial (``activations.run_trial``: no runner, no shortcut) on that faulty model."""
    x, y = data()
    cfg = config()
    with_faults = combined.campaign_runner(small_cnn(), x, y, cfg)
    for trial in range(TRIALS):
        _, metrics = with_faults.run(BER, trial)
        net = small_cnn()
        memory = F.parameter_memory(net, "float32", include_bn=True)
        faults = draw_trial_faults(memory, dataclasses.replace(cfg, target="parameters", activation_ber=None),
                                   BER, trial)
        with F.injected(memory, faults):
            expected = activations.run_trial(net, x, y, golden=with_faults.golden, ber=RATE, seed=SEED, trial=trial)
        assert metrics["accuracy"] == expected["accuracy"], trial
        assert metrics["faults_per_layer"] == expected["faults_per_layer"]


def test_a_combined_campaign_runs_resumes_and_records_its_rate(tmp_path) -> None:
    x, y = data()
    first = campaign.run_campaign(small_cnn(), x, y, config(), tmp_path / "run", progress=False)
    assert first["config"]["target"] == "both" and first["config"]["activation_ber"] == RATE
    [row] = first["results"]
    assert row["trials"] == TRIALS and 0.0 <= row["accuracy_mean"] <= 1.0
    # a campaign killed after 3 trials resumes with the same numbers
    db = sqlite3.connect(tmp_path / "run" / campaign.DB_NAME)
    db.execute("DELETE FROM trials WHERE trial >= 3")
    db.commit()
    db.close()
    again = campaign.run_campaign(small_cnn(), x, y, config(), tmp_path / "run", progress=False)
    assert again["results"] == first["results"]
    # another activation rate is another campaign: refused, not mixed
    with pytest.raises(ValueError, match="differ"):
        campaign.run_campaign(small_cnn(), x, y, config(activation_ber=RATE / 2), tmp_path / "run", progress=False)
    # parameter and activation campaigns keep the identities they had (no activation_ber recorded)
    for cfg in (CampaignConfig(bers=(BER,)), CampaignConfig(bers=(BER,), target="activations")):
        assert "activation_ber" not in cfg.recorded()


def test_the_correction_bounds_are_attacked_under_both() -> None:
    """A protected model's added values (bounds) are parameter fault targets under both, as under
    parameters (every stored bit is memory)."""
    x, y = data()
    hard = hardening.harden(small_cnn(), calibration=x[:32], ratio=0.0, check_weights="zero")
    runner = combined.campaign_runner(hard, x, y, config())
    parameters = combined.campaign_runner(hard, x, y, CampaignConfig(bers=(BER,), seed=SEED))
    assert set(runner.space.stored) == set(parameters.space.stored)
    assert any("bound" in name or "low" in name or "high" in name for name in runner.space.stored), \
        sorted(runner.space.stored)


@pytest.mark.parametrize("kw, match", [
    ({"activation_ber": None}, "target both needs --activation-ber in \\(0, 1\\]"),
    ({"activation_ber": 0.0}, "target both needs --activation-ber"),
    ({"activation_ber": 2.0}, "target both needs --activation-ber"),
    ({"bers": (), "counts": (3,)}, "target both sweeps parameter BERs"),
    ({"inputs_per_trial": 10}, "activation faults are drawn"),
    ({"precision": 0.05, "trials": None}, "--precision stratifies one fault target"),
    ({"mode": "stuck0"}, "target both takes bit flips"),
    ({"target": "parameters"}, "--activation-ber is the datapath rate of target both"),
])
def test_bad_combined_settings_are_one_line_refusals(kw, match) -> None:
    with pytest.raises(ValueError, match=match) as refused:
        config(**kw)
    assert "\n" not in str(refused.value)


def test_a_campaign_file_sets_both_and_refuses_a_stray_rate(tmp_path) -> None:
    good = tmp_path / "both.toml"
    good.write_text('target = "both"\nber = [1e-4]\nactivation_ber = 1e-6\ntrials = 5\n')
    cfg = campaign_file.load_campaign_file(good)
    assert CampaignConfig(**campaign_file.config_kwargs(cfg)).activation_ber == 1e-6
    stray = tmp_path / "stray.toml"
    stray.write_text('ber = [1e-4]\nactivation_ber = 1e-6\n')
    with pytest.raises(campaign_file.CampaignFileError, match="activation_ber") as refused:
        campaign_file.load_campaign_file(stray)
    assert "\n" not in str(refused.value)
    missing = tmp_path / "missing.toml"
    missing.write_text('target = "both"\nber = [1e-4]\n')
    with pytest.raises(campaign_file.CampaignFileError, match="activation_ber"):
        campaign_file.load_campaign_file(missing)
