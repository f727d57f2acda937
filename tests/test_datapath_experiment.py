"""experiments/datapath.py (issue 22, item 8): protections under activation faults beside memory
faults. A small LeNet-5 on the 8x8 digits, a fake protect cell in tmp_path, a few trials: the page
has every row, every row's campaign draws from the test role's seed and the same faults, output
TMR's replicas are each attacked, and every number on the page is the computed summaries'."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ftcnn import checkpoint, data, files
from ftcnn.campaigns import campaign, paired, seeds
from ftcnn.flows import pipeline
from ftcnn.protection import cost, hardening, protect as P

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
ROWS = (("unprotected", "none"), ("output TMR", "full_tmr"), ("weight TMR", "weight_tmr"), ("ECC", "ecc"),
        ("parity", "parity"), ("bounds alone", "weights_zero"), ("chosen", "weights_zero"))
RATES = ("1e-06", "3e-06")  # few enough faults per trial that every site is stored (trials.SITES_KEPT)
TRIALS = 4


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("datapath_experiment", ROOT / "experiments" / "datapath.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


D = _load_script()


def _fake_cell(cells: Path, seed: int = 0) -> dict[str, Any]:
    """``cells/tiny``: a trained model, a cell at 1e-4 with distinctive memory numbers, and its
    protect folder (front.json with the config protect records, protected.pt of the chosen)."""
    folder = cells / "tiny"
    net = pipeline.train_or_load(folder / "model.pt", "lenet5", "digits", epochs=2, width=0.5, seed=seed).eval()
    deployed, _ = P.deployed_form(net)
    rows = [{"row": label, "candidate": cand, "clean": 0.9, "accuracy": 0.4 + i / 100 + 0.0012,
             "accuracy_ci": [0.3 + i / 100, 0.5 + i / 100], "trials": 7} for i, (label, cand) in enumerate(ROWS)]
    cell = {"settings": {"model": "tiny", "data": "digits", "seed": seed, "test_trials": 7,
                         "test_inputs_per_trial": None},
            "model": "tiny", "ber": 1e-4, "chosen": "weights_zero", "rows": rows, "test_role": "test",
            "test_fault_seed": seeds.role_seed(seed, "test"), "fold_bn": {"folded": False}}
    files.write_json(folder / "cell_0.0001.json", cell)
    protect_dir = files.make_folder(folder / "ber_0.0001" / "protect")
    chosen = hardening.harden(deployed, ratio=0.0, check_weights="zero")
    checkpoint.save(chosen, protect_dir / "protected.pt", protection="weights_zero")
    ecc = hardening.harden(deployed, ratio=0.0, code="secded")
    front = {"format": "ftcnn-protect/1", "chosen": "weights_zero",
             "config": {"validation_fraction": 0.2, "calibration_size": 50, "seed": seed},
             "candidates": [{"name": "ecc", "memory_bits": cost.memory_bits(ecc)},
                            *({"name": c} for c in ("none", "full_tmr", "weight_tmr", "parity", "weights_zero"))]}
    files.write_json(protect_dir / "front.json", front)
    return cell


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("datapath")
    cell = _fake_cell(tmp / "cells")
    out, page = tmp / "out", tmp / "datapath.md"
    rc = D.main(["--cells", str(tmp / "cells"), "--out", str(out), "--results", str(page), "--trials", str(TRIALS),
                 "--act-bers", *RATES])
    assert rc == 0
    result = json.loads((out / "tiny" / "datapath_0.0001.json").read_text())
    work = out / "tiny" / "ber_0.0001" / f"test_{'_'.join(RATES)}_t{TRIALS}"
    return {"tmp": tmp, "cell": cell, "page": page.read_text(), "result": result, "work": work}


def _table_lines(page: str) -> dict[str, str]:
    lines = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("| row ")]
    return {line.split(" | ")[0][2:]: line for line in lines}


def _trials(folder: Path) -> list[tuple[float, int, int, float, str | None]]:
    db = sqlite3.connect(f"{(folder / campaign.DB_NAME).resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute("SELECT point, trial, n_faults, accuracy, sites FROM trials ORDER BY point, trial").fetchall()
    finally:
        db.close()


def _identity_seed(folder: Path) -> int:
    db = sqlite3.connect(f"{(folder / campaign.DB_NAME).resolve().as_uri()}?mode=ro", uri=True)
    try:
        return json.loads(db.execute("SELECT value FROM meta WHERE key='identity'").fetchone()[0])["config"]["seed"]
    finally:
        db.close()


def test_table_has_every_row_in_the_cells_order(run):
    table = _table_lines(run["page"])
    assert list(table) == [label for label, _ in ROWS]
    assert "## tiny" in run["page"] and "### Verdict" in run["page"]
    for label, cand in ROWS:
        assert table[label].split(" | ")[1] == cand
        # memory, each rate (with its paired difference), and both at once (with its paired difference)
        assert table[label].count("[") == 1 + 2 * (len(RATES) + 1) - (len(RATES) + 1 if label == "unprotected" else 0)


def test_rows_share_seed_and_fault_draws(run):
    """Every row's campaign has the test role's seed; trial i of every row holds the same faults on the
    layers they share (all at X.original), and TMR adds its two replicas' own faults."""
    folders = {label: run["work"] / D.slug(label) for label, _ in ROWS}
    assert {label: _identity_seed(f) for label, f in folders.items()} == \
        dict.fromkeys(folders, seeds.role_seed(0, "test"))
    assert all(r["seed"] == seeds.role_seed(0, "test") for r in run["result"]["rows"])
    base = _trials(folders["unprotected"])
    assert len(base) == TRIALS * len(RATES) and sum(t[2] for t in base) > 0
    assert all(t[4] is not None for t in base)  # every site stored: the comparison below sees them all
    for label, folder in folders.items():
        rows = _trials(folder)
        assert [t[:2] for t in rows] == [t[:2] for t in base]
        for mine, theirs in zip(rows, base):
            sites = json.loads(mine[4])
            shared = [s for s in sites if ".copies" not in s[0]]
            assert shared == json.loads(theirs[4]), label
            assert mine[2] >= theirs[2] if label == "output TMR" else mine[2] == theirs[2]
    assert sum(t[2] for t in _trials(folders["output TMR"])) > sum(t[2] for t in base)  # the replicas' own


