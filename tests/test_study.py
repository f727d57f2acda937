"""``ftcnn study`` (issue 22): cells stored and resumed, claims tested per BER with Holm-corrected
paired tests, verdicts stated only when every seed holds them, prose generated from the tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from _helpers import assert_one_line_refusal, cli_in_process
from ftcnn import files
from ftcnn.campaigns import paired
from ftcnn.flows import study
from ftcnn.campaigns.seeds import role_seed

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(models=("lenet5",), data="digits", seeds=(0, 1), bers=(1e-3,), trials=5, epochs=1, finetune_epochs=1,
            latency_rounds=5)


class Killed(RuntimeError):
    """What the simulated kill raises mid-study."""


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, one_thread) -> dict:
    """A tiny study killed after two of its six cells, then rerun: what each run computed."""
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
    assert len(cells) == 6  # per seed: two claims at one BER, and the latency claim
    assert resumed["first"] == cells[:2]            # stored as they completed, before the kill
    assert resumed["second"] == cells[2:]           # the rerun skipped them
    assert resumed["third"] == []                   # a finished study computes nothing
    assert resumed["result"]["reused_cells"] == 2 and resumed["result"]["computed_cells"] == 4
    assert resumed["again"]["claims"] == resumed["result"]["claims"]  # the same numbers from the stored cells
    # what the study cost is said on its page even when every cell was reused: each cell keeps its own time
    again = resumed["again"]
    assert again["timed_cells"] == again["cells"] == 6 and again["computed_cells"] == 0
    assert again["cell_seconds"] == pytest.approx(resumed["result"]["cell_seconds"]) and again["cell_seconds"] > 0
    assert f"Compute time of the cells: {again['cell_seconds']:.0f} s in all (6 of 6 cells timed" in \
        (resumed["root"] / "results" / "study.md").read_text()


def test_every_claim_is_tested_per_ber_and_seed_with_the_test_roles_faults(resumed) -> None:
    result, root = resumed["result"], resumed["root"]
    assert [c["name"] for c in result["claims"]] == ["hardening_vs_tmr", "vulnerability_vs_l1_pruning",
                                                     "pruning_pays_for_hardening"]
    for claim in result["claims"][:2]:
        assert {(r["model"], r["seed"], r["ber"]) for r in claim["cells"]} == {("lenet5", 0, 1e-3), ("lenet5", 1, 1e-3)}
        for r in claim["cells"]:
            assert r["trials"] == 5 and r["verdict"] in (study.SUPPORTED, study.REFUTED, study.NO_POWER)
            assert 0.0 <= r["p_support_holm"] <= 1.0 and r["p_support_holm"] >= r["p_support"]
            low, high = r["difference_ci"]
            assert low < high  # never of zero width
        assert [r["of"] for r in claim["across_seeds"]] == [2]
    # both arms of a claim drew their faults from the test role's stream, not the validation seed
    for variant in ("harden_min", "tmr_full"):
        summary = json.loads((root / "run" / "lenet5" / "seed1" / "campaigns" / variant / "ber_1e-3" /
                              "summary.json").read_text())
        assert summary["seed"] == role_seed(1, "test") != 1


def test_resilience_is_the_drop_from_each_models_own_clean_accuracy(resumed) -> None:
    for claim in resumed["result"]["claims"][:2]:
        for r in claim["cells"]:
            assert r["drop_arm"] == pytest.approx(r["clean_arm"] - r["accuracy_arm"])
            assert r["mean_difference"] == pytest.approx(r["drop_arm"] - r["drop_reference"])


def test_every_number_in_the_prose_appears_in_the_generated_tables(resumed) -> None:
    text = (resumed["root"] / "results" / "study.md").read_text()
    tables, _, prose = text.partition(study.VERDICTS_HEADING)
    sentences = [line for line in prose.splitlines() if line.startswith("- ")]
    assert len(sentences) == 3  # one per claim, model and BER (latency: per model)
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
    for r in claim["cells"]:
        assert r["rounds"] == 5 and r["latency_arm_ms"] > 0 and r["latency_reference_ms"] > 0
        low, high = r["difference_ci"]
        assert -1 < low < high
        assert r["accuracy_kept"] == (r["clean_arm"] >= r["clean_reference"] - 0.003)
        if not r["accuracy_kept"]:  # "up to X% faster" means nothing when it cost clean accuracy
            assert r["verdict"] == study.UNEQUAL


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
])
def test_bad_options_are_one_line_refusals(monkeypatch, capsys, tmp_path: Path, args, match) -> None:
    r = cli_in_process(monkeypatch, capsys, "study", "--data", "digits", *args, "-o", str(tmp_path / "s"))
    assert_one_line_refusal(r, match)
    assert not (tmp_path / "s").exists()  # refused before any work
