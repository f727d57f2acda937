"""Does the automatic protection search deliver issue 12's goal? Numbers on mnist5k.

For each model (LeNet-5; VGG-11 width 0.25 and ResNet-20 when asked):
train (or reuse) it, run ``ftcnn.protect.protect`` at BER 1e-4 within 1.15x
MACs (selection on a validation split of the training data), then, only
after the choice, run test-split campaigns at BER 1e-4 and 1e-3 for the
named rows: unprotected, the best restriction, the weight check and weight
check + restriction (when ``ftcnn.hardening`` offers ``check_weights``), the
chosen protection and full TMR. Rows of a family are the family member with
the best VALIDATION accuracy (never picked on test). Then the end-to-end
pipeline: vulnerability pruning (ratio 0.3) -> fine-tune -> protect within
1.00x of the ORIGINAL's MACs, reported against the original.

Writes ``runs/exp_protect/<model>/`` (resumable campaign folders) and
``experiments/results/protect.md``.

Examples:
    python experiments/protect.py --models lenet5 --trials 100
    python experiments/protect.py --models lenet5 vgg11 --trials 30 --quick
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ftcnn import data, files, pipeline, protect as P

MODELS = {"lenet5": (1.0, 5), "vgg11": (0.25, 3), "resnet20": (1.0, 3)}  # name -> (width, epochs)
DATA = "mnist5k"
BER = 1e-4
BERS = (1e-4, 1e-3)
ROWS = (("unprotected", ("none",)), ("restriction", ("restriction",)), ("weight check", ("weight check",)),
        ("weight check + restriction", ("weight check + restriction",)))


def best_of(result: P.ProtectResult, family: str) -> str | None:
    """The family member with the highest validation accuracy (None if none was evaluated)."""
    recs = [r for r in result.records if r["family"] == family and r["validation"] is not None]
    return max(recs, key=lambda r: r["validation"]["accuracy"])["name"] if recs else None


def fmt_acc(p: dict[str, Any]) -> str:
    lo, hi = p["accuracy_ci"]
    return f"{100 * p['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def run_model(name: str, root: Path, trials: int, max_macs: float, seed: int, e2e: bool,
              log: Any, max_latency: float | None = None, test_trials: int | None = None,
              test_inputs_per_trial: int | None = None, e2e_max_latency: float | None = None) -> dict[str, Any]:
    width, epochs = MODELS[name]
    folder = root / name
    net = pipeline.train_or_load(folder / "model.pt", name, DATA, epochs=epochs, width=width, seed=seed)
    train_set, test_set = data.load(DATA, "train"), data.load(DATA, "test")
    start = time.time()
    result = P.protect(net, *train_set.tensors, ber=BER, max_macs=max_macs, max_latency=max_latency,
                       trials=trials, seed=seed, work_dir=folder / "campaigns", log=log)
    rows: list[tuple[str, str]] = []
    for label, (family,) in ROWS:
        member = best_of(result, family)
        if member is not None:
            rows.append((label, member))
    rows += [("chosen", result.chosen), ("full TMR", "full_tmr")]
    names = list(dict.fromkeys(n for _, n in rows))
    test_dir = folder / "campaigns" if test_inputs_per_trial is None else folder / f"campaigns_b{test_inputs_per_trial}"
    test = P.evaluate_test(result, *test_set.tensors, names=names, bers=BERS, work_dir=test_dir,
                           trials=test_trials, inputs_per_trial=test_inputs_per_trial)
    P.write_result(result, folder / "protect", data=DATA)
    out: dict[str, Any] = {"model": name, "width": width, "rows": [], "chosen": result.chosen,
                           "reason": result.reason, "seconds_protect": time.time() - start,
                           "trials": test_trials or trials, "validation_trials": trials,
                           "test_inputs_per_trial": test_inputs_per_trial, "max_latency": max_latency,
                           "e2e_max_latency": e2e_max_latency,
                           "validation_size": result.config["validation_size"]}
    for label, member in rows:
        rec, t = result.record(member), test[member]
        out["rows"].append({"row": label, "candidate": member, "clean": t["clean"],
                            **{f"{b:g}": t["bers"][f"{b:g}"] for b in BERS},
                            "macs_ratio": rec["macs_ratio"], "macs_ratio_b1": rec["cost"]["macs_ratio_batch1"],
                            "latency_ratio": rec.get("latency_ratio"), "params_ratio": rec["params_ratio"],
                            "validation": rec["validation"]})
    if e2e:
        start = time.time()
        res = pipeline.prune_and_protect(net, train_set, test_set, folder / "e2e", prune_ratio=0.3,
                                         criterion="vulnerability", finetune_epochs=3, max_macs=1.0,
                                         max_latency=e2e_max_latency, ber=BER,
                                         trials=trials, seed=seed, record={"data": DATA}, log=log)
        # prune_and_protect reported the choice on test at BER and 10x BER, i.e. BERS
        rec, t = res.record(res.chosen), res.test[res.chosen]
        info = res.extra["end_to_end"]
        out["e2e"] = {"candidate": res.chosen, "clean": t["clean"], **{f"{b:g}": t["bers"][f"{b:g}"] for b in BERS},
                      "macs_ratio": rec["macs_ratio"], "macs_ratio_b1": rec["cost"]["macs_ratio_batch1"],
                      "latency_ratio": rec.get("latency_ratio"),
                      "params_ratio": rec["params_ratio"], "clean_original": info["clean_test"]["original"],
                      "clean_pruned": info["clean_test"]["pruned"], "seconds": time.time() - start,
                      "pruned_unprotected_macs": res.record("none")["macs_ratio"],
                      "pruned_unprotected_latency": res.record("none").get("latency_ratio")}
    return out


def command_of(r: dict[str, Any]) -> str:
    """The command that produced a model's entry."""
    return r.get("command") or f"python experiments/protect.py --models {r['model']} --trials {r['trials']}"