def test_every_tmr_replica_is_attacked(run):
    rows = {r["row"]: r for r in run["result"]["rows"]}
    assert rows["output TMR"]["fault_target_bits"] == 3 * rows["unprotected"]["fault_target_bits"]
    for label in ("weight TMR", "ECC", "parity", "bounds alone", "chosen"):
        assert rows[label]["fault_target_bits"] == rows["unprotected"]["fault_target_bits"]


def test_page_numbers_are_the_summaries(run):
    """Each cell of the table, recomputed here from the campaign's summary.json, the stored per-trial
    accuracies (paired test) and the fake cell's memory numbers."""
    table = _table_lines(run["page"])
    base = {(t[0], t[1]): t[3] for t in _trials(run["work"] / "unprotected")}
    for label, _ in ROWS:
        line = table[label]
        mem = next(r for r in run["cell"]["rows"] if r["row"] == label)
        assert f"{100 * mem['accuracy']:.2f} [{100 * mem['accuracy_ci'][0]:.2f}, {100 * mem['accuracy_ci'][1]:.2f}]" \
            in line
        folder = run["work"] / D.slug(label)
        summary = json.loads((folder / "summary.json").read_text())
        clean = json.loads((run["work"] / "unprotected" / "summary.json").read_text())["golden_accuracy"]
        mine = {(t[0], t[1]): t[3] for t in _trials(folder)}
        for point in summary["results"]:
            acc, (lo, hi) = point["accuracy_mean"], point["accuracy_ci"]
            assert f"| {100 * acc:.2f} [{100 * lo:.2f}, {100 * hi:.2f}] | {100 * (clean - acc):.2f} |" in line
            keys = sorted(k for k in base if k[0] == point["ber"])
            t = paired.paired_test([base[k] for k in keys], [mine[k] for k in keys])
            if label != "unprotected":
                lo, hi = t["ci"]
                assert f"{100 * t['mean_difference']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]" in line


