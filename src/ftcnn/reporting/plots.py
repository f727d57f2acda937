"""Every figure ftcnn draws, in one place (issue 20: drawing lived in protect, vulnerability and report).

The modules that compute the numbers (``protect``, ``vulnerability``, ``report``) hand this
module plain data (lists, dicts, a ``front.json`` blob) and a file name; nothing here
computes a statistic, so a figure redrawn from stored data is the figure first drawn.

What a reader should see at a glance (issue 23, item 4):

- labels sit at their points and never overlap (``place_labels``: nearest free spot, a
  leader line when pushed away; points that share a spot share one label);
- axes cover the candidates that matter: one far off to the right (full TMR at x3) is an
  annotated arrow at the axis edge, not the reason every other point sits in a tenth of it;
- no interval from fewer flips than it needs: a bit or tensor x bit cell with fewer than
  ``MIN_FLIPS`` flips is grey and labelled ``n < 30``, never drawn as a rate;
- every cost axis names the batch its MACs count at.

matplotlib is imported lazily (0.4 s): only when a figure is drawn, never at a command's start.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ftcnn.files import atomic_write
from ftcnn.lazy import headless_matplotlib, lazy
from ftcnn.campaigns.paired import fmt_ber

plt = lazy("matplotlib.pyplot", setup=headless_matplotlib)
ticker = lazy("matplotlib.ticker")

MIN_FLIPS = 30            # fewer single flips per cell than this: no rate, no interval, a grey "n < 30" cell
DEFAULT_BATCH = 128       # the batch a protect front's MACs count at when the file does not say
# matplotlib's tab10, written out (reading it from pyplot would import pyplot at start-up), then four more
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf", "#6b3e26", "#1a5e63", "#8c6d31", "#393b79")
FEW = f"n < {MIN_FLIPS}"
FEW_GREY = "0.86"          # a cell or bit with fewer flips than that, and a cell no flip landed in
LABEL_GID = "point-label"  # the gid of every label placed at a point (tests find them by it)

Box = tuple[float, float, float, float]


# --- saving and small pieces --------------------------------------------------------------------

def save(fig: Any, stem: Path, formats: Sequence[str] = ("png", "svg"), dpi: int = 110, tight: bool = True) -> None:
    """Write ``fig`` as ``stem.EXT`` for each format (atomically: never a half-written file), then close it.

    ``tight``: cropped to what the figure draws, measured once for every format (``bbox_inches="tight"``
    would draw the whole figure once more per format: most of a report's time); SVG text stays text."""
    try:
        box, pixels = None, None
        if tight:
            fig.set_dpi(dpi)
            fig.canvas.draw()
            drawn = fig.get_tightbbox(fig.canvas.get_renderer())
            box = drawn.padded(0.1)
            pixels = _cropped(fig, drawn, dpi)
        fig.set_layout_engine("none")  # laid out once: a constrained layout would rerun at every save
        with plt.rc_context({"svg.fonttype": "none"}):
            for ext in formats:
                if ext == "png" and pixels is not None:  # the draw just made, cropped: no second raster draw
                    atomic_write(Path(stem).with_suffix(".png"), lambda tmp: _write_png(pixels, tmp, dpi))
                    continue
                atomic_write(Path(stem).with_suffix(f".{ext}"),
                             lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches=box))
    finally:
        plt.close(fig)


def _cropped(fig: Any, drawn: Any, dpi: float) -> np.ndarray | None:
    """The figure's last raster draw cut to what it drew (``drawn``, inches) plus 0.1 inch of margin
    where the canvas has it; None where the drawing leaves the canvas (savefig then draws it again)."""
    width, height = fig.canvas.get_width_height(physical=True)
    x0, y0, x1, y1 = (v * dpi for v in drawn.extents)
    if x0 < -0.5 or y0 < -0.5 or x1 > width + 0.5 or y1 > height + 0.5:
        return None
    pad = 0.1 * dpi
    x0, y0, x1, y1 = max(0.0, x0 - pad), max(0.0, y0 - pad), min(width, x1 + pad), min(height, y1 + pad)
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return rgba[int(height - y1):int(math.ceil(height - y0)), int(x0):int(math.ceil(x1))].copy()


