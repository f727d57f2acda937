"""Time-to-precision campaigns (``--precision``, ``ftcnn.campaigns.strata``; issue 13).

The coverage test follows tests/test_sequential.py: real trials are run once
into per-stratum pools (and a long plain reference), then 200 seeded runs of
the campaign's own procedure (``C.precision_stop``) draw their trials i.i.d.
from the pools, so the truth each run estimates is known exactly
(W_0 * golden + sum_h W_h * pool mean_h). The plain reference checks the
other half: that the stratified draws have the plain fault model's mean.
Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import sqlite3
import time

import numpy as np
import pytest
import torch

from ftcnn.campaigns import campaign as C
from ftcnn import checkpoint, data, train
from ftcnn.campaigns import strata
from ftcnn.injection import faults as F
from ftcnn.campaigns.metrics import mean_ci

BER = 1e-5            # LeNet-5/digits: 19% of trials hold an MSB flip, plain std ~0.21
PRECISION = 0.01
CONFIDENCE = 0.95
POOL = 600            # real trials per sampled stratum
PLAIN = 3000          # real plain trials of the reference
RUNS = 200



def _trained(name: str, spec: str, epochs: int, **kwargs) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    info = data.info(spec)
    train.seed_everything(0)
    net = checkpoint.build(name, num_classes=info.num_classes, in_channels=info.in_channels,
                           input_size=info.input_size, **kwargs)
    train.fit(net, data.load(spec, "train"), epochs=epochs, seed=0, progress=False)
    x, y = C.stack_dataset(data.load(spec, "test"))
    return net, x, y


@pytest.fixture(scope="module")
def lenet_trained(one_thread) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    return _trained("lenet5", "digits", 5)


@pytest.fixture(scope="module")
def lenet_runner(lenet_trained) -> C.TrialRunner:
    """The precision campaign's own runner: each trial on one block of 100 inputs (its default)."""
    net, x, y = lenet_trained
    return C.prepare(net, x, y, C.CampaignConfig(bers=(BER,), precision=PRECISION, seed=0))


@pytest.fixture(scope="module")
def lenet_plain_runner(lenet_trained) -> C.TrialRunner:
    """Plain trials on every input: the long reference."""
    net, x, y = lenet_trained
    return C.prepare(net, x, y, C.CampaignConfig(bers=(BER,), seed=0))


def _pools(runner: C.TrialRunner, ber: float, pool: int, plain: int,
           reference_runner: C.TrialRunner) -> dict[str, object]:
    """Real per-stratum outcomes (seed 0, as the campaign runs them: a block of inputs each)
    and a plain reference on every input (seed 0), with timings."""
    weights = strata.weights(strata.Layout.of(runner.memory, None), ber)
    pools, seconds = {}, {}
    for h in range(1, len(weights)):
        if weights[h] > 0:
            start = time.perf_counter()
            pools[h] = np.array([r.metrics["accuracy"] for r in runner.run_many([(ber, i, h) for i in range(pool)])])
            seconds[h] = (time.perf_counter() - start) / pool
    start = time.perf_counter()
    reference = np.array([r.metrics["accuracy"]
                          for r in reference_runner.run_many([(ber, t) for t in range(plain)])])
    plain_seconds = (time.perf_counter() - start) / plain
    golden = runner.golden_metrics["accuracy"]
    truth = weights[0] * golden + sum(weights[h] * pools[h].mean() for h in pools)
    return {"weights": weights, "pools": pools, "reference": reference, "truth": truth, "golden": golden,
            "seconds": seconds, "plain_seconds": plain_seconds}


@pytest.fixture(scope="module")
def lenet_pools(lenet_runner, lenet_plain_runner) -> dict[str, object]:
    return _pools(lenet_runner, BER, POOL, PLAIN, lenet_plain_runner)


def _resampling_fetch(pools: dict[int, np.ndarray], k: int):
    """Run ``k``'s trials: i.i.d. draws from each stratum's real pool (seeded)."""
    rng = np.random.default_rng([2026, k])

    def fetch(asked: list[tuple[int, int]]) -> list[float]:
        return [float(pools[h][rng.integers(len(pools[h]))]) for h, _ in asked]
    return fetch


