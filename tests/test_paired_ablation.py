"""The ablation "protection values attacked vs not" is paired (issue 21): the unattacked campaign draws
over the same memory and drops only the sites in protection values, so every other fault of trial i
is the attacked campaign's, and the accuracy difference is the protection's own faults' alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ftcnn import build
from ftcnn.campaigns import campaign, trials as T
from ftcnn.injection import faults as F
from ftcnn.protection import hardening as H


def _hardened() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build("lenet5", num_classes=10, in_channels=1, input_size=8).eval()
    return H.harden(model, ratio=0.0, check_weights="zero", restrict="zero", range_margin=0.1,
                    calibration=torch.randn(32, 1, 8, 8))


def test_unattacked_draws_are_the_attacked_ones_less_the_protection_sites() -> None:
    hm = _hardened()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    attacked = campaign.CampaignConfig(bers=(3e-3,), trials=8, seed=5)
    spared = dataclasses.replace(attacked, attack_protection=False)
    full = T.prepare(hm, x, y, attacked).space.memory
    part = T.prepare(hm, x, y, spared).space.memory
    protection = set(full.stored) - set(F.fault_targets(hm, include_protection=False))
    assert protection and part.spared == frozenset(protection)
    hits = 0
    for trial in range(8):
        a = T.draw_trial_faults(full, attacked, 3e-3, trial)
        u = T.draw_trial_faults(part, spared, 3e-3, trial)
        kept = sorted(s for s in a.as_list() if s[0] not in protection)
        assert sorted(u.as_list()) == kept
        hits += a.count - len(kept)
    assert hits > 0  # some trials did hit protection values: the comparison is not vacuous


def test_summary_counts_only_the_attacked_bits(tmp_path) -> None:
    hm = _hardened()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    cfg = campaign.CampaignConfig(bers=(1e-3,), trials=3, seed=1, attack_protection=False)
    summary = campaign.run_campaign(hm, x, y, cfg, tmp_path / "u", progress=False)
    weights_only = F.parameter_memory(hm, include_protection=False).total_bits()
    assert summary["memory"]["fault_target_bits"] == weights_only
    assert summary["memory"]["unattacked_bits"] >= sum(
        t.numel() * 32 for n, t in F.parameter_memory(hm).stored.items() if n not in F.fault_targets(
            hm, include_protection=False))
    assert summary["config"]["attack_protection"] is False


def test_spare_keeps_drawn_values_of_other_tensors() -> None:
    f = F.drawn_faults({"a": (np.array([1]), np.array([3])), "b": (np.array([2]), np.array([4]))},
                       "random-value", np.random.default_rng(0))
    kept = F.spare(f, {"a"})
    assert list(kept.sites) == ["b"] and kept.values is not None and list(kept.values) == ["b"]
    assert kept.values["b"][0] == f.values["b"][0]
