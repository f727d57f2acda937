"""Issue 22, items 1 and 3: each campaign role draws its own faults; intervals valid at every n.

Item 1: `ftcnn protect` used to run its test campaigns with the validation campaigns' seed, so
every test trial had exactly a validation trial's fault set. Item 3: fixed-n campaigns used a
Student-t interval, which at 10-30 trials of zero-inflated outcomes is of zero width (all trials
benign), clipped or reaches outside [0, 1].
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ftcnn import checkpoint, data
from ftcnn.campaigns import campaign, paired, seeds
from ftcnn.protection import protect as P
from ftcnn.injection import faults as F
from ftcnn.campaigns.metrics import (BOUNDED_CI_BELOW, CI_BETTING_FIXED, CI_STUDENT_T, bounded_ci, fixed_n_ci, mean_ci,
                           needs_bounded_ci)
from ftcnn.campaigns.trials import MAX_SEED, draw_trial_faults

pytestmark = pytest.mark.usefixtures("one_thread")

BER = 1e-4
DRAWS = 200


def _lenet() -> torch.nn.Module:
    info = data.info("digits")
    torch.manual_seed(0)
    return checkpoint.build("lenet5", num_classes=info.num_classes, in_channels=info.in_channels,
                            input_size=info.input_size).eval()


# --- item 1: seeds per role -----------------------------------------------------------------------

def test_role_seeds_are_fixed_distinct_and_validation_keeps_the_users_seed():
    for seed in (0, 7, MAX_SEED):
        derived = seeds.role_seeds(seed)
        assert derived["validation"] == seed  # the search's numbers stay what they were
        assert len(set(derived.values())) == len(seeds.ROLES)
        assert all(0 <= s <= MAX_SEED for s in derived.values())
        assert derived == seeds.role_seeds(seed)  # a pure function of the user's seed
    assert seeds.role_seed(0, "test") != seeds.role_seed(1, "test")
    with pytest.raises(ValueError, match="unknown campaign role"):
        seeds.role_seed(0, "training")


def test_protect_never_tests_on_the_validation_fault_sets(monkeypatch):
    """The reproduction: the campaigns `protect` and `evaluate_test` run, spied on; 200 trials of
    each role drawn at BER 1e-4 on LeNet-5's memory by the draw campaigns use. On the old code the
    test role's seed was the validation seed and every fault set was shared."""
    net = _lenet()
    train_set, test_set = data.load("digits", "train"), data.load("digits", "test")
    configs: dict[str, list[campaign.CampaignConfig]] = {}
    real = campaign.run_campaign

    def spy(model, inputs, labels, config, out, *args, **kwargs):
        configs.setdefault(out.parent.name, []).append(config)
        return real(model, inputs, labels, config, out, *args, **kwargs)

    monkeypatch.setattr(campaign, "run_campaign", spy)
    space = [c for c in P.candidates(restricts=[], corrections=[], weight_checks=False) if c.name == "none"]
    result = P.protect(net, *train_set.tensors, ber=1e-3, max_macs=1.15, trials=2, seed=7, space=space,
                       measure_latency=False)
    P.evaluate_test(result, *test_set.tensors, trials=2)
    P.evaluate_test(result, *test_set.tensors, trials=2, role="end_to_end")

    assert {c.seed for c in configs["validation"]} == {7}  # validation = the user's seed, as before
    role_config = {role: configs[role][0] for role in seeds.ROLES}
    assert result.config["fault_seeds"] == {role: c.seed for role, c in role_config.items()}
    assert result.test[result.chosen]["role"] == "end_to_end"
    assert result.test[result.chosen]["fault_seed"] == role_config["end_to_end"].seed

    memory = F.parameter_memory(_lenet())
    drawn = {role: {frozenset(draw_trial_faults(memory, config, BER, t).as_list()) for t in range(DRAWS)}
             for role, config in role_config.items()}
    assert all(len(sets) == DRAWS for sets in drawn.values())  # ~200 flips per trial: all distinct
    assert drawn["test"].isdisjoint(drawn["validation"])
    assert drawn["end_to_end"].isdisjoint(drawn["validation"])
    assert drawn["end_to_end"].isdisjoint(drawn["test"])
    # and the validation role draws exactly what a campaign with the user's seed draws
    plain = campaign.CampaignConfig(bers=(BER,), trials=DRAWS, seed=7)
    assert drawn["validation"] == {frozenset(draw_trial_faults(memory, plain, BER, t).as_list())
                                   for t in range(DRAWS)}


# --- item 3: intervals valid at every n -------------------------------------------------------------

P_BAD = 0.2
TRUE_MEAN = (1 - P_BAD) * 0.97 + P_BAD * 0.25  # 0.97 w.p. 0.8, else uniform(0, 0.5) (mean 0.25)


def _zero_inflated(rng: np.random.Generator, runs: int, n: int) -> np.ndarray:
    bad = rng.random((runs, n)) < P_BAD
    return np.where(bad, rng.uniform(0.0, 0.5, (runs, n)), 0.97)


