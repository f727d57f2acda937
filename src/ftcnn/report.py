"""Plots and a self-contained HTML page from a comparison's stored results (design §6).

Everything here reads what ``ftcnn compare`` stored and never reruns a trial, so
``ftcnn report RUN`` can rebuild the page at any time:

- ``summary.json``: per variant and BER the campaign statistics, costs, clean accuracy;
- the per-trial rows of each variant's campaign (``campaigns/NAME/results.sqlite``) for
  the paired tests, and of its single-flip campaigns (``bits/NAME/bitNN/results.sqlite``),
  which record the faulted tensor and bit of every flip, for the bit-sensitivity CIs and
  the tensor x bit heatmap.

The per-trial values the page uses are copied into ``report_data.json`` beside the
summary; when the SQLite files are gone (an archived run folder), the page is rebuilt
from that copy and comes out the same.

A run folder is untrusted input (design §8): every file is checked by ``ftcnn.readback``
before use (a malformed one is refused in one line naming the file and field), every value
from it is HTML-escaped on the page, and the page's Content-Security-Policy allows no script.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import sqlite3
from pathlib import Path
from typing import Any, Sequence

from ftcnn import files, readback
from ftcnn.files import atomic_write
from ftcnn.lazy import headless_matplotlib, lazy
from ftcnn.metrics import BOUNDED_CI_BELOW
from ftcnn.paired import (auc_log_ber, fmt_ber, holm, paired_test, pareto_front, tolerable_ber, welch_test,
                          wilson_ci)

# 0.4 s to import: only when a report is drawn, not at every command's start
plt = lazy("matplotlib.pyplot", setup=headless_matplotlib)
ticker = lazy("matplotlib.ticker")

PLOTS = ("pareto", "accuracy_vs_ber", "bit_sensitivity", "layer_bit_heatmap", "vulnerability")
CSV_FIELDS = ("variant", "ber", "trials", "accuracy_mean", "accuracy_ci_low", "accuracy_ci_high",
              "confidence", "sdc_mean", "critical_sdc_mean", "due_mean", "clean_accuracy", "params", "macs",
              "latency_b1_ms", "latency_b128_ms", "relative_params", "relative_macs",
              "relative_latency_b1_ms", "relative_latency_b128_ms")
REPORT_DATA = "report_data.json"
TOLERANCE = 0.01          # "within 1 point of clean accuracy"
MIN_FLIPS = 30            # fewer single flips per cell than this: the rate is flagged as too noisy
COSTS = (("params", "parameters (protection values included)"), ("macs", "MACs per input"),
         ("latency_b1_ms", "CPU latency, batch 1"), ("latency_b128_ms", "CPU latency, batch 128"))
# matplotlib's tab10, written out (reading it from pyplot would import pyplot at start-up), then four more
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf", "#6b3e26", "#1a5e63", "#8c6d31", "#393b79")


# --- numbers and rows --------------------------------------------------------------------------

def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per variant x BER (the CSV and the HTML table share these)."""
    rows = []
    for v in summary["variants"]:
        cost, rel = v.get("cost", {}), v.get("relative_cost", {})
        for r in v["results"]:
            rows.append({
                "variant": v["name"], "ber": r["ber"], "trials": r["trials"],
                "accuracy_mean": r["accuracy_mean"], "accuracy_ci_low": r["accuracy_ci"][0],
                "accuracy_ci_high": r["accuracy_ci"][1], "confidence": r.get("confidence"),
                "sdc_mean": r["sdc_mean"],
                "critical_sdc_mean": r["critical_sdc_mean"], "due_mean": r["due_mean"],
                "clean_accuracy": v.get("clean_accuracy"),
                **{k: cost.get(k) for k in ("params", "macs", "latency_b1_ms", "latency_b128_ms")},
                **{f"relative_{k}": rel.get(k) for k in ("params", "macs", "latency_b1_ms", "latency_b128_ms")},
            })
    return rows


def confidence(summary: dict[str, Any]) -> float | None:
    levels = {r.get("confidence") for v in summary["variants"] for r in v["results"]}
    level = levels.pop() if len(levels) == 1 else None
    return level if isinstance(level, float) else None


def ci_header(summary: dict[str, Any]) -> str:
    """"95% CI" with the level the variants' campaigns actually used (just "CI" if they differ)."""
    level = confidence(summary)
    return f"{100 * level:.4g}% CI" if level is not None else "CI"


def ci_methods(summary: dict[str, Any]) -> list[str]:
    return sorted({r.get("ci_method") or "student-t" for v in summary["variants"] for r in v["results"]})


