"""Activation-fault campaigns wired in (issue 14, phase 2): ``ftcnn.run_campaign`` with
``target="activations"`` agrees with an independent plain computation (the documented draw
written out again with numpy, and a hand-run forward flipping bits on uint32 views); resume
gives identical numbers; ``ftcnn inject --target activations``, ``--config FILE`` and
``ftcnn compare --target activations`` through the CLI; bad campaign files fail in one line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ftcnn
from ftcnn import checkpoint
from ftcnn.campaigns import activations as A, campaign_file as CF, strata, trials
from ftcnn.flows import compare
from _helpers import run_cli, train_digits_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 5


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = small_cnn()(x).argmax(dim=1)          # labels the model mostly gets right
    flip = torch.randperm(n, generator=g)[: n // 10]
    y[flip] = (y[flip] + 1) % 10                  # ... but not all
    return x, y


# --- the documented draw, written out again (activations' module docstring) -----------------------

def plain_draw(layer: str, per_input_values: int, rate: float, trial: int, n_inputs: int,
               seed: int = SEED, block: int = 128) -> list[tuple[int, int, int]]:
    """(input, value, bit) sites of one layer: per block of 128 inputs, a numpy generator seeded by
    (domain, seed, trial, sha256(layer), the rate's bits, block) draws Binomial(128 * values * 32, rate)
    distinct positions, position = ((input * values) + value) * 32 + bit."""
    if rate == 0:
        return []
    layer_key = int.from_bytes(hashlib.sha256(layer.encode()).digest()[:8], "little")
    rate_key = int(np.float64(rate).view(np.uint64))
    per_input = per_input_values * 32
    sites = []
    for b in range((n_inputs + block - 1) // block):
        rng = np.random.default_rng(np.random.SeedSequence([0x41435431, seed, trial, layer_key, rate_key, b]))
        size = block * per_input
        k = int(rng.binomial(size, rate))
        for pos in sorted(rng.choice(size, size=k, replace=False).tolist()) if k else []:
            pos += b * size
            sample, rem = divmod(pos, per_input)
            if sample < n_inputs:
                sites.append((sample, rem // 32, rem % 32))
    return sites


def plain_accuracy(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, sites: dict) -> float:
    """The Sequential's children one by one, flipping the drawn bits of the faulted outputs in a
    numpy uint32 view, one site at a time; NaN/Inf logits count as wrong (a DUE)."""
    with torch.inference_mode():
        h = x
        for name, layer in model.named_children():
            h = layer(h)
            if sites.get(name):
                a = h.numpy().copy()
                u = a.reshape(a.shape[0], -1).view(np.uint32)
                for sample, value, bit in sites[name]:
                    u[sample, value] ^= np.uint32(1) << np.uint32(bit)
                h = torch.from_numpy(a)
    finite = torch.isfinite(h).all(dim=1)
    return float(((h.argmax(dim=1) == y) & finite).float().mean())


def stored(folder: Path) -> dict[tuple[float, int], tuple[int, float, list | None]]:
    db = sqlite3.connect(folder / "results.sqlite")
    rows = db.execute("SELECT point, trial, n_faults, accuracy, sites FROM trials").fetchall()
    db.close()
    return {(p, t): (n, acc, None if s is None else json.loads(s)) for p, t, n, acc, s in rows}


def test_campaign_agrees_with_a_plain_computation(tmp_path):
    model, (x, y) = small_cnn(), data(150)        # 150 inputs: two blocks, the second cut
    values = {"0": 4 * 8 * 8, "4": 16, "6": 10}   # per-input outputs of the Conv2d/Linear layers
    per_layer = {"6": 3e-4}                        # the logits layer at its own rate at every point
    config = ftcnn.CampaignConfig(bers=(2e-5, 3e-4), trials=4, seed=SEED, target="activations",
                                  ber_per_layer=per_layer)
    summary = ftcnn.run_campaign(model, x, y, config, tmp_path / "run", progress=False)
    assert summary["config"]["target"] == "activations"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["ber_per_layer"] == [["6", 3e-4]]
    rows = stored(tmp_path / "run")
    checked_sites = 0
    for row in summary["results"]:
        ber, accs = row["ber"], []
        for trial in range(4):
            rates = {name: per_layer.get(name, ber) for name in values}
            sites = {name: plain_draw(name, values[name], rates[name], trial, len(x)) for name in values}
            acc = plain_accuracy(model, x, y, sites)
            n_faults, stored_acc, stored_sites = rows[(ber, trial)]
            assert n_faults == sum(len(s) for s in sites.values())
            assert stored_acc == pytest.approx(acc, abs=1e-7), (ber, trial)
            if stored_sites is not None:            # (layer, input, value, bit) as stored
                assert sorted(map(tuple, stored_sites)) == sorted(
                    (name, *s) for name, layer_sites in sites.items() for s in layer_sites)
                checked_sites += 1
            accs.append(acc)
        assert row["accuracy_mean"] == pytest.approx(np.mean(accs), abs=1e-7)
        assert row["trials"] == 4
    assert checked_sites > 0
    assert any(v < summary["golden_accuracy"] for v in (r["accuracy_mean"] for r in summary["results"]))
    # the fault space is every bit of every hooked value of every input
    assert summary["memory"]["fault_target_bits"] == sum(values.values()) * 32 * len(x)


def test_resume_gives_identical_results(tmp_path):
    model, (x, y) = small_cnn(), data(60)

    def config(n: int) -> ftcnn.CampaignConfig:
        return ftcnn.CampaignConfig(bers=(1e-4, 1e-3), trials=n, seed=SEED, target="activations")

    ftcnn.run_campaign(model, x, y, config(3), tmp_path / "resumed", progress=False)
    resumed = ftcnn.run_campaign(model, x, y, config(6), tmp_path / "resumed", progress=False)
    fresh = ftcnn.run_campaign(model, x, y, config(6), tmp_path / "fresh", progress=False)
    assert resumed["results"] == fresh["results"]
    assert stored(tmp_path / "resumed") == stored(tmp_path / "fresh")
    # another fault target or mode is another campaign: refused, not mixed in
    with pytest.raises(ValueError, match="activation_mode"):
        ftcnn.run_campaign(model, x, y, ftcnn.CampaignConfig(bers=(1e-4, 1e-3), trials=6, seed=SEED,
                                                             target="activations", activation_mode="permanent"),
                           tmp_path / "resumed", progress=False)
    with pytest.raises(ValueError, match="target"):
        ftcnn.run_campaign(model, x, y, ftcnn.CampaignConfig(bers=(1e-4, 1e-3), trials=6, seed=SEED),
                           tmp_path / "resumed", progress=False)


def test_worker_processes_give_the_same_numbers(tmp_path):
    """distributed's workers build their runner with activations.campaign_runner too."""
    model, (x, y) = small_cnn(), data(60)
    config = ftcnn.CampaignConfig(bers=(1e-3,), trials=4, seed=SEED, target="activations")
    one = ftcnn.run_campaign(model, x, y, config, tmp_path / "one", progress=False)
    two = ftcnn.run_campaign(model, x, y, dataclasses.replace(config, workers=2, threads=2), tmp_path / "two",
                             progress=False)
    assert one["results"] == two["results"]
    assert stored(tmp_path / "one") == stored(tmp_path / "two")


def test_parameter_campaigns_keep_their_identity_and_summary_keys():
    config = ftcnn.CampaignConfig(bers=(1e-5,))
    for key in ("target", "activation_mode", "ber_per_layer"):
        assert key not in config.identity() and key not in config.recorded()
    act = ftcnn.CampaignConfig(bers=(1e-5,), target="activations")
    assert act.identity()["target"] == "activations" and act.recorded()["activation_mode"] == "transient"
    assert A.MODES == trials.ACTIVATION_MODES and A.DTYPES == trials.ACTIVATION_DTYPES
    assert "target" not in compare.CompareConfig().recorded()


@pytest.mark.parametrize("kwargs, match", [
    ({"target": "neurons"}, "fault target"),
    ({"activation_mode": "permanent"}, "activation faults only"),
    ({"precision": 0.01, "ber_per_layer": {"0": 1e-3}}, "one rate for every layer"),
    ({"target": "activations", "ber_per_layer": {"0": 2.0}}, "outside"),
    ({"target": "activations", "mode": "stuck0"}, "permanent"),
    ({"target": "activations", "dtype": "int8"}, "int8"),
    ({"target": "activations", "precision": 0.01, "ber_per_layer": {"0": 1e-4}}, "one rate for every layer"),
])
def test_config_refuses_what_does_not_apply(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ftcnn.CampaignConfig(bers=(1e-5,), **kwargs)


# --- through the CLI ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "lenet.pt"
    train_digits_model(path, epochs=10, threads=1)
    return path


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def _one_line_error(r) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr


def test_inject_target_activations_matches_the_api(digits_model, tmp_path):
    out = tmp_path / "inj"
    r = run_cli("inject", str(digits_model), "--target", "activations", "--ber", "1e-4",
                "--ber-per-layer", "features.0=0", "--trials", "3", "--limit", "100", "-o", str(out), threads="1")
    assert r.returncode == 0, r.stderr
    summary = _summary(out)
    assert summary["config"]["target"] == "activations"
    assert summary["config"]["ber_per_layer"] == [["features.0", 0.0]]
    from ftcnn import data as data_mod
    x, y = ftcnn.campaigns.campaign.stack_dataset(data_mod.load("digits", "test"))
    config = ftcnn.CampaignConfig(bers=(1e-4,), trials=3, target="activations",
                                  ber_per_layer={"features.0": 0.0}, device="cpu")
    api = ftcnn.run_campaign(checkpoint.load(digits_model), x[:100], y[:100], config, tmp_path / "api",
                             progress=False)
    assert api["results"] == summary["results"]


def test_inject_campaign_file(digits_model, tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "model.pt").write_bytes(Path(digits_model).read_bytes())  # a file names paths inside its folder
    (folder / "campaign.toml").write_text(f"""\
checkpoint = "model.pt"
data = "digits"
limit = 120
output = "out"                 # relative to this file's folder
target = "activations"
trials = 2
seed = 1

[ber_per_layer]
"classifier.4" = 1e-3
""")
    # run from another folder; --seed on the command line overrides the file's seed
    r = run_cli("inject", "--config", str(folder / "campaign.toml"), "--seed", "3", cwd=tmp_path, threads="1")
    assert r.returncode == 0, r.stderr
    summary = _summary(folder / "out")
    cfg = summary["config"]
    assert cfg["bers"] == [0.0] and cfg["seed"] == 3 and cfg["trials"] == 2 and cfg["inputs"] == 120
    assert cfg["ber_per_layer"] == [["classifier.4", 1e-3]]
    # only the logits layer is faulted (about 10 values x 32 bits x 120 inputs x 1e-3 = 38 flips a trial)
    rows = stored(folder / "out")
    assert len(rows) == 2 and all(sites is not None and n > 0 for n, _, sites in rows.values())
    assert {site[0] for _, _, sites in rows.values() for site in sites} == {"classifier.4"}
    # the example file is a valid campaign for these flags
    example = CF.inject_settings({"ber": [], "trials": "100", "checkpoint_path": "m.pt", "output": "o"},
                                 ("checkpoint_path", "output"), Path(__file__).parents[1] / "examples/campaign.toml")
    assert example.config.target == "activations" and example.config.trials is None


@pytest.mark.parametrize("text", ['ber = [1e-5\n', 'ber = "x"\n', 'bre = [1e-5]\n',
                                  'target = "activations"\nber = [1e-5]\ninclude_bn = true\n'])
def test_bad_campaign_file_is_one_line(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    _one_line_error(run_cli("inject", "--config", str(path), "-o", str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_cli_mistakes_are_one_line(digits_model, tmp_path):
    _one_line_error(run_cli("inject", str(digits_model), "--target", "activations", "--ber", "1e-4",
                            "--ber-per-layer", "features.0", "-o", str(tmp_path / "a")))
    _one_line_error(run_cli("inject", str(digits_model), "--ber", "1e-4", "--activation-mode", "permanent",
                            "-o", str(tmp_path / "b")))
    _one_line_error(run_cli("inject", "--ber", "1e-4", "-o", str(tmp_path / "c")))   # no checkpoint
    _one_line_error(run_cli("compare", str(digits_model), "--target", "neurons", "-o", str(tmp_path / "d")))


def test_compare_against_activation_faults(digits_model, tmp_path):
    out = tmp_path / "cmp"
    r = run_cli("compare", str(digits_model), "--target", "activations", "--variants", "baseline,restrict",
                "--trials", "3", "--ber", "1e-5", "1e-4", "--bit-trials", "0", "-o", str(out), threads="1")
    assert r.returncode == 0, r.stderr
    summary = _summary(out)
    assert summary["config"]["target"] == "activations"
    acc = {v["name"]: {row["ber"]: row["accuracy_mean"] for row in v["results"]} for v in summary["variants"]}
    # range restriction zeroes the huge values exponent flips make (phase 1: 88.5% vs 96.3% at 1e-4)
    assert acc["restrict"][1e-4] > acc["baseline"][1e-4] + 0.02, acc
    assert (out / "report.html").is_file()
    assert "activations" in (out / "report.html").read_text()
    ident = json.loads(sqlite3.connect(out / "campaigns" / "baseline" / "results.sqlite").execute(
        "SELECT value FROM meta WHERE key='identity'").fetchone()[0])
    assert ident["config"]["target"] == "activations"


def test_bit_sensitivity_against_activations(tmp_path):
    """One flip per inference (a permanent single site), per bit: bit 30 (exponent) flips do harm,
    bit 0 (mantissa) ones do not."""
    model, (x, y) = small_cnn(), data(60)
    config = compare.CompareConfig(bits=(0, 30), bit_trials=4, target="activations")
    rates = compare._bit_sensitivity(model, x, y, config, tmp_path / "bits")
    assert rates["0"] == 0.0 and rates["30"] > 0.0
    ident = json.loads(sqlite3.connect(tmp_path / "bits" / "bit30" / "results.sqlite").execute(
        "SELECT value FROM meta WHERE key='identity'").fetchone()[0])
    assert ident["config"]["activation_mode"] == "permanent" and ident["config"]["counts"] == [1]


# --- --precision for activation faults (issue 24): strata by the flipped exponent MSB ---------------

def test_stratified_draws_are_the_plain_model_conditioned_on_their_stratum():
    """A stratum's plan holds exactly its MSB flips (bit 30) and, for "faults, no MSB flip", at
    least one other; sorted per input; a pure function of (seed, point, stratum, index)."""
    runner = A.prepare(small_cnn(), *data(40), seed=SEED)
    layout = runner.memory.strata_layout()
    assert layout.names == tuple(runner.outputs) and layout.msb == 30
    assert layout.numels == tuple(o.numel * 40 for o in runner.outputs.values())   # every input's values
    msb_counts = {0: set(), 1: set(), 2: set(), 3: set()}
    for stratum in (0, 1, 2, 3):
        for index in range(20):
            plan = runner.draw_stratum(1e-4, index, stratum)
            bits = np.concatenate([lf.bit for lf in plan.layers.values()])
            msb_counts[stratum].add(int((bits == 30).sum()))
            if stratum == 1:
                assert len(bits) >= 1
            for lf in plan.layers.values():
                assert np.all(np.diff(lf.sample) >= 0) and np.all(lf.sample < 40)
            again = runner.draw_stratum(1e-4, index, stratum)
            assert again.as_list() == plan.as_list()
    assert msb_counts[0] == {0} and msb_counts[1] == {0} and msb_counts[2] == {1} and min(msb_counts[3]) >= 2
    assert runner.draw_stratum(1e-4, 0, 0).count == 0


def test_precision_intervals_cover_a_long_reference_run():
    """The two-stage stratified design on activation trials: its intervals cover the mean of a
    long plain run (600 trials) about as often as they say (25 runs at +-0.004, 95%), and the
    estimates centre on it."""
    model, (x, y) = small_cnn(), data(64)
    runner = A.prepare(model, x, y, seed=0)
    ber = 1e-5
    reference = float(np.mean([runner.run(ber, t)[1]["accuracy"] for t in range(600)]))
    weights = strata.weights(runner.memory.strata_layout(), ber)
    covered, means = 0, []
    for seed in range(25):
        other = dataclasses.replace(runner, seed=100 + seed)
        estimate = strata.precision_run(
            weights, lambda asked: [other.run(ber, i, h)[1]["accuracy"] for h, i in asked], 0.004,
            known={0: other.golden_metrics["accuracy"]})
        covered += estimate.low <= reference <= estimate.high
        means.append(estimate.mean)
    assert covered >= 22                                   # P(<= 21 of 25 | 95%) < 4%
    assert abs(np.mean(means) - reference) < 0.002        # about the reference's own noise x 5
    assert reference < runner.golden_metrics["accuracy"]   # faults did bite


def test_precision_campaign_runs_and_resumes(tmp_path):
    """``run_campaign`` with target activations and --precision: a stratified row per BER, and
    a resumed run recomputes the same row from the stored trials."""
    model, (x, y) = small_cnn(), data(40)
    config = ftcnn.CampaignConfig(bers=(1e-5, 1e-4), precision=0.02, seed=SEED, target="activations")
    assert config.inputs_per_trial is None                 # activation trials evaluate every input
    first = ftcnn.run_campaign(model, x, y, config, tmp_path / "run", progress=False)
    again = ftcnn.run_campaign(model, x, y, config, tmp_path / "run", progress=False)
    assert first["results"] == again["results"]
    for row in first["results"]:
        assert row["ci_method"] == strata.CI_STRATIFIED and row["precision"] == 0.02
        assert [s["stratum"] for s in row["strata"]] == list(strata.STRATUM_NAMES)
        assert row["accuracy_ci"][0] <= row["accuracy_mean"] <= row["accuracy_ci"][1]
        assert row["trials"] >= 3 * strata.PILOT