@pytest.mark.parametrize("n", [10, 30])
def test_fixed_n_intervals_cover_a_zero_inflated_mean(n):
    """Coverage >= 93% over 250 seeded runs; never of zero width; always inside [0, 1]. The old
    Student-t interval covered ~89% at n = 10 (zero width whenever all 10 trials were benign)."""
    samples = _zero_inflated(np.random.default_rng(n), 250, n)
    intervals, methods = zip(*(fixed_n_ci(x, 0.95) for x in samples))
    low, high = np.array(intervals).T
    assert set(methods) == {CI_BETTING_FIXED}
    assert np.all(low >= 0.0) and np.all(high <= 1.0) and np.all(high > low)
    coverage = float(np.mean((low <= TRUE_MEAN) & (TRUE_MEAN <= high)))
    assert coverage >= 0.93, coverage


def test_identical_values_never_give_a_zero_width_interval():
    benign = [0.967] * 10
    _, _, (t_low, t_high) = mean_ci(benign)
    assert t_high - t_low < 1e-9  # the old interval: [0.967, 0.967]
    (low, high), method = fixed_n_ci(benign)
    assert method == CI_BETTING_FIXED and 0.0 <= low < 0.967 < high <= 1.0
    # above the size threshold too: zero observed variance falls back to the bounded interval
    (low, high), method = fixed_n_ci([0.967] * BOUNDED_CI_BELOW)
    assert method == CI_BETTING_FIXED and low < 0.967 < high
    assert needs_bounded_ci([0.5] * (BOUNDED_CI_BELOW - 2) + [0.6]) and \
        not needs_bounded_ci([0.5] * (BOUNDED_CI_BELOW - 1) + [0.6])
    (low, high), method = fixed_n_ci(np.random.default_rng(0).random(BOUNDED_CI_BELOW))
    assert method == CI_STUDENT_T and 0.0 <= low < high <= 1.0
    assert bounded_ci([]) == (0.0, 1.0)


def test_a_fixed_n_campaign_reports_a_bounded_interval(tiny_model, tiny_data, tmp_path):
    """5 fault-free trials (BER 1e-12): the old summary said [acc, acc] by Student-t."""
    x, y = tiny_data
    config = campaign.CampaignConfig(bers=(1e-12,), trials=5, seed=0)
    summary = campaign.run_campaign(tiny_model, x, y, config, tmp_path / "run", progress=False)
    row = summary["results"][0]
    assert summary["ci_method"] == row["ci_method"] == CI_BETTING_FIXED
    for key in ("accuracy_ci", "sdc_ci"):
        low, high = row[key]
        assert 0.0 <= low < high <= 1.0
    assert row["accuracy_ci"][0] < row["accuracy_mean"] < row["accuracy_ci"][1]


def test_paired_differences_get_a_bounded_interval():
    """Equal differences gave a zero-width interval; a few catastrophic pairs among 10 a
    t-interval past -1 (a difference of accuracies lies in [-1, 1])."""
    same = paired.paired_test([0.96] * 10, [0.962] * 10)
    low, high = same["ci"]
    assert same["ci_method"] == CI_BETTING_FIXED and -1.0 <= low < 0.002 < high <= 1.0
    assert same["p_t"] == same["p_sign"]
    base = [0.97] * 10
    crash = [0.0] * 3 + [0.97] * 7
    _, _, (t_low, _) = mean_ci(np.subtract(crash, base))
    assert t_low < -1.0 + 0.4  # the t-interval's reach (about -0.62 here): wide and symmetric
    result = paired.paired_test(base, crash)
    assert result["ci_method"] == CI_BETTING_FIXED and -1.0 <= result["ci"][0] < result["ci"][1] <= 1.0
    unpaired = paired.welch_test([0.5] * 10, [0.5] * 10)
    assert unpaired["ci_method"] == CI_BETTING_FIXED and unpaired["ci"][0] < 0.0 < unpaired["ci"][1]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        paired.paired_test([0.5, 1.5], [0.5, 0.5])


@pytest.mark.parametrize("n", [10, 30])
def test_paired_intervals_cover_a_zero_inflated_difference(n):
    """Differences of two zero-inflated variants (a protection that removes half the catastrophic
    trials): coverage >= 93% over 250 runs, never of zero width, inside [-1, 1]."""
    rng = np.random.default_rng(100 + n)
    base = _zero_inflated(rng, 250, n)
    fixed = np.where(rng.random((250, n)) < 0.5, 0.97, base)  # pairs share their trials
    true_difference = (0.97 - TRUE_MEAN) / 2
    hits = 0
    for a, b in zip(base, fixed):
        low, high = paired.paired_test(a, b)["ci"]
        assert -1.0 <= low < high <= 1.0
        hits += low <= true_difference <= high
    assert hits / 250 >= 0.93, hits / 250