def _coverage(runner: C.TrialRunner, p: dict[str, object], ber: float, runs: int) -> dict[str, float]:
    config = C.CampaignConfig(bers=(ber,), precision=PRECISION, confidence=CONFIDENCE)
    budget = C.trial_budget(config, runner.memory)
    stops = [C.precision_stop(config, runner.memory, ber, budget, _resampling_fetch(p["pools"], k), p["golden"])
             for k in range(runs)]
    truth = p["truth"]
    reference = p["reference"]
    ref_mean, ref_std, (ref_low, ref_high) = mean_ci(reference.tolist(), CONFIDENCE)
    # plain --trials auto on the same precision, on the plain reference's trials
    auto_config = C.CampaignConfig(bers=(ber,), trials=None, ci_half_width=PRECISION, confidence=CONFIDENCE)
    rng = np.random.default_rng(7)
    autos = [C.auto_stop(iter(reference[rng.integers(0, len(reference), 20_000)].tolist()), auto_config, budget)
             for _ in range(40)]
    # CPU estimate: trials x measured seconds per trial of each kind (golden trials cost ~0)
    strat_cpu = np.mean([sum((s.pilot[h] + s.trials[h]) * p["seconds"].get(h, 0.0) for h in range(len(s.weights)))
                         for s in stops])
    out = {
        "coverage": float(np.mean([s.low <= truth <= s.high for s in stops])),
        "estimates": float(np.mean([s.mean for s in stops])),
        "trials": float(np.mean([s.total for s in stops])),
        "half_width": float(np.mean([s.half_width for s in stops])),
        "narrow": float(np.mean([s.narrow for s in stops])),
        "auto_trials": float(np.mean([a.trials for a in autos])),
        "ref": (ref_mean, ref_low, ref_high, ref_std),
        "strat_cpu": float(strat_cpu),
        "auto_cpu": float(np.mean([a.trials for a in autos]) * p["plain_seconds"]),
    }
    print(f"\n{ber:g}: weights {np.round(p['weights'], 4).tolist()}; truth {truth:.4f}; plain reference "
          f"{len(reference)} trials {ref_mean:.4f} [{ref_low:.4f}, {ref_high:.4f}] std {ref_std:.4f}")
    print(f"stratified, {runs} runs at +-{PRECISION}: coverage {out['coverage']:.1%}, mean of estimates "
          f"{out['estimates']:.4f}, trials mean {out['trials']:.0f} (pilot included), mean half-width "
          f"{out['half_width']:.4f}, narrow {out['narrow']:.0%}")
    print(f"plain --trials auto, same precision: trials mean {out['auto_trials']:.0f}; ratio "
          f"{out['auto_trials'] / out['trials']:.1f}x fewer trials; est. CPU {out['auto_cpu']:.2f} s vs "
          f"{out['strat_cpu']:.2f} s ({out['auto_cpu'] / max(out['strat_cpu'], 1e-9):.1f}x; 1 thread, loaded machine)")
    return out


def test_stratified_runs_cover_and_need_fewer_trials(lenet_runner, lenet_pools) -> None:
    out = _coverage(lenet_runner, lenet_pools, BER, RUNS)
    ref_mean, ref_low, ref_high, _ = out["ref"]
    assert out["coverage"] >= 0.93
    assert ref_low <= out["estimates"] <= ref_high          # unbiased against the long plain run
    assert ref_low <= lenet_pools["truth"] <= ref_high      # the stratified draws have the plain mean
    assert out["trials"] * 3 <= out["auto_trials"]


def test_weights_are_the_plain_draws_frequencies(lenet_runner) -> None:
    """Strata frequencies of 4,000 plain draws agree with the exact weights (4 sigma)."""
    memory, layout = lenet_runner.memory, strata.Layout.of(lenet_runner.memory, None)
    ber = 3e-5
    weights = strata.weights(layout, ber)
    counts = np.zeros(4)
    n = 4000
    for t in range(n):
        faults = F.draw_faults(memory, np.random.default_rng([9, t]), ber=ber)
        msb = sum(int((bits == 30).sum()) for _, bits in faults.sites.values())
        counts[0 if faults.count == 0 else 1 if msb == 0 else 2 if msb == 1 else 3] += 1
    sigma = np.sqrt(weights * (1 - weights) / n)
    assert np.all(np.abs(counts / n - weights) <= 4 * sigma + 1e-12), (counts / n, weights)