def _write_png(pixels: np.ndarray, path: str, dpi: float) -> None:
    from PIL import Image

    Image.fromarray(pixels).save(path, format="png", dpi=(dpi, dpi), compress_level=3)


def empty(stem: Path, message: str, height: float) -> None:
    """A figure that says why there is nothing to draw (a missing plot reads as 'not measured')."""
    fig, ax = plt.subplots(figsize=(6, height))
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.axis("off")
    save(fig, stem)


def ber_axis(ax: Any, bers: Sequence[float]) -> None:
    """Log x axis with ticks at the decades the sweep spans, labelled 1e-5 (not 10^-5 or 9.99e-06)."""
    ax.set_xscale("log")
    lo, hi = math.floor(math.log10(min(bers)) + 1e-9), math.ceil(math.log10(max(bers)) - 1e-9)
    ticks = [10.0 ** e for e in range(lo, hi + 1)]
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: fmt_ber(x)))
    ax.xaxis.set_minor_locator(ticker.NullLocator())  # a log axis's minor ticks: most of a panel's draw time
    ax.set_xlim(min(bers) / 1.5, max(bers) * 1.5)


def fixed_margins(fig: Any, left: float, right: float, bottom: float, top: float, wspace: float,
                  hspace: float) -> None:
    """Margins in inches (gaps between panels as a share of a panel): a fixed layout instead of
    ``tight_layout``, which measures every tick label of every panel (seconds on a 12-panel figure)."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=wspace, hspace=hspace)


def panel_grid(n: int, height: float, **shared: bool) -> tuple[Any, Any]:
    """Small multiples: ``n`` panels, 3 (4 past six) to a row, each 3.1 wide and ``height`` tall
    (plus room for the title above), laid out with fixed margins."""
    cols = 4 if n > 6 else min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.1 * cols, height * nrows + 0.5), squeeze=False, **shared)
    fixed_margins(fig, left=0.7, right=0.15, bottom=0.55, top=0.65, wspace=0.12 if shared.get("sharey") else 0.3,
                  hspace=0.55)
    return fig, axes


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def leader(box: Box, x: float, y: float, step: float = 3.0) -> list[Box]:
    """The leader line from a label's box (its centre) to its point (x, y), as small boxes every
    ``step`` pixels outside the label's box and more than 4 px from the point (where the line
    stops short of the marker): what another label must not cover."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    n = max(1, int(math.hypot(x - cx, y - cy) / step))
    out = []
    for k in range(n + 1):
        px, py = cx + (x - cx) * k / n, cy + (y - cy) * k / n
        inside = box[0] <= px <= box[2] and box[1] <= py <= box[3]
        if not inside and math.hypot(px - x, py - y) > 4:
            out.append((px - 1, py - 1, px + 1, py + 1))
    return out


