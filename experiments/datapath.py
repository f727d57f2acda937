"""Protections under activation (datapath) faults beside memory faults (issue 22, item 8). Regenerates
experiments/results/datapath.md.

Why: output-level TMR exists to mask compute faults and weight checks or codes cannot see them,
so a comparison under memory faults alone favours one side. For every model whose protect cell
(``experiments/protect.py``: ``CELLS/<model>/cell_<ber>.json``) exists at ``--ber``, the cell's
rows (unprotected deployed form, output TMR, weight TMR, ECC, parity, bounds alone, and the
cell's chosen protection loaded from its ``protected.pt``) are evaluated under transient bit
flips in the outputs of every Conv2d/Linear computation the deployed model executes
(``CampaignConfig(target="activations")``; output TMR computes three replicas, each faulted
on its own before the vote), on the test split with the test role's fault seed
(``seeds.role_seed(seed, "test")``) for every row, so rows are compared paired by trial.

The baselines are rebuilt with the public API as ``protect`` built them: ``protect.deployed_form``,
then ``hardening.harden(deployed, calibration=..., **candidate.settings)`` with the
calibration subset of the training split's fit part (``splits``); each rebuilt model's stored
bits are checked against the cell's ``front.json``. The activation rates are chosen per model by
a pilot on the validation split (never the test split): the rates of ``RATE_GRID`` at which the
unprotected model loses ``DROP_POINTS`` points, at most ``MAX_RATES`` of them.

Every campaign has its own folder (SQLite per campaign: a killed run resumes), each model's
numbers go to ``OUT/<model>/datapath_<ber>.json`` and the page is regenerated from every such
file found under ``OUT`` (generated text only), so models can be run one at a time.

Examples:
    OMP_NUM_THREADS=1 python experiments/datapath.py --cells /work/exp/runs/exp_protect --out runs/exp_datapath
    python experiments/datapath.py --models lenet5 --trials 30 --act-bers 1e-5 1e-4
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ftcnn import checkpoint, data, files, readback
from ftcnn.campaigns import campaign, paired, seeds, store
from ftcnn.protection import cost, hardening, protect as P
from ftcnn.splits import calibration_subset, validation_split

MODEL_ORDER = ("lenet5", "vgg11", "resnet20")  # the page's order; other models found follow by name
DEFAULT_BER = 1e-4
# activation rates the pilot tries, ascending; it stops past the drop range
RATE_GRID = (1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
DROP_POINTS = (1.0, 30.0)  # the unprotected model's drop from clean (points) a chosen rate must give
MAX_RATES = 3
PILOT_TRIALS = 10
WEIGHT_SIDE = ("weight TMR", "ECC", "parity", "bounds alone")  # rows that only see memory
Log = Callable[[str], Any]


class Refused(ValueError):
    """A problem the user can fix: one ``error:`` line, exit 2."""


def tag(x: float) -> str:
    return f"{x:g}"


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label)


# --- inputs: cells, models ------------------------------------------------------------------------

def find_cells(cells: Path, ber: float, models: Sequence[str] | None = None) -> dict[str, Path]:
    """Model name -> its folder, for every ``cells/<model>/cell_<ber>.json`` (page order)."""
    if not cells.is_dir():
        raise Refused(f"--cells {cells} is not a folder")
    found = {p.parent.name: p.parent for p in cells.glob(f"*/cell_{tag(ber)}.json")}
    if models:
        missing = [m for m in models if m not in found]
        if missing:
            raise Refused(f"no cell at BER {tag(ber)} for {missing[0]} under {cells}")
        found = {m: found[m] for m in models}
    order = {n: i for i, n in enumerate(MODEL_ORDER)}
    return {n: found[n] for n in sorted(found, key=lambda n: (order.get(n, len(order)), n))}


def read_cell(folder: Path, ber: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The cell and its protect run's ``front.json`` (read as untrusted files)."""
    try:
        cell = readback.read_json(folder / f"cell_{tag(ber)}.json", readback.SETTINGS)
        front = readback.read_json(folder / f"ber_{tag(ber)}" / "protect" / "front.json", readback.PROTECT_FRONT)
    except (OSError, ValueError) as exc:
        raise Refused(str(exc).splitlines()[0]) from None
    for key in ("settings", "rows", "chosen", "test_fault_seed"):
        if key not in cell:
            raise Refused(f"{folder / f'cell_{tag(ber)}.json'} has no {key!r}")
    config = front.get("config") or {}
    for key in ("validation_fraction", "calibration_size", "seed"):
        if key not in config:
            raise Refused(f"{folder}/ber_{tag(ber)}/protect/front.json has no config.{key}")
    return cell, front


