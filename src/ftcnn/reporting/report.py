"""A self-contained HTML page from any run folder's stored results (design §6): the data of its
figures here, the drawing in ``ftcnn.reporting.plots``.

``ftcnn report RUN`` reads the kind of run from its files (``run_kind``): a protect run (or
``ftcnn pipeline --max-macs``) by its ``front.json``, a comparison, a pipeline and an inject
campaign by their ``summary.json`` (variants, stages, results), each checked by its ``readback``
schema; anything else is refused in one line. It never reruns a trial, so the page can be rebuilt
at any time. For a comparison it reads what ``ftcnn compare`` stored:

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
from pathlib import Path
from typing import Any, Sequence

from ftcnn import files, readback
from ftcnn.campaigns import store
from ftcnn.reporting import plots
from ftcnn.campaigns.metrics import BOUNDED_CI_BELOW
from ftcnn.campaigns.paired import (auc_log_ber, fmt_ber, holm, paired_test, pareto_front, tolerable_ber, welch_test,
                          wilson_ci)
from ftcnn.reporting.plots import MIN_FLIPS

PLOTS = ("pareto", "accuracy_vs_ber", "bit_sensitivity", "layer_bit_heatmap", "vulnerability")
CSV_FIELDS = ("variant", "ber", "trials", "accuracy_mean", "accuracy_ci_low", "accuracy_ci_high",
              "confidence", "sdc_mean", "critical_sdc_mean", "due_mean", "clean_accuracy", "params", "macs",
              "latency_b1_ms", "latency_b128_ms", "relative_params", "relative_macs",
              "relative_latency_b1_ms", "relative_latency_b128_ms")
REPORT_DATA = "report_data.json"
TOLERANCE = 0.01          # "within 1 point of clean accuracy"
COSTS = (("params", "parameters (protection values included)"), ("macs", "MACs per input"),
         ("latency_b1_ms", "CPU latency, batch 1"), ("latency_b128_ms", "CPU latency, batch 128"))


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

def _page_head(title: str) -> str:
    """The start of every page ftcnn writes: the CSP (no script, no remote load), the style, the title."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