def place_labels(ax: Any, points: Sequence[tuple[float, float]], labels: Sequence[tuple[int, list[str], dict]],
                 obstacles: Sequence[Box] = (), drawn: bool = False) -> list[Any]:
    """Place each label near its point where it overlaps no marker, no other label and stays in
    the axes (nearest free spot first, a leader line when pushed away); returns the placed texts.

    ``labels``: (point index, texts to try, longest first, text style). Points that share a spot
    (within a few pixels) should be given one label naming them all. A label that finds no free
    spot anywhere in the axes is left out (the figure's table still names the point): an
    overlapping label is worse than none. ``drawn``: the figure's layout is final and drawn
    already (one draw for all panels: a draw is most of a figure's time)."""
    fig = ax.figure
    if not drawn:
        fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    px = [to_px(p) for p in points]
    box = ax.get_window_extent(renderer)
    taken: list[Box] = [(x - 5, y - 5, x + 5, y + 5) for x, y in px]
    for x0, y0, x1, y1 in obstacles:  # data-space rectangles (error bars, the front's line)
        (a, b), (c, d) = to_px((x0, y0)), to_px((x1, y1))
        taken.append((min(a, c) - 2, min(b, d) - 2, max(a, c) + 2, max(b, d) + 2))
    scale = fig.dpi / 72.0

    def free(b: Box) -> bool:
        if b[0] < box.x0 + 2 or b[2] > box.x1 - 2 or b[1] < box.y0 + 2 or b[3] > box.y1 - 2:
            return False
        return not any(_overlaps(b, t) for t in taken)

    def spots(x: float, y: float, w: float, h: float):
        """Boxes around (x, y), nearest first: rings of 16 directions, then a coarse grid of the axes."""
        for r in (7, 13, 20, 30, 42, 56, 72, 90, 115, 140, 170, 210):
            for k in range(16):
                angle = k * math.pi / 8
                dx, dy = math.cos(angle), math.sin(angle)
                cx, cy = x + dx * r, y + dy * r * 0.8
                left = cx if dx > 0.3 else cx - w if dx < -0.3 else cx - w / 2
                bottom = cy if dy > 0.3 else cy - h if dy < -0.3 else cy - h / 2
                yield (left, bottom, left + w, bottom + h), r
        grid = [(gx, gy) for gx in np.arange(box.x0 + 3, box.x1 - w - 3, 12.0)
                for gy in np.arange(box.y0 + 3, box.y1 - h - 3, 8.0)]
        grid.sort(key=lambda g: (g[0] + w / 2 - x) ** 2 + (g[1] + h / 2 - y) ** 2)
        for gx, gy in grid:
            yield (gx, gy, gx + w, gy + h), 999

    labelled: list[Box] = []  # the placed labels' boxes: no leader line may cross one
    placed = []
    for index, texts, style in labels:
        x, y = px[index]
        chosen = None
        for text in texts:  # the full label first, then a shorter one (the number) where it fits no place
            probe = ax.annotate(text, points[index], xytext=(0, 0), textcoords="offset points", **style)
            ext = probe.get_window_extent(renderer)
            probe.remove()
            # a margin of 3 px a side: the placed text (centred) is measured again by the renderer,
            # and a probe at the baseline rounds differently by a fraction of a pixel
            w, h = ext.width + 6, ext.height + 6
            chosen = next(((text, cand, r) for cand, r in spots(x, y, w, h)
                           if free(cand) and (r <= 7 or not any(_overlaps(d, t) for d in leader(cand, x, y)
                                                                for t in labelled))), None)
            if chosen:
                break
        if chosen is None:
            continue
        text, (left, bottom, right, top), r = chosen
        offset = ((left + (right - left) / 2 - x) / scale, (bottom + (top - bottom) / 2 - y) / scale)
        arrow = {"arrowstyle": "-", "color": "0.5", "lw": 0.6, "shrinkA": 0, "shrinkB": 3} if r > 7 else None
        placed.append(ax.annotate(text, points[index], xytext=offset, textcoords="offset points", ha="center",
                                  va="center", arrowprops=arrow, gid=LABEL_GID, annotation_clip=False, **style))
        taken.append((left, bottom, right, top))
        labelled.append((left, bottom, right, top))
        if r > 7:  # later labels keep off this one's leader line
            taken.extend(leader((left, bottom, right, top), x, y))
    return placed


def few_flips_cell(ax: Any, x0: float, y0: float, width: float, height: float, fontsize: float = 6) -> None:
    """A cell with fewer than ``MIN_FLIPS`` flips: grey, labelled ``n < 30`` (no rate drawn)."""
    ax.add_patch(plt.Rectangle((x0, y0), width, height, facecolor=FEW_GREY, lw=0,
                               zorder=0.5))
    ax.text(x0 + width / 2, y0 + height / 2, FEW, ha="center", va="center", fontsize=fontsize, color="0.3",
            rotation=90 if height > 2 * width else 0, zorder=1)


# --- a comparison's figures (report.py computes the data) ---------------------------------------

