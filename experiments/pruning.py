"""Does vulnerability pruning beat L1 pruning, and how much does pruning save a hardened model?

The paper's pipeline (design §5) for LeNet-5 and VGG-11 (width 0.25; ResNet-20
optional) on mnist5k: train (or reuse) the model, then for every pruning ratio
and criterion (``vulnerability`` = lowest gain score goes, ``l1`` = smallest
filter norm goes) run ``ftcnn.flows.pipeline.prune_and_harden``: score -> prune -> fine-tune ->
re-score -> harden (ratio 0.1, ``min``). Then the same float32 bit-flip
campaign (``ftcnn.campaigns.campaign.run_campaign``) on the unprotected model, the
hardened unpruned model and every hardened pruned one.

Reported, per model: clean accuracy right after pruning and after fine-tuning;
accuracy (mean, 95% CI) per BER; parameters, MACs and CPU latency (batch 1 and
128) of hardened-pruned relative to hardened-unpruned. Latency on a shared CPU
is noisy, so all hardened variants of a model are timed interleaved (each
round times every model once, in rotating order) and the median per model is
kept; single-threaded, so other processes disturb it less.

Resumable: every pipeline stage, campaign trial and timing is stored under
``--out`` (default ``runs/exp_pruning``) and reused; results are written to
``results.json`` and ``results.md`` there.

Examples:
    python experiments/pruning.py --quick                      # smoke run, LeNet-5, ~2 min
    python experiments/pruning.py --models lenet5              # the reported run
    python experiments/pruning.py --models lenet5 vgg11 --trials 30
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ftcnn import checkpoint, data, train
from ftcnn.campaigns import campaign
from ftcnn.protection import cost
from ftcnn.flows.pipeline import prune_and_harden as pipeline

MODEL_SETUP = {  # name -> (width, training epochs); the same as experiments/hardening.py
    "lenet5": (1.0, 5),
    "vgg11": (0.25, 3),
    "resnet20": (0.5, 3),
}
DATA = "mnist5k"


def get_model(name: str, folder: Path, seed: int, epochs: int) -> torch.nn.Module:
    """Train once, then reuse the checkpoint."""
    path = folder / "model.pt"
    if path.is_file():
        return checkpoint.load(path)
    folder.mkdir(parents=True, exist_ok=True)
    info = data.info(DATA)
    train.seed_everything(seed)
    width = MODEL_SETUP[name][0]
    model = checkpoint.build(name, num_classes=info.num_classes, in_channels=info.in_channels,
                             input_size=info.input_size, width=width)
    train.fit(model, data.load(DATA, "train"), epochs=epochs, seed=seed, desc=f"train {name}")
    checkpoint.save(model, path, data=DATA, epochs=epochs, seed=seed,
                    test_accuracy=train.evaluate(model, data.load(DATA, "test")))
    return checkpoint.load(path)


def run_pipelines(model: torch.nn.Module, folder: Path, args: argparse.Namespace) -> dict[str, Path]:
    """One pipeline folder per (criterion, ratio); the stages shared by all of them
    (original scores, hardened unpruned) are computed once and copied."""
    train_set, test_set = data.load(DATA, "train"), data.load(DATA, "test")
    runs: dict[str, Path] = {}
    first: Path | None = None
    for criterion in args.criteria:
        for ratio in args.ratios:
            key = f"{criterion}_{ratio:g}"
            out = folder / key
            out.mkdir(parents=True, exist_ok=True)
            if first is not None:  # identical inputs, identical outputs: reuse, don't recompute
                for shared in ("scores_original.json", "hardened_unpruned.pt"):
                    if not (out / shared).exists() and (first / shared).exists():
                        shutil.copy2(first / shared, out / shared)
            print(f"[{folder.name}] pipeline {key}", flush=True)
            pipeline(model, train_set, test_set, out, prune_ratio=ratio, harden_ratio=args.harden_ratio,
                     correction=args.correction, criterion=criterion, finetune_epochs=args.finetune_epochs,
                     samples=args.samples, seed=args.seed, record={"data": DATA}, progress=False)
            first = first or out
            runs[key] = out
    return runs


def latencies(folder: Path, models: dict[str, torch.nn.Module], shape: tuple[int, ...],
              rounds: int) -> dict[str, dict[str, float]]:
    path = folder / "latency.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if set(stored.get("b1", {})) == set(models):
            return stored
    result = {"threads": 1, "rounds": rounds,
              **{f"b{b}": cost.interleaved_latency(models, shape, batch=b, rounds=rounds, threads=1)
                 for b in (1, 128)}}
    campaign.write_text(path, json.dumps(result, indent=1))
    return result


def fault_campaign(model: torch.nn.Module, folder: Path, args: argparse.Namespace,
                   inputs: torch.Tensor, labels: torch.Tensor) -> list[dict[str, Any]]:
    config = campaign.CampaignConfig(bers=tuple(args.bers), trials=args.trials, seed=args.seed)
    summary = campaign.run_campaign(model, inputs, labels, config, folder, record={"data": DATA},
                                    progress=False)
    return [{"ber": r["ber"], "mean": r["accuracy_mean"], "ci95": r["accuracy_ci"], "trials": r["trials"],
             "due": r["due_mean"]} for r in summary["results"]]


def paired_difference(a: Path, b: Path, bers: list[float]) -> list[dict[str, Any]]:
    """Per BER: accuracy of campaign ``a`` minus ``b``, paired by trial, with a Wilcoxon
    signed-rank p-value. Hardened models of equal shapes get the same fault positions
    in trial t (the draw depends only on seed, BER, trial and the memory layout), so
    the pairing removes most of the fault-draw noise; shapes are checked, not assumed."""
    import sqlite3

    from scipy import stats

    def trials(folder: Path, ber: float) -> dict[int, tuple[float, int]]:
        with sqlite3.connect(folder / campaign.DB_NAME) as db:
            rows = db.execute("SELECT trial, accuracy, n_faults FROM trials WHERE point = ?", (ber,))
            return {t: (acc, n) for t, acc, n in rows}

    out = []
    for ber in bers:
        ta, tb = trials(a, ber), trials(b, ber)
        common = sorted(set(ta) & set(tb))
        same_faults = all(ta[t][1] == tb[t][1] for t in common)
        diff = [ta[t][0] - tb[t][0] for t in common]
        nonzero = any(d != 0 for d in diff)
        p = float(stats.wilcoxon(diff).pvalue) if len(diff) > 1 and nonzero else 1.0
        out.append({"ber": ber, "trials": len(common), "mean_difference": sum(diff) / max(len(diff), 1),
                    "wins": sum(d > 0 for d in diff), "losses": sum(d < 0 for d in diff),
                    "wilcoxon_p": p, "same_fault_counts": same_faults})
    return out


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    folder = args.out / name
    epochs = args.epochs or MODEL_SETUP[name][1]
    model = get_model(name, folder, args.seed, epochs)
    runs = run_pipelines(model, folder, args)
    inputs, labels = campaign.stack_dataset(data.load(DATA, "test"))
    shape = tuple(inputs.shape[1:])
    first = next(iter(runs.values()))
    variants = {"original": model, "hardened_unpruned": checkpoint.load(first / "hardened_unpruned.pt")}
    variants.update({f"hardened_{k}": checkpoint.load(p / "hardened.pt") for k, p in runs.items()})
    print(f"[{name}] latency", flush=True)
    lat = latencies(folder, variants, shape, args.rounds)
    rows: dict[str, Any] = {}
    for key, net in variants.items():
        print(f"[{name}] campaign {key}", flush=True)
        costs = cost.macs(net, shape)
        rows[key] = {"params": cost.parameters(net), "macs": costs["macs"],
                     "latency_b1_ms": lat["b1"][key], "latency_b128_ms": lat["b128"][key],
                     "accuracy": train.evaluate(net, data.load(DATA, "test")),
                     "faults": fault_campaign(net, folder / "campaigns" / key, args, inputs, labels)}
    base = rows["hardened_unpruned"]
    for key, path in runs.items():
        summary = json.loads((path / "summary.json").read_text())
        row = rows[f"hardened_{key}"]
        row.update(criterion=summary["config"]["criterion"], prune_ratio=summary["config"]["prune_ratio"],
                   accuracy_pruned=summary["stages"]["pruned"]["accuracy"],
                   accuracy_finetuned=summary["stages"]["pruned_finetuned"]["accuracy"],
                   pipeline_latency_rel_b1=summary["relative"]["hardened_pruned_vs_hardened_unpruned"]["latency_b1_ms"],
                   pipeline_latency_rel_b128=summary["relative"]["hardened_pruned_vs_hardened_unpruned"]["latency_b128_ms"])
        row["relative_to_hardened_unpruned"] = {k: row[k] / base[k] for k in
                                                ("params", "macs", "latency_b1_ms", "latency_b128_ms")}
    paired = {}
    if {"vulnerability", "l1"} <= set(args.criteria):
        for ratio in args.ratios:
            key = f"{ratio:g}"
            paired[key] = paired_difference(folder / "campaigns" / f"hardened_vulnerability_{key}",
                                            folder / "campaigns" / f"hardened_l1_{key}", args.bers)
    return {"model": name, "width": MODEL_SETUP[name][0], "epochs": epochs,
            "clean_accuracy": checkpoint.meta(model).get("test_accuracy"), "variants": rows,
            "vulnerability_minus_l1": paired}


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [f"# Pruning experiment ({DATA})", "",
             f"harden ratio {cfg['harden_ratio']} ({cfg['correction']}), fine-tune {cfg['finetune_epochs']} "
             f"epochs, gain on {cfg['samples']} training inputs, {cfg['trials']} trials per BER, seed "
             f"{cfg['seed']}. Accuracy under faults: mean [95% CI] over trials on the 1000 test inputs. "
             "Costs relative to the hardened unpruned model (latency: CPU, 1 thread, interleaved medians).", ""]
    for m in results["models"]:
        bers = [f["ber"] for f in m["variants"]["original"]["faults"]]
        lines += [f"## {m['model']} (width {m['width']}, {m['epochs']} epochs, clean {m['clean_accuracy']:.2%})", "",
                  "| variant | acc. pruned | acc. fine-tuned | " + " | ".join(f"acc @ {b:g}" for b in bers)
                  + " | params | MACs | latency b1 | latency b128 |",
                  "|---" * (7 + len(bers)) + "|"]
        for key, row in m["variants"].items():
            rel = row.get("relative_to_hardened_unpruned")
            faults = " | ".join(f"{f['mean']:.2%} [{f['ci95'][0]:.1%}, {f['ci95'][1]:.1%}]" for f in row["faults"])
            if rel:
                costs = (f"{rel['params']:.2f}x | {rel['macs']:.2f}x | {rel['latency_b1_ms']:.2f}x | "
                         f"{rel['latency_b128_ms']:.2f}x")
                accs = f"{row['accuracy_pruned']:.2%} | {row['accuracy_finetuned']:.2%}"
            else:
                costs = (f"{row['params']:,} | {row['macs']:,} | {row['latency_b1_ms']:.3f} ms | "
                         f"{row['latency_b128_ms']:.2f} ms")
                accs = f"- | {row['accuracy']:.2%}"
            lines.append(f"| {key} | {accs} | {faults} | {costs} |")
        lines.append("")
        if m.get("vulnerability_minus_l1"):
            lines += ["Hardened vulnerability-pruned minus hardened L1-pruned accuracy, paired by trial "
                      "(same fault positions): mean difference, wins/losses, Wilcoxon p.", "",
                      "| prune ratio | " + " | ".join(f"@ {b:g}" for b in bers) + " |",
                      "|---" * (1 + len(bers)) + "|"]
            for ratio, cells in m["vulnerability_minus_l1"].items():
                lines.append(f"| {ratio} | " + " | ".join(
                    f"{c['mean_difference']:+.2%} ({c['wins']}/{c['losses']}, p={c['wilcoxon_p']:.2g})"
                    + ("" if c["same_fault_counts"] else " (fault counts differ)") for c in cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet5", "vgg11"], choices=sorted(MODEL_SETUP))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    parser.add_argument("--criteria", nargs="+", default=["vulnerability", "l1"], choices=["vulnerability", "l1"])
    parser.add_argument("--bers", nargs="+", type=float, default=[1e-5, 3e-5, 1e-4])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: per model)")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--harden-ratio", type=float, default=0.1)
    parser.add_argument("--correction", default="min")
    parser.add_argument("--samples", type=int, default=256, help="training inputs for the gain scores")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/exp_pruning"))
    parser.add_argument("--quick", action="store_true", help="LeNet-5, one ratio, few trials (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.models, args.ratios, args.trials, args.epochs = ["lenet5"], [0.4], 5, 2
        args.finetune_epochs, args.rounds, args.bers = 1, 5, [1e-4]
        args.out = args.out.with_name(args.out.name + "_quick")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "models": []}
    for name in args.models:
        results["models"].append(run_model(name, args))
        results["seconds"] = round(time.time() - start, 1)
        campaign.write_text(args.out / "results.json", json.dumps(results, indent=1))
        campaign.write_text(args.out / "results.md", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
