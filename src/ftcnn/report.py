"""Plots and a self-contained HTML page from a comparison's stored results (design §6).

Everything here reads the comparison summary (``summary.json`` of a run
folder) and never recomputes a result, so ``ftcnn report RUN`` can rebuild the
page at any time.
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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ftcnn.files import atomic_write  # noqa: E402

PLOTS = ("accuracy_vs_ber", "overhead_vs_resilience", "vulnerability", "bit_sensitivity")
CSV_FIELDS = ("variant", "ber", "trials", "accuracy_mean", "accuracy_ci_low", "accuracy_ci_high",
              "confidence", "sdc_mean", "critical_sdc_mean", "due_mean", "clean_accuracy", "params", "macs",
              "latency_b1_ms", "latency_b128_ms", "relative_params", "relative_macs",
              "relative_latency_b1_ms", "relative_latency_b128_ms")


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


def ci_header(summary: dict[str, Any]) -> str:
    """"95% CI" with the level the variants' campaigns actually used (just "CI" if they differ)."""
    levels = {r.get("confidence") for v in summary["variants"] for r in v["results"]}
    level = levels.pop() if len(levels) == 1 else None
    return f"{100 * level:.4g}% CI" if isinstance(level, float) else "CI"


def write_csv(summary: dict[str, Any], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in summary_rows(summary):
        writer.writerow(row)
    _write_text(path, buf.getvalue())


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def _save(fig: plt.Figure, stem: Path) -> None:
    for ext in ("png", "svg"):
        atomic_write(stem.with_suffix(f".{ext}"), lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=120,
                                                                                 bbox_inches="tight"))
    plt.close(fig)


def _style(index: int) -> dict[str, Any]:
    markers = "osD^v<>ph*X"
    return {"marker": markers[index % len(markers)], "linestyle": "-" if index < 10 else "--"}


def plot_accuracy_vs_ber(summary: dict[str, Any], stem: Path) -> None:
    """Accuracy under faults vs BER, one line per variant with its CI band."""
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for i, v in enumerate(summary["variants"]):
        res = [r for r in v["results"] if r["ber"] and r["ber"] > 0]
        if not res:
            continue
        bers = [r["ber"] for r in res]
        ax.plot(bers, [r["accuracy_mean"] for r in res], label=v.get("label", v["name"]), **_style(i))
        ax.fill_between(bers, [r["accuracy_ci"][0] for r in res], [r["accuracy_ci"][1] for r in res],
                        alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("bit error rate (parameter memory)")
    ax.set_ylabel("top-1 accuracy under faults")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.axhline(summary.get("golden_accuracy", float("nan")), color="gray", lw=0.8, ls=":")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"{summary.get('model_name', 'model')} on {summary.get('data', '')}: accuracy vs BER")
    _save(fig, stem)


def _at_ber(v: dict[str, Any], ber: float) -> dict[str, Any] | None:
    for r in v["results"]:
        if r["ber"] is not None and math.isclose(r["ber"], ber, rel_tol=1e-9):
            return r
    return None