def accuracy_vs_ber(curves: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any] | None, title: str,
                    stem: Path) -> None:
    """Small multiples: one panel per variant (its line and CI band), the baseline in grey in each.

    ``curves``: per variant ``name``, ``number``, ``bers``, ``means``, ``lows``, ``highs``, ``clean``
    (or None) and ``tolerable`` (a BER or None); ``baseline``: the baseline's curve (or None)."""
    if not curves:
        empty(stem, "no BER results", 2)
        return
    fig, axes = panel_grid(len(curves), 2.5, sharex=True, sharey=True)
    all_bers = [b for c in curves for b in c["bers"]]
    for i, ax in enumerate(axes.flat):
        if i >= len(curves):
            ax.axis("off")
            continue
        c = curves[i]
        if baseline is not None and c["name"] != baseline["name"]:
            ax.plot(baseline["bers"], baseline["means"], color="0.6", lw=1.2, ls="--", label="baseline")
        color = COLORS[i % len(COLORS)]
        ax.fill_between(c["bers"], c["lows"], c["highs"], color=color, alpha=0.25, lw=0)
        ax.plot(c["bers"], c["means"], color=color, marker="o", ms=3.5, lw=1.8)
        if c.get("clean") is not None:
            ax.axhline(c["clean"], color=color, lw=0.8, ls=":")
        if c.get("tolerable") is not None:
            ax.axvline(c["tolerable"], color="k", lw=0.7, alpha=0.5)
        ax.set_title(f"{c['number']}. {c['name']}", fontsize=9, loc="left")
        ax.grid(True, which="major", alpha=0.3)
        ber_axis(ax, all_bers)
        ax.tick_params(labelsize=8)
        ax.set_ylim(0, 1.02)
    for ax in axes[-1]:
        ax.set_xlabel("bit error rate", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy under faults", fontsize=8)
    fig.suptitle(title, fontsize=9, y=0.995)
    save(fig, stem)


def pareto(panels: Sequence[Mapping[str, Any]], title: str, stem: Path) -> None:
    """Accuracy against each cost (one panel per cost, log x), the Pareto front as a red step line,
    points numbered at their place (the front's named).

    ``panels``: per cost ``title``, ``xlabel``, ``ylabel``, ``points`` (x, y, (ci low, ci high),
    number, name, x spread (low, high) or None) and ``front`` (indices into ``points``)."""
    panels = [p for p in panels if p["points"]]
    fig, axes = plt.subplots(math.ceil(len(panels) / 2) or 1, 2,
                             figsize=(12, 4.6 * max(1, math.ceil(len(panels) / 2)) + 0.5), squeeze=False)
    pending = []
    for ax, panel in zip(axes.flat, panels):
        pts, front = panel["points"], panel["front"]
        fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
        ax.step(fx, fy, where="post", color="tab:red", lw=1.4, alpha=0.8, zorder=1, label="Pareto front")
        for j, (x, y, ci, _, _, spread) in enumerate(pts):
            on = j in front
            xe = None if spread is None else [[max(0.0, x - spread[0])], [max(0.0, spread[1] - x)]]
            ax.errorbar([x], [y], yerr=[[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]], xerr=xe, fmt="o",
                        ms=6 if on else 5, color="tab:red" if on else "0.45", mfc="tab:red" if on else "white",
                        ecolor="tab:red" if on else "0.6", elinewidth=1, capsize=2, zorder=3)
        labels = [(j, [f"{pts[j][3]} {pts[j][4]}", str(pts[j][3])],
                   {"fontsize": 8, "color": "darkred", "weight": "bold"}) for j in front]
        labels += [(j, [str(pts[j][3])], {"fontsize": 8, "color": "0.25"}) for j in range(len(pts)) if j not in front]
        xs = [p[0] for p in pts]
        # log scale: a ratio reads the same at x1.1 as at x3, and the cheap cluster near x1 spreads out
        ax.set_xscale("log")
        lo, hi = min(xs + [1.0]) / 1.08, max(xs + [1.0]) * 1.3
        ax.set_xlim(lo, hi)
        ticks = [t for t in (0.25, 0.35, 0.5, 0.7, 0.85, 1, 1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)
                 if lo <= t <= hi]
        ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"×{x:g}"))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        # the accuracies' range (CIs included), not always 0-1: crowded points need the room for labels
        ax.set_ylim(max(-0.02, min(p[2][0] for p in pts) - 0.08), min(1.04, max(p[2][1] for p in pts) + 0.08))
        ax.axvline(1.0, color="0.7", lw=0.8, ls=":")
        ax.set_xlabel(panel["xlabel"], fontsize=9)
        ax.set_ylabel(panel["ylabel"], fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.set_title(panel["title"], fontsize=10, loc="left")
        obstacles = [(x, ci[0], x, ci[1]) for x, _, ci, *_ in pts]
        obstacles += [(p[5][0], p[1], p[5][1], p[1]) for p in pts if p[5] is not None]
        obstacles += [(fx[k], fy[k], fx[k + 1], fy[k]) for k in range(len(fx) - 1)]   # the step's runs
        obstacles += [(fx[k + 1], fy[k], fx[k + 1], fy[k + 1]) for k in range(len(fx) - 1)]  # and rises
        pending.append((ax, [(p[0], p[1]) for p in pts], labels, obstacles))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9, y=0.995)
    fixed_margins(fig, left=0.8, right=0.2, bottom=0.6, top=0.75, wspace=0.2, hspace=0.45)
    fig.canvas.draw()
    for args in pending:  # after the layout is final: labels are placed in pixels
        place_labels(*args, drawn=True)
    save(fig, stem)


