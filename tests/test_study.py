"""``ftcnn study`` (issue 22): cells stored and resumed, claims tested per BER with Holm-corrected
paired tests, verdicts stated only when every seed holds them, prose generated from the tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from _helpers import assert_one_line_refusal, cli_in_process
from ftcnn import checkpoint, data, files, fingerprint, splits
from ftcnn.campaigns import paired
from ftcnn.flows import study
from ftcnn.campaigns.seeds import role_seed

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(models=("lenet5",), data="digits", seeds=(0, 1), bers=(1e-3,), activation_bers=(1e-4,), trials=5,
            epochs=1, finetune_epochs=1, latency_rounds=5, prune_grid=(0.4, 0.6))


class Killed(RuntimeError):
    """What the simulated kill raises mid-study."""


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, one_thread) -> dict:
    """A tiny study killed after two of its ten cells, then rerun: what each run computed."""
    root = tmp_path_factory.mktemp("study")
    config = study.StudyConfig(**TINY)
    computed: list[str] = []
    real = study.compute_cell

    def dies_after_two(cell, *args, **kwargs):
        if len(computed) == 2:
            raise Killed("killed mid-study")
        computed.append(cell.label)
        return real(cell, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(study, "compute_cell", dies_after_two)
        with pytest.raises(Killed):
            study.run_study(config, root / "run", root / "results")
        first = list(computed)
        computed.clear()
        mp.setattr(study, "compute_cell", lambda cell, *a, **k: computed.append(cell.label) or real(cell, *a, **k))
        result = study.run_study(config, root / "run", root / "results")
        second = list(computed)
        computed.clear()
        again = study.run_study(config, root / "run", root / "results")
    finally:
        mp.undo()
    return {"root": root, "config": config, "first": first, "second": second, "third": list(computed),
            "result": result, "again": again}


def test_a_killed_study_loses_nothing_and_a_rerun_computes_only_the_rest(resumed) -> None:
    cells = [c.label for c in study.plan(resumed["config"])]
    assert len(cells) == 10  # per seed: two claims at one rate of each fault target, and the latency claim
    assert resumed["first"] == cells[:2]            # stored as they completed, before the kill
    assert resumed["second"] == cells[2:]           # the rerun skipped them
    assert resumed["third"] == []                   # a finished study computes nothing
    assert resumed["result"]["reused_cells"] == 2 and resumed["result"]["computed_cells"] == 8
    assert resumed["again"]["claims"] == resumed["result"]["claims"]  # the same numbers from the stored cells
    # what the study cost is said on its page even when every cell was reused: each cell keeps its own time
    again = resumed["again"]
    assert again["timed_cells"] == again["cells"] == 10 and again["computed_cells"] == 0
    assert again["cell_seconds"] == pytest.approx(resumed["result"]["cell_seconds"]) and again["cell_seconds"] > 0
    assert f"Compute time of the cells: {again['cell_seconds']:.0f} s in all (10 of 10 cells timed" in \
        (resumed["root"] / "results" / "study.md").read_text()


def test_every_claim_is_tested_per_ber_and_seed_with_the_test_roles_faults(resumed) -> None:
    result, root = resumed["result"], resumed["root"]
    assert [c["name"] for c in result["claims"]] == ["hardening_vs_tmr", "vulnerability_vs_l1_pruning",
                                                     "pruning_pays_for_hardening"]
    for claim in result["claims"][:2]:
        assert {(r["model"], r["seed"], r["target"], r["ber"]) for r in claim["cells"]} == {
            ("lenet5", seed, target, rate) for seed in (0, 1)
            for target, rate in (("parameters", 1e-3), ("activations", 1e-4))}
        for r in claim["cells"]:
            assert r["trials"] == 5 and r["verdict"] in (study.SUPPORTED, study.REFUTED, study.NO_POWER)
            assert 0.0 <= r["p_support_holm"] <= 1.0 and r["p_support_holm"] >= r["p_support"]
            low, high = r["difference_ci"]
            assert low < high  # never of zero width
        # one Holm family per claim: both fault targets' cells (4 of them), so m = 4
        raw = [r["p_support"] for r in claim["cells"]]
        assert min(r["p_support_holm"] for r in claim["cells"]) == pytest.approx(min(1.0, 4 * min(raw)))
        assert [(r["target"], r["ber"], r["of"]) for r in claim["across_seeds"]] == [
            ("parameters", 1e-3, 2), ("activations", 1e-4, 2)]
    # both arms of a claim drew their faults from the test role's stream, not the validation seed, and each
    # fault target's campaign attacked what it names
    for variant in ("harden_min", "tmr_full"):
        for where, target in (("ber_1e-3", "parameters"), ("activations_ber_1e-4", "activations")):
            summary = json.loads((root / "run" / "lenet5" / "seed1" / "campaigns" / variant / where /
                                  "summary.json").read_text())
            assert summary["seed"] == role_seed(1, "test") != 1
            assert summary["config"].get("target", "parameters") == target


def test_an_activation_cell_matches_an_independent_computation_of_its_trials(resumed) -> None:
    """An activation cell's per-trial accuracies are those of ``activations.run_trial`` (no runner,
    no shortcut, no store: the plain draw-hook-evaluate path) on the stored arm and the test split, with
    the test role's seed, trial by trial."""
    from ftcnn.campaigns import activations, campaign

    root, config = resumed["root"], resumed["config"]
    cell = next(c for c in study.plan(config) if c.target == "activations" and c.seed == 1)
    stored = json.loads(cell.path(root / "run").read_text())
    x, y = campaign.stack_dataset(data.load("digits", "test"))
    for side, variant in (("arm", cell.claim.arm), ("reference", cell.claim.reference)):
        net = checkpoint.load(root / "run" / "lenet5" / "seed1" / "models" / f"{variant}.pt").eval()
        assert fingerprint.model_digest(net) == stored["model_digests"][side]
        for trial in range(config.trials):
            found = activations.run_trial(net, x, y, ber=cell.ber, seed=role_seed(1, "test"), trial=trial)
            assert found["accuracy"] == pytest.approx(stored["accuracy"][side][trial], abs=1e-12), (side, trial)
    # the faults did something: not every trial of both arms is the clean accuracy
    assert any(a != stored["clean"][s] for s in ("arm", "reference") for a in stored["accuracy"][s])


