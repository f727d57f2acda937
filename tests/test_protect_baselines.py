"""Issue 21, part A: the memory-fault baselines in ``protect`` and ``compare``, the memory budget,
and BatchNorm folded in the model ``protect`` builds.

Small untrained models on the built-in 8x8 digits and campaigns of two trials: what is checked is
which candidates exist, which are evaluated, which can be chosen, and what the written model holds,
not accuracies.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ftcnn
from ftcnn import checkpoint, data, files
from ftcnn.flows import compare
from ftcnn.injection import faults as F
from ftcnn.protection import cost, fold, protect as P
from tests._helpers import assert_one_line_refusal, cli_in_process

pytestmark = pytest.mark.usefixtures("one_thread")

BER = 1e-3
TRIALS = 2


def _lenet() -> nn.Module:
    torch.manual_seed(0)
    return ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8).eval()


def _resnet() -> nn.Module:
    """A small ResNet-20 whose BatchNorm statistics are far from their initial 0/1, as after training."""
    torch.manual_seed(0)
    net = ftcnn.build("resnet20", num_classes=10, in_channels=1, input_size=8, width=0.25).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 3 + 0.05)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "test")


def _space(*names: str) -> list[P.Candidate]:
    by_name = {c.name: c for c in P.candidates()}
    return [by_name[n] for n in names]


def test_the_candidates_hold_the_memory_baselines_with_their_families_and_codes():
    space = {c.name: c for c in P.candidates()}
    expected = {"weights_zero": ("weight check", None), "weight_tmr": ("weight TMR", "tmr3"),
                "ecc": ("ECC", "secded"), "parity": ("parity", "parity"), "full_tmr": ("full TMR", None)}
    for name, (family, code) in expected.items():
        cand = space[name]
        assert cand.baseline and cand.family == family and (cand.settings or {}).get("code") == code, cand
    # the codes behind the weight check are ordinary candidates (chosen on merit), alone and restricted
    coded = [c for c in space.values() if c.family.startswith("code + weight check")]
    assert {c.settings["code"] for c in coded} == {"parity_exponent", "secded"} and len(coded) == 4
    assert all(c.settings["check_weights"] == "zero" and not c.baseline for c in coded)
    assert sum("restrict" in c.settings for c in coded) == 2
    # the baselines share their names with `ftcnn compare`'s variants
    variants = {v.name: v for v in compare.default_variants()}
    for name in ("weight_tmr", "ecc", "parity"):
        assert variants[name].harden == space[name].settings
    without = [c.name for c in P.candidates(codes=False)]
    assert not any(n in without for n in ("weight_tmr", "ecc", "parity")) and "full_tmr" in without
    assert not any("code" in (c.settings or {}) for c in P.candidates(codes=False))


def test_a_baseline_over_the_memory_budget_is_evaluated_shown_and_never_chosen(digits):
    x, y = digits[0].tensors
    space = _space("none", "ecc", "weight_tmr")
    # without a memory limit both fit a MAC budget (decoding is shared by the batch): both eligible
    free = P.protect(_lenet(), x, y, ber=BER, trials=TRIALS, space=space, measure_latency=False, max_macs=2.0)
    assert all(r["within_budget"] for r in free.records)
    assert free.record("ecc")["memory_ratio"] > 1.10 and free.record("weight_tmr")["memory_ratio"] > 2.9
    limited = P.protect(_lenet(), x, y, ber=BER, trials=TRIALS, space=space, measure_latency=False,
                        max_macs=2.0, max_memory=1.10)
    assert limited.chosen == "none" and limited.config["max_memory"] == 1.10
    for name in ("ecc", "weight_tmr"):
        rec = limited.record(name)
        assert not rec["within_budget"] and rec["validation"] is not None and not rec["chosen"]
        assert rec["choice"]["why"].startswith("over budget")
    assert "memory <= x1.1" in limited.reason


def test_the_memory_budget_excludes_candidates_and_refuses_a_bad_ratio(digits):
    x, y = digits[0].tensors
    coded = P.Candidate("ecc_as_candidate", "ECC", {"ratio": 0.0, "code": "secded"})  # not a baseline
    result = P.protect(_lenet(), x, y, ber=BER, trials=TRIALS, space=[_space("none")[0], coded],
                       measure_latency=False, max_memory=1.05)
    rec = result.record("ecc_as_candidate")
    assert rec["built"] and not rec["within_budget"] and rec["validation"] is None
    with pytest.raises(ValueError, match="no candidate fits the budget.*memory <= x1.05"):
        P.protect(_lenet(), x, y, ber=BER, trials=TRIALS, space=[coded], measure_latency=False, max_memory=1.05)
    for bad, message in ((0.9, "below 1"), (float("nan"), "finite ratio"), (True, "finite ratio")):
        with pytest.raises(ValueError, match=message):
            P.check_budget(1.15, None, BER, 10, max_memory=bad)
    # the end-to-end pipeline's budgets are relative to the unpruned original: 0.9 is a goal there
    P.check_budget(1.0, None, BER, 10, max_memory=0.9, at_least_one=False)


@pytest.mark.parametrize("value, message", [("0.9", "below 1"), ("nan", "max_memory must be a finite ratio")])
def test_cli_protect_refuses_a_bad_memory_budget_in_one_line(tmp_path, monkeypatch, capsys, value, message):
    path = tmp_path / "lenet5.pt"
    checkpoint.save(_lenet(), path, data="digits")
    r = cli_in_process(monkeypatch, capsys, "protect", str(path), "--max-memory", value, "-o", str(tmp_path / "out"))
    assert_one_line_refusal(r, message)
    assert not (tmp_path / "out").exists()


def test_protect_folds_batchnorm_into_every_candidate_and_the_written_model(digits, tmp_path):
    train_set, test_set = digits
    net = _resnet()
    result = P.protect(net, *train_set.tensors, ber=BER, trials=TRIALS, space=_space("none", "weights_zero"),
                       measure_latency=False)
    folding = result.config["fold_bn"]
    assert folding["folded"] and len(folding["layers"]) == 21
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 21  # the user's model is untouched
    for name, model in result.models.items():  # the unprotected reference too
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), name
        coverage = F.memory_coverage(model, F.parameter_memory(model).stored)
        assert coverage["unattacked_memory"] == {} and coverage["unattacked_bits"] == 0, name
    # costs are relative to the folded model: the unprotected one costs exactly x1
    assert result.record("none")["memory_ratio"] == 1.0 and result.record("none")["macs_ratio"] == 1.0
    assert result.record("weights_zero")["memory_ratio"] > 1.0
    # the clean accuracy reported is the folded model's (the same function within float rounding)
    test = P.evaluate_test(result, *test_set.tensors, bers=[BER], trials=TRIALS)
    folded = fold.fold_batchnorm(net)
    x_test, y_test = test_set.tensors
    with torch.no_grad():
        assert test[result.chosen]["clean"] == (folded(x_test).argmax(1) == y_test).float().mean().item()
    paths = P.write_result(result, tmp_path / "out", data="digits")
    reloaded = checkpoint.load(paths["model"])
    kinds = [t["kind"] for t in checkpoint.get_spec(reloaded)["transforms"]]
    assert kinds == (["fold_bn"] if result.chosen == "none" else ["fold_bn", "harden"])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in reloaded.modules())
    with torch.no_grad():
        assert torch.equal(reloaded(x_test[:64]), result.model(x_test[:64]))


def test_protect_leaves_a_model_without_batchnorm_as_it_is(digits):
    x, y = digits[0].tensors
    net = _lenet()
    result = P.protect(net, x, y, ber=BER, trials=TRIALS, space=_space("none"), measure_latency=False)
    assert result.models["none"] is net and result.config["fold_bn"] == {"folded": False, "layers": {}}


def test_the_ablation_leaves_the_protection_memory_out_of_the_fault_space(digits, tmp_path):
    train_set, test_set = digits
    result = P.protect(_lenet(), *train_set.tensors, ber=BER, trials=TRIALS, space=_space("none", "weights_zero"),
                       measure_latency=False, max_macs=2.0)
    names = ["weights_zero"]
    attacked = P.evaluate_test(result, *test_set.tensors, names=names, bers=[BER], trials=TRIALS,
                               work_dir=tmp_path)
    spared = P.evaluate_test(result, *test_set.tensors, names=names, bers=[BER], trials=TRIALS,
                             work_dir=tmp_path, attack_protection=False)
    key = "weights_zero.protection_not_attacked"
    assert attacked["weights_zero"]["attack_protection"] and not spared[key]["attack_protection"]
    assert set(result.test) == {"weights_zero", key}  # both kept, under names ``ftcnn report`` reads
    memory = {folder: files.loads_strict((tmp_path / "test" / folder / "summary.json").read_text())["memory"]
              for folder in ("weights_zero", key)}
    assert memory["weights_zero"]["attack_protection"] and not memory[key]["attack_protection"]
    assert memory["weights_zero"]["fault_target_bits"] > memory[key]["fault_target_bits"]


def test_compare_builds_the_memory_baselines_and_reports_their_memory(digits, tmp_path):
    train_set, _ = digits
    net = _lenet()
    config = compare.CompareConfig(calibration_size=50)
    shape = tuple(train_set.tensors[0].shape[1:])
    nets = {"baseline": net}
    for variant in compare.default_variants():
        if variant.name in ("weight_tmr", "ecc", "parity"):
            nets[variant.name] = compare.build_variant(variant, net, {"layers": {}}, train_set, config, shape,
                                                       tmp_path)
            assert (tmp_path / f"{variant.name}.pt").is_file()
    measured = compare._measure_all(nets, shape, rounds=1)
    memory = {n: cost.relative(measured[n], measured["baseline"])["memory_bits"] for n in nets}
    assert memory["baseline"] == 1.0
    assert 1.12 < memory["ecc"] < 1.2 and 1.03 < memory["parity"] < 1.06 and 2.95 < memory["weight_tmr"] < 3.1
    x = train_set.tensors[0][:32]
    with torch.no_grad():  # fault-free, every code computes exactly what the model does
        for name, model in nets.items():
            assert torch.equal(model(x), net(x)), name


def test_pipeline_takes_the_memory_budget_only_in_its_end_to_end_mode(tmp_path, monkeypatch, capsys):
    r = cli_in_process(monkeypatch, capsys, "pipeline", str(tmp_path / "none.pt"), "--max-memory", "1.1",
                       "-o", str(tmp_path / "run"))
    assert_one_line_refusal(r, "--max-memory applies to the end-to-end mode: give --max-macs too")
    assert not (tmp_path / "run").exists()


def test_the_end_to_end_pipeline_hands_its_memory_budget_to_the_search(digits, tmp_path, monkeypatch):
    """prune_and_protect forwards max_memory to protect (checked where it is received)."""
    from ftcnn.flows import pipeline

    class Stop(Exception):
        pass

    seen = {}

    def fake_protect(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(P, "protect", fake_protect)
    train_set, test_set = digits
    with pytest.raises(Stop):
        pipeline.prune_and_protect(_lenet(), train_set, test_set, tmp_path / "run", prune_ratio=0.25,
                                   finetune_epochs=0, max_macs=1.0, max_memory=1.05, trials=5, samples=8,
                                   measure_latency=False)
    assert seen["max_memory"] == 1.05


def test_protect_confidence_sets_the_intervals_and_the_choice_level(digits):
    x, y = digits[0].tensors
    result = P.protect(_lenet(), x, y, ber=BER, trials=TRIALS, space=_space("none", "weights_zero"),
                       measure_latency=False, confidence=0.9)
    assert result.config["confidence"] == 0.9
    assert result.config["choice"]["alpha"] == pytest.approx(0.1)
    assert all(r["choice"]["confidence"] == pytest.approx(0.8) for r in result.records
               if r.get("choice") and r["choice"].get("confidence") is not None)
    with pytest.raises(ValueError, match="confidence"):
        P.protect(_lenet(), x, y, ber=BER, trials=TRIALS, space=_space("none"), measure_latency=False,
                  confidence=1.5)


def test_cli_protect_refuses_a_percentage_confidence_in_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "lenet5.pt"
    checkpoint.save(_lenet(), path, data="digits")
    r = cli_in_process(monkeypatch, capsys, "protect", str(path), "--confidence", "95", "-o", str(tmp_path / "out"))
    assert_one_line_refusal(r, "--confidence")
    assert not (tmp_path / "out").exists()