def bit_sensitivity(panels: Sequence[Mapping[str, Any]], ylabel: str, title: str, stem: Path) -> None:
    """Small multiples: per variant, the share of single flips at each measured bit that cause a
    critical SDC, with its interval, only where the bit has at least ``MIN_FLIPS`` flips; a bit with
    fewer is a grey ``n < 30`` column (a 0-43% interval from 5 flips is noise, not data).

    ``panels``: per variant ``name``, ``number`` and ``bits`` ({bit: {n, rate, ci, mean_share}};
    ``n`` None: the summary's mean share only, drawn as a square without interval)."""
    if not panels:
        empty(stem, "no single-flip campaigns in this run (--bit-trials 0)", 1.5)
        return
    fig, axes = panel_grid(len(panels), 2.3, sharey=True)
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.axis("off")
            continue
        panel = panels[i]
        labels = list(panel["bits"])
        xs = list(range(len(labels)))
        color = COLORS[(panel["number"] - 1) % len(COLORS)]
        for x, b in zip(xs, labels):
            row = panel["bits"][b]
            if row["rate"] is None:  # no per-flip data: the summary's mean share, no CI
                ax.plot([x], [row["mean_share"]], "s", color=color, ms=4)
            elif row["n"] < MIN_FLIPS:
                few_flips_cell(ax, x - 0.4, 0.0, 0.8, 1.0, fontsize=7)
            else:
                lo, hi = row["ci"]
                ax.errorbar([x], [row["rate"]], yerr=[[max(0.0, row["rate"] - lo)], [max(0.0, hi - row["rate"])]],
                            fmt="o", ms=4, color=color, elinewidth=1, capsize=2)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, axis="y", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_title(f"{panel['number']}. {panel['name']}", fontsize=9, loc="left")
    for ax in axes[-1]:
        ax.set_xlabel("bit (31 sign, 30-23 exponent, 22-0 mantissa)", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(title, fontsize=9, y=0.995)
    save(fig, stem)


def layer_bit_heatmap(panels: Sequence[Mapping[str, Any]], title: str, stem: Path) -> bool:
    """Per variant, the share of single flips in each tensor x bit that caused a critical SDC, each
    cell annotated k/n; a cell with fewer than ``MIN_FLIPS`` flips is grey and labelled
    ``n < 30`` (one flip in full red reads as a finding). False when there is nothing to draw.

    ``panels``: per variant ``name``, ``number``, ``tensors`` (rows), ``bits`` (columns), ``cells``
    ((critical flips, flips) per row and column)."""
    if not panels:
        return False
    cols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / cols)
    heights = [max(len(p["tensors"]) for p in panels[r * cols:(r + 1) * cols]) for r in range(nrows)]
    # fixed margins sized by the longest tensor name (a constrained layout measures every label: seconds)
    label = 0.3 + 0.055 * max(len(t) for p in panels for t in p["tensors"])  # inches, at 7 points
    width, height = 7.0 * cols, sum(0.3 * h + 0.9 for h in heights) + 0.9
    fig, axes = plt.subplots(nrows, cols, figsize=(width, height), squeeze=False,
                             gridspec_kw={"height_ratios": [h + 2.2 for h in heights]})
    panel_width = (width - label - 1.4 - (cols - 1) * (label + 0.3)) / cols
    fixed_margins(fig, left=label, right=1.4, bottom=0.45, top=0.8, wspace=(label + 0.3) / panel_width,
                  hspace=0.75 / max(0.5, (height - 0.95) / nrows - 0.75))
    cmap = plt.get_cmap("Reds").with_extremes(bad=FEW_GREY)
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.axis("off")
            continue
        p = panels[i]
        rates = [[(k / n if n >= MIN_FLIPS else float("nan")) for k, n in row] for row in p["cells"]]
        image = ax.imshow(rates, cmap=cmap, vmin=0, vmax=1, aspect="auto", zorder=1)
        for r, row in enumerate(p["cells"]):
            for c, (k, n) in enumerate(row):
                if n >= MIN_FLIPS:
                    ax.text(c, r, f"{k}/{n}", ha="center", va="center", fontsize=6,
                            color="white" if k / n > 0.6 else "black", zorder=2)
                elif n:  # grey (the image's "bad" colour), no rate: one text, no patch per cell
                    ax.text(c, r, FEW, ha="center", va="center", fontsize=6, color="0.3", zorder=2)
        ax.set_xticks(range(len(p["bits"])))
        ax.set_xticklabels(p["bits"], fontsize=7)
        ax.set_yticks(range(len(p["tensors"])))
        ax.set_yticklabels(p["tensors"], fontsize=7)
        ax.set_title(f"{p['number']}. {p['name']}", fontsize=9, loc="left")
        ax.tick_params(length=2)
    for ax in axes[-1]:
        ax.set_xlabel("bit (31 sign, 30-23 exponent, 22-0 mantissa)", fontsize=7)
    if image is not None:
        bar = fig.add_axes((1 - 1.0 / width, 0.2, 0.12 / width, 0.6))
        fig.colorbar(image, cax=bar).set_label("critical-SDC share", fontsize=8)
        bar.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9, y=1 - 0.15 / height)
    save(fig, stem)
    return True