def markdown(results: list[dict[str, Any]], max_macs: float) -> str:
    lines = ["# Automatic protection search (issue 12), mnist5k", "",
             f"Selection: `ftcnn.protect.protect` at BER {BER:g}, budget <= x{max_macs:g} MACs, on a stratified "
             "validation split (20%) of the training data; scores and ranges from the rest. Rows of a family show "
             "its member with the best validation accuracy. Test numbers (1,000 test inputs) come from campaigns "
             "run after the choice. Faults: float32 bit flips in every Conv2d/Linear parameter and in every value "
             "a protection adds (bounds, copies). Accuracy in %: mean [95% CI]. Latency: batch 128, CPU, 1 thread, "
             "all candidates timed interleaved (medians). MACs per input include copies, corrections, restrictions and "
             "weight checks; weight checks run once per forward, so `MACs x` shares them over a batch of 128 and "
             "`MACs x (b1)` counts them whole (batch 1). The budget applies to `MACs x`.", ""]
    for r in results:
        blocks = r.get("test_inputs_per_trial")
        lines += [f"## {r['model']} (width {r['width']:g}); {r['trials']} test trials per point"
                  + (f", each on a random block of {blocks} of the 1,000 test inputs (unbiased)" if blocks else "")
                  + (f"; {r['validation_trials']} validation trials per candidate"
                     if r.get("validation_trials", r["trials"]) != r["trials"] else "")
                  + (f"; latency budget x{r['max_latency']:g}" if r.get("max_latency") else "")
                  + f"; validation split {r['validation_size']} inputs", "",
                  f"Command: `{command_of(r)}`", "",
                  "| row | candidate | clean | acc @1e-4 | acc @1e-3 | MACs x | MACs x (b1) | latency b128 x "
                  "| params x |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lat = row["latency_ratio"]
            lines.append(f"| {row['row']} | {row['candidate']} | {100 * row['clean']:.1f} | {fmt_acc(row['0.0001'])} "
                         f"| {fmt_acc(row['0.001'])} | {row['macs_ratio']:.3f} | {row['macs_ratio_b1']:.3f} | "
                         f"{'-' if lat is None else f'{lat:.2f}'} | {row['params_ratio']:.3f} |")
        lines += ["", f"Chosen: {r['chosen']} — {r['reason']}.", ""]
        if "e2e" in r:
            e = r["e2e"]
            lat = e["latency_ratio"]
            lat_budget = r.get("e2e_max_latency")
            lines += ["End to end (vulnerability pruning 0.3 -> 3 epochs fine-tune on the fit split -> protect "
                      "within x1.00 of the ORIGINAL's MACs"
                      + (f" and x{lat_budget:g} of its latency" if lat_budget else "")
                      + f"; test: {r.get('validation_trials', r['trials'])} trials of all test inputs); ratios "
                      "relative to the original unpruned model:", "",
                      "| model | candidate | clean | acc @1e-4 | acc @1e-3 | MACs x | MACs x (b1) | latency b128 x "
                      "| params x |",
                      "|---|---|---|---|---|---|---|---|---|",
                      f"| pruned + protected | {e['candidate']} | {100 * e['clean']:.1f} | {fmt_acc(e['0.0001'])} | "
                      f"{fmt_acc(e['0.001'])} | {e['macs_ratio']:.3f} | {e['macs_ratio_b1']:.3f} | "
                      f"{'-' if lat is None else f'{lat:.2f}'} | "
                      f"{e['params_ratio']:.3f} |", "",
                      f"Clean test accuracy: original {100 * e['clean_original']:.1f}, pruned and fine-tuned "
                      f"{100 * e['clean_pruned']:.1f}; the pruned model unprotected costs "
                      f"x{e['pruned_unprotected_macs']:.3f} MACs"
                      + (f", x{e['pruned_unprotected_latency']:.2f} latency" if e["pruned_unprotected_latency"] else "")
                      + " of the original.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet5"], choices=list(MODELS))
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--max-macs", type=float, default=1.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-e2e", action="store_true", help="skip the prune -> protect run")
    parser.add_argument("--max-latency", type=float, default=None, help="latency budget (b128 ratio)")
    parser.add_argument("--test-trials", type=int, default=None, help="test-split trials (default: --trials)")
    parser.add_argument("--e2e-max-latency", type=float, default=None,
                        help="end to end: latency budget relative to the ORIGINAL model (e.g. 1.0)")
    parser.add_argument("--test-inputs-per-trial", type=int, default=None,
                        help="test trials each on a random block of this many test inputs (unbiased)")
    parser.add_argument("--out", type=Path, default=Path("runs/exp_protect"))
    parser.add_argument("--results", type=Path, default=Path("experiments/results/protect.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    stored = args.out / "results.json"
    # results of models run by earlier invocations are kept (each with its own command)
    done = {r["model"]: r for r in (json.loads(stored.read_text()) if stored.is_file() else [])}
    for name in args.models:
        result = run_model(name, args.out, args.trials, args.max_macs, args.seed, not args.no_e2e,
                           lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True),
                           args.max_latency, args.test_trials, args.test_inputs_per_trial, args.e2e_max_latency)
        result["command"] = (f"python experiments/protect.py --models {name} --trials {args.trials}"
                             + (" --no-e2e" if args.no_e2e else "")
                             + (f" --max-latency {args.max_latency:g}" if args.max_latency else "")
                             + (f" --test-trials {args.test_trials}" if args.test_trials else "")
                             + (f" --test-inputs-per-trial {args.test_inputs_per_trial}"
                                if args.test_inputs_per_trial else "")
                             + (f" --e2e-max-latency {args.e2e_max_latency:g}" if args.e2e_max_latency else ""))
        done[name] = result
        results = [done[m] for m in MODELS if m in done]
        files.write_json(stored, results)
        files.write_text(args.results, markdown(results, args.max_macs))
        print(json.dumps({r["model"]: r["chosen"] for r in results}))

if __name__ == "__main__":
    main()
