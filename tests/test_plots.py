"""Figures that read at a glance (issue 23, item 4): the protect front's labels never overlap and sit
at their points, full TMR is an arrow at the axis edge instead of squeezing the rest into a tenth,
the cost axis names its batch, and no bit or tensor x bit cell shows a rate from fewer than
``plots.MIN_FLIPS`` flips. Figures are checked in matplotlib itself (label boxes in pixels)."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ftcnn.reporting import plots

# the README's hero plot (issue 23: labels "6 17 9" overlapped, 15-19 sat at x1.3-1.6 while their
# points are at x1.14-1.15, and full TMR at x3.1 squeezed every candidate into a tenth of the axis)
HERO = [("none", 17.1, 1.00), ("restrict_zero_m0", 95.8, 1.08), ("restrict_zero_m0.1", 95.9, 1.08),
        ("restrict_clamp_m0", 92.8, 1.08), ("restrict_clamp_m0.1", 91.8, 1.08), ("weights_zero", 97.4, 1.01),
        ("weights_clamp", 97.2, 1.01), ("weights_zero+restrict_zero_m0", 97.0, 1.08),
        ("weights_zero+restrict_zero_m0.1", 97.2, 1.08), ("weights_zero+restrict_clamp_m0", 97.2, 1.08),
        ("weights_zero+restrict_clamp_m0.1", 97.2, 1.08), ("dup_min+restrict_zero_m0.1", 96.8, 1.15),
        ("dup_min+weights_zero+restrict_zero_m0.1", 97.4, 1.15), ("dup_min+restrict_clamp_m0.1", 94.5, 1.15),
        ("dup_min+weights_zero+restrict_clamp_m0.1", 97.4, 1.15), ("dup_range+restrict_zero_m0.1", 97.1, 1.15),
        ("dup_range+weights_zero+restrict_zero_m0.1", 97.3, 1.14), ("dup_range+restrict_clamp_m0.1", 94.9, 1.15),
        ("dup_range+weights_zero+restrict_clamp_m0.1", 97.3, 1.14), ("full_tmr", 93.0, 3.11)]


def hero_front(**config: Any) -> dict[str, Any]:
    """A front.json blob with the hero plot's numbers (CIs +-1.5 points)."""
    candidates = []
    for name, acc, macs in HERO:
        baseline = name == "full_tmr"
        candidates.append({
            "name": name, "family": name.split("_")[0], "baseline": baseline, "built": True,
            "macs_ratio": macs, "params_ratio": macs, "within_budget": not baseline and macs <= 1.15,
            "validation": {"accuracy": acc / 100, "accuracy_ci": [max(0.0, acc / 100 - 0.015),
                                                                  min(1.0, acc / 100 + 0.015)], "trials": 50},
            "pareto": name in ("none", "weights_zero"), "chosen": name == "weights_zero"})
    return {"format": "ftcnn-protect/1", "chosen": "weights_zero", "reason": "highest accuracy",
            "config": {"ber": 1e-4, "max_macs": 1.15, "trials": 50, **config}, "candidates": candidates}


def _boxes(texts: list[Any], renderer: Any) -> list[tuple[float, float, float, float]]:
    out = []
    for t in texts:
        b = t.get_window_extent(renderer)
        out.append((b.x0, b.y0, b.x1, b.y1))
    return out


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_front_labels_never_overlap_and_sit_at_their_points() -> None:
    fig, labels = plots.protect_front_figure(hero_front())
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax, key = fig.axes[:2]
        boxes = _boxes(labels, renderer)
        clashes = [(labels[i].get_text(), labels[j].get_text()) for i, j in combinations(range(len(boxes)), 2)
                   if _overlap(boxes[i], boxes[j])]
        assert not clashes, clashes
        # every candidate is named on the plot, by one label per spot (shared spots list every number)
        named = sorted(int(n) for t in labels for n in t.get_text().split(" ")[0].split(","))
        assert named == list(range(1, len(HERO) + 1))
        # labels sit at their points: inside the axes, a short way from the point they name
        frame = ax.get_window_extent(renderer)
        for label, box in zip(labels, boxes):
            assert frame.x0 <= box[0] and box[2] <= frame.x1 + 1 and frame.y0 <= box[1] and box[3] <= frame.y1
            px, py = ax.transData.transform(label.xy)
            gap = math.hypot(max(box[0] - px, 0, px - box[2]), max(box[1] - py, 0, py - box[3]))
            assert gap < 0.35 * frame.width, (label.get_text(), gap)
        # the key beside the plot: one line per candidate, none on top of another
        rows = [t for t in key.texts if t.get_text()[:2].strip().isdigit()]
        assert len(rows) == len(HERO)
        row_boxes = _boxes(rows, renderer)
        assert not any(_overlap(a, b) for a, b in combinations(row_boxes, 2))
    finally:
        plots.plt.close(fig)


