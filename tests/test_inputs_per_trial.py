"""A block of inputs per trial (``inputs_per_trial``; ``--precision``'s default; issue 13).

A trial that evaluates one seeded random block of the split, chosen with
probability size / n, estimates the trial's accuracy on the whole split
without bias. These tests check that against an independent computation (the
same faults evaluated on every input, then the block's rows taken by hand),
that the blocks average to the whole exactly, that blocks are chosen in
proportion to their size, that the shortcut, the plain path and worker
processes give the same block trials, and that campaigns without the option
are what they were.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ftcnn.campaigns import campaign as C
from ftcnn.campaigns import trials as T
from ftcnn.campaigns.metrics import Golden, trial_metrics

BER = 3e-3


@pytest.fixture
def block_setup(tiny_model, tiny_data):
    x, y = tiny_data
    config = C.CampaignConfig(bers=(BER,), trials=10, seed=4, inputs_per_trial=7)
    return tiny_model, x, y, config


def test_block_trial_is_the_whole_evaluation_restricted_to_its_rows(block_setup) -> None:
    """Independent check: the same faults on every input (plain path, no blocks, the same input
    order), then the chosen block's rows picked out by hand, give the block trial's metrics."""
    model, x, y, config = block_setup
    runner = C.prepare(model, x, y, config)
    assert runner.blocks and runner.config.batch_size == 7
    order = np.random.default_rng(np.random.SeedSequence([config.seed, 0x424C4B, len(x)])).permutation(len(x))
    whole_config = C.CampaignConfig(bers=(BER,), trials=10, seed=4, shortcut=False, batch_size=7)
    whole = C.prepare(model, x[order], y[order], whole_config)
    checked = 0
    for trial in range(12):
        faults, metrics = runner.run(BER, trial)
        if faults.count == 0:
            assert metrics == whole.golden_metrics
            continue
        assert faults.as_list() == T.draw_trial_faults(whole.memory, whole_config, BER, trial).as_list()
        logits = whole.faulty_logits(faults)          # all inputs, plain path
        block = T.trial_block(config, BER, trial, None, len(x))
        rows = slice(7 * block, 7 * block + 7)
        expected = trial_metrics(logits[rows], Golden(whole.golden.labels[rows], whole.golden.predictions[rows]))
        assert metrics == expected
        assert torch.equal(runner.faulty_logits(faults, block), logits[rows])
        checked += 1
    assert checked >= 5


def test_blocks_average_to_the_whole_exactly(block_setup) -> None:
    """For one set of faults, the size-weighted mean of every block's accuracy is the accuracy on
    all inputs: what makes a uniformly-by-size chosen block unbiased."""
    model, x, y, config = block_setup
    runner = C.prepare(model, x, y, config)
    faults = next(f for t in range(20) if (f := T.draw_trial_faults(runner.memory, runner.config, BER, t)).count)
    n, m = len(x), 7
    blocks = range((n + m - 1) // m)
    total = sum(trial_metrics(runner.faulty_logits(faults, b),
                              Golden(runner.golden.labels[b * m:(b + 1) * m],
                                     runner.golden.predictions[b * m:(b + 1) * m]))["accuracy"]
                * min(m, n - b * m) for b in blocks)
    everything = trial_metrics(runner.faulty_logits(faults), runner.golden)["accuracy"]
    assert total / n == pytest.approx(everything, abs=1e-6)   # float32 means of 0/1 values
    assert len(x) % m != 0   # the uneven last block is part of the check


def test_blocks_are_chosen_in_proportion_to_their_size() -> None:
    config = C.CampaignConfig(bers=(1e-4,), trials=10, seed=1, inputs_per_trial=40)
    n = 100                                     # blocks of 40, 40 and 20
    picks = np.bincount([T.trial_block(config, 1e-4, t, None, n) for t in range(5000)], minlength=3)
    expected = np.array([0.4, 0.4, 0.2]) * 5000
    assert np.all(np.abs(picks - expected) < 4 * np.sqrt(expected))
    # a pure function of (seed, point, stratum, trial), apart from the faults' generator
    assert T.trial_block(config, 1e-4, 7, 2, n) == T.trial_block(config, 1e-4, 7, 2, n)
    assert len({T.trial_block(config, 1e-4, 7, h, n) for h in (None, 0, 1, 2, 3)}) > 1


def test_how_block_trials_run_does_not_change_them(block_setup, tmp_path) -> None:
    """Shortcut on or off, worker processes, batched-trial settings: the same block trials."""
    model, x, y, config = block_setup
    one = C.run_campaign(model, x, y, config, tmp_path / "one", progress=False)["results"]
    for name, settings in (("plain", {"shortcut": False}), ("workers", {"workers": 2}),
                           ("batched", {"batch_trials": 4})):
        other = C.run_campaign(model, x, y, C.CampaignConfig(**{**config.__dict__, **settings}),
                               tmp_path / name, progress=False)["results"]
        assert other == one, name


def test_precision_defaults_to_blocks_and_plain_campaigns_do_not_change(tiny_model, tiny_data) -> None:
    assert C.CampaignConfig(bers=(1e-5,), precision=0.01).inputs_per_trial == T.PRECISION_INPUTS_PER_TRIAL
    plain = C.CampaignConfig(bers=(1e-5,))
    assert plain.inputs_per_trial is None and "inputs_per_trial" not in plain.identity()
    assert C.CampaignConfig(bers=(1e-5,), inputs_per_trial=50).identity()["inputs_per_trial"] == 50
    # a block as large as the split is every input: the plain trials themselves
    x, y = tiny_data
    big = C.prepare(tiny_model, x, y, C.CampaignConfig(bers=(BER,), seed=4, inputs_per_trial=len(x)))
    ref = C.prepare(tiny_model, x, y, C.CampaignConfig(bers=(BER,), seed=4))
    assert not big.blocks
    assert [r.metrics for r in big.run_many([(BER, t) for t in range(6)])] == \
        [r.metrics for r in ref.run_many([(BER, t) for t in range(6)])]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="inputs per trial"):
            C.CampaignConfig(bers=(1e-5,), inputs_per_trial=bad)
    with pytest.raises(ValueError, match="parameter faults"):
        C.CampaignConfig(bers=(1e-5,), inputs_per_trial=10, target="activations")