def vulnerability_profiles(scores: Mapping[str, Any], stem: Path) -> None:
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
    save(fig, stem)


def campaign_curve(points: Sequence[Mapping[str, Any]], clean: float | None, title: str, stem: Path) -> None:
    """One campaign (``ftcnn inject``): accuracy under faults per BER with its interval, clean dotted.

    ``points``: per BER ``ber``, ``mean``, ``low``, ``high``."""
    if not points:
        empty(stem, "no BER > 0 in this campaign (a --count campaign: see the table)", 1.5)
        return
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bers = [p["ber"] for p in points]
    ax.fill_between(bers, [p["low"] for p in points], [p["high"] for p in points], color=COLORS[0], alpha=0.25,
                    lw=0)
    ax.plot(bers, [p["mean"] for p in points], color=COLORS[0], marker="o", ms=4, lw=1.8)
    if clean is not None:
        ax.axhline(clean, color=COLORS[0], lw=0.8, ls=":")
    ber_axis(ax, bers)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("bit error rate", fontsize=9)
    ax.set_ylabel("accuracy under faults", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=9, loc="left")
    save(fig, stem)


# --- vulnerability scores (``Scores.save`` draws this beside the JSON) -------------------------

def scores_map(layers: Mapping[str, Sequence[float]], method: str, path: Path) -> None:
    """Vulnerability map: each layer's channel scores (top), and per layer the sorted profile (bottom)."""
    names = list(layers)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(names) + 2), 7))
    rng = np.random.default_rng(0)
    positive = all(v > 0 for vs in layers.values() for v in vs)
    for i, name in enumerate(names):
        v = np.asarray(layers[name], dtype=float)
        top.scatter(i + rng.uniform(-0.25, 0.25, len(v)), v, s=6, alpha=0.6)
        top.plot([i - 0.35, i + 0.35], [v.mean()] * 2, color="black", lw=1)
    if positive:
        top.set_yscale("log")
    top.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    top.set_ylabel(f"{method} score per channel")
    top.set_title(f"parameter vulnerability ({method}); bar = layer mean")
    width = max(len(v) for v in layers.values())
    grid = np.full((len(names), width), np.nan)
    for i, name in enumerate(names):
        v = np.sort(np.asarray(layers[name], dtype=float))[::-1]
        peak = np.nanmax(np.abs(v)) if len(v) else 0
        grid[i, :len(v)] = v / peak if peak > 0 else v
    image = bottom.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    bottom.set_yticks(range(len(names)), names, fontsize=7)
    bottom.set_xlabel("channel rank within layer")
    bottom.set_title("channels sorted by score, relative to the layer's maximum")
    fig.colorbar(image, ax=bottom, fraction=0.03)
    fig.tight_layout()
    save(fig, Path(path), formats=("png",), dpi=110, tight=False)