def test_full_tmr_is_an_arrow_at_the_edge_not_the_scale() -> None:
    fig, labels = plots.protect_front_figure(hero_front())
    try:
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        assert hi < 1.3 and lo > 0.9  # x3.11 is off scale: the candidates that matter fill the axis
        inside = [m for _, _, m in HERO if m < 2]
        assert (max(inside) - min(inside)) / (hi - lo) > 0.6
        tmr = next(t for t in labels if t.get_text().startswith(f"{len(HERO)} "))
        assert "×3.11" in tmr.get_text() and "→" in tmr.get_text()
        assert tmr.xy[0] == pytest.approx(hi)  # drawn at the right edge, its ratio written
    finally:
        plots.plt.close(fig)


@pytest.mark.parametrize("config, candidate_batch, expected", [
    ({}, None, 128), ({"check_batch": 32}, None, 32), ({"check_batch": 32}, 64, 64)])
def test_cost_axis_names_its_batch(config: dict, candidate_batch: int | None, expected: int) -> None:
    front = hero_front(**config)
    if candidate_batch is not None:
        for c in front["candidates"]:
            c["batch"] = candidate_batch
    fig, _ = plots.protect_front_figure(front)
    try:
        assert fig.axes[0].get_xlabel() == f"MACs relative to the unprotected model (batch {expected})"
    finally:
        plots.plt.close(fig)
    front["end_to_end"] = {"prune_ratio": 0.3}
    assert "original (unpruned, unprotected)" in plots.front_reference(front)


@pytest.fixture
def kept_figures(monkeypatch) -> list[Any]:
    """The figures ``plots`` would save, kept open for inspection (nothing written)."""
    kept: list[Any] = []
    monkeypatch.setattr(plots, "save", lambda fig, stem, **_: kept.append(fig))
    yield kept
    for fig in kept:
        plots.plt.close(fig)


def _flips(n: int, k: int) -> dict[str, Any]:
    return {"n": n, "k": k, "rate": k / n, "ci": (0.0, 0.43) if n < 30 else (k / n - 0.1, k / n + 0.1),
            "mean_share": 0.01}


def test_bit_sensitivity_draws_no_rate_from_few_flips(kept_figures: list[Any], tmp_path: Path) -> None:
    """The demo's 5 flips per bit gave every bit an interval of 0-43%: noise drawn as data."""
    panels = [{"name": "baseline", "number": 1, "bits": {"23": _flips(5, 0), "30": _flips(40, 12)}}]
    plots.bit_sensitivity(panels, "critical flips", "title", tmp_path / "bits")
    (fig,) = kept_figures
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == [plots.FEW]  # bit 23: a grey "n < 30" column
    assert ax.texts[0].get_position()[0] == pytest.approx(0.0)
    drawn = [line for line in ax.lines if len(line.get_xdata()) == 1 and line.get_marker() == "o"]
    assert [tuple(line.get_xdata()) for line in drawn] == [(1,)]  # bit 30 only: its rate and interval
    assert drawn[0].get_ydata()[0] == pytest.approx(0.3)
    assert [p.get_facecolor()[:3] for p in ax.patches] == [(0.86, 0.86, 0.86)]  # the grey column


def test_heatmap_greys_cells_below_the_minimum(kept_figures: list[Any], tmp_path: Path) -> None:
    """One tensor with 1/1 cells used to be drawn in full red."""
    panels = [{"name": "baseline", "number": 1, "tensors": ["conv weight", "fc bias"], "bits": ["23", "30"],
               "cells": [[(3, 40), (30, 30)], [(1, 1), (0, 0)]]}]
    assert plots.layer_bit_heatmap(panels, "title", tmp_path / "heat")
    (fig,) = kept_figures
    ax = fig.axes[0]
    rates = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    assert rates[0, 0] == pytest.approx(3 / 40) and rates[0, 1] == pytest.approx(1.0)
    assert np.isnan(rates[1, 0]) and np.isnan(rates[1, 1])  # 1 flip and no flip: no colour from them
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["3/40", "30/30", plots.FEW])
    assert "1/1" not in texts
    assert not plots.layer_bit_heatmap([], "title", tmp_path / "none")