def build_rows(folder: Path, cell: Mapping[str, Any], front: Mapping[str, Any], ber: float
               ) -> list[tuple[str, str, nn.Module]]:
    """(row label, candidate, model) for every row of the cell, built as ``protect`` built them:
    the deployed form, then ``harden`` with the candidate's settings and the calibration subset
    of the training split's fit part; the chosen row is the cell's ``protected.pt``."""
    cfg = front["config"]
    seed = int(cfg["seed"])
    net = checkpoint.load(folder / "model.pt").eval()
    deployed, _ = P.deployed_form(net)
    x_train, y_train = data.load(cell["settings"]["data"], "train").tensors
    (x_fit, _), _ = validation_split(x_train, y_train, cfg["validation_fraction"], seed)
    calibration = calibration_subset(x_fit, int(cfg["calibration_size"]), seed)
    space = {c.name: c for c in P.candidates()}
    stored = {r["name"]: r.get("memory_bits") for r in front["candidates"]}
    rows: list[tuple[str, str, nn.Module]] = []
    for row in cell["rows"]:
        label, cand = row["row"], row["candidate"]
        if label == "chosen":
            path = folder / f"ber_{tag(ber)}" / "protect" / "protected.pt"
            saved = checkpoint.read(path)["meta"].get("protection")
            if saved != cell["chosen"]:
                raise Refused(f"{path} holds {saved!r}, the cell chose {cell['chosen']!r}")
            model = checkpoint.load(path)
        elif cand == "none":
            model = aligned_names(deployed)
        elif cand not in space:
            raise Refused(f"row {label!r}: {cand!r} is not among protect.candidates()")
        elif space[cand].duplicate:  # its budget fill is protect's private _build: not copied here
            raise Refused(f"row {label!r}: {cand!r} duplicates within a budget; only protect's private "
                          "_build rebuilds it")
        else:
            model = hardening.harden(deployed, calibration=calibration, **space[cand].settings)
        model.eval()
        if stored.get(cand) is not None and cost.memory_bits(model) != stored[cand]:
            raise Refused(f"row {label!r}: rebuilt {cand} stores {cost.memory_bits(model)} bits, "
                          f"protect's front.json {stored[cand]}")
        rows.append((label, cand, model))
    return rows


def aligned_names(model: nn.Module) -> nn.Module:
    """``hardening.aligned_names`` (the library's; a model it cannot align is a refusal here)."""
    try:
        return hardening.aligned_names(model)
    except ValueError as exc:
        raise Refused(str(exc)) from None


# --- campaigns ------------------------------------------------------------------------------------

def activation_config(rates: Sequence[float], trials: int, seed: int, threads: int | None) -> campaign.CampaignConfig:
    """Transient bit flips in every Conv2d/Linear output (all replicas), float32."""
    return campaign.CampaignConfig(bers=tuple(rates), trials=trials, seed=seed, target="activations",
                                   activation_mode="transient", threads=threads)