def test_unprotected_lenet_measures_bit_30_catastrophic_and_keeps_its_draws(lenet_runner) -> None:
    """The pilot's single-flip pass (``strata.measure_sensitivity``) finds exactly bit 30 of the
    weights and of the biases catastrophic on LeNet-5/digits, so its strata, weights and draws
    are those of the bit-30 design (the numbers campaigns produced before stay byte-identical)."""
    memory = lenet_runner.memory
    assert memory.catastrophic.groups == {"weight": (30,), "bias": (30,)}
    assert memory.catastrophic.drops["weight"][30] > 0.3 and memory.catastrophic.drops["weight"][29] < 0.05
    layout = strata.Layout.of(memory, None)
    assert layout.hot is None and layout.msb == 30
    measured = [strata.draw_faults(memory, strata.trial_rng(0, 1e-4, h, i), 1e-4, h).as_list()
                for h in (1, 2, 3) for i in range(5)]
    sensitivity, memory.catastrophic = memory.catastrophic, None
    try:
        assert measured == [strata.draw_faults(memory, strata.trial_rng(0, 1e-4, h, i), 1e-4, h).as_list()
                            for h in (1, 2, 3) for i in range(5)]
    finally:
        memory.catastrophic = sensitivity


def test_stratum_draws_hold_what_their_stratum_says(lenet_runner) -> None:
    memory = lenet_runner.memory
    for h, check in ((1, lambda c, m: c >= 1 and m == 0), (2, lambda c, m: m == 1), (3, lambda c, m: m >= 2)):
        for i in range(50):
            rng = strata.trial_rng(0, 1e-4, h, i)
            faults = strata.draw_faults(memory, rng, 1e-4, h)
            msb = sum(int((bits == 30).sum()) for _, bits in faults.sites.values())
            assert check(faults.count, msb)
            for idx, bits in faults.sites.values():  # distinct (element, bit) sites
                assert len(set(zip(idx.tolist(), bits.tolist()))) == len(idx)
    again = strata.draw_faults(memory, strata.trial_rng(0, 1e-4, 2, 7), 1e-4, 2)
    first = strata.draw_faults(memory, strata.trial_rng(0, 1e-4, 2, 7), 1e-4, 2)
    assert again.as_list() == first.as_list()
    assert strata.draw_faults(memory, strata.trial_rng(0, 1e-4, 0, 0), 1e-4, 0).count == 0
    # bits without the MSB: only the first two strata exist
    layout = strata.Layout.of(memory, [0, 1, 2])
    assert layout.n_msb == 0 and strata.weights(layout, 1e-4)[2:].sum() == 0


def test_precision_campaign_commits_resumes_and_keeps_old_folders(lenet_runner, tmp_path) -> None:
    """Through ``run_campaign``: trials land in SQLite by (point, stratum, index), a second run
    recomputes the same summary from them, and a folder of an older ftcnn (no strata table)
    opens and gains one."""
    model, x = lenet_runner.model, lenet_runner.inputs
    y = lenet_runner.golden.labels
    config = C.CampaignConfig(bers=(1e-5,), precision=0.03, seed=1)
    first = C.run_campaign(model, x, y, config, tmp_path / "a", progress=False)
    row = first["results"][0]
    assert row["ci_method"] == strata.CI_STRATIFIED and row["narrow"]
    assert row["accuracy_ci"][0] <= row["accuracy_mean"] <= row["accuracy_ci"][1]
    assert row["accuracy_ci"][1] - row["accuracy_ci"][0] <= 2 * 0.03 + 1e-9
    db = sqlite3.connect(tmp_path / "a" / C.DB_NAME)
    stored = db.execute("SELECT COUNT(*) FROM strata_trials").fetchone()[0]
    plain = db.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
    db.close()
    assert stored == row["trials"] and plain == 0
    again = C.run_campaign(model, x, y, config, tmp_path / "a", progress=False)
    assert again["results"] == first["results"]
    # a plain campaign's folder (as older versions wrote it) takes a precision run too
    plain_config = C.CampaignConfig(bers=(1e-5,), trials=5, seed=1, inputs_per_trial=config.inputs_per_trial)
    C.run_campaign(model, x, y, plain_config, tmp_path / "b", progress=False)
    db = sqlite3.connect(tmp_path / "b" / C.DB_NAME)
    db.execute("DROP TABLE strata_trials")
    db.commit()
    db.close()
    assert C.run_campaign(model, x, y, config, tmp_path / "b", progress=False)["results"] == first["results"]