def plot_overhead_vs_resilience(summary: dict[str, Any], stem: Path) -> None:
    """Each variant a point: extra MACs (%) vs accuracy at the report's BER."""
    ber = summary["report_ber"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, v in enumerate(summary["variants"]):
        r = _at_ber(v, ber)
        rel = v.get("relative_cost", {}).get("macs")
        if r is None or rel is None:
            continue
        x = 100 * (rel - 1)
        ax.errorbar([x], [r["accuracy_mean"]],
                    yerr=[[r["accuracy_mean"] - r["accuracy_ci"][0]], [r["accuracy_ci"][1] - r["accuracy_mean"]]],
                    fmt=_style(i)["marker"], capsize=3, label=v.get("label", v["name"]))
        ax.annotate(v["name"], (x, r["accuracy_mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("extra MACs vs baseline (%)")
    ax.set_ylabel(f"accuracy at BER {ber:g}")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("what each protection costs and buys")
    _save(fig, stem)


def plot_vulnerability(scores: dict[str, Any], stem: Path) -> None:
    """Per layer, the channels' scores sorted from most to least vulnerable."""
    layers = scores.get("layers", {})
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for i, (name, values) in enumerate(layers.items()):
        vals = sorted((float(x) for x in values), reverse=True)
        total = sum(vals) or 1.0
        xs = [(k + 0.5) / len(vals) for k in range(len(vals))]
        ax.plot(xs, [x / total for x in vals], label=f"{name} ({len(vals)})", **_style(i), markersize=3)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("channel rank (share of the layer's filters/neurons)")
    ax.set_ylabel("share of the layer's vulnerability")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"per-layer vulnerability ({scores.get('method', '?')} scores)")
    _save(fig, stem)


def plot_bit_sensitivity(summary: dict[str, Any], stem: Path) -> None:
    """Critical-SDC rate of a single flip at each float32 bit, per variant."""
    variants = [v for v in summary["variants"] if v.get("bit_sensitivity")]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    if variants:
        bits = sorted({int(b) for v in variants for b in v["bit_sensitivity"]})
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            xs = [b + (i - (len(variants) - 1) / 2) * width for b in bits]
            ax.bar(xs, [v["bit_sensitivity"].get(str(b), 0.0) for b in bits], width=width,
                   label=v.get("label", v["name"]))
        ax.set_xticks(bits)
    ax.set_xlabel("float32 bit position (31 = sign, 30-23 = exponent, 22-0 = mantissa)")
    ax.set_ylabel("critical SDC rate of one flip")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("which bits hurt, and what each protection stops")
    _save(fig, stem)


def make_plots(summary: dict[str, Any], scores: dict[str, Any] | None, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    plot_accuracy_vs_ber(summary, folder / "accuracy_vs_ber")
    plot_overhead_vs_resilience(summary, folder / "overhead_vs_resilience")
    plot_vulnerability(scores or {"layers": {}}, folder / "vulnerability")
    plot_bit_sensitivity(summary, folder / "bit_sensitivity")
    return {name: folder / f"{name}.png" for name in PLOTS}


def _fmt(x: Any, pct: bool = False, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if pct:
        return f"{100 * x:.1f}%"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return f"{x:,}" if isinstance(x, int) else html.escape(str(x))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def render_html(summary: dict[str, Any], plots: dict[str, Path]) -> str:
    """One page, no external resource: the plots are embedded as base64 PNGs."""
    ber = summary["report_ber"]
    overview = []
    for v in summary["variants"]:
        r = _at_ber(v, ber)
        rel = v.get("relative_cost", {})
        overview.append([
            f"<b>{html.escape(v['name'])}</b>", html.escape(v.get("description", "")),
            _fmt(v.get("clean_accuracy"), pct=True),
            _fmt(r["accuracy_mean"], pct=True) if r else "–",
            f"[{_fmt(r['accuracy_ci'][0], pct=True)}, {_fmt(r['accuracy_ci'][1], pct=True)}]" if r else "–",
            _fmt(r["critical_sdc_mean"], pct=True) if r else "–",
            _fmt(r["due_mean"], pct=True) if r else "–",
            _fmt(v.get("cost", {}).get("params")), _fmt((rel.get("params", 1) - 1), pct=True),
            _fmt((rel.get("macs", 1) - 1), pct=True),
            _fmt((rel.get("latency_b1_ms", 1) - 1), pct=True), _fmt((rel.get("latency_b128_ms", 1) - 1), pct=True),
        ])
    overview_table = _table(
        ["variant", "what it is", "clean acc.", f"acc. @ BER {ber:g}", ci_header(summary), "crit. SDC", "DUE",
         "params", "+params", "+MACs", "+latency b1", "+latency b128"], overview, "overview")
    detail = [[html.escape(r["variant"]), f"{r['ber']:g}", str(r["trials"]), _fmt(r["accuracy_mean"], pct=True),
               f"[{_fmt(r['accuracy_ci_low'], pct=True)}, {_fmt(r['accuracy_ci_high'], pct=True)}]",
               _fmt(r["sdc_mean"], pct=True), _fmt(r["critical_sdc_mean"], pct=True), _fmt(r["due_mean"], pct=True)]
              for r in summary_rows(summary)]
    detail_table = _table(["variant", "BER", "trials", "accuracy", ci_header(summary), "SDC", "critical SDC",
                           "DUE"],
                          detail, "detail")
    config = html.escape(json.dumps(summary.get("config", {}), indent=2))
    versions = html.escape(", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items()))
    figures = "".join(_img(plots[name], caption) for name, caption in (
        ("accuracy_vs_ber", f"Accuracy under faults vs bit error rate (bands: {ci_header(summary)})"),
        ("overhead_vs_resilience", f"Overhead vs resilience at BER {ber:g}"),
        ("bit_sensitivity", "Critical SDC rate of a single flip per float32 bit"),
        ("vulnerability", "Per-layer vulnerability of the filters/neurons"),
    ) if name in plots and plots[name].exists())
    title = f"ftcnn comparison: {summary.get('model_name', 'model')} on {summary.get('data', '')}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 1.5rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }}
h1 {{ font-size: 1.5rem; }} h2 {{ font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 0.85rem; width: 100%; }}
th, td {{ border-bottom: 1px solid #e5e5e5; padding: 0.3rem 0.5rem; text-align: right; }}
th {{ background: #f5f5f5; position: sticky; top: 0; }}
td:first-child, th:first-child, .overview td:nth-child(2), .overview th:nth-child(2) {{ text-align: left; }}
.figs {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 1rem; }}
figure {{ margin: 0; }} figure img {{ width: 100%; height: auto; border: 1px solid #eee; }}
figcaption {{ font-size: 0.8rem; color: #555; }}
pre {{ background: #f7f7f7; padding: 0.75rem; overflow-x: auto; font-size: 0.75rem; }}
.detail-wrap {{ max-height: 28rem; overflow-y: auto; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Golden (fault-free) accuracy: <b>{_fmt(summary.get('golden_accuracy'), pct=True)}</b>.
Faults: independent bit flips in the float32 parameter memory of every Conv2d/Linear (duplicated copies
included) at each bit error rate; every trial evaluates the whole test split
({summary.get('inputs', '?')} inputs). Overheads are measured on this machine's CPU.</p>
<h2>Overview at BER {ber:g}</h2>
{overview_table}
<h2>Plots</h2>
<div class="figs">{figures}</div>
<h2>All results</h2>
<div class="detail-wrap">{detail_table}</div>
<h2>Configuration</h2>
<p>Versions: {versions}</p>
<pre>{config}</pre>
</body></html>
"""


def build_report(run_dir: str | Path) -> Path:
    """Rebuild the plots and ``report.html`` of a comparison from its ``summary.json``."""
    run = Path(run_dir)
    path = run / "summary.json"
    if not path.is_file():
        raise ValueError(f"{run} holds no summary.json (run `ftcnn compare` into it first)")
    try:
        summary = json.loads(path.read_text())
        summary["variants"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path} is not a comparison summary") from None
    scores = None
    scores_path = run / "scores.json"
    if scores_path.is_file():
        scores = json.loads(scores_path.read_text())
    plots = make_plots(summary, scores, run / "plots")
    write_csv(summary, run / "summary.csv")
    out = run / "report.html"
    _write_text(out, render_html(summary, plots))
    return out
