"""A small comparison produces every file, with numbers consistent across JSON, CSV and HTML,
and a page that renders in headless Chromium with visible plots."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import ftcnn
from ftcnn import compare, report, train, data


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cmp")
    train.seed_everything(0)
    model = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=8, width=0.5)
    train.fit(model, data.load("digits", "train"), epochs=2, progress=False)
    config = compare.CompareConfig(bers=(1e-5, 1e-3), trials=3, bit_trials=2, bits=(23, 30),
                                   finetune_epochs=1, score_samples=32, latency_repeats=2)
    compare.run_compare(model, "digits", out, config)
    return out


def test_every_file_is_written(compare_run: Path) -> None:
    for name in ("summary.json", "summary.csv", "report.html", "scores.json"):
        assert (compare_run / name).is_file(), name
    for plot in report.PLOTS:
        for ext in ("png", "svg"):
            assert (compare_run / "plots" / f"{plot}.{ext}").stat().st_size > 1000
    summary = json.loads((compare_run / "summary.json").read_text())
    names = [v["name"] for v in summary["variants"]]
    assert names == [v.name for v in compare.default_variants()]
    for v in summary["variants"]:
        assert set(v["bit_sensitivity"]) == {"23", "30"}
        assert v["cost"]["params"] > 0 and len(v["results"]) == 2


def test_json_csv_and_html_agree(compare_run: Path) -> None:
    summary = json.loads((compare_run / "summary.json").read_text())
    rows = list(csv.DictReader((compare_run / "summary.csv").open()))
    assert len(rows) == sum(len(v["results"]) for v in summary["variants"])
    page = (compare_run / "report.html").read_text()
    by_key = {(r["variant"], float(r["ber"])): r for r in rows}
    for v in summary["variants"]:
        for r in v["results"]:
            row = by_key[(v["name"], r["ber"])]
            assert float(row["accuracy_mean"]) == pytest.approx(r["accuracy_mean"], rel=1e-12)
            assert float(row["params"]) == v["cost"]["params"]
            # the detail table shows the same mean, rounded to 0.1%
            assert f"{100 * r['accuracy_mean']:.1f}%" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page


def test_report_rebuilds_without_recomputing(compare_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(compare_run, copy)
    shutil.rmtree(copy / "plots")
    (copy / "report.html").unlink()
    for db in copy.rglob("results.sqlite*"):
        db.unlink()  # nothing to recompute from: the page must come from summary.json alone
    report.build_report(copy)
    assert (copy / "report.html").read_text() == (compare_run / "report.html").read_text()
    with pytest.raises(ValueError, match="no summary.json"):
        report.build_report(tmp_path / "empty")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (.ci/run installs it)")
def test_page_renders_in_headless_chromium(compare_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1800"]
    page = (compare_run / "report.html").resolve().as_uri()
    shot_run = subprocess.run([_chromium(), *flags, f"--screenshot={shot}", page],
                              capture_output=True, text=True, timeout=120)
    assert shot.is_file(), shot_run.stderr[-2000:]
    # console errors: dump the DOM with console logging on; page errors surface as "Uncaught"/"ERROR:CONSOLE"
    dom = subprocess.run([_chromium(), *flags[:-1], "--enable-logging=stderr", "--v=0", "--dump-dom", page],
                         capture_output=True, text=True, timeout=120)
    assert "Uncaught" not in dom.stderr and not re.search(r"CONSOLE\(\d+\)\].*error", dom.stderr, re.I)
    assert dom.stdout.count("<img") >= 4 and "data:image/png;base64," in dom.stdout
    image = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    # the plots sit below the overview table: that band must hold drawn content, not a blank page
    band = image[500:1500]
    assert band.std() > 20 and (band < 128).mean() > 0.005