def pilot(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, folder: Path, trials: int,
          threads: int | None, grid: Sequence[float] = RATE_GRID, log: Log = print) -> list[dict[str, Any]]:
    """The unprotected model on the validation split at each rate of ``grid``, ascending, until its
    drop passes the range: one campaign per rate (so a longer grid resumes)."""
    out: list[dict[str, Any]] = []
    for rate in sorted(grid):
        s = campaign.run_campaign(model, x, y, activation_config([rate], trials, seed, threads),
                                  folder / f"rate_{tag(rate)}", progress=False)
        r = s["results"][0]
        out.append({"rate": rate, "clean": s["golden_accuracy"], "accuracy": r["accuracy_mean"],
                    "trial_seconds": trial_seconds(folder / f"rate_{tag(rate)}"),
                    "drop": 100 * (s["golden_accuracy"] - r["accuracy_mean"]), "trials": r["trials"]})
        log(f"  pilot {tag(rate)}: drop {out[-1]['drop']:.2f} points")
        if out[-1]["drop"] > DROP_POINTS[1]:
            break
    return out


def choose_rates(points: Sequence[Mapping[str, Any]], low: float = DROP_POINTS[0], high: float = DROP_POINTS[1],
                 most: int = MAX_RATES) -> tuple[list[float], str]:
    """Up to ``most`` rates whose pilot drop lies in [low, high] points: the lowest, the highest and
    the middle one (by position); when none does, the last below and the first above. And why."""
    inside = [p for p in points if low <= p["drop"] <= high]
    if inside:
        picks = [inside[0], inside[len(inside) // 2], inside[-1]] if len(inside) > 2 else inside
        picks = list({id(p): p for p in picks}.values())[:most]
        why = f"the pilot rates where the unprotected model lost {low:g} to {high:g} points"
        if len(inside) > most:
            why += f" (lowest, middle and highest of {len(inside)})"
    else:
        below = [p for p in points if p["drop"] < low]
        above = [p for p in points if p["drop"] > high]
        picks = below[-1:] + above[:1]
        why = f"no pilot rate gave a drop of {low:g} to {high:g} points: the nearest on each side"
    return sorted(p["rate"] for p in picks), why


def evaluate(rows: Sequence[tuple[str, str, nn.Module]], x: torch.Tensor, y: torch.Tensor, rates: Sequence[float],
             trials: int, seed: int, folder: Path, threads: int | None, log: Log = print) -> dict[str, Any]:
    """Every row's activation campaign (same config, hence same fault seed, for all): label -> its
    summary's numbers and per-trial accuracies (what the paired differences compare)."""
    config = activation_config(rates, trials, seed, threads)
    out: dict[str, Any] = {}
    for label, cand, model in rows:
        where = folder / slug(label)
        start = time.time()
        s = campaign.run_campaign(model, x, y, config, where, progress=False)
        points = {}
        for r in s["results"]:
            points[tag(r["ber"])] = {"accuracy": r["accuracy_mean"], "accuracy_ci": list(r["accuracy_ci"]),
                                     "trials": r["trials"], "sdc": r["sdc_mean"], "due": r["due_mean"],
                                     "ci_method": r["ci_method"],
                                     "per_trial": P.trial_accuracies(where, r["ber"], trials)}
        out[label] = {"candidate": cand, "clean": s["golden_accuracy"], "seed": s["seed"],
                      "fault_target_bits": s["memory"].get("fault_target_bits"), "points": points,
                      "folder": str(where), "seconds": time.time() - start, "trial_seconds": trial_seconds(where)}
        log(f"  {label}: " + ", ".join(f"{k} {100 * v['accuracy']:.2f}%" for k, v in points.items()))
    return out


def evaluate_combined(rows: Sequence[tuple[str, str, nn.Module]], x: torch.Tensor, y: torch.Tensor, ber: float,
                      rate: float, trials: int, seed: int, folder: Path, threads: int | None,
                      log: Log = print) -> dict[str, Any]:
    """Every row under both fault models at once (``CampaignConfig(target="both")``): the memory at the
    cell's BER and the datapath at ``rate`` in every trial, the same seed for all rows (trial i of a row
    holds its parameter campaign's trial-i faults and its activation campaign's): label -> numbers."""
    config = campaign.CampaignConfig(bers=(ber,), trials=trials, seed=seed, target="both", activation_ber=rate,
                                     threads=threads)
    out: dict[str, Any] = {}
    for label, _, model in rows:
        where = folder / slug(label)
        s = campaign.run_campaign(model, x, y, config, where, progress=False)
        r = s["results"][0]
        out[label] = {"accuracy": r["accuracy_mean"], "accuracy_ci": list(r["accuracy_ci"]), "trials": r["trials"],
                      "ci_method": r["ci_method"], "per_trial": P.trial_accuracies(where, r["ber"], trials),
                      "trial_seconds": trial_seconds(where)}
        log(f"  {label} under both: {100 * r['accuracy_mean']:.2f}%")
    return out


TRIAL_SECONDS = readback.ListOf(readback.Row((readback.NONNEG,)))


def trial_seconds(folder: Path) -> float:
    """Seconds the committed trials of the campaign in ``folder`` took (stored per trial, so a
    resumed run still counts what its trials cost; set-up and golden runs not included)."""
    got = store.read_trials(folder / campaign.DB_NAME, "seconds", TRIAL_SECONDS)
    return sum(float(r[0] or 0.0) for r in got[0]) if got is not None else 0.0


def paired_to(base: Mapping[str, float], other: Mapping[str, float]) -> dict[str, Any]:
    """``other - base`` paired by trial index: ``paired.paired_test``'s 95% interval (the campaigns'
    rule: the bounded betting interval below 1,000 pairs, valid at every n, wide at 100) and the
    two-sided paired sign-flip test (``paired.sign_flip_test``, exact at every n), which the
    verdicts use; ``identical``: every trial gave the same accuracy."""
    common = sorted(set(base) & set(other), key=int)
    a, b = [base[k] for k in common], [other[k] for k in common]
    t = paired.paired_test(a, b)
    return {"n": t["n"], "difference": t["mean_difference"], "ci": list(t["ci"]), "ci_method": t["ci_method"],
            "p_sign_flip": paired.sign_flip_test([y - x for x, y in zip(a, b)]), "identical": a == b}


def model_result(name: str, cell: Mapping[str, Any], rates: Sequence[float], why: str,
                 pilot_points: Sequence[Mapping[str, Any]], runs: Mapping[str, Any], ber: float,
                 settings: Mapping[str, Any], combined: Mapping[str, Any] | None = None,
                 combined_rate: float | None = None) -> dict[str, Any]:
    """What the page needs for one model, JSON-able: per row the cell's memory-fault numbers
    beside the activation ones and (``combined``) both at once, each with the paired difference
    to the unprotected row."""
    base = runs["unprotected"]
    rows = []
    for mem in cell["rows"]:
        run = runs[mem["row"]]
        acts = {}
        for r in rates:
            p = dict(run["points"][tag(r)])
            trials = p.pop("per_trial")
            acts[tag(r)] = {**p, "paired": paired_to(base["points"][tag(r)]["per_trial"], trials)}
        rows.append({"row": mem["row"], "candidate": mem["candidate"], "clean": run["clean"], "seed": run["seed"],
                     "trial_seconds": run["trial_seconds"],
                     "fault_target_bits": run["fault_target_bits"],
                     "memory": {"accuracy": mem["accuracy"], "accuracy_ci": mem["accuracy_ci"], "clean": mem["clean"],
                                "trials": mem.get("trials")},
                     "activations": acts})
        if combined is not None:
            both = dict(combined[mem["row"]])
            trials = both.pop("per_trial")
            rows[-1]["combined"] = {**both, "paired": paired_to(combined["unprotected"]["per_trial"], trials)}
    return {"model": name, "ber": ber, "chosen": cell["chosen"], "rates": [tag(r) for r in rates],
            "combined_rate": None if combined_rate is None else tag(combined_rate),
            "rates_why": why, "pilot": list(pilot_points), "rows": rows, "settings": dict(settings),
            "memory_settings": cell["settings"], "fold_bn": cell.get("fold_bn", {}).get("folded")}


# --- the page -------------------------------------------------------------------------------------

def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def acc_ci(p: Mapping[str, Any]) -> str:
    lo, hi = p["accuracy_ci"]
    return f"{pct(p['accuracy'])} [{pct(lo)}, {pct(hi)}]"


ALPHA = 0.05  # two-sided level of the verdicts' paired sign-flip test


def diff_ci(d: Mapping[str, Any]) -> str:
    lo, hi = d["ci"]
    return f"{100 * d['difference']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}], p {d['p_sign_flip']:.2g}"


def effect(d: Mapping[str, Any]) -> str:
    """'identical', 'better', 'worse' or 'no significant difference' (paired sign-flip test at ``ALPHA``)."""
    if d["identical"]:
        return "identical"
    if d["p_sign_flip"] >= ALPHA:
        return "no significant difference"
    return "better" if d["difference"] > 0 else "worse"


def verdicts(res: Mapping[str, Any]) -> list[str]:
    """Sentences from the numbers: per rate, what output TMR, the weight-side rows and the chosen
    protection do against datapath faults (paired sign-flip test); then both fault models' rankings."""
    rows = {r["row"]: r for r in res["rows"]}
    none, tmr = rows["unprotected"], rows.get("output TMR")
    side = [r for r in WEIGHT_SIDE if r in rows]
    out = []
    for rate in res["rates"]:
        lost = 100 * (none["clean"] - none["activations"][rate]["accuracy"])
        parts = [f"At activation BER {rate} the unprotected model loses {lost:.2f} points"]

        def said(label: str, name: str) -> str:
            d = rows[label]["activations"][rate]["paired"]
            kind = effect(d)
            if kind == "identical":
                return f"{name} gives the unprotected accuracy in every one of the {d['n']} trials"
            if kind == "better" and lost > 0:
                return (f"{name} masks {100 * d['difference'] / (lost / 100):.0f}% of that loss "
                        f"({diff_ci(d)})")
            return f"{name}: {kind} ({diff_ci(d)})"

        if tmr is not None:
            parts.append(said("output TMR", "output TMR"))
        same = [r for r in side if effect(rows[r]["activations"][rate]["paired"]) == "identical"]
        if same:
            n = rows[same[0]]["activations"][rate]["paired"]["n"]
            parts.append(f"{', '.join(same)} give{'s' if len(same) == 1 else ''} the unprotected accuracy in "
                         f"every one of the {n} trials (their datapath is the unprotected one)")
        parts += [said(r, r) for r in side if r not in same]
        if "chosen" in rows:
            parts.append(said("chosen", f"the chosen `{res['chosen']}`"))
        out.append("; ".join(parts) + ".")
    if tmr is not None and side:
        top = res["rates"][-1]
        best_mem = max(side, key=lambda r: rows[r]["memory"]["accuracy"])
        best_act = max(side, key=lambda r: rows[r]["activations"][top]["accuracy"])
        mem_gap = 100 * (tmr["memory"]["accuracy"] - rows[best_mem]["memory"]["accuracy"])
        act_gap = 100 * (tmr["activations"][top]["accuracy"] - rows[best_act]["activations"][top]["accuracy"])
        flips = (mem_gap < 0) != (act_gap < 0)
        out.append(f"Both fault models: output TMR minus the best weight-side row is {mem_gap:+.2f} points "
                   f"under memory faults at BER {res['ber']:g} ({best_mem}: {pct(rows[best_mem]['memory']['accuracy'])}) "
                   f"and {act_gap:+.2f} points under activation faults at {top} ({best_act}: "
                   f"{pct(rows[best_act]['activations'][top]['accuracy'])}): "
                   + ("the ranking flips with the fault model, so a comparison under one of them alone favours "
                      "one side." if flips else "the same ranking under both."))
    if res.get("combined_rate") is not None:
        ranked = sorted(res["rows"], key=lambda r: -r["combined"]["accuracy"])
        best = ranked[0]
        parts = [f"Both at once (memory BER {res['ber']:g} + activation BER {res['combined_rate']}): the most accurate "
                 f"row is {best['row']} ({pct(best['combined']['accuracy'])})"]
        for label in ("output TMR", "chosen"):
            if label in rows and rows[label] is not best:
                d = rows[label]["combined"]["paired"]
                parts.append(f"{label}: {pct(rows[label]['combined']['accuracy'])}, {effect(d)} against the "
                             f"unprotected model ({diff_ci(d)})")
        out.append("; ".join(parts) + ".")
    return out


def model_section(res: Mapping[str, Any]) -> list[str]:
    s, mem = res["settings"], res["memory_settings"]
    rows = {r["row"]: r for r in res["rows"]}
    clean = rows["unprotected"]["clean"]
    bits = rows["unprotected"]["fault_target_bits"]
    pilot_text = ", ".join(f"{tag(p['rate'])}: {p['drop']:.2f}" for p in res["pilot"])
    lines = [f"## {res['model']}", "",
             f"Activation rates {', '.join(res['rates'])}: {res['rates_why']} (pilot, unprotected, validation "
             f"split, {s['pilot_trials']} trials per rate, drop in points: {pilot_text}).", "",
             f"Clean test accuracy (deployed form): {pct(clean)}. {s['trials']} activation trials per row and rate "
             f"on all {s['test_inputs']} test inputs ({bits} faultable output bits per trial unprotected); memory "
             f"column: the cell's {mem.get('test_trials', '?')} test trials at BER {res['ber']:g}"
             + (f", each on {mem['test_inputs_per_trial']} test inputs" if mem.get("test_inputs_per_trial") else "")
             + f". Command: `{s['command']}` ({s['threads']} thread). Trial time (stored per trial, so resumed "
             f"runs count what was spent; set-up not included): "
             + ", ".join(f"{r['row']} {r['trial_seconds']:.0f} s" for r in res["rows"])
             + ("" if res.get("combined_rate") is None else "; under both: " + ", ".join(
                 f"{r['row']} {r['combined']['trial_seconds']:.0f} s" for r in res["rows"]))
             + f", pilot {sum(p.get('trial_seconds', 0.0) for p in res['pilot']):.0f} s.", ""]
    head = "| row | candidate | memory 1e-4 acc [95% CI] |"
    rule = "|---|---|---|"
    for rate in res["rates"]:
        head += f" act {rate} acc [95% CI] | drop | vs unprotected (paired) |"
        rule += "---|---|---|"
    both = res.get("combined_rate")
    if both is not None:
        head += f" both: memory {res['ber']:g} + act {both} acc [95% CI] | drop | vs unprotected (paired) |"
        rule += "---|---|---|"
    lines += [head.replace("1e-4", f"{res['ber']:g}"), rule]
    for r in res["rows"]:
        line = f"| {r['row']} | {r['candidate']} | {acc_ci(r['memory'])} |"
        for rate in res["rates"]:
            a = r["activations"][rate]
            vs = "-" if r["row"] == "unprotected" else diff_ci(a["paired"])
            line += f" {acc_ci(a)} | {100 * (clean - a['accuracy']):.2f} | {vs} |"
        if both is not None:
            c = r["combined"]
            vs = "-" if r["row"] == "unprotected" else diff_ci(c["paired"])
            line += f" {acc_ci(c)} | {100 * (clean - c['accuracy']):.2f} | {vs} |"
        lines.append(line)
    lines += ["", "### Verdict", ""] + [f"- {v}" for v in verdicts(res)] + [""]
    return lines


def markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """The whole page from the stored per-model results."""
    lines = ["# Protections under activation (datapath) faults beside memory faults (issue 22, item 8)", "",
             "Generated by `experiments/datapath.py` from its result files; every number below comes from them "
             "(each model's section names the command that computed it).", "",
             "Method: for each model, the rows of its `experiments/protect.py` cell (unprotected deployed form, "
             "output TMR, weight TMR, ECC, parity, bounds alone, and the protection the cell chose, loaded from "
             "its `protected.pt`) are attacked by transient float32 bit flips in the outputs of every "
             "Conv2d/Linear computation the deployed model executes, each bit of each output value flipping "
             "with the activation BER per inference (`CampaignConfig(target=\"activations\")`). Output TMR "
             "computes three replicas of every layer and each replica's output is faulted on its own before the "
             "vote (3x the faultable bits); coded and checked layers compute once, so a fault in their output is "
             "past every weight check. Test split, the test role's fault seed (`seeds.role_seed(seed, \"test\")`) "
             "for every row: trial i of every row draws from the same seed, so rows are compared paired by "
             "trial (`ftcnn.campaigns.paired.paired_test`, 95%). Draws are keyed by layer name: every row "
             "holds its layers at `X.original` (TMR's two extra replicas at `X.copies`), so all rows draw identical "
             "faults there; "
             "the unprotected row is the deployed model with each layer moved to `X.original` (a `hardening.Hardened` "
             "wrapper with nothing added: the same computation), so it draws them too. Not attacked: the vote of "
             "output TMR and any restriction after a layer (they compute on the faulted outputs, but their own "
             "outputs take no fault), so output TMR's numbers are those of a fault-free voter. Rates are chosen per "
             "model by a pilot of the unprotected model on the validation split (never the test split). "
             "Accuracy in %: mean [95% CI]; drop = clean (unprotected, deployed form) minus accuracy, in points; "
             "vs unprotected = row minus unprotected, paired by trial, points [95% CI] (`paired.paired_test`: below "
             "1,000 trials the bounded betting interval, valid at every n but about +-7 points wide at 100 trials) "
             "and the two-sided paired sign-flip test's p (`paired.sign_flip_test`), which the verdicts use at "
             f"{ALPHA:g}. The memory column is "
             "the cell's test number at its BER (every stored bit attacked).", ""]
    for res in results:
        lines += model_section(res)
    return "\n".join(lines)


def stored_results(out: Path, ber: float) -> list[dict[str, Any]]:
    """Every model's result file under ``out``, in page order."""
    found = {p.parent.name: p for p in out.glob(f"*/datapath_{tag(ber)}.json")}
    order = {n: i for i, n in enumerate(MODEL_ORDER)}
    return [readback.read_json(found[n], readback.SETTINGS)
            for n in sorted(found, key=lambda n: (order.get(n, len(order)), n))]


# --- the run --------------------------------------------------------------------------------------

def run_model(name: str, folder: Path, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """Pilot, then every row's activation campaign; the model's result as written to its JSON."""
    start = time.time()
    cell, front = read_cell(folder, args.ber)
    rows = build_rows(folder, cell, front, args.ber)
    dname = cell["settings"]["data"]
    seed = int(front["config"]["seed"])
    test_seed = seeds.role_seed(seed, "test")
    if int(cell["test_fault_seed"]) != test_seed:
        raise Refused(f"{name}: the cell's test fault seed {cell['test_fault_seed']} is not role_seed({seed}, test)")
    work = args.out / name / f"ber_{tag(args.ber)}"
    deployed = next(m for label, _, m in rows if label == "unprotected")
    if args.act_bers:
        pilot_points: list[dict[str, Any]] = []
        rates, why = sorted(args.act_bers), "given on the command line (--act-bers)"
    else:
        x_train, y_train = data.load(dname, "train").tensors
        (_, _), (x_val, y_val) = validation_split(x_train, y_train, front["config"]["validation_fraction"], seed)
        log(f"{name}: pilot of the unprotected model on {len(x_val)} validation inputs ...")
        pilot_points = pilot(deployed, x_val, y_val, seeds.role_seed(seed, "validation"),
                             work / f"pilot_t{args.pilot_trials}", args.pilot_trials, args.threads, log=log)
        rates, why = choose_rates(pilot_points)
    x_test, y_test = data.load(dname, "test").tensors
    log(f"{name}: {len(rows)} rows at activation BER {', '.join(map(tag, rates))}, {args.trials} trials ...")
    runs = evaluate(rows, x_test, y_test, rates, args.trials, test_seed,
                    work / f"test_{'_'.join(map(tag, rates))}_t{args.trials}", args.threads, log)
    combined, combined_rate = None, None
    if args.combined:  # the middle activation rate beside the cell's memory BER, in every trial
        combined_rate = rates[len(rates) // 2]
        log(f"{name}: {len(rows)} rows under both (memory {tag(args.ber)} + activation {tag(combined_rate)}) ...")
        combined = evaluate_combined(rows, x_test, y_test, args.ber, combined_rate, args.trials, test_seed,
                                     work / f"both_{tag(combined_rate)}_t{args.trials}", args.threads, log)
    settings = {"trials": args.trials, "pilot_trials": args.pilot_trials, "test_inputs": len(x_test),
                "test_fault_seed": test_seed, "data": dname, "seconds": time.time() - start,
                "threads": args.threads, "command": command_of(args, name)}
    return model_result(name, cell, rates, why, pilot_points, runs, args.ber, settings, combined, combined_rate)


def command_of(args: argparse.Namespace, name: str) -> str:
    """The command that computes one model's section with these settings."""
    cmd = (f"OMP_NUM_THREADS=1 python experiments/datapath.py --cells {args.cells} --out {args.out} "
           f"--models {name} --trials {args.trials}")
    if args.pilot_trials != PILOT_TRIALS:
        cmd += f" --pilot-trials {args.pilot_trials}"
    if args.act_bers:
        cmd += " --act-bers " + " ".join(map(tag, args.act_bers))
    if not args.combined:
        cmd += " --no-combined"
    if not math.isclose(args.ber, DEFAULT_BER):
        cmd += f" --ber {tag(args.ber)}"
    return cmd


class _Parser(argparse.ArgumentParser):
    """argparse's refusals as one ``error:`` line (no usage block)."""

    def error(self, message: str) -> Any:
        raise Refused(message)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=Path, default=Path("runs/exp_protect"), help="experiments/protect.py's --out")
    parser.add_argument("--ber", type=float, default=DEFAULT_BER, help="the memory-fault cell to take (its BER)")
    parser.add_argument("--models", nargs="+", default=None, help="default: every model with a cell at --ber")
    parser.add_argument("--trials", type=int, default=100, help="activation trials per row and rate")
    parser.add_argument("--pilot-trials", type=int, default=PILOT_TRIALS)
    parser.add_argument("--act-bers", nargs="+", type=float, default=None, help="skip the pilot: these rates")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the campaigns")
    parser.add_argument("--no-combined", dest="combined", action="store_false",
                        help="skip the rows under both fault models at once")
    parser.add_argument("--out", type=Path, default=Path("runs/exp_datapath"))
    parser.add_argument("--results", type=Path, default=Path("experiments/results/datapath.md"))
    args = parser.parse_args(argv)
    if args.trials < 2 or args.pilot_trials < 2:
        raise Refused("--trials and --pilot-trials must be >= 2")
    if args.act_bers and not all(0 < b <= 1 for b in args.act_bers):
        raise Refused("--act-bers must lie in (0, 1]")
    if not 0 < args.ber <= 1:
        raise Refused("--ber must lie in (0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    began = time.time()

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{(time.time() - began) / 60:.1f} min] {text}", flush=True)

    try:
        args = parse(argv)
        torch.set_num_threads(args.threads)
        found = find_cells(args.cells, args.ber, args.models)
        if not found:
            raise Refused(f"no cell_{tag(args.ber)}.json under {args.cells}/<model>/")
        for name, folder in found.items():
            res = run_model(name, folder, args, log)
            files.write_json(args.out / name / f"datapath_{tag(args.ber)}.json", res)
            log(f"{name}: done in {res['settings']['seconds'] / 60:.1f} min")
        files.write_text(args.results, markdown(stored_results(args.out, args.ber)) + "\n")
    except (ValueError, OSError) as exc:  # Refused, CheckpointError, unreadable files: one line
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    log(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