def test_resilience_is_the_drop_from_each_models_own_clean_accuracy(resumed) -> None:
    for claim in resumed["result"]["claims"][:2]:
        for r in claim["cells"]:
            assert r["drop_arm"] == pytest.approx(r["clean_arm"] - r["accuracy_arm"])
            assert r["mean_difference"] == pytest.approx(r["drop_arm"] - r["drop_reference"])


def test_every_number_in_the_prose_appears_in_the_generated_tables(resumed) -> None:
    text = (resumed["root"] / "results" / "study.md").read_text()
    tables, _, prose = text.partition(study.VERDICTS_HEADING)
    sentences = [line for line in prose.splitlines() if line.startswith("- ")]
    assert len(sentences) == 5  # one per claim, model, fault target and rate (latency: per model)
    number = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])")
    table_cells = {cell.strip() for line in tables.splitlines() if line.startswith("|")
                   for cell in re.split(r"[|\[\];,]", line)} | \
        {tok for line in tables.splitlines() if line.startswith("|") for tok in number.findall(line)}
    found = [n for s in sentences for n in number.findall(s)]
    assert found and all(n in table_cells for n in found), [n for n in found if n not in table_cells]
    json.loads((resumed["root"] / "results" / "study.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"study.json holds {c}: not strict JSON"))


def test_a_tampered_cell_is_recomputed_not_trusted(resumed, capsys) -> None:
    """A cell file is untrusted: one that passes its key but not its schema is recomputed (from the
    campaigns' stored trials), said in one line, never a traceback."""
    config, root = resumed["config"], resumed["root"]
    cell = study.plan(config)[0]
    path = cell.path(root / "run")
    hostile = json.loads(path.read_text())
    hostile["accuracy"]["arm"][0] = 7.5
    files.write_json(path, hostile, indent=None)
    key = {k: v for k, v in json.loads(study.pipeline.key_path(path).read_text()).items()
           if k != study.pipeline.CONTENT_FIELD}
    study.pipeline.store_key(path, key)  # re-signed: the key matches, the content is hostile
    capsys.readouterr()
    result = study.run_study(config, root / "run", root / "results")
    assert result["computed_cells"] == 1
    assert "must be a number in [0, 1]" in capsys.readouterr().err
    assert result["claims"] == resumed["result"]["claims"]


def test_the_latency_claim_is_paired_by_round_at_equal_clean_accuracy(resumed) -> None:
    claim = resumed["result"]["claims"][2]
    assert claim["kind"] == study.LATENCY and len(claim["cells"]) == 2
    timed = [r for r in claim["cells"] if r["tested"]]
    assert timed  # digits, 1 epoch: pruning 0.6 loses accuracy on the validation split, 0.4 keeps it
    for r in timed:
        assert r["rounds"] == 5 and r["latency_arm_ms"] > 0 and r["latency_reference_ms"] > 0
        low, high = r["difference_ci"]
        assert -1 < low < high
        assert r["accuracy_kept"] == (r["clean_arm"] >= r["clean_reference"] - 0.003)
        if not r["accuracy_kept"]:  # "up to X% faster" means nothing when it cost clean accuracy
            assert r["verdict"] == study.UNEQUAL


def test_claim_3s_ratio_is_the_largest_kept_on_the_validation_split(resumed) -> None:
    """Each seed's claim-3 cell holds its search (the grid, each tried ratio's validation accuracy, the
    chosen ratio); the chosen ratio is the largest of the grid within the tolerance on the validation
    split, its model is the one timed, and study.md shows it per seed."""
    config, root = resumed["config"], resumed["root"]
    claim = resumed["result"]["claims"][2]
    text = (root / "results" / "study.md").read_text()
    for r in claim["cells"]:
        search = r["search"]
        assert search["grid"] == [0.4, 0.6] and search["tolerance"] == config.accuracy_tolerance
        assert search["validation_inputs"] > 0 and search["validation_fraction"] == 0.2
        ratios = [t["ratio"] for t in search["tried"]]
        assert ratios == [0.6, 0.4][:len(ratios)]  # from the largest down
        kept = [t["ratio"] for t in search["tried"]
                if t["validation_accuracy"] >= search["reference_validation_accuracy"] - config.accuracy_tolerance]
        assert search["chosen"] == (kept[0] if kept else None) == r["prune_ratio"]
        assert [t["kept"] for t in search["tried"]] == [t["ratio"] in kept for t in search["tried"]]
        if kept:  # it stopped at the first kept ratio
            assert ratios[-1] == kept[0]
        assert f"| lenet5 | {r['seed']} | {search['chosen'] if kept else 'none'} |" in text
    assert any(r["prune_ratio"] is not None for r in claim["cells"])
    # the chosen model is the arm that was timed: built (and stored) by the comparison's own code
    r = next(r for r in claim["cells"] if r["prune_ratio"] is not None)
    folder = root / "run" / "lenet5" / f"seed{r['seed']}" / "models" / "prune_search" / f"ratio_{r['prune_ratio']!r}"
    arm = checkpoint.load(folder / "pruned_vuln_harden_min.pt")
    assert fingerprint.model_digest(arm) == r["model_digests"]["arm"] != r["model_digests"]["reference"]
    # the validation inputs: the stratified split of the training split (the test inputs never enter)
    train_x, train_y = data.load("digits", "train").tensors
    _, (_, y_val) = splits.validation_split(train_x, train_y, 0.2, r["seed"])
    assert len(y_val) == r["search"]["validation_inputs"] and set(y_val.tolist()) == set(train_y.tolist())


def test_claim_3_where_no_ratio_keeps_accuracy_times_nothing_and_says_so(tmp_path) -> None:
    """A grid whose every ratio loses validation accuracy: the cell holds the search and the
    reference's accuracy only, its verdict says why, the prose says no latency was timed, and a
    rerun reuses it."""
    config = study.StudyConfig(**{**TINY, "seeds": (0,), "prune_grid": (0.8,)})
    result = study.run_study(config, tmp_path / "run", tmp_path / "results")
    claim = result["claims"][2]
    [row] = claim["cells"]
    assert row["prune_ratio"] is None and not row["tested"] and row["verdict"] == study.NO_RATIO
    assert row["search"]["tried"][0]["ratio"] == 0.8 and not row["search"]["tried"][0]["kept"]
    assert row["mean_difference"] is None and row["p_support_holm"] is None and row["clean_arm"] is None
    assert claim["across_seeds"][0]["verdict"] == study.NO_RATIO
    stored = json.loads(study.Cell("lenet5", 0, study.claims(config)[2][0], None).path(tmp_path / "run").read_text())
    assert "latency_ms" not in stored and "arm" not in stored["clean"]
    text = (tmp_path / "results" / "study.md").read_text()
    assert "| lenet5 | 0 | none |" in text and "no latency was timed" in text and study.NO_RATIO in text
    json.loads((tmp_path / "results" / "study.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"study.json holds {c}: not strict JSON"))
    again = study.run_study(config, tmp_path / "run", tmp_path / "results")
    assert again["computed_cells"] == 0 and again["claims"] == result["claims"]


def test_a_tampered_search_is_recomputed_not_trusted(resumed, capsys) -> None:
    """A claim-3 cell whose search does not follow the rule (a chosen ratio that is not the first
    kept one) is recomputed, said in one line."""
    config, root = resumed["config"], resumed["root"]
    cell = next(c for c in study.plan(config) if c.claim.kind == study.LATENCY)
    path = cell.path(root / "run")
    hostile = json.loads(path.read_text())
    hostile["search"]["chosen"] = 0.6 if hostile["search"]["chosen"] != 0.6 else 0.4
    files.write_json(path, hostile, indent=None)
    key = {k: v for k, v in json.loads(study.pipeline.key_path(path).read_text()).items()
           if k != study.pipeline.CONTENT_FIELD}
    study.pipeline.store_key(path, key)
    capsys.readouterr()
    result = study.run_study(config, root / "run", root / "results")
    assert result["computed_cells"] == 1
    assert "search: its chosen ratio is not the first kept one" in capsys.readouterr().err
    assert [r["search"]["chosen"] for r in result["claims"][2]["cells"]] == \
        [r["search"]["chosen"] for r in resumed["result"]["claims"][2]["cells"]]


# --- the ratio search -----------------------------------------------------------------------------

def test_the_search_picks_the_largest_kept_ratio_of_a_monotone_accuracy() -> None:
    calls: list[float] = []

    def accuracy(ratio: float) -> float:  # loses 2 points per 0.1 of pruning past 0.3
        calls.append(ratio)
        return 0.95 - max(0.0, ratio - 0.3) * 0.2

    chosen, tried = study.largest_kept_ratio([0.1, 0.2, 0.3, 0.4, 0.5], accuracy, reference=0.95, tolerance=0.003)
    assert chosen == 0.3 and calls == [0.5, 0.4, 0.3]  # from the largest down, stopped at the first kept
    assert [(r, k) for r, _, k in tried] == [(0.5, False), (0.4, False), (0.3, True)]
    # within the tolerance, one-sided: 0.4 loses 0.2 point <= 0.3 and is kept; more accurate always keeps
    assert study.largest_kept_ratio([0.4, 0.1], lambda r: 0.948 if r == 0.4 else 0.99, 0.95, 0.003)[0] == 0.4
    assert study.largest_kept_ratio([0.1, 0.2], lambda r: 0.5, 0.95, 0.003) == (
        None, [(0.2, 0.5, False), (0.1, 0.5, False)])  # none kept: every ratio tried


def test_the_search_picks_the_largest_kept_ratio_of_a_non_monotone_accuracy() -> None:
    """Validation noise makes accuracy against ratio non-monotone at the boundary: 0.6 keeps, 0.5
    does not, 0.3 and below keep. Bisection over 0.1..0.8 (probing 0.5 first) would answer 0.4 or
    lower; the search answers 0.6, the largest kept, as defined."""
    values = {0.1: 0.95, 0.2: 0.95, 0.3: 0.951, 0.4: 0.94, 0.5: 0.93, 0.6: 0.949, 0.7: 0.90, 0.8: 0.80}
    chosen, tried = study.largest_kept_ratio(list(values), values.__getitem__, reference=0.95, tolerance=0.003)
    assert chosen == 0.6 and [r for r, _, _ in tried] == [0.8, 0.7, 0.6]
    assert all(values[r] < 0.95 - 0.003 for r in values if r > chosen)  # no larger ratio keeps
    # the grid's order does not matter
    assert study.largest_kept_ratio([0.3, 0.8, 0.6, 0.1], values.__getitem__, 0.95, 0.003)[0] == 0.6


@pytest.mark.parametrize("grid, match", [
    ((), "--prune-grid needs at least one pruning ratio"),
    ((0.5, 1.0), "--prune-grid ratio 1 must lie in (0, 1)"),
    ((0.0, 0.5), "--prune-grid ratio 0 must lie in (0, 1)"),
    ((-0.2,), "--prune-grid ratio -0.2 must lie in (0, 1)"),
    ((float("nan"),), "--prune-grid ratio nan must lie in (0, 1)"),
    ((0.3, 0.3), "--prune-grid names a ratio twice"),
    (("0.3",), "--prune-grid ratio '0.3' is not a number"),
    ((True,), "--prune-grid ratio 'True' is not a number"),
    (0.3, "--prune-grid must be a list of ratios"),
    (tuple(i / 1000 for i in range(1, 200)), "--prune-grid holds 199 ratios; at most 100"),
])
def test_a_bad_grid_is_a_one_line_refusal(grid, match) -> None:
    with pytest.raises(ValueError) as refused:
        study.StudyConfig(**{**TINY, "prune_grid": grid})
    assert match in str(refused.value) and "\n" not in str(refused.value)


def test_a_bad_validation_fraction_is_a_one_line_refusal() -> None:
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"--validation-fraction must lie in \(0, 1\)"):
            study.StudyConfig(**{**TINY, "validation_fraction": fraction})


def test_claim_3s_cell_key_holds_the_grid_and_tolerance_and_claims_1_and_2_keep_theirs() -> None:
    """A new grid, tolerance or validation fraction recomputes claim 3's cells only; claims 1 and 2's
    keys are what they were (their stored cells resume); claim 3 no longer depends on prune_ratio."""
    digests = {"train": "t", "test": "u"}
    config = study.StudyConfig(**TINY)
    cells = study.plan(config)
    keys = {c: study.cell_key(c, config, digests) for c in cells}
    for changed in ({"prune_grid": (0.2, 0.4)}, {"accuracy_tolerance": 0.01}, {"validation_fraction": 0.3}):
        other = study.StudyConfig(**{**TINY, **changed})
        for c in cells:
            assert (study.cell_key(c, other, digests) != keys[c]) == (c.claim.kind == study.LATENCY), (changed, c)
    other = study.StudyConfig(**{**TINY, "prune_ratio": 0.5})  # claim 1's key held it before, and still does
    assert [study.cell_key(c, other, digests) == keys[c] for c in cells] == \
        [c.claim.kind == study.LATENCY for c in cells]
    latency = next(c for c in cells if c.claim.kind == study.LATENCY)
    assert keys[latency]["prune_grid"] == [0.4, 0.6] and keys[latency]["accuracy_tolerance"] == 0.003
    faults = next(c for c in cells if c.claim.name == "hardening_vs_tmr")
    # a parameter cell's key is the one it was first stored under (the reported study's cells resume);
    # an activation cell's adds what its faults hit, so the two never share a key or a file
    assert set(keys[faults]) == {"format", "model", "width", "epochs", "seed", "data", "train data", "test data",
                                 "harden_ratio", "prune_ratio", "finetune_epochs", "claim", "arm", "reference",
                                 "ber", "trials", "fault seed"}
    datapath = next(c for c in cells if c.claim.name == "hardening_vs_tmr" and c.target == "activations")
    assert keys[datapath] == {**{k: v for k, v in keys[faults].items() if k != "ber"}, "ber": 1e-4,
                              "target": "activations", "activation_mode": "transient"}
    assert faults.path(Path("r")).name == "ber_1e-3.json" and datapath.path(Path("r")).name == \
        "activations_ber_1e-4.json"


def test_a_cell_without_a_ratio_is_no_member_of_the_holm_family() -> None:
    tested = {**_row(0, -0.1, (-0.2, -0.05), 0.02, 0.98), "tested": True, "accuracy_kept": True}
    untested = {"seed": 1, "mean_difference": None, "difference_ci": None, "p_support": None, "p_refute": None,
                "tested": False, "accuracy_kept": None}
    study.verdicts([tested, untested], margin=0.0, alpha=0.05)
    assert tested["p_support_holm"] == pytest.approx(0.02) and tested["verdict"] == study.SUPPORTED  # m = 1
    assert untested["verdict"] == study.NO_RATIO and untested["p_support_holm"] is None
    summary = study.across_seeds([tested, untested])
    assert summary["mean_difference"] == pytest.approx(-0.1) and summary["spread"] is None
    assert summary["verdict"] == study.NO_POWER and summary["holding"] == 1


def test_the_upfront_estimate_counts_only_what_is_left() -> None:
    import torch

    config = study.StudyConfig(**TINY)
    x = torch.zeros(50, 1, 8, 8)
    cells = study.plan(config)
    some, none = study.upfront_estimate(config, x, 200, cells), study.upfront_estimate(config, x, 200, [])
    assert some.startswith("expected: at most") and f"{len(cells)} cells" in some
    assert none.startswith("expected: at most") and "0 cells" in none


# --- the statistics -------------------------------------------------------------------------------

def test_holm_against_a_hand_computed_example() -> None:
    # sorted 0.01, 0.02, 0.03, 0.04 (m = 4): 4*0.01 = 0.04, 3*0.02 = 0.06, 2*0.03 = 0.06, 1*0.04 = 0.04 -> running max
    assert paired.holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])


def test_sign_flip_test_exact_against_a_hand_computed_example() -> None:
    # d = 1, 2, 3: the 8 sign vectors give sums 6, 4, 2, 0, 0, -2, -4, -6
    assert paired.sign_flip_test([1, 2, 3]) == pytest.approx(2 / 8)
    assert paired.sign_flip_test([1, 2, 3], alternative="greater") == pytest.approx(1 / 8)
    assert paired.sign_flip_test([1, 2, 3], alternative="less") == pytest.approx(1.0)
    # against a margin: d - 2 = -1, 0, 1 is symmetric, so no evidence either way
    assert paired.sign_flip_test([1, 2, 3], null=2.0, alternative="greater") == pytest.approx(6 / 8)
    assert paired.sign_flip_test([0.0] * 5) == 1.0
    assert np.isnan(paired.sign_flip_test([]))


def test_sign_flip_test_sampled_past_the_exact_size() -> None:
    d = [0.1] * 30  # only the identity sign vector reaches the observed mean: p = 1 / (1 + permutations)
    assert paired.sign_flip_test(d, alternative="greater", permutations=999) == pytest.approx(1 / 1000)
    rng = np.random.default_rng(3)
    noise = rng.normal(0.0, 1.0, 40)
    p = paired.sign_flip_test(noise, permutations=2000, seed=1)
    assert p == paired.sign_flip_test(noise, permutations=2000, seed=1) and 0.05 < p <= 1.0
    with pytest.raises(ValueError, match="alternative"):
        paired.sign_flip_test(d, alternative="bigger")


def _row(seed: int, mean: float, ci: tuple[float, float], p_support: float, p_refute: float) -> dict:
    return {"seed": seed, "mean_difference": mean, "difference_ci": list(ci), "p_support": p_support,
            "p_refute": p_refute}


def test_a_verdict_needs_the_corrected_test_and_the_interval() -> None:
    rows = [_row(0, 0.20, (0.10, 0.30), 0.99, 0.001),   # refuted: significant after Holm, interval above
            _row(1, 0.20, (-0.50, 0.80), 0.99, 0.01),   # significant, but the interval spans the margin
            _row(2, -0.05, (-0.08, -0.02), 0.02, 0.98)]  # Holm: 3 x 0.02 = 0.06 >= 0.05
    study.verdicts(rows, margin=0.0, alpha=0.05)
    assert [r["verdict"] for r in rows] == [study.REFUTED, study.NO_POWER, study.NO_POWER]
    assert [r["p_support_holm"] for r in rows] == pytest.approx([1.0, 1.0, 0.06])  # 2 x 0.99 capped at 1
    assert [r["p_refute_holm"] for r in rows] == pytest.approx([0.003, 0.02, 0.98])


def test_across_seeds_a_verdict_is_stated_only_when_every_seed_holds_it() -> None:
    def cell(seed: int, verdict: str, mean: float) -> dict:
        return {**_row(seed, mean, (mean - 0.1, mean + 0.1), 0.5, 0.5), "verdict": verdict}

    held = study.across_seeds([cell(0, study.REFUTED, 0.1), cell(1, study.REFUTED, 0.3), cell(2, study.REFUTED, 0.2)])
    assert held["verdict"] == study.REFUTED and (held["holding"], held["of"]) == (3, 3)
    assert held["mean_difference"] == pytest.approx(0.2) and held["spread"] == pytest.approx(0.1)
    assert len(held["seed_cis"]) == 3
    partial = study.across_seeds([cell(0, study.SUPPORTED, 0.1), cell(1, study.NO_POWER, 0.0)])
    assert partial["verdict"] == study.NO_POWER and partial["holding"] == 1
    split = study.across_seeds([cell(0, study.SUPPORTED, -0.1), cell(1, study.REFUTED, 0.1)])
    assert split["verdict"] == study.DISAGREE


# --- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, match", [
    (("--models", "lenet6"), "unknown model 'lenet6'"),
    (("--models", "lenet5", "lenet5"), "--models names a model twice"),
    (("--seeds", "0", "0"), "--seeds names a seed twice"),
    (("--seeds", "-1"), "--seeds"),
    (("--trials", "1"), "--trials must be >= 2"),
    (("--ber", "0"), "--ber 0"),
    (("--prune-ratio", "1.5"), "--prune-ratio"),
    (("--tmr-margin", "5"), "--tmr-margin"),
    (("--alpha", "0"), "--alpha"),
    (("--latency-rounds", "1"), "--latency-rounds"),
    (("--data", "nosuchset"), "nosuchset"),
    (("--targets", "memory"), "unknown fault target 'memory'; choose from parameters, activations"),
    (("--targets", "both"), "unknown fault target 'both'"),
    (("--targets", "activations", "activations"), "--targets names a target twice"),
    (("--activation-ber", "0"), "--activation-ber 0"),
    (("--activation-ber", "1e-6", "2"), "--activation-ber"),
])
def test_bad_options_are_one_line_refusals(monkeypatch, capsys, tmp_path: Path, args, match) -> None:
    r = cli_in_process(monkeypatch, capsys, "study", "--data", "digits", *args, "-o", str(tmp_path / "s"))
    assert_one_line_refusal(r, match)
    assert not (tmp_path / "s").exists()  # refused before any work