"""


def collect_trials(run: Path, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The per-trial values the page needs, from the run folder's SQLite files (None if none)."""
    campaigns: dict[str, Any] = {}
    bits: dict[str, Any] = {}
    for v in summary["variants"]:
        name = v["name"]
        got = store.read_trials(run / "campaigns" / name / "results.sqlite", "point, trial, accuracy",
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
                got = store.read_trials(db_path, "n_faults, critical_sdc, sites", readback.FLIP_ROWS)
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


# --- figures: the data each needs (``ftcnn.reporting.plots`` draws them) ----------------------------------

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


def curves(summary: dict[str, Any], tol: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Per variant with BER results, its accuracy curve for ``plots.accuracy_vs_ber``; and the baseline's."""
    tol_by = {t["name"]: t for t in tol}
    out, baseline = [], None
    for v in summary["variants"]:
        res = _ber_results(v)
        if not res:
            continue
        t = tol_by.get(v["name"], {}).get("tolerable_ci", (None, ""))
        clean = _clean(v)
        curve = {"name": v["name"], "number": len(out) + 1, "bers": [r["ber"] for r in res],
                 "means": [r["accuracy_mean"] for r in res], "lows": [r["accuracy_ci"][0] for r in res],
                 "highs": [r["accuracy_ci"][1] for r in res], "clean": None if _nan(clean) else clean,
                 "tolerable": t[0] if t[0] is not None and t[1] != "<" else None}
        out.append(curve)
        if v["name"] == "baseline":
            baseline = curve
    return out, baseline


def pareto_panels(summary: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Per cost, the points of ``plots.pareto`` (accuracy at the report BER, its CI, the cost
    relative to the baseline, a latency's spread) and the front; and each cost's front (names)."""
    ber = summary["report_ber"]
    variants = summary["variants"]
    numbers = {v["name"]: i + 1 for i, v in enumerate(variants)}
    panels, fronts = [], {}
    for key, what in COSTS:
        if not any(not _nan(v.get("relative_cost", {}).get(key)) for v in variants):
            continue
        pts = []
        for v in variants:
            r, rel = _at_ber(v, ber), v.get("relative_cost", {}).get(key)
            if r is None or _nan(rel) or _nan(r["accuracy_mean"]):
                continue
            pts.append((float(rel), float(r["accuracy_mean"]), r["accuracy_ci"], numbers[v["name"]], v["name"],
                        _latency_spread(v, key, variants)))
        front = pareto_front([p[0] for p in pts], [p[1] for p in pts]) if pts else []
        if pts:
            fronts[key] = [pts[i][4] for i in front]
        panels.append({"title": f"accuracy vs {what}", "xlabel": f"{what}, relative to the baseline (log scale)",
                       "ylabel": f"accuracy at BER {fmt_ber(ber)}", "points": pts, "front": list(front)})
    return panels, fronts


def bit_panels(summary: dict[str, Any], bits: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    numbers = {v["name"]: i + 1 for i, v in enumerate(summary["variants"])}
    return [{"name": v["name"], "number": numbers[v["name"]], "bits": bits[v["name"]]}
            for v in summary["variants"] if v["name"] in bits]


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
        names, per_table = list(bits), 8  # more variant columns overflow an A4 page: one table per 8
        bit_table = "".join(
            _table(["bit", *[f"{numbers[n]}. {html.escape(n).replace('_', '_<wbr>')}" for n in names[i:i + per_table]]],
                   [[r[0], *r[1 + i:1 + i + per_table]] for r in rows], "bits")
            for i in range(0, len(names), per_table))
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
                         "proportion to a tensor's size: small tensors get few or none, and a "
                         f"cell with fewer than {MIN_FLIPS} flips is grey and labelled “n &lt; {MIN_FLIPS}” "
                         "(a cell no flip landed in is grey and blank): no rate is drawn from it.")
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
    return _page_head(title) + f"""<p class=lead>{len(variants)} variants under independent bit flips in {html.escape(_fault_target(summary))},
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
     "per variant, with Wilson " + cih + "s, drawn only for a bit with at least " + str(MIN_FLIPS) + " flips; "
     "a bit with fewer is a grey column labelled “n &lt; " + str(MIN_FLIPS) + "” (no rate: its "
     "interval would span most of [0, 1]).")}
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
    cih = ci_header(summary)
    ber = fmt_ber(summary["report_ber"])
    panels, fronts = pareto_panels(summary)
    plots.pareto(panels, f"Pareto fronts at BER {ber}: red = not dominated (no other variant is cheaper and at "
                 f"least as accurate); bars: {cih}; numbers: see the table", folder / "pareto")
    lines, baseline = curves(summary, tolerance_rows(summary))
    plots.accuracy_vs_ber(lines, baseline, f"{summary.get('model_name', 'model')} on {summary.get('data', '')}: "
                          f"accuracy vs BER (band: {cih}; dashed grey: baseline; dotted: clean accuracy; "
                          "vertical line: conservative tolerable BER)", folder / "accuracy_vs_ber")
    bits = bit_rows(summary, trials)
    have_rates = any(b["rate"] is not None for per in bits.values() for b in per.values())
    plots.bit_sensitivity(bit_panels(summary, bits), "critical flips" if have_rates else "mean critical SDC",
                          f"share of single flips that cause a critical SDC, per measured bit ({cih}, Wilson); "
                          f"grey: fewer than {MIN_FLIPS} flips, no rate drawn", folder / "bit_sensitivity")
    made = list(PLOTS)
    layer_order = list((scores or {}).get("layers", {}))
    numbers = {v["name"]: i + 1 for i, v in enumerate(summary["variants"])}
    heat = [{"name": name, "number": numbers[name], "tensors": tensors, "bits": bit_labels, "cells": cells}
            for name, (tensors, bit_labels, cells) in heatmap_data(summary, trials, layer_order).items()]
    if not plots.layer_bit_heatmap(heat, "critical-SDC rate of single flips by faulted tensor and bit (cell: "
                                   f"critical flips / flips; grey: no flip, or fewer than {MIN_FLIPS} "
                                   f"({plots.FEW}): no rate)",
                                   folder / "layer_bit_heatmap"):
        made.remove("layer_bit_heatmap")
        for ext in ("png", "svg"):
            (folder / f"layer_bit_heatmap.{ext}").unlink(missing_ok=True)
    plots.vulnerability_profiles(scores or {"layers": {}}, folder / "vulnerability")
    for old in ("overhead_vs_resilience",):  # the previous report's plot, replaced by the Pareto plot
        for ext in ("png", "svg"):
            (folder / f"{old}.{ext}").unlink(missing_ok=True)
    return {name: folder / f"{name}.png" for name in made}, fronts


# --- the other run folders: inject, protect, pipeline -----------------------------------------------

KINDS = ("compare", "inject", "protect", "pipeline")


def _page(title: str, lead: str, sections: Sequence[tuple[str, str, str]], config: dict[str, Any] | None) -> str:
    """One self-contained page (the comparison's style and policy): a title, a lead paragraph
    (already HTML), then (id, heading, HTML) sections and the run's settings."""
    nav = "".join(f'<a href="#{sid}">{html.escape(heading)}</a>' for sid, heading, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{html.escape(heading)}</h2>\n{content}</section>\n'
                   for sid, heading, content in sections)
    settings = (f'<section id="config"><h2>Configuration</h2>\n{_config_table(config)}</section>'
                if config else "")
    return _page_head(title) + f"""<p class=lead>{lead}</p>
<nav>{nav}</nav>
{body}{settings}
</body></html>
"""


def _point_cells(point: Any) -> list[str]:
    """Accuracy and its CI of a stored point (``{accuracy, accuracy_ci}``), or dashes."""
    if not isinstance(point, dict):
        return ["–", "–"]
    return [_fmt(point["accuracy"], pct=True), _ci(point["accuracy_ci"])]


def render_protect(front: dict[str, Any], figure: Path) -> str:
    """The page of a protect run (or of ``ftcnn pipeline --max-macs``): the front, every candidate,
    the test split's numbers for the choice, and the end-to-end comparison when there is one."""
    config = front.get("config", {})
    e2e = front.get("end_to_end")
    chosen = front["chosen"]
    batch = plots.front_batch(front)
    B = fmt_ber(config["ber"]) if "ber" in config else "?"
    rows = plots.front_rows(front)
    numbers = {r["name"]: i + 1 for i, r in enumerate(rows)}
    title = (f"ftcnn pipeline (prune, then protect): {chosen} chosen" if isinstance(e2e, dict)
             else f"ftcnn protect: {chosen} chosen")
    budget = config.get("max_macs")
    lead = (f"{len(front['candidates'])} candidate protections, {len(rows)} attacked on the validation split "
            f"({_text(config.get('validation_size', '?'))} inputs, {_text(config.get('trials', '?'))} trials each) "
            f"with float32 bit flips at BER {B}; budget: MACs ≤ ×{_text(budget if budget is not None else '?')} of "
            f"{html.escape(plots.front_reference(front))} (batch {batch}). "
            f"<b>{html.escape(chosen)}</b> was chosen: {html.escape(front.get('reason', ''))}")
    caption = (f"Each point: a candidate's validation accuracy at BER {B} (bars: 95% CI) against its MACs relative "
               f"to {html.escape(plots.front_reference(front))} (weight checks shared by a batch of {batch}); "
               "numbers as in the table, one label per spot. Red: chosen; blue: within budget; grey: over "
               "budget. A candidate far beyond the budget (full TMR) is an arrow at the right edge with its ratio.")
    table = []
    for r in front["candidates"]:
        validation = r.get("validation")
        table.append([str(numbers.get(r["name"], "–")), html.escape(r["name"]), html.escape(str(r.get("family", ""))),
                      _rel(r.get("macs_ratio")), _rel(r.get("params_ratio")), _rel(r.get("latency_ratio")),
                      "yes" if r.get("within_budget") else "no", *_point_cells(validation),
                      "◆" if r.get("pareto") else "", "<b>chosen</b>" if r.get("chosen") else ""])
    sections = [
        ("front", "Candidates: accuracy under faults vs MACs", _img(figure, "protect front", caption)),
        ("candidates", "Every candidate", _table(
            ["#", "candidate", "family", f"MACs (batch {batch})", "params", "latency b128", "within budget",
             f"validation acc. @ BER {B}", "95% CI", "front", ""], table, "candidates")),
    ]
    test_rows = []
    entries = dict(front.get("test") or {})
    if isinstance(e2e, dict) and isinstance(e2e.get("original_test"), dict):
        entries["original (unpruned, unprotected)"] = e2e["original_test"]
    for name, entry in entries.items():
        for ber, point in (entry.get("bers") or {}).items():
            test_rows.append([html.escape(name), html.escape(str(entry.get("role", "test"))),
                              _fmt(entry.get("clean"), pct=True), fmt_ber(float(ber)), *_point_cells(point)])
    if test_rows:
        sections.append(("test", "On the test split (after the choice)", _table(
            ["model", "role", "clean acc.", "BER", "accuracy under faults", "95% CI"], test_rows, "test")))
    if isinstance(e2e, dict):
        clean = e2e.get("clean_test") or {}
        sections.append(("end_to_end", "End to end: original, pruned, protected", _table(
            ["model", "clean test accuracy"], [[html.escape(k), _fmt(v, pct=True)] for k, v in clean.items()], "e2e")
            + f"<p class=note>Pruned by {_text(e2e.get('criterion', '?'))} at ratio "
            f"{_text(e2e.get('prune_ratio', '?'))}"
            "; costs are relative to the original (unpruned, unprotected) model.</p>"))
    return _page(title, lead, sections, config)


def render_inject(summary: dict[str, Any], figure: Path) -> str:
    """The page of one campaign (``ftcnn inject``): accuracy under faults per BER (or fault count)."""
    config = summary["config"]
    results = summary["results"]
    title = f"ftcnn inject: {config.get('checkpoint', 'model')} on {config.get('data', '')}"
    target = str(config.get("target") or "parameters")
    lead = (f"{len(results)} point(s) of bit flips in the model's {html.escape(target)}, "
            f"{_text(config.get('inputs', '?'))} inputs per trial, "
            f"seed {_text(summary.get('seed', config.get('seed', '?')))}. "
            f"Golden (fault-free) accuracy: <b>{_fmt(summary.get('golden_accuracy'), pct=True)}</b>. Intervals: "
            f"{_text(summary.get('ci_method') or 'see each row')} at "
            + (_fmt(summary.get("confidence"), pct=True) if summary.get("confidence") else "the level each row states")
            + ".")
    rows = [[fmt_ber(r["ber"]) if r.get("ber") is not None else f"{_text(r.get('count'))} fault(s)",
             str(r["trials"]), _fmt(r["accuracy_mean"], pct=True), _ci(r["accuracy_ci"]), _fmt(r["sdc_mean"], pct=True),
             _fmt(r["critical_sdc_mean"], pct=True), _fmt(r["due_mean"], pct=True)] for r in results]
    sections = [
        ("curve", "Accuracy under faults", _img(figure, "accuracy vs BER", "Mean accuracy under faults per BER with "
                                                 "its interval (band); dotted: golden accuracy.")),
        ("results", "Every point", _table(["BER / faults", "trials", "accuracy", "CI", "SDC", "critical SDC", "DUE"],
                                          rows, "results")),
    ]
    return _page(title, lead, sections, config)


def render_pipeline(summary: dict[str, Any], figure: Path | None) -> str:
    """The page of ``ftcnn pipeline`` (prune -> fine-tune -> harden): every stage's costs and clean accuracy."""
    stages = summary["stages"]
    config = summary.get("config", {})
    record = summary.get("record", {})
    title = f"ftcnn pipeline: {record.get('checkpoint', 'model')} on {record.get('data', '')}"
    lead = (f"Pruned at ratio {_text(config.get('prune_ratio', '?'))} by {_text(config.get('criterion', '?'))}, "
            f"fine-tuned {_text(config.get('finetune_epochs', '?'))} epoch(s), hardened at ratio "
            f"{_text(config.get('harden_ratio', '?'))} ({_text(config.get('correction', '?'))}). Clean test accuracy "
            "and costs of every stage; latency: median ms per forward, one thread, timed interleaved.")
    rows = [[html.escape(name), _fmt(st.get("accuracy"), pct=True), _fmt(st.get("params")), _fmt(st.get("macs")),
             _fmt(st.get("latency_b1_ms")), _fmt(st.get("latency_b128_ms"))] for name, st in stages.items()]
    rel_rows = [[html.escape(name), *(_rel(rel.get(k)) for k in ("params", "macs", "latency_b1_ms", "latency_b128_ms"))]
                for name, rel in (summary.get("relative") or {}).items()]
    sections = [("stages", "Stages", _table(["stage", "clean test acc.", "params", "MACs", "latency b1 (ms)",
                                             "latency b128 (ms)"], rows, "stages"))]
    if rel_rows:
        sections.append(("relative", "Relative costs", _table(["comparison", "params", "MACs", "latency b1",
                                                               "latency b128"], rel_rows, "relative")))
    if figure is not None:
        sections.append(("vulnerability", "Per-layer vulnerability of the original",
                         _img(figure, "vulnerability", "Channel scores of each layer of the original model, sorted; "
                              "these chose the channels pruning removed and hardening protected.")))
    return _page(title, lead, sections, config)


def run_kind(run: Path) -> tuple[str, Path, Any]:
    """What ``run`` holds: (kind, the file that says so, its parsed content), each file read with its
    ``readback`` schema; one line naming the folder when it is none of ``KINDS``."""
    if not run.is_dir():
        raise ValueError(f"{run} is not a folder (ftcnn report takes a run folder of "
                         "inject, protect, compare or pipeline)")
    front = run / "front.json"
    if front.is_file():
        return "protect", front, readback.read_json(front, readback.PROTECT_FRONT)
    path = run / "summary.json"
    if not path.is_file():
        raise ValueError(f"{run} holds no summary.json or front.json: not a run folder of ftcnn inject, protect, "
                         "compare or pipeline")
    blob = readback.read_json(path, readback.SETTINGS)
    if "variants" in blob:
        readback.check(blob, readback.COMPARE_SUMMARY, str(path))
        return "compare", path, blob
    if "stages" in blob:
        readback.check(blob, readback.PIPELINE_SUMMARY, str(path))
        return "pipeline", path, blob
    if "results" in blob:
        readback.check(blob, readback.CAMPAIGN_SUMMARY, str(path))
        return "inject", path, blob
    raise ValueError(f"{path}: holds no variants, stages or results (not a summary of ftcnn compare, pipeline or "
                     "inject)")


def _build_compare(run: Path, summary: dict[str, Any]) -> str:
    scores = None
    scores_path = run / "scores.json"
    if scores_path.is_file():
        scores = readback.read_json(scores_path, readback.SCORES)
    trials = load_trials(run, summary)
    drawn, fronts = make_plots(summary, scores, run / "plots", trials)
    write_csv(summary, run / "summary.csv")
    return render_html(summary, drawn, trials, fronts)


def _build_inject(run: Path, summary: dict[str, Any]) -> str:
    points = [{"ber": r["ber"], "mean": r["accuracy_mean"], "low": r["accuracy_ci"][0], "high": r["accuracy_ci"][1]}
              for r in sorted((r for r in summary["results"] if r.get("ber")), key=lambda r: r["ber"])
              if r["accuracy_mean"] is not None and None not in r["accuracy_ci"]]
    stem = run / "plots" / "accuracy_vs_ber"
    stem.parent.mkdir(exist_ok=True)
    plots.campaign_curve(points, summary.get("golden_accuracy"), "accuracy under faults (band: CI; dotted: golden)",
                         stem)
    return render_inject(summary, stem.with_suffix(".png"))


def _build_protect(run: Path, front: dict[str, Any]) -> str:
    figure = run / "front.png"
    plots.protect_front(front, figure)
    return render_protect(front, figure)


def _build_pipeline(run: Path, summary: dict[str, Any]) -> str:
    figure = None
    scores_path = run / "scores_original.json"
    if scores_path.is_file():
        scores = readback.read_json(scores_path, readback.SCORES)
        stem = run / "plots" / "vulnerability"
        stem.parent.mkdir(exist_ok=True)
        plots.vulnerability_profiles(scores, stem)
        figure = stem.with_suffix(".png")
    return render_pipeline(summary, figure)


def build_report(run_dir: str | Path) -> Path:
    """Rebuild ``report.html`` (and its figures; a comparison's summary.csv too) of any run folder,
    inject, protect, compare or pipeline, from its stored results: nothing is recomputed."""
    run = Path(run_dir)
    run_kind(run)  # a folder of no known kind is refused before anything is written there (its lock included)
    with files.exclusive_folder(run):  # one writer: a run still writing there is refused
        kind, _, blob = run_kind(run)  # read again under the lock: what a finished writer left
        build = {"compare": _build_compare, "inject": _build_inject, "protect": _build_protect,
                 "pipeline": _build_pipeline}[kind]
        out = run / "report.html"
        _write_text(out, build(run, blob))
    return out