def write_csv(summary: dict[str, Any], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in summary_rows(summary):
        # a BER as typed (1e-05), not its nearest float's 17 digits (9.999999999999999e-06)
        writer.writerow({**row, "ber": None if row["ber"] is None else f"{row['ber']:.12g}"})
    _write_text(path, buf.getvalue())


def _write_text(path: Path, text: str) -> None:
    files.write_text(path, text)


def _at_ber(v: dict[str, Any], ber: float) -> dict[str, Any] | None:
    for r in v["results"]:
        if r["ber"] is not None and math.isclose(r["ber"], ber, rel_tol=1e-9):
            return r
    return None


def _clean(v: dict[str, Any]) -> float | None:
    """The variant's fault-free accuracy on the campaign's inputs."""
    g = v.get("golden_accuracy")
    return v.get("clean_accuracy") if _nan(g) else g


def _ber_results(v: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted((r for r in v["results"] if r.get("ber") and r["ber"] > 0), key=lambda r: r["ber"])


# --- per-trial data: read from the run's SQLite files, kept in report_data.json ----------------

def _read_trials(db_path: Path, columns: str, rows_schema: readback.Schema
                 ) -> tuple[list[tuple], int | None] | None:
    """The ``columns`` of every trial in ``db_path`` (checked against ``rows_schema``: the file may
    have been edited) and the seed its identity records; None when there is no readable database."""
    if not db_path.is_file():
        return None
    try:
        db = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = db.execute(f"SELECT {columns} FROM trials ORDER BY point, trial").fetchall()
            meta = db.execute("SELECT value FROM meta WHERE key='identity'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    readback.check(rows, rows_schema, f"{db_path} (its trials)")
    seed = None
    if meta:
        try:
            seed = json.loads(meta[0]).get("config", {}).get("seed")
        except (ValueError, AttributeError, RecursionError, TypeError):
            seed = None
    if isinstance(seed, bool) or not isinstance(seed, int):
        seed = None
    return rows, seed


def collect_trials(run: Path, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The per-trial values the page needs, from the run folder's SQLite files (None if none)."""
    campaigns: dict[str, Any] = {}
    bits: dict[str, Any] = {}
    for v in summary["variants"]:
        name = v["name"]
        got = _read_trials(run / "campaigns" / name / "results.sqlite", "point, trial, accuracy",
                           readback.CAMPAIGN_ROWS)
        if got is not None:
            rows, seed = got
            used = {r["ber"]: r["trials"] for r in v["results"] if r.get("ber") is not None}
            per_ber: dict[str, dict[str, float]] = {}
            for point, trial, acc in rows:
                n = next((t for b, t in used.items() if math.isclose(b, point, rel_tol=1e-9)), None)
                if n is not None and trial < n:  # the trials the summary's statistics used
                    per_ber.setdefault(repr(float(point)), {})[str(trial)] = acc
            campaigns[name] = {"seed": seed, "accuracy": per_ber}
        folder = run / "bits" / name
        if folder.is_dir():
            per_bit: dict[str, list] = {}
            for sub in sorted(folder.glob("bit[0-9][0-9]")):
                db_path = sub / "results.sqlite"
                got = _read_trials(db_path, "n_faults, critical_sdc, sites", readback.FLIP_ROWS)
                if got is None:
                    continue
                flips = []
                for n_faults, crit, sites in got[0]:
                    site = (readback.parse(sites, readback.SITES, f"{db_path} (a trial's sites)")[0]
                            if sites and n_faults == 1 else None)
                    flips.append([site[0] if site else None, crit])
                per_bit[str(int(sub.name[3:]))] = flips
            if per_bit:
                bits[name] = per_bit
    if not campaigns and not bits:
        return None
    data = {"format": "ftcnn-report-data/1",
            "note": "per-trial values copied from the run's SQLite files: accuracy of every trial "
                    "(by BER, then trial index) and, per single-flip campaign, [faulted tensor, "
                    "critical SDC share] of every flip",
            "campaigns": campaigns, "bits": bits}
    readback.check(data, readback.REPORT_DATA, f"the per-trial rows of {run}'s results.sqlite files")
    return data


def load_trials(run: Path, summary: dict[str, Any]) -> dict[str, Any] | None:
    data = collect_trials(run, summary)
    path = run / REPORT_DATA
    if data is not None:
        files.write_json(path, data, indent=None)
        return data
    if path.is_file():
        return readback.read_json(path, readback.REPORT_DATA, readback.MAX_REPORT_DATA_BYTES)
    return None


# --- derived statistics -----------------------------------------------------------------------

def tolerance_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for v in summary["variants"]:
        res = _ber_results(v)
        bers = [r["ber"] for r in res]
        clean = _clean(v)
        tol = tolerable_ber(bers, [r["accuracy_mean"] for r in res], clean, TOLERANCE)
        tol_ci = tolerable_ber(bers, [r["accuracy_ci"][0] for r in res], clean, TOLERANCE)
        area, area_ci = auc_log_ber(bers, [r["accuracy_mean"] for r in res],
                                    [r.get("accuracy_std") for r in res], [r["trials"] for r in res],
                                    confidence(summary) or 0.95)
        out.append({"name": v["name"], "clean": clean, "tolerable": tol, "tolerable_ci": tol_ci,
                    "auc": area, "auc_ci": area_ci})
    return out


def paired_rows(summary: dict[str, Any], trials: dict[str, Any] | None, ber: float
                ) -> tuple[list[dict[str, Any]], str]:
    """Each variant against the baseline at ``ber`` (accuracy, per trial); a note on the pairing."""
    level = confidence(summary) or 0.95
    if not trials or "baseline" not in trials.get("campaigns", {}):
        return [], "the per-trial results (campaigns/*/results.sqlite or report_data.json) are missing"
    camps = trials["campaigns"]
    base = camps["baseline"]
    key = next((k for k in base["accuracy"] if math.isclose(float(k), ber, rel_tol=1e-9)), None)
    if key is None:
        return [], f"the baseline has no trials at BER {fmt_ber(ber)}"
    rows, unpaired = [], []
    for v in summary["variants"]:
        if v["name"] == "baseline" or v["name"] not in camps:
            continue
        other = camps[v["name"]]
        k = next((k for k in other["accuracy"] if math.isclose(float(k), ber, rel_tol=1e-9)), None)
        if k is None:
            continue
        a, b = base["accuracy"][key], other["accuracy"][k]
        common = sorted(set(a) & set(b), key=int)
        same_seed = base.get("seed") is not None and base.get("seed") == other.get("seed")
        if same_seed and len(common) >= 2:
            result = paired_test([a[t] for t in common], [b[t] for t in common], level)
        else:
            unpaired.append(v["name"])
            result = welch_test(list(a.values()), list(b.values()), level)
        rows.append({"name": v["name"], **result})
    for row, p in zip(rows, holm([r["p_t"] for r in rows])):
        row["p_holm"] = p
    note = ("Trials are paired by index: trial i of every variant draws its faults from the generator "
            "seeded by (seed, BER, i) and runs on the same test inputs; the seeds stored in the campaigns "
            "agree. A protection that adds memory (copies, bounds) spends the same random stream over a "
            "larger memory, so paired trials share their random numbers but not always their fault sites; "
            "the paired test stays valid (trials are independent of one another) and gains power where "
            "the pairing correlates the two variants. Δ includes any difference in clean accuracy (a pruned and "
            "fine-tuned variant starts from its own): at low BER a constant Δ with a tiny p says the clean "
            "accuracies differ, not that the protection works. With every Δ equal the t-test is undefined and "
            "its p is the sign test's.")
    if unpaired:
        note += (" Not paired (different seeds or too few common trials), compared with Welch's unpaired "
                 "t-test instead: " + ", ".join(unpaired) + ".")
    return rows, note


def bit_rows(summary: dict[str, Any], trials: dict[str, Any] | None) -> dict[str, dict[str, dict[str, Any]]]:
    """Per variant and measured bit: flips, critical flips (>= 1 input turned wrong), Wilson CI,
    mean critical-SDC share (the summary's ``bit_sensitivity``)."""
    level = confidence(summary) or 0.95
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for v in summary["variants"]:
        flips = (trials or {}).get("bits", {}).get(v["name"], {})
        per: dict[str, dict[str, Any]] = {}
        for bit, mean in (v.get("bit_sensitivity") or {}).items():
            rows = flips.get(bit)
            if rows:
                n = len(rows)
                k = sum(1 for _, crit in rows if crit is not None and crit > 0)
                per[bit] = {"n": n, "k": k, "rate": k / n, "ci": wilson_ci(k, n, level), "mean_share": mean}
            else:
                per[bit] = {"n": None, "k": None, "rate": None, "ci": (float("nan"), float("nan")),
                            "mean_share": mean}
        if per:
            out[v["name"]] = dict(sorted(per.items(), key=lambda kv: int(kv[0])))
    return out


# --- plots --------------------------------------------------------------------------------------

def _save(fig: plt.Figure, stem: Path) -> None:
    for ext in ("png", "svg"):
        atomic_write(stem.with_suffix(f".{ext}"), lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=110,
                                                                                 bbox_inches="tight"))
    plt.close(fig)


def _ber_axis(ax: plt.Axes, bers: Sequence[float]) -> None:
    """Log x axis with ticks at the decades the sweep spans, labelled 1e-5 (not 10^-5 or 9.99e-06)."""
    ax.set_xscale("log")
    lo, hi = math.floor(math.log10(min(bers)) + 1e-9), math.ceil(math.log10(max(bers)) - 1e-9)
    ticks = [10.0 ** e for e in range(lo, hi + 1)]
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: fmt_ber(x)))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlim(min(bers) / 1.5, max(bers) * 1.5)


def _empty_figure(stem: Path, message: str, height: float) -> None:
    """A figure that says why there is nothing to draw (a missing plot reads as 'not measured')."""
    fig, ax = plt.subplots(figsize=(6, height))
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.axis("off")
    _save(fig, stem)


def _panel_grid(n: int, height: float, **shared: bool) -> tuple[Any, Any]:
    """Small multiples: ``n`` panels, 3 (4 past six) to a row, each 3.1 wide and ``height`` tall."""
    cols = 4 if n > 6 else min(3, n)
    nrows = math.ceil(n / cols)
    return plt.subplots(nrows, cols, figsize=(3.1 * cols, height * nrows), squeeze=False, **shared)


def plot_accuracy_vs_ber(summary: dict[str, Any], stem: Path, tol: list[dict[str, Any]]) -> None:
    """Small multiples: one panel per variant (its line and CI band), the baseline in grey in each."""
    variants = [v for v in summary["variants"] if _ber_results(v)]
    if not variants:
        _empty_figure(stem, "no BER results", 2)
        return
    fig, axes = _panel_grid(len(variants), 2.5, sharex=True, sharey=True)
    base = next((v for v in summary["variants"] if v["name"] == "baseline"), None)
    all_bers = [r["ber"] for v in variants for r in _ber_results(v)]
    tol_by = {t["name"]: t for t in tol}
    for i, ax in enumerate(axes.flat):
        if i >= len(variants):
            ax.axis("off")
            continue
        v = variants[i]
        res = _ber_results(v)
        bers = [r["ber"] for r in res]
        if base is not None and v is not base:
            bres = _ber_results(base)
            ax.plot([r["ber"] for r in bres], [r["accuracy_mean"] for r in bres], color="0.6", lw=1.2,
                    ls="--", label="baseline")
        color = COLORS[i % len(COLORS)]
        ax.fill_between(bers, [r["accuracy_ci"][0] for r in res], [r["accuracy_ci"][1] for r in res],
                        color=color, alpha=0.25, lw=0)
        ax.plot(bers, [r["accuracy_mean"] for r in res], color=color, marker="o", ms=3.5, lw=1.8)
        clean = _clean(v)
        if not _nan(clean):
            ax.axhline(clean, color=color, lw=0.8, ls=":")
        t = tol_by.get(v["name"], {}).get("tolerable_ci", (None, ""))
        if t[0] is not None and t[1] != "<":
            ax.axvline(t[0], color="k", lw=0.7, alpha=0.5)
        ax.set_title(f"{i + 1}. {v['name']}", fontsize=9, loc="left")
        ax.grid(True, which="major", alpha=0.3)
        _ber_axis(ax, all_bers)
        ax.tick_params(labelsize=8)
        ax.set_ylim(0, 1.02)
    for ax in axes[-1]:
        ax.set_xlabel("bit error rate", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy under faults", fontsize=8)
    fig.suptitle(f"{summary.get('model_name', 'model')} on {summary.get('data', '')}: accuracy vs BER "
                 f"(band: {ci_header(summary)}; dashed grey: baseline; dotted: clean accuracy; "
                 "vertical line: conservative tolerable BER)", fontsize=9, y=1.0)
    fig.tight_layout()
    _save(fig, stem)


def _place_labels(ax: plt.Axes, points: list[tuple[float, float]], labels: list[tuple[int, list[str], dict]],
                  obstacles: Sequence[tuple[float, float, float, float]] = ()) -> None:
    """Place each label near its point where it overlaps no marker, no other label and stays in
    the axes (greedy, nearest free spot first), with a leader line when pushed away."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    px = [to_px(p) for p in points]
    box = ax.get_window_extent(renderer)
    taken = [(x - 5, y - 5, x + 5, y + 5) for x, y in px]
    for x0, y0, x1, y1 in obstacles:  # data-space rectangles (error bars, the front's line)
        (a, b), (c, d) = to_px((x0, y0)), to_px((x1, y1))
        taken.append((min(a, c) - 2, min(b, d) - 2, max(a, c) + 2, max(b, d) + 2))
    scale = fig.dpi / 72.0

    def free(b: tuple[float, float, float, float]) -> bool:
        if b[0] < box.x0 + 2 or b[2] > box.x1 - 2 or b[1] < box.y0 + 2 or b[3] > box.y1 - 2:
            return False
        return not any(b[0] < t[2] and t[0] < b[2] and b[1] < t[3] and t[1] < b[3] for t in taken)

    for index, texts, style in labels:
        x, y = px[index]
        chosen = None
        for text in texts:  # the full label first, then a shorter one (the number) where it fits no place
            t = ax.annotate(text, points[index], xytext=(0, 0), textcoords="offset points", **style)
            ext = t.get_window_extent(renderer)
            t.remove()
            w, h = ext.width, ext.height
            for r in (7, 13, 20, 30, 42, 56, 72, 90, 115, 140):
                for dx, dy in ((1, 0), (1, 1), (1, -1), (-1, 0), (0, 1), (0, -1), (-1, 1), (-1, -1)):
                    cx, cy = x + dx * r, y + dy * r * 0.8
                    left = cx if dx > 0 else cx - w if dx < 0 else cx - w / 2
                    bottom = cy if dy > 0 else cy - h if dy < 0 else cy - h / 2
                    cand = (left, bottom, left + w, bottom + h)
                    if free(cand):
                        chosen = (text, cand, r)
                        break
                if chosen:
                    break
            if chosen:
                break
        if chosen is None:  # nowhere free: the shortest label, next to the point
            chosen = (texts[-1], (x + 6, y, x + 6 + w, y + h), 7)
        text, (left, bottom, right, top), r = chosen
        offset = ((left + w / 2 - x) / scale, (bottom + h / 2 - y) / scale)
        arrow = {"arrowstyle": "-", "color": "0.5", "lw": 0.6, "shrinkA": 0, "shrinkB": 3} if r > 7 else None
        ax.annotate(text, points[index], xytext=offset, textcoords="offset points", ha="center", va="center",
                    arrowprops=arrow, **style)
        taken.append((left, bottom, right, top))


def _latency_spread(v: dict[str, Any], key: str, variants: list[dict[str, Any]]) -> tuple[float, float] | None:
    """The interquartile range of a variant's latency relative to the baseline's median, when the
    summary records one as ``cost[KEY + "_iqr"] = [q1, q3]`` (ms); None otherwise."""
    iqr = v.get("cost", {}).get(f"{key}_iqr")
    base = next((b for b in variants if b["name"] == "baseline"), None)
    median = None if base is None else base.get("cost", {}).get(key)
    if not (isinstance(iqr, list) and len(iqr) == 2 and all(isinstance(q, (int, float)) for q in iqr)) \
            or not median:
        return None
    return iqr[0] / median, iqr[1] / median


def _iqr_text(iqr: Any) -> str:
    """`` (IQR 1.2-1.3)`` for a recorded ``[p25, p75]`` (ms), else nothing (older summaries)."""
    if not (isinstance(iqr, list) and len(iqr) == 2 and all(isinstance(q, (int, float)) for q in iqr)):
        return ""
    return f" (IQR {_fmt(float(iqr[0]))}-{_fmt(float(iqr[1]))})"


def plot_pareto(summary: dict[str, Any], stem: Path) -> dict[str, list[str]]:
    """Accuracy at the report BER (with its CI) against each cost relative to the baseline,
    one panel per cost, the Pareto front drawn; returns each cost's front (variant names)."""
    ber = summary["report_ber"]
    variants = summary["variants"]
    numbers = {v["name"]: i + 1 for i, v in enumerate(variants)}
    panels = [(k, what) for k, what in COSTS if any(not _nan(v.get("relative_cost", {}).get(k)) for v in variants)]
    fronts: dict[str, list[str]] = {}
    fig, axes = plt.subplots(math.ceil(len(panels) / 2) or 1, 2, figsize=(12, 4.6 * max(1, math.ceil(len(panels) / 2))),
                             squeeze=False)
    pending = []
    for ax, (key, what) in zip(axes.flat, panels):
        pts, names = [], []
        xerr: dict[int, tuple[float, float]] = {}
        for v in variants:
            r, rel = _at_ber(v, ber), v.get("relative_cost", {}).get(key)
            if r is None or _nan(rel) or _nan(r["accuracy_mean"]):
                continue
            pts.append((float(rel), float(r["accuracy_mean"]), r["accuracy_ci"]))
            names.append(v["name"])
            spread = _latency_spread(v, key, variants)
            if spread is not None:
                xerr[len(pts) - 1] = spread
        if not pts:
            ax.axis("off")
            continue
        front = pareto_front([p[0] for p in pts], [p[1] for p in pts])
        fronts[key] = [names[i] for i in front]
        fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
        ax.step(fx, fy, where="post", color="tab:red", lw=1.4, alpha=0.8, zorder=1, label="Pareto front")
        for j, (x, y, ci) in enumerate(pts):
            on = j in front
            xe = None if j not in xerr else [[max(0.0, x - xerr[j][0])], [max(0.0, xerr[j][1] - x)]]
            ax.errorbar([x], [y], yerr=[[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]], xerr=xe, fmt="o",
                        ms=6 if on else 5, color="tab:red" if on else "0.45", mfc="tab:red" if on else "white",
                        ecolor="tab:red" if on else "0.6", elinewidth=1, capsize=2, zorder=3)
        labels = [(j, [f"{numbers[names[j]]} {names[j]}", str(numbers[names[j]])],
                   {"fontsize": 8, "color": "darkred", "weight": "bold"}) for j in front]
        labels += [(j, [str(numbers[names[j]])], {"fontsize": 8, "color": "0.25"})
                   for j in range(len(pts)) if j not in front]
        xs = [p[0] for p in pts]
        # log scale: a ratio reads the same at x1.1 as at x3, and the cheap cluster near x1 spreads out
        ax.set_xscale("log")
        lo, hi = min(xs + [1.0]) / 1.08, max(xs + [1.0]) * 1.3
        ax.set_xlim(lo, hi)
        ticks = [t for t in (0.25, 0.35, 0.5, 0.7, 0.85, 1, 1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)
                 if lo <= t <= hi]
        ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"×{x:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        # the accuracies' range (CIs included), not always 0-1: crowded points need the room for labels
        ax.set_ylim(max(-0.02, min(p[2][0] for p in pts) - 0.08), min(1.04, max(p[2][1] for p in pts) + 0.08))
        ax.axvline(1.0, color="0.7", lw=0.8, ls=":")
        ax.set_xlabel(f"{what}, relative to the baseline (log scale)", fontsize=9)
        ax.set_ylabel(f"accuracy at BER {fmt_ber(ber)}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.set_title(f"accuracy vs {what}", fontsize=10, loc="left")
        obstacles = [(x, ci[0], x, ci[1]) for x, _, ci in pts]
        obstacles += [(xerr[j][0], pts[j][1], xerr[j][1], pts[j][1]) for j in xerr]
        obstacles += [(fx[k], fy[k], fx[k + 1], fy[k]) for k in range(len(fx) - 1)]   # the step's runs
        obstacles += [(fx[k + 1], fy[k], fx[k + 1], fy[k + 1]) for k in range(len(fx) - 1)]  # and rises
        pending.append((ax, [(p[0], p[1]) for p in pts], labels, obstacles))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Pareto fronts at BER {fmt_ber(ber)}: red = not dominated (no other variant is cheaper "
                 f"and at least as accurate); bars: {ci_header(summary)}; numbers: see the table",
                 fontsize=9)
    fig.tight_layout()
    for args in pending:  # after the layout is final: labels are placed in pixels
        _place_labels(*args)
    _save(fig, stem)
    return fronts


def plot_bit_sensitivity(summary: dict[str, Any], stem: Path, bits: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Small multiples: per variant, the share of single flips at each measured bit that turned at
    least one correctly classified input wrong, with Wilson CIs (hollow: fewer than MIN_FLIPS flips)."""
    names = [v["name"] for v in summary["variants"] if v["name"] in bits]
    numbers = {v["name"]: i + 1 for i, v in enumerate(summary["variants"])}
    if not names:
        _empty_figure(stem, "no single-flip campaigns in this run (--bit-trials 0)", 1.5)
        return
    fig, axes = _panel_grid(len(names), 2.3, sharey=True)
    have_rates = any(b["rate"] is not None for n in names for b in bits[n].values())
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.axis("off")
            continue
        per = bits[names[i]]
        labels = list(per)
        xs = list(range(len(labels)))
        color = COLORS[(numbers[names[i]] - 1) % len(COLORS)]
        for x, b in zip(xs, labels):
            row = per[b]
            if row["rate"] is None:  # no per-flip data: the summary's mean share, no CI
                ax.plot([x], [row["mean_share"]], "s", color=color, ms=4)
                continue
            lo, hi = row["ci"]
            solid = row["n"] >= MIN_FLIPS
            ax.errorbar([x], [row["rate"]], yerr=[[max(0.0, row["rate"] - lo)], [max(0.0, hi - row["rate"])]],
                        fmt="o", ms=4,
                        color=color, mfc=color if solid else "white", elinewidth=1, capsize=2)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, axis="y", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_title(f"{numbers[names[i]]}. {names[i]}", fontsize=9, loc="left")
    for ax in axes[-1]:
        ax.set_xlabel("bit (31 sign, 30-23 exponent, 22-0 mantissa)", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("critical flips" if have_rates else "mean critical SDC", fontsize=8)
    fig.suptitle("share of single flips that cause a critical SDC, per measured bit "
                 f"({ci_header(summary)}, Wilson); hollow: fewer than {MIN_FLIPS} flips", fontsize=9, y=1.0)
    fig.tight_layout()
    _save(fig, stem)


def _short_tensor(name: str) -> str:
    """classifier.0.original.weight -> classifier.0 weight; the copies a protection adds say so."""
    parts = name.split(".")
    kind = parts[-1]
    role = [p for p in parts[:-1] if p in ("original", "copies")]
    layer = ".".join(p for p in parts[:-1] if p not in ("original", "copies"))
    return f"{layer} {kind}" + (" (copies)" if role == ["copies"] else "")


def heatmap_data(summary: dict[str, Any], trials: dict[str, Any] | None, layer_order: Sequence[str] = ()
                 ) -> dict[str, tuple[list[str], list[str], list[list[tuple[int, int]]]]]:
    """Per variant: tensors (rows, in the model's layer order), bits (columns), and per cell
    (critical flips, flips)."""
    order = {name: i for i, name in enumerate(layer_order)}

    def rank(tensor: str) -> tuple:
        short = _short_tensor(tensor)
        layer = short.split(" ")[0]
        return (order.get(layer, len(order)), layer, "(copies)" in short, short)

    out = {}
    for v in summary["variants"]:
        flips = (trials or {}).get("bits", {}).get(v["name"])
        if not flips:
            continue
        bits = sorted(flips, key=int)
        tensors = sorted({t for b in bits for t, _ in flips[b] if t is not None}, key=rank)
        if not tensors:
            continue
        cells = [[(sum(1 for t, c in flips[b] if t == tensor and c and c > 0),
                   sum(1 for t, _ in flips[b] if t == tensor)) for b in bits] for tensor in tensors]
        out[v["name"]] = ([_short_tensor(t) for t in tensors], bits, cells)
    return out


def plot_layer_bit_heatmap(summary: dict[str, Any], stem: Path,
                           data: dict[str, tuple[list[str], list[str], list[list[tuple[int, int]]]]]) -> bool:
    """Per variant, the share of single flips in each tensor x bit that caused a critical SDC,
    each cell annotated k/n (grey: no flip landed there). False when there is nothing to draw."""
    if not data:
        return False
    numbers = {v["name"]: i + 1 for i, v in enumerate(summary["variants"])}
    names = list(data)
    cols = 2 if len(names) > 1 else 1
    nrows = math.ceil(len(names) / cols)
    heights = [max(len(data[n][0]) for n in names[r * cols:(r + 1) * cols]) for r in range(nrows)]
    fig, axes = plt.subplots(nrows, cols, figsize=(7.0 * cols, sum(0.3 * h + 0.9 for h in heights) + 0.6),
                             squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": [h + 2.2 for h in heights]})
    cmap = plt.get_cmap("Reds").with_extremes(bad="0.85")
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.axis("off")
            continue
        tensors, bits, cells = data[names[i]]
        rates = [[(k / n if n else float("nan")) for k, n in row] for row in cells]
        image = ax.imshow(rates, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for r, row in enumerate(cells):
            for c, (k, n) in enumerate(row):
                if n:
                    ax.text(c, r, f"{k}/{n}", ha="center", va="center", fontsize=6,
                            color="white" if k / n > 0.6 else "black")
        ax.set_xticks(range(len(bits)))
        ax.set_xticklabels(bits, fontsize=7)
        ax.set_yticks(range(len(tensors)))
        ax.set_yticklabels(tensors, fontsize=7)
        ax.set_title(f"{numbers[names[i]]}. {names[i]}", fontsize=9, loc="left")
        ax.tick_params(length=2)
    for ax in axes[-1]:
        ax.set_xlabel("bit (31 sign, 30-23 exponent, 22-0 mantissa)", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.5, aspect=40, label="share of flips causing a critical SDC")
    fig.suptitle("critical-SDC rate of single flips by faulted tensor and bit (cell: critical flips / flips; "
                 "grey: no flip landed there)", fontsize=9)
    _save(fig, stem)
    return True


def plot_vulnerability(scores: dict[str, Any], stem: Path) -> None:
    """Per layer, the channels' scores sorted from most to least vulnerable (on one scale, so
    layers compare; the scores are as ``analyze`` stored them)."""
    layers = scores.get("layers", {})
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for i, (name, values) in enumerate(layers.items()):
        vals = sorted((float(x) for x in values), reverse=True)
        xs = [(k + 0.5) / len(vals) for k in range(len(vals))]
        ax.plot(xs, vals, label=f"{name} ({len(vals)})", color=COLORS[i % len(COLORS)], marker="os^Dv<>p"[i % 8],
                markersize=3)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("channel rank (share of the layer's filters/neurons)")
    ax.set_ylabel(f"{scores.get('method', '?')} score")
    ax.grid(True, alpha=0.3)
    if layers:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no vulnerability scores in this run folder", ha="center", va="center",
                transform=ax.transAxes)
    normalized = (scores.get("settings") or {}).get("normalize")
    ax.set_title(f"per-layer vulnerability ({scores.get('method', '?')} scores"
                 + (", normalised per layer by analyze" if normalized else "") + ")", fontsize=10)
    _save(fig, stem)


# --- HTML ---------------------------------------------------------------------------------------

def _text(x: Any) -> str:
    """Any value from a run folder's files as HTML text: escaped, whatever its type (a file is
    untrusted: a string where a number belongs must not become markup)."""
    return html.escape(str(x))


def _fmt(x: Any, pct: bool = False, digits: int = 3) -> str:
    if _nan(x):
        return "–"
    if pct:
        return f"{100 * x:.1f}%"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return f"{x:,}" if isinstance(x, int) else html.escape(str(x))


def _pts(x: Any, signed: bool = True) -> str:
    """A difference of shares in percentage points."""
    if _nan(x):
        return "–"
    if abs(x) < 0.0005:
        return "0.0"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _p(x: Any) -> str:
    if _nan(x):
        return "–"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def _ci(ci: Sequence[float], fmt=lambda x: _fmt(x, pct=True)) -> str:
    if ci is None or any(_nan(c) for c in ci):
        return "–"
    return f"<span class=ci>[{fmt(ci[0])}, {fmt(ci[1])}]</span>"


def _rel(x: Any) -> str:
    return "–" if _nan(x) else f"×{x:.2f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(path: Path, alt: str, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _paired_sweep_table(summary: dict[str, Any], trials: dict[str, Any] | None, numbers: dict[str, int]) -> str:
    """Mean paired difference to the baseline at every swept BER, with its Holm-adjusted p (over the
    variants at that BER): where along the sweep a protection starts to matter."""
    bers = sorted({r["ber"] for v in summary["variants"] for r in _ber_results(v)})
    per_ber = {b: {r["name"]: r for r in paired_rows(summary, trials, b)[0]} for b in bers}
    names = [v["name"] for v in summary["variants"] if any(v["name"] in per_ber[b] for b in bers)]
    if not names:
        return ""
    def cell(name: str, ber: float) -> str:
        r = per_ber[ber].get(name)
        if r is None:
            return "–"
        diff = _pts(r["mean_difference"])
        if not _nan(r["p_holm"]) and r["p_holm"] < 0.05:
            diff = f"<b>{diff}</b>"
        return f"{diff}<br><span class=note>p {_p(r['p_holm'])}</span>"

    rows = [[str(numbers[name]), html.escape(name), *(cell(name, b) for b in bers)] for name in names]
    table = _table(["#", "variant", *[f"BER {fmt_ber(b)}" for b in bers]], rows, "sweep")
    return ("<h3>Across the sweep</h3>" + table + "<p class=note>Mean paired difference in accuracy to the "
            "baseline (points) at every BER, with the paired t-test's p adjusted by Holm over the variants at "
            "that BER; bold: p &lt; 0.05.</p>")


def _config_table(config: dict[str, Any]) -> str:
    """The comparison's settings as a two-column table, BERs written as typed."""
    def value(key: str, v: Any) -> str:
        if "ber" in key and isinstance(v, (int, float)) and not isinstance(v, bool):
            return fmt_ber(float(v))
        if "ber" in key and isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            return ", ".join(fmt_ber(float(x)) for x in v)
        if isinstance(v, list) and all(isinstance(x, int) for x in v):
            return ", ".join(str(x) for x in v)
        return html.escape(json.dumps(v) if not isinstance(v, str) else v)
    return _table(["setting", "value"], [[html.escape(k), value(k, v)] for k, v in config.items()], "config")


def _bit_kind(bit: int) -> str:
    return "sign" if bit == 31 else "exponent" if bit >= 23 else "mantissa"


def _tol_text(t: tuple[float | None, str]) -> str:
    b, rel = t
    if b is None:
        return "–"
    return {"=": fmt_ber(b), ">=": f"≥ {fmt_ber(b)}", "<": f"< {fmt_ber(b)}"}[rel]


def _activation_faults(summary: dict[str, Any]) -> bool:
    config = summary.get("config", {})
    return any(str(config.get(k, "")).startswith("activation") for k in ("target", "fault_target"))


def _fault_target(summary: dict[str, Any]) -> str:
    if _activation_faults(summary):
        return "the float32 outputs of their layers (activations, per value per inference)"
    return "their float32 parameter memory (copies and protection bounds included)"


def _ber_definition(summary: dict[str, Any]) -> str:
    if _activation_faults(summary):
        return ("each bit of each float32 value a faulted layer outputs flips independently with this "
                "probability, per inference (transient activation faults); the number of flips is binomial.")
    return ("each stored bit of the float32 parameter memory (weights and biases of every Conv2d/Linear, plus "
            "everything a protection adds: copies, correction and restriction bounds) flips independently with "
            "this probability, once per trial; the number of flips per tensor is binomial.")


def _definitions(summary: dict[str, Any]) -> str:
    level = confidence(summary)
    level_txt = f"{100 * level:.4g}%" if level else "the level each row states"
    methods = ", ".join(ci_methods(summary))
    n = summary.get("inputs", "?")
    items = [
        ("Bit error rate (BER)", _ber_definition(summary)),
        ("Trial", f"one draw of faults, then one evaluation of the whole test split ({n} inputs) by the faulty "
         "model, compared with the fault-free (golden) model on the same inputs."),
        ("Clean accuracy", "top-1 accuracy of the variant without faults on the test split."),
        ("Accuracy under faults", "top-1 accuracy of the faulty model, averaged over trials. An input whose "
         "logits hold NaN or Inf counts as wrong."),
        ("SDC (silent data corruption)", "share of inputs whose top-1 class differs from the golden model's."),
        ("Critical SDC", "share of inputs the golden model classifies correctly and the faulty one does not."),
        ("DUE (detected unrecoverable error)", "share of inputs whose logits hold NaN or Inf (detectable by a "
         "finiteness check); such inputs also count as wrong and as SDCs."),
        ("Confidence intervals", f"two-sided, at {level_txt}, of the mean over trials; method: {methods} "
         f"(for a fixed number of trials: below {BOUNDED_CI_BELOW:,} trials, or when all trials are equal, the "
         "betting interval for that number, valid for shares at every size and never of zero width, else "
         "Student-t; the betting confidence sequence for --trials auto, valid under its data-dependent stop). "
         "Shares are clipped to [0, 1]."),
        ("Tolerable BER", f"the highest BER of the sweep at which the mean accuracy under faults stays within "
         f"{100 * TOLERANCE:.0f} point of the variant's clean accuracy, there and at every lower BER swept. "
         "Conservative: the same with the CI's lower bound. “≥ x”: it held at the highest BER swept; "
         "“< x”: it failed already at the lowest. Resolution is the sweep's spacing."),
        ("AUC", "area under accuracy vs log10(BER) over the sweep (trapezoids), divided by the number of "
         "decades: the mean accuracy over the swept decades, in [0, 1]. Its CI is normal, from the points' "
         "standard errors (each BER has its own trials, so the points are independent)."),
        ("Paired test", "per trial index, Δ = variant accuracy − baseline accuracy at the same BER "
         "(same seed, same trial index, same inputs); mean Δ with its CI (the campaigns' rule on Δ rescaled "
         "from [-1, 1] to [0, 1]), the paired t-test's "
         "two-sided p, the exact sign test's p (zero differences dropped), and Holm's adjustment of the t "
         "p-values over all variants compared."),
        ("Critical flip (bit sensitivity)", "a single bit flip at the given bit position of a uniformly drawn "
         + ("value of the variant's layer outputs (the same value in every inference of the trial: one flip "
            "per inference)" if _activation_faults(summary) else "parameter of the variant's memory")
         + " that turns at least one correctly classified test input wrong. "
         f"Its share has a Wilson score interval at {level_txt}; with fewer than {MIN_FLIPS} flips a share "
         "means little and is marked. The mean critical-SDC share per flip (severity) is in the table."),
        ("Pareto front", "the variants no other variant dominates: none is at most as costly and at least as "
         "accurate (at the report BER), strictly better in one of the two. Computed on the means: a variant "
         "whose CI overlaps the front's is not shown to be worse."),
        ("Costs", "parameters include the values a protection adds (copies, bounds); MACs count multiply-"
         "accumulates of Conv2d/Linear layers plus the element-wise operations of corrections and checks, per "
         "input; latency is the median ms per forward on this machine's CPU with one thread, timed in "
         "interleaved rounds across all variants, at batch 1 and 128."),
    ]
    return "<dl class=\"defs\">" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                                           for k, v in items) + "</dl>"


# the page runs no script and loads nothing: its images are data: URIs, its style is inline; a
# script that found its way in (a hostile summary, a bug) is blocked by the browser
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 1.2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.35; }
h1 { font-size: 1.45rem; margin-bottom: 0.3rem; } h3 { font-size: 1rem; margin: 1rem 0 0.2rem; }
h2 { font-size: 1.15rem; margin-top: 1.8rem;
  border-bottom: 1px solid #ddd; }
p.lead { margin-top: 0.2rem; }
.keys { background: #f6f8fa; border-left: 4px solid #c0392b; padding: 0.5rem 0.9rem; margin: 0.8rem 0; }
.keys ul { margin: 0.2rem 0; padding-left: 1.2rem; }
table { border-collapse: collapse; font-size: 0.82rem; width: 100%; margin: 0.4rem 0; }
th, td { border-bottom: 1px solid #e5e5e5; padding: 0.25rem 0.45rem; text-align: right; vertical-align: top; }
th { background: #f3f3f3; font-weight: 600; }
td.l, th.l { text-align: left; }
td.ci, span.ci { white-space: nowrap; }
td:nth-child(1), th:nth-child(1), td:nth-child(2), th:nth-child(2) { text-align: left; }
table.config { width: auto; } table.config td { text-align: left; font-family: ui-monospace, monospace; }
table.bits { font-size: 0.72rem; } table.bits td { padding: 0.15rem 0.3rem; }
table.bits th { font-weight: 600; font-size: 0.68rem; }
figure { margin: 0.6rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.8rem; color: #444; margin-top: 0.2rem; }
.note { font-size: 0.82rem; color: #444; } td .note { font-size: 0.92em; }
.warn { color: #8a4b00; }
dl.defs dt { font-weight: 600; margin-top: 0.45rem; } dl.defs dd { margin-left: 1.2rem; font-size: 0.88rem; }
pre { background: #f7f7f7; padding: 0.75rem; white-space: pre-wrap; word-break: break-all; font-size: 0.72rem; }
nav { font-size: 0.85rem; } nav a { margin-right: 0.7rem; }
@media print {
  body { max-width: none; margin: 0; font-size: 10pt; }
  nav { display: none; }
  table { font-size: 8pt; page-break-inside: auto; } table.bits { font-size: 6.5pt; }
  table.bits td, table.bits th { padding: 0.1rem 0.12rem; }
  span.ci { white-space: normal; } th, td { padding: 0.15rem 0.25rem; }
  thead { display: table-header-group; }
  tr, figure, dl.defs dt, dl.defs dd { page-break-inside: avoid; break-inside: avoid; }
  h2 { page-break-after: avoid; break-after: avoid; }
  figure img { max-width: 100%; border: none; }
  a { color: inherit; text-decoration: none; }
}
"""


def render_html(summary: dict[str, Any], plots: dict[str, Path], trials: dict[str, Any] | None = None,
                fronts: dict[str, list[str]] | None = None) -> str:
    """One page, no external resource: the plots are embedded as base64 PNGs."""
    ber = summary["report_ber"]
    B = fmt_ber(ber)
    variants = summary["variants"]
    numbers = {v["name"]: i + 1 for i, v in enumerate(variants)}
    fronts = fronts or {}
    cih = ci_header(summary)
    tol = tolerance_rows(summary)
    tol_by = {t["name"]: t for t in tol}
    pairs, pair_note = paired_rows(summary, trials, ber)
    bits = bit_rows(summary, trials)
    heat_drawn = "layer_bit_heatmap" in plots and plots["layer_bit_heatmap"].exists()

    # overview: every variant at the report BER, with costs, the front it sits on
    overview = []
    for v in variants:
        r = _at_ber(v, ber)
        rel = v.get("relative_cost", {})
        on = [label for key, label in (("params", "P"), ("macs", "M"), ("latency_b1_ms", "L1"),
                                       ("latency_b128_ms", "L128")) if v["name"] in fronts.get(key, [])]
        t = tol_by[v["name"]]
        overview.append([
            str(numbers[v["name"]]), f"<b>{html.escape(v['name'])}</b><br><span class=note>"
                                     f"{html.escape(v.get('description', ''))}</span>",
            _fmt(_clean(v), pct=True),
            _fmt(r["accuracy_mean"], pct=True) if r else "–", _ci(r["accuracy_ci"]) if r else "–",
            _fmt(r["critical_sdc_mean"], pct=True) if r else "–", _fmt(r["due_mean"], pct=True) if r else "–",
            _tol_text(t["tolerable_ci"]),
            _rel(rel.get("params")), _rel(rel.get("macs")), _rel(rel.get("latency_b1_ms")),
            _rel(rel.get("latency_b128_ms")), " ".join(on) or "",
        ])
    overview_table = _table(
        ["#", "variant", "clean acc.", f"acc. @ BER {B}", cih, "crit. SDC", "DUE", "tolerable BER (cons.)",
         "params", "MACs", "latency b1", "latency b128", "on front"], overview, "overview")

    # key findings, computed, never hand-written
    keys = []
    ranked = sorted((v for v in variants if _at_ber(v, ber)), key=lambda v: -_at_ber(v, ber)["accuracy_mean"])
    if ranked:
        best = ranked[0]
        rb = _at_ber(best, ber)
        test = next((p for p in pairs if p["name"] == best["name"]), None)
        if test is None or _nan(test.get("p_holm")):
            caveat = ""
        elif test["p_holm"] < 0.05:
            caveat = f"; {_pts(test['mean_difference'])} points over the baseline (Holm p {_p(test['p_holm'])})"
        else:
            caveat = (f"; <b>not</b> shown to differ from the baseline (Holm p {_p(test['p_holm'])}: "
                      "more trials needed)")
        keys.append(f"Most accurate at BER {B}: <b>{html.escape(best['name'])}</b>, "
                    f"{_fmt(rb['accuracy_mean'], pct=True)} {_ci(rb['accuracy_ci'])}, at "
                    f"{_rel(best.get('relative_cost', {}).get('macs'))} the baseline's MACs{caveat}.")
    base = next((v for v in variants if v["name"] == "baseline"), None)
    if base is not None and _at_ber(base, ber):
        rb = _at_ber(base, ber)
        keys.append(f"Unprotected baseline at BER {B}: {_fmt(rb['accuracy_mean'], pct=True)} "
                    f"{_ci(rb['accuracy_ci'])} (clean {_fmt(_clean(base), pct=True)}).")
    if "macs" in fronts:
        keys.append("Pareto front in MACs: " + ", ".join(f"{numbers[n]} {html.escape(n)}" for n in fronts["macs"])
                    + "; every other variant is beaten by one of these on both cost and accuracy.")
    if pairs:
        sig = [p for p in pairs if not _nan(p["p_holm"]) and p["p_holm"] < 0.05]
        keys.append(f"{len(sig)} of {len(pairs)} variants differ from the baseline at BER {B} "
                    "(paired t-test, Holm-adjusted p &lt; 0.05).")
    keys_html = "<div class=keys><b>In short</b><ul>" + "".join(f"<li>{k}</li>" for k in keys) + "</ul></div>"

    # Pareto table
    pareto_rows = []
    for v in variants:
        r = _at_ber(v, ber)
        rel, cost = v.get("relative_cost", {}), v.get("cost", {})
        def cell(key: str, unit: str = "") -> str:
            mark = " ◆" if v["name"] in fronts.get(key, []) else ""
            return f"{_fmt(cost.get(key))}{unit}{_iqr_text(cost.get(f'{key}_iqr'))} ({_rel(rel.get(key))}){mark}"
        pareto_rows.append([
            str(numbers[v["name"]]), html.escape(v["name"]),
            _fmt(r["accuracy_mean"], pct=True) if r else "–", _ci(r["accuracy_ci"]) if r else "–",
            cell("params"), cell("macs"), cell("latency_b1_ms", " ms"), cell("latency_b128_ms", " ms"),
        ])
    pareto_table = _table(["#", "variant", f"acc. @ BER {B}", cih, "params", "MACs", "latency b1 (median)",
                           "latency b128 (median)"], pareto_rows, "pareto")
    spread = all(_latency_spread(v, "latency_b1_ms", variants) is not None for v in variants)
    repeats = summary.get("config", {}).get("latency_repeats")
    latency_note = (" Latency bars: interquartile range of the timing rounds, relative to the baseline's median."
                    if spread else
                    f" Latency is the median of {_text(repeats or 'several')} interleaved timing rounds per variant; "
                    "this summary records no spread for it (no quartiles or per-round times), so no error bar "
                    "can be drawn on the latency axes: treat latency differences of a few percent, and any on "
                    "a loaded machine, as unresolved.")

    # tolerable BER and AUC
    bauc = tol_by.get("baseline", {}).get("auc")
    tol_table = _table(
        ["#", "variant", "clean acc.", "tolerable BER (mean)", "tolerable BER (CI low)", "AUC",
         f"AUC {cih}", "Δ AUC vs baseline (pts)"],
        [[str(numbers[t["name"]]), html.escape(t["name"]), _fmt(t["clean"], pct=True), _tol_text(t["tolerable"]),
          _tol_text(t["tolerable_ci"]), _fmt(t["auc"], pct=True), _ci(t["auc_ci"]),
          _pts(t["auc"] - bauc) if t["name"] != "baseline" and not _nan(bauc) and not _nan(t["auc"]) else "–"]
         for t in tol], "tol")
    swept = sorted({r["ber"] for v in variants for r in _ber_results(v)})
    sweep_txt = ", ".join(fmt_ber(b) for b in swept)

    # paired tests
    if pairs:
        pair_table = _table(
            ["#", "variant", "test", "pairs", "mean Δ acc. (pts)", f"Δ {cih} (pts)", "p (t)", "p (Holm)",
             "p (sign)"],
            [[str(numbers[p["name"]]), html.escape(p["name"]), html.escape(p["test"]), str(p["n"]),
              _pts(p["mean_difference"]), _ci(p["ci"], _pts), _p(p["p_t"]), _p(p["p_holm"]), _p(p["p_sign"])]
             for p in pairs], "pairs")
        pair_html = f"{pair_table}<p class=note>{html.escape(pair_note)}</p>" + _paired_sweep_table(
            summary, trials, numbers)
    else:
        pair_html = f"<p class=warn>No paired tests: {html.escape(pair_note)}.</p>"

    # bit sensitivity table
    if bits:
        all_bits = sorted({b for per in bits.values() for b in per}, key=int)
        few = False
        rows = []
        for b in all_bits:
            cells = []
            for name in bits:
                row = bits[name].get(b)
                if row is None:
                    cells.append("")
                elif row["rate"] is None:
                    cells.append(f"{_fmt(row['mean_share'], pct=True)}")
                else:
                    mark = "" if row["n"] >= MIN_FLIPS else "†"
                    few |= bool(mark)
                    strong = row["k"] > 0
                    count = f"<b>{row['k']}/{row['n']}</b>" if strong else f"{row['k']}/{row['n']}"
                    lo, hi = row["ci"]
                    cells.append(f"{count}{mark}<br><span class=note>{100 * lo:.0f}–{100 * hi:.0f}%"
                                 f"<br>({_fmt(row['mean_share'], pct=True)})</span>")
            rows.append([f"bit {b}<br><span class=note>{_bit_kind(int(b))}</span>", *cells])
        bit_table = _table(["bit", *[f"{numbers[n]}. {html.escape(n).replace('_', '_<wbr>')}" for n in bits]],
                           rows, "bits")
        no_flip_data = all(r["rate"] is None for per in bits.values() for r in per.values())
        bit_note = ("Cells: critical flips / flips (bold when any), the Wilson interval of that share, and in "
                    "parentheses the mean share of inputs turned into critical SDCs per flip (severity). Only the "
                    "bits the run measured are shown. Every bit's campaign uses the same seed, so its k-th flip hits "
                    "the same parameter whatever the bit: across bits, a variant's cells compare the same "
                    "parameters.")
        if few:
            bit_note += (f" † fewer than {MIN_FLIPS} flips: the share is too noisy to rank variants or bits "
                         "(rerun `ftcnn compare` with a larger --bit-trials).")
        if no_flip_data:
            bit_note = ("The per-flip records are missing (no SQLite files, no report_data.json): only the mean "
                        "critical-SDC share per flip from summary.json is shown, without intervals.")
        bit_html = f"{bit_table}<p class=note>{html.escape(bit_note)}</p>"
    else:
        bit_html = "<p class=warn>This run measured no single-bit flips (--bit-trials 0).</p>"

    if heat_drawn:
        heat_html = _img(plots["layer_bit_heatmap"], "critical-SDC rate by tensor and bit",
                         "Single-flip campaigns record the faulted tensor and bit of every flip "
                         "(bits/VARIANT/bitNN/results.sqlite), so each cell is the share of flips that landed in "
                         "that tensor at that bit and caused a critical SDC, with its counts. Flips land in "
                         "proportion to a tensor's size: small tensors get few or none, and a cell with a "
                         f"handful of flips (well under {MIN_FLIPS}) is an anecdote, not a rate.")
    else:
        heat_html = ("<p class=warn>No tensor x bit heatmap: this run folder holds no per-flip records with "
                     "their faulted tensor (single-flip campaigns missing, or --bit-trials 0).</p>")

    def fig(name: str, alt: str, caption: str) -> str:
        return _img(plots[name], alt, caption) if name in plots and plots[name].exists() else ""

    detail = [[html.escape(r["variant"]), fmt_ber(r["ber"]), str(r["trials"]), _fmt(r["accuracy_mean"], pct=True),
               _ci((r["accuracy_ci_low"], r["accuracy_ci_high"])),
               _fmt(r["sdc_mean"], pct=True), _fmt(r["critical_sdc_mean"], pct=True), _fmt(r["due_mean"], pct=True)]
              for r in summary_rows(summary)]
    detail_table = _table(["variant", "BER", "trials", "accuracy", cih, "SDC", "critical SDC", "DUE"],
                          detail, "detail")
    config = _config_table(summary.get("config", {}))
    versions = html.escape(", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items()))
    title = f"ftcnn comparison: {summary.get('model_name', 'model')} on {summary.get('data', '')}"
    trials_n = sorted({r["trials"] for v in variants for r in v["results"]})
    trials_txt = str(trials_n[0]) if len(trials_n) == 1 else f"{trials_n[0]}–{trials_n[-1]}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class=lead>{len(variants)} variants under independent bit flips in {html.escape(_fault_target(summary))},
BERs {sweep_txt}; {trials_txt} trials per variant and BER, each on the whole test
split ({_text(summary.get('inputs', '?'))} inputs), seed {_text(summary.get('config', {}).get('seed', '?'))}. Golden (fault-free)
accuracy of the baseline: <b>{_fmt(summary.get('golden_accuracy'), pct=True)}</b>. Intervals: {cih}
({html.escape(', '.join(ci_methods(summary)))}). Every metric is defined <a href="#definitions">below</a>.</p>
<nav><a href="#overview">overview</a><a href="#pareto">Pareto</a><a href="#ber">accuracy vs BER</a>
<a href="#tolerance">tolerable BER</a><a href="#paired">paired tests</a><a href="#bits">bits</a>
<a href="#heatmap">tensor × bit</a><a href="#definitions">definitions</a><a href="#all">all results</a></nav>
{keys_html}
<section id="overview"><h2>Overview at BER {B}</h2>
{overview_table}
<p class=note>Costs are relative to the baseline (×1.00 = no overhead). “on front”: the variant is on the Pareto
front of accuracy at BER {B} vs parameters (P), MACs (M), latency at batch 1 (L1) or 128 (L128).</p></section>
<section id="pareto"><h2>Cost vs accuracy under faults (Pareto fronts at BER {B})</h2>
{fig("pareto", "Pareto plots", "Each panel: accuracy at BER " + B + " (bars: " + cih + ") against one cost relative "
     "to the baseline. Red points and line: the Pareto front (named); grey hollow points: dominated variants, "
     "numbered as in the table (◆: on that cost's front)." + latency_note)}
{pareto_table}</section>
<section id="ber"><h2>Accuracy vs bit error rate</h2>
{fig("accuracy_vs_ber", "accuracy vs BER", "One panel per variant: its mean accuracy under faults with the " + cih
     + " band, its clean accuracy (dotted), the baseline for reference (dashed grey), and its conservative "
     "tolerable BER (vertical line).")}</section>
<section id="tolerance"><h2>Tolerable BER and area under the curve</h2>
{tol_table}
<p class=note>Tolerable BER: highest swept BER ({sweep_txt}) at which accuracy stays within
{100 * TOLERANCE:.0f} point of clean accuracy (mean, and conservatively the {cih} lower bound). AUC: mean accuracy
over the swept decades of log10(BER).</p></section>
<section id="paired"><h2>Is a protection's gain real? Paired tests against the baseline at BER {B}</h2>
{pair_html}</section>
<section id="bits"><h2>Bit sensitivity (single flips)</h2>
{fig("bit_sensitivity", "bit sensitivity", "Share of single flips at each measured bit that cause a critical SDC, "
     "per variant, with Wilson " + cih + "s; hollow points: fewer than " + str(MIN_FLIPS) + " flips.")}
{bit_html}</section>
<section id="heatmap"><h2>Where flips hurt: tensor × bit</h2>
{heat_html}</section>
<section id="vulnerability"><h2>Per-layer vulnerability scores</h2>
{fig("vulnerability", "vulnerability", "Channel scores of each layer of the original model, sorted; these choose "
     "the channels hardening protects and pruning removes.")}</section>
<section id="definitions"><h2>Definitions</h2>
{_definitions(summary)}</section>
<section id="all"><h2>All results</h2>
{detail_table}</section>
<section id="config"><h2>Configuration</h2>
<p>Versions: {versions}</p>
{config}</section>
</body></html>
"""


def make_plots(summary: dict[str, Any], scores: dict[str, Any] | None, folder: Path,
               trials: dict[str, Any] | None = None) -> tuple[dict[str, Path], dict[str, list[str]]]:
    folder.mkdir(parents=True, exist_ok=True)
    fronts = plot_pareto(summary, folder / "pareto")
    plot_accuracy_vs_ber(summary, folder / "accuracy_vs_ber", tolerance_rows(summary))
    plot_bit_sensitivity(summary, folder / "bit_sensitivity", bit_rows(summary, trials))
    made = list(PLOTS)
    layer_order = list((scores or {}).get("layers", {}))
    if not plot_layer_bit_heatmap(summary, folder / "layer_bit_heatmap", heatmap_data(summary, trials, layer_order)):
        made.remove("layer_bit_heatmap")
        for ext in ("png", "svg"):
            (folder / f"layer_bit_heatmap.{ext}").unlink(missing_ok=True)
    plot_vulnerability(scores or {"layers": {}}, folder / "vulnerability")
    for old in ("overhead_vs_resilience",):  # the previous report's plot, replaced by the Pareto plot
        for ext in ("png", "svg"):
            (folder / f"{old}.{ext}").unlink(missing_ok=True)
    return {name: folder / f"{name}.png" for name in made}, fronts


def build_report(run_dir: str | Path) -> Path:
    """Rebuild the plots, summary.csv and ``report.html`` of a comparison from its stored results."""
    run = Path(run_dir)
    path = run / "summary.json"
    if not path.is_file():
        raise ValueError(f"{run} holds no summary.json (run `ftcnn compare` into it first)")
    with files.exclusive_folder(run):  # one writer: a compare still running there is refused
        summary = readback.read_json(path, readback.COMPARE_SUMMARY)
        scores = None
        scores_path = run / "scores.json"
        if scores_path.is_file():
            scores = readback.read_json(scores_path, readback.SCORES)
        trials = load_trials(run, summary)
        plots, fronts = make_plots(summary, scores, run / "plots", trials)
        write_csv(summary, run / "summary.csv")
        out = run / "report.html"
        _write_text(out, render_html(summary, plots, trials, fronts))
    return out