def test_the_combined_column_attacks_memory_and_datapath_at_once(run):
    """Each row under both fault models: the memory at the cell's BER plus the middle activation rate in
    every trial, the test role's seed; its numbers on the page are the campaign's summary; the
    verdict names the most accurate row under both."""
    rate = RATES[len(RATES) // 2]
    work = run["work"].parent / f"both_{rate}_t{TRIALS}"
    table = _table_lines(run["page"])
    assert f"both: memory 0.0001 + act {rate}" in run["page"]
    for label, _ in ROWS:
        summary = json.loads((work / D.slug(label) / "summary.json").read_text())
        assert summary["config"]["target"] == "both" and summary["config"]["activation_ber"] == float(rate)
        assert summary["seed"] == seeds.role_seed(0, "test")
        [point] = summary["results"]
        acc, (lo, hi) = point["accuracy_mean"], point["accuracy_ci"]
        assert f"{100 * acc:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]" in table[label]
    assert "Both at once (memory BER 0.0001 + activation BER" in run["page"]


def test_weight_side_rows_change_nothing_in_the_datapath(run):
    """A coded or checked layer computes the unprotected layer's outputs: with the same draws, the
    same accuracy in every trial, and the verdict says so (no hand-typed claim)."""
    rows = {r["row"]: r for r in run["result"]["rows"]}
    for label in ("weight TMR", "ECC", "parity", "bounds alone"):
        for rate in RATES:
            assert rows[label]["activations"][rate]["paired"]["identical"]
    assert "give the unprotected accuracy in every one of the 4 trials" in run["page"]


def test_aligned_names_compute_the_same(run):
    net = checkpoint.load(run["tmp"] / "cells" / "tiny" / "model.pt").eval()
    aligned = D.aligned_names(net)
    x = data.load("digits", "test").tensors[0][:32]
    assert torch.equal(aligned(x), net(x))
    names = list(hardening.target_layers(aligned))
    assert names == [f"{n}.original" for n in hardening.target_layers(net)] and names


def test_choose_rates() -> None:
    pts = [{"rate": r, "drop": d} for r, d in ((1e-6, 0.2), (3e-6, 1.5), (1e-5, 5.0), (3e-5, 14.0), (1e-4, 29.0),
                                               (3e-4, 60.0))]
    rates, why = D.choose_rates(pts)
    assert rates == [3e-6, 3e-5, 1e-4] and "lowest, middle and highest of 4" in why
    assert D.choose_rates(pts[:3])[0] == [3e-6, 1e-5]
    rates, why = D.choose_rates([{"rate": 1e-6, "drop": 0.5}, {"rate": 1e-5, "drop": 40.0}])
    assert rates == [1e-6, 1e-5] and "nearest on each side" in why


def test_pilot_stops_past_the_range(run, tmp_path):
    net = checkpoint.load(run["tmp"] / "cells" / "tiny" / "model.pt").eval()
    x, y = data.load("digits", "test").tensors
    grid = (1e-1, 1e-7, 1e-2)
    pts = D.pilot(net, x[:100], y[:100], 0, tmp_path / "pilot", 2, 1, grid=grid, log=lambda _: None)
    assert [p["rate"] for p in pts] == sorted(grid)[:len(pts)]  # ascending
    assert all(p["drop"] <= D.DROP_POINTS[1] for p in pts[:-1])  # it goes on while inside the range ...
    assert len(pts) == len(grid) or pts[-1]["drop"] > D.DROP_POINTS[1]  # ... and stops past it
    assert pts[0]["drop"] < pts[-1]["drop"]


@pytest.mark.parametrize("case", ["no folder", "stored bits differ", "no cell", "bad flag"])
def test_refusals_are_one_line(run, tmp_path, capsys, case) -> None:
    cells = tmp_path / "cells"
    if case != "no folder":
        _fake_cell(cells)
    if case == "stored bits differ":
        path = cells / "tiny" / "ber_0.0001" / "protect" / "front.json"
        front = json.loads(path.read_text())
        front["candidates"][0]["memory_bits"] += 1
        path.write_text(json.dumps(front))
    args = ["--cells", str(cells), "--out", str(tmp_path / "out"), "--results", str(tmp_path / "p.md"),
            "--trials", "2", "--act-bers", "1e-6"]
    if case == "no cell":
        args += ["--ber", "1e-3"]
    if case == "bad flag":
        args += ["--trials", "many"]
    capsys.readouterr()
    assert D.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert {"no folder": "is not a folder", "stored bits differ": "stores", "no cell": "no cell_0.001.json",
            "bad flag": "invalid int value"}[case] \
        in err[0]
    assert not (tmp_path / "p.md").exists()