def test_how_trials_run_does_not_change_a_precision_run(tiny_model, tiny_data, tmp_path) -> None:
    """Batched trials and worker processes give the same stratified trials and summary."""
    x, y = tiny_data
    config = C.CampaignConfig(bers=(1e-3,), precision=0.05, seed=2)
    one = C.run_campaign(tiny_model, x, y, config, tmp_path / "one", progress=False)["results"]
    for name, settings in (("batched", {"batch_trials": 4}), ("workers", {"workers": 2})):
        other = C.run_campaign(tiny_model, x, y, C.CampaignConfig(**{**config.__dict__, **settings}),
                               tmp_path / name, progress=False)["results"]
        assert other == one, name


def test_precision_needs_ber_and_a_valid_value() -> None:
    with pytest.raises(ValueError, match="needs fault rates"):
        C.CampaignConfig(counts=(1,), precision=0.01)
    with pytest.raises(ValueError, match="precision"):
        C.CampaignConfig(bers=(1e-5,), precision=1.5)
    # precision is a stop rule, not identity: the same trials serve any precision
    a = C.CampaignConfig(bers=(1e-5,), precision=0.01).identity()
    assert a == C.CampaignConfig(bers=(1e-5,), precision=0.02).identity()


def test_cli_precision(tmp_path, digits_lenet5) -> None:
    """`ftcnn inject --precision` as a user runs it: stratified rows in summary.json."""
    import json

    from _helpers import run_cli
    model = digits_lenet5  # the run's shared LeNet-5 (conftest), read only
    r = run_cli("inject", str(model), "--data", "digits", "--ber", "1e-5", "--precision", "0.05", "--limit", "100",
                "-o", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "run" / "summary.json").read_text())["results"][0]
    assert row["ci_method"] == strata.CI_STRATIFIED and row["precision"] == 0.05 and len(row["strata"]) == 4
    r = run_cli("inject", str(model), "--data", "digits", "--count", "2", "--precision", "0.05",
                "-o", str(tmp_path / "bad"))
    assert r.returncode == 2 and "needs fault rates" in r.stderr


@pytest.mark.slow
def test_vgg11_stratified_runs_cover(one_thread) -> None:
    """The same coverage test on VGG-11 w0.25 (mnist5k padded to 3x32x32 as in
    benchmarks/peers.py, 2 epochs, 500 test inputs; minutes)."""
    xs, ys = data.load("mnist5k", "train").tensors
    train_set = torch.utils.data.TensorDataset(data.pad_to(xs, 32, 3), ys)
    train.seed_everything(0)
    net = checkpoint.build("vgg11", num_classes=10, in_channels=3, input_size=32, width=0.25)
    train.fit(net, train_set, epochs=2, seed=0, progress=False)
    x, y = data.load("mnist5k", "test").tensors
    x, y = data.pad_to(x[:500], 32, 3), y[:500]
    runner = C.prepare(net, x, y, C.CampaignConfig(bers=(1e-6,), precision=PRECISION, seed=0))
    p = _pools(runner, 1e-6, 200, 1000, C.prepare(net, x, y, C.CampaignConfig(bers=(1e-6,), seed=0)))
    out = _coverage(runner, p, 1e-6, RUNS)
    _, ref_low, ref_high, _ = out["ref"]
    assert out["coverage"] >= 0.93
    assert ref_low <= out["estimates"] <= ref_high