# --- the protect front (``protect.write_result`` and ``ftcnn report`` on a protect folder) ------

def front_batch(front: Mapping[str, Any]) -> int:
    """The batch the front's MACs count at (weight checks shared by a batch): what the candidates
    record, else the config's ``batch`` or ``check_batch``, else ``DEFAULT_BATCH``."""
    recorded = {c.get("batch") for c in front.get("candidates", []) if isinstance(c, Mapping)} - {None}
    config = front.get("config", {})
    for value in (*sorted(recorded), config.get("batch"), config.get("check_batch")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_BATCH


def front_reference(front: Mapping[str, Any]) -> str:
    """What the front's costs are relative to, in words."""
    return ("the original (unpruned, unprotected) model" if isinstance(front.get("end_to_end"), Mapping)
            else "the unprotected model")


def front_rows(front: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The candidates a campaign evaluated (those the figure and its table number, in order)."""
    return [r for r in front.get("candidates", []) if isinstance(r, Mapping) and r.get("validation")
            and isinstance(r.get("macs_ratio"), (int, float))]


def front_scale(front: Mapping[str, Any]) -> tuple[float, float]:
    """The MACs range the figure shows: the candidates within budget, the budget line and every
    candidate up to 1.5x past them; one further off (full TMR at x3) is an arrow at the right edge."""
    recs = front_rows(front)
    budget = front.get("config", {}).get("max_macs") or 1.0
    core = [r["macs_ratio"] for r in recs if r.get("within_budget") and not r.get("baseline")] + [1.0, budget]
    reach = 1.5 * max(core)
    shown = [r["macs_ratio"] for r in recs if r["macs_ratio"] <= reach] + [1.0, budget]
    lo, hi = min(shown), max(shown)
    pad = 0.08 * (hi - lo or 0.1)
    return lo - pad, hi + pad


def protect_front_figure(front: Mapping[str, Any]) -> tuple[Any, list[Any]]:
    """The protect front (README's hero plot) as a figure, and the labels placed at its points.

    Left: validation accuracy under faults against MACs relative to the unprotected model (at the
    batch the weight checks are shared by), 95% CI bars, the Pareto front as a step line, the
    budget as a dashed line; each point (or group of points sharing a spot) carries its number,
    placed where it overlaps nothing. A candidate beyond the shown range is an arrow at the right
    edge, annotated with its ratio. Right: the numbered table of candidates."""
    recs = front_rows(front)
    config = front.get("config", {})
    chosen = front.get("chosen")
    accs = [100 * r["validation"]["accuracy"] for r in recs]
    lows = [100 * r["validation"]["accuracy_ci"][0] for r in recs]
    highs = [100 * r["validation"]["accuracy_ci"][1] for r in recs]
    best = max(accs) if accs else 100.0
    # zoom on the candidates that matter (within 15 points of the best); those below sit on the
    # bottom edge as triangles with their accuracy in the table
    floor = max(0.0, min(min((lo for lo, a in zip(lows, accs) if a >= best - 15), default=0.0) - 1.0, best - 15))
    top = min(100.0, max(highs, default=100.0) + 0.5)
    x_lo, x_hi = front_scale(front)
    fig, (ax, key) = plt.subplots(1, 2, figsize=(12, 5.8), gridspec_kw={"width_ratios": [2.0, 1]})
    positions: list[tuple[float, float]] = []
    colors = []
    off_scale = []
    for i, (r, acc, lo, hi) in enumerate(zip(recs, accs, lows, highs), 1):
        color = "tab:red" if r.get("name") == chosen else "tab:blue" if r.get("within_budget") else "tab:gray"
        x = min(r["macs_ratio"], x_hi)
        y = min(max(acc, floor + 0.3), top)
        far = r["macs_ratio"] > x_hi
        marker = ">" if far else "v" if acc < floor else "o"
        ax.errorbar(x, y, yerr=[[max(0.0, y - max(lo, floor))], [max(0.0, min(hi, top) - y)]], fmt=marker,
                    color=color, capsize=3, markersize=8 if far or r.get("name") == chosen else 5, alpha=0.9,
                    clip_on=False, zorder=3)
        positions.append((x, y))
        colors.append(color)
        if far:
            off_scale.append(i - 1)
    front_pts = sorted(positions[i] for i, r in enumerate(recs) if r.get("pareto") and i not in off_scale)
    if len(front_pts) > 1:
        ax.step(*zip(*front_pts), where="post", color="tab:green", lw=1, label="Pareto front", zorder=1)
    budget = config.get("max_macs")
    if budget:
        ax.axvline(budget, color="tab:orange", ls="--", lw=1, label=f"budget ×{budget:g} MACs")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(floor, top)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"×{v:.3g}"))
    batch = front_batch(front)
    ax.set_xlabel(f"MACs relative to {front_reference(front)} (batch {batch})")
    ax.set_ylabel(f"validation accuracy at BER {fmt_ber(float(config.get('ber') or 0))} (%)")
    ax.set_title(f"protection candidates (red: chosen, {chosen})", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    # one label per spot: candidates often share a MACs ratio and an accuracy
    groups: dict[tuple[int, int], list[int]] = {}
    fig.canvas.draw()
    for i, (x, y) in enumerate(positions):
        px = ax.transData.transform((x, y))
        groups.setdefault((round(px[0] / 4), round(px[1] / 4)), []).append(i)
    labels = []
    for members in groups.values():
        numbers = ",".join(str(i + 1) for i in members)
        lead = members[0]
        if lead in off_scale:
            text = f"{numbers} ×{recs[lead]['macs_ratio']:.2f} →"
        elif accs[lead] < floor:  # a triangle on the bottom edge: its accuracy beside it
            text = f"{numbers} ({accs[lead]:.0f}%)"
        else:
            text = numbers
        chosen_here = any(recs[i].get("name") == chosen for i in members)
        style = {"fontsize": 8, "color": "tab:red" if chosen_here else "0.15",
                 "weight": "bold" if chosen_here else "normal"}
        labels.append((lead, [text], style))
    obstacles = [(x, max(lo, floor), x, min(hi, top)) for (x, _), lo, hi in zip(positions, lows, highs)]
    obstacles += [(front_pts[k][0], front_pts[k][1], front_pts[k + 1][0], front_pts[k][1])
                  for k in range(len(front_pts) - 1)]
    placed = place_labels(ax, positions, labels, obstacles, drawn=True)
    key.axis("off")
    key.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="lower left")  # beside the plot: it hides no point
    step = min(0.05, 0.76 / (len(recs) + 3))
    size = 7.5 if step >= 0.04 else 6.5
    for j, (r, acc, color) in enumerate(zip(recs, accs, colors)):
        text = f"{j + 1:>2}  {r['name']}  {acc:.1f}%  ×{r['macs_ratio']:.2f}" + ("  front" if r.get("pareto") else "")
        key.text(0.0, 1.0 - j * step, text, transform=key.transAxes, fontsize=size, color=color,
                 family="monospace", va="top")
    key.text(0.0, 1.0 - (len(recs) + 0.6) * step,
             "red: chosen; blue: within budget; grey: over budget\n"
             "▼ below the plotted range; ► beyond it (ratio in the label)",
             transform=key.transAxes, fontsize=size, va="top")
    return fig, placed


def protect_front(front: Mapping[str, Any], path: Path) -> None:
    """Draw the protect front into ``path`` (PNG), atomically."""
    fig, _ = protect_front_figure(front)
    save(fig, Path(path), formats=("png",), dpi=130, tight=False)
