"""``ftcnn protect --target`` (issue 22, item 8): the search ranks candidates under the fault model its
user expects: parameters (memory), activations (datapath) or both at once. Under activation faults a
weight check protects nothing (its datapath is the unprotected one), so it must tie the unprotected
model trial by trial while restriction and output TMR mask faults; the campaigns record what they
attacked; test campaigns draw from the test role's stream; bad settings are one-line refusals."""

from __future__ import annotations

import json

import pytest

from ftcnn import checkpoint, data, train
from ftcnn.campaigns.seeds import role_seed
from ftcnn.protection import protect as P
from tests._helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TRIALS = 4
NAMES = ("none", "restrict_zero_m0.1", "weights_zero", "full_tmr")


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    info = data.info("digits")
    train.seed_everything(0)
    net = checkpoint.build("lenet5", num_classes=10, in_channels=info.in_channels, input_size=info.input_size)
    train.fit(net, data.load("digits", "train"), epochs=4, progress=False)
    path = tmp_path_factory.mktemp("protect_targets") / "lenet5.pt"
    checkpoint.save(net, path, data="digits")
    return checkpoint.load(path), path


def _space() -> list[P.Candidate]:
    by_name = {c.name: c for c in P.candidates(restricts=[("zero", 0.1)], corrections=[], codes=False)}
    return [by_name[n] for n in NAMES]


@pytest.fixture(scope="module")
def under_activations(lenet, tmp_path_factory):
    net, _ = lenet
    work = tmp_path_factory.mktemp("act")
    x, y = data.load("digits", "train").tensors
    result = P.protect(net, x, y, ber=3e-4, max_macs=3.5, trials=TRIALS, space=_space(), measure_latency=False,
                       race=False, work_dir=work, validation_inputs=120,
                       faults=P.FaultModel("activations"))
    return result, work


def test_under_activation_faults_a_weight_check_ties_the_unprotected_model(under_activations):
    result, work = under_activations
    by = {r["name"]: r for r in result.records}
    none, check = by["none"]["validation"], by["weights_zero"]["validation"]
    # the same datapath, the same faults (drawn per layer name and input): the same accuracy, trial by trial
    assert check["trial_accuracy"] == none["trial_accuracy"]
    # output TMR votes over three independently faulted replicas: it masks what the plain model loses
    assert by["full_tmr"]["validation"]["accuracy"] > none["accuracy"]
    assert result.config["target"] == "activations" and result.config["activation_ber"] is None
    assert "Conv2d/Linear output" in result.config["fault_model"]
    summary = json.loads((work / "validation" / "none" / "summary.json").read_text())
    assert summary["config"]["target"] == "activations" and summary["seed"] == role_seed(0, "validation")
    # activation faults are drawn per input: a fixed subset of 120 validation inputs, every input of it
    assert "inputs_per_trial" not in summary["config"]


def test_test_campaigns_attack_what_the_choice_was_made_under(under_activations, tmp_path):
    result, _ = under_activations
    x_test, y_test = data.load("digits", "test").tensors
    out = P.evaluate_test(result, x_test, y_test, trials=3, work_dir=tmp_path, inputs_per_trial=100)
    entry = out[result.chosen]
    assert entry["fault_seed"] == role_seed(0, "test") and entry["inputs_per_trial"] == 100
    summary = json.loads(next((tmp_path / "test").rglob("summary.json")).read_text())
    assert summary["config"]["target"] == "activations"


def test_under_both_the_memory_and_the_datapath_are_attacked(lenet, tmp_path):
    net, _ = lenet
    x, y = data.load("digits", "train").tensors
    space = [c for c in _space() if c.name in ("none", "weights_zero")]
    result = P.protect(net, x, y, ber=1e-3, max_macs=1.5, trials=TRIALS, space=space, measure_latency=False,
                       race=False, work_dir=tmp_path, validation_inputs=120, faults=P.FaultModel("both", 1e-4))
    summary = json.loads((tmp_path / "validation" / "weights_zero" / "summary.json").read_text())
    assert summary["config"]["target"] == "both" and summary["config"]["activation_ber"] == 1e-4
    assert result.config["target"] == "both" and result.config["activation_ber"] == 1e-4
    by = {r["name"]: r for r in result.records}
    # the weight check still masks the memory's faults: it is no worse than none, under both
    assert by["weights_zero"]["validation"]["accuracy"] >= by["none"]["validation"]["accuracy"]


@pytest.mark.parametrize("target, rate, match", [
    ("both", None, "--activation-ber is the datapath rate of --target both"),
    ("parameters", 1e-6, "--activation-ber is the datapath rate of --target both"),
    ("memory", None, "target"),
    ("both", 0.5, "--activation-ber"),
])
def test_bad_fault_models_are_one_line_refusals(target, rate, match):
    with pytest.raises(ValueError, match=match) as refused:
        P.FaultModel(target, rate)
    assert "\n" not in str(refused.value)


def test_cli_protect_refuses_a_stray_activation_rate_before_any_work(lenet, tmp_path):
    _, path = lenet
    r = run_cli("protect", str(path), "--activation-ber", "1e-6", "-o", str(tmp_path / "out"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--activation-ber is the datapath rate of --target both" in r.stderr
    assert not (tmp_path / "out").exists()
