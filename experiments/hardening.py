"""Does selective hardening pay? Every protection of design §4 under the same faults.

For LeNet-5 and VGG-11 (width 0.25) on mnist5k: train (or reuse) the model,
score channels (``gain`` from ``ftcnn.protection.vulnerability``; L1 norms if that module
is missing), build each variant, and run the same float32 bit-flip campaign on
each (the copies are fault targets too). Writes, resumably, one run folder
per variant under ``runs/exp_hardening/<model>/<variant>/`` and the tables
``runs/exp_hardening/results.md`` and ``results.json``:

- accuracy mean and 95% CI per BER, clean test accuracy;
- parameters, MACs (correction included) and CPU latency relative to the baseline;
- the fault-free discrepancy between the original channels and their copies
  (why the corrections need a tolerance), and whether the hardened model is
  bit-exact on the test set;
- critical-SDC rate per bit position, from single-fault campaigns per bit.

Nothing here is tuned per variant: all share the seed, margin, trials and data.

Examples:
    python experiments/hardening.py --quick                       # smoke run, ~1 min
    python experiments/hardening.py --models lenet5 --trials 30   # the reported run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ftcnn import checkpoint, data, train
from ftcnn.campaigns import campaign
from ftcnn.protection import hardening as H
from ftcnn.splits import calibration_subset

MODEL_SETUP = {  # name -> (width, epochs)
    "lenet5": (1.0, 5),
    "vgg11": (0.25, 3),
}
BERS = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4)


def variants(ratios: tuple[float, ...], restrict: str) -> dict[str, dict[str, Any] | None]:
    """Variant name -> harden() keywords (None: the unprotected baseline)."""
    out: dict[str, dict[str, Any] | None] = {"baseline": None, f"restrict_{restrict}": {"ratio": 0.0, "restrict": restrict}}
    for r in ratios:
        tag = f"{round(100 * r)}"
        for corr in ("min", "range"):
            out[f"{corr}_{tag}"] = {"ratio": r, "correction": corr}
            out[f"{corr}_{tag}+restrict"] = {"ratio": r, "correction": corr, "restrict": restrict}
        out[f"tmr_{tag}"] = {"ratio": r, "correction": "tmr"}
    out["full_tmr"] = {"tmr": "full"}
    return out


def get_model(name: str, folder: Path, seed: int, epochs: int | None) -> tuple[torch.nn.Module, float]:
    """Train once, then reuse the checkpoint."""
    path = folder / "model.pt"
    test = data.load("mnist5k", "test")
    if path.is_file():
        model = checkpoint.load(path)
        return model, train.evaluate(model, test)
    width, default_epochs = MODEL_SETUP[name]
    info = data.info("mnist5k")
    train.seed_everything(seed)
    model = checkpoint.build(name, num_classes=info.num_classes, in_channels=info.in_channels,
                             input_size=info.input_size, width=width)
    n_epochs = epochs or default_epochs
    train.fit(model, data.load("mnist5k", "train"), epochs=n_epochs, seed=seed, progress=False)
    accuracy = train.evaluate(model, test)
    checkpoint.save(model, path, data="mnist5k", test_accuracy=accuracy, epochs=n_epochs, seed=seed)
    return model, accuracy


def get_scores(model: torch.nn.Module, folder: Path, x: torch.Tensor, y: torch.Tensor, seed: int
               ) -> tuple[str, dict[str, list[float]]]:
    path = folder / "scores.json"
    if path.is_file():
        blob = json.loads(path.read_text())
        return blob["method"], blob["layers"]
    try:
        from ftcnn.protection import vulnerability
    except ImportError:  # scores by L1 norm until the vulnerability module exists
        layers = {n: m.weight.detach().abs().flatten(1).sum(1).tolist()
                  for n, m in H.target_layers(model).items()}
        campaign.write_text(path, json.dumps({"method": "l1", "layers": layers}))
        return "l1", layers
    scores = vulnerability.analyze(model, x, y, method="gain", samples=256, seed=seed)
    vulnerability.save_scores(scores, path)
    method, layers = scores["method"], scores["layers"]
    return method, layers


@torch.inference_mode()
def copy_discrepancy(hardened: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Fault-free |original channel - copy| over ``x``: max absolute, max relative
    (where |value| > 1e-3), share of non-identical values, and the largest
    ratio to the agreement tolerance (< 1 means the corrections stay exact)."""
    stats = {"values": 0, "different": 0, "max_abs": 0.0, "max_rel": 0.0, "max_tolerance_ratio": 0.0}

    def hook(mod: H.Correction, inputs: Any, output: torch.Tensor) -> None:
        y, copies = inputs
        a = y.index_select(mod.dim, mod.index)
        for b in copies.chunk(H.CORRECTIONS[mod.rule].copies, mod.dim):
            d = (a - b).abs()
            big = a.abs() > 1e-3
            stats["values"] += d.numel()
            stats["different"] += int((d > 0).sum())
            stats["max_abs"] = max(stats["max_abs"], float(d.max()))
            if big.any():
                stats["max_rel"] = max(stats["max_rel"], float((d[big] / a.abs()[big]).max()))
            tol = H.RTOL * torch.minimum(a.abs(), b.abs()) + H.ATOL
            stats["max_tolerance_ratio"] = max(stats["max_tolerance_ratio"], float((d / tol).max()))

    handles = [m.register_forward_hook(hook) for m in hardened.modules() if isinstance(m, H.Correction)]
    try:
        campaign.predict(hardened, x)
    finally:
        for h in handles:
            h.remove()
    stats["share_different"] = stats["different"] / max(stats["values"], 1)
    return stats


def bit_sensitivity(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, folder: Path,
                    bits: tuple[int, ...], trials: int, seed: int, record: dict[str, Any]) -> dict[int, float]:
    """Critical-SDC rate of one flip at each bit position (a campaign per bit)."""
    out = {}
    for b in bits:
        config = campaign.CampaignConfig(counts=(1,), bits=(b,), trials=trials, seed=seed)
        s = campaign.run_campaign(model, x, y, config, folder / f"bit{b:02d}", progress=False,
                                  record=record or None)
        out[b] = s["results"][0]["critical_sdc_mean"]
    return out


def run_model(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    model, clean = get_model(name, folder, args.seed, args.epochs)
    print(f"{name}: clean test accuracy {clean:.2%}", flush=True)
    train_x, train_y = campaign.stack_dataset(data.load("mnist5k", "train"))
    x, y = campaign.stack_dataset(data.load("mnist5k", "test"))
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    calibration = calibration_subset(train_x, args.calibration_size, args.seed)  # the one rule (same numbers)
    method, scores = get_scores(model, folder, train_x, train_y, args.seed)
    input_shape = tuple(x.shape[1:])
    config = campaign.CampaignConfig(bers=tuple(args.ber), trials=args.trials, seed=args.seed)
    subset = {"inputs": len(x)} if args.limit else {}  # a --limit run is another campaign
    with torch.inference_mode():
        golden_logits = campaign.predict(model, x)
    results: dict[str, Any] = {"model": name, "clean_accuracy": clean, "scores": method, "variants": {}}
    chosen = variants(tuple(args.ratios), args.restrict)
    if args.variants:
        chosen = {k: v for k, v in chosen.items() if k in args.variants}
    for label, kw in chosen.items():
        start = time.perf_counter()
        net = model if kw is None else H.harden(model, scores, range_margin=args.margin, calibration=calibration, **kw)
        net.eval()
        with torch.inference_mode():
            logits = campaign.predict(net, x)
        row: dict[str, Any] = {
            "settings": kw, "margin": args.margin if kw else None,
            "clean_accuracy": float((logits.argmax(1) == y).float().mean()),
            "bit_exact": bool(torch.equal(logits, golden_logits)),
            "max_logit_difference": float((logits - golden_logits).abs().max()),
            "protected_channels": sum(len(v) for v in H.protected(net).values()),
            "duplicated_parameters": H.duplicated_parameters(net),
        }
        if kw and kw.get("ratio", 1) > 0:
            row["copy_discrepancy"] = copy_discrepancy(net, x)
        cost = H.overheads(model, net, input_shape)
        row["cost"] = cost["hardened"]
        row["relative"] = cost["relative"]
        summary = campaign.run_campaign(net, x, y, config, folder / label, progress=False,
                                        record={"model": name, "variant": label, "data": "mnist5k", **subset})
        row["campaign"] = [{k: r[k] for k in ("ber", "trials", "accuracy_mean", "accuracy_ci", "sdc_mean",
                                              "critical_sdc_mean", "due_mean", "n_faults_mean")}
                           for r in summary["results"]]
        if args.bit_trials:
            row["critical_sdc_by_bit"] = bit_sensitivity(net, x, y, folder / label / "bits", tuple(args.bits),
                                                         args.bit_trials, args.seed, subset)
        row["seconds"] = time.perf_counter() - start
        results["variants"][label] = row
        accs = " ".join(f"{r['accuracy_mean']:.3f}" for r in row["campaign"])
        print(f"  {label:22s} clean {row['clean_accuracy']:.4f} exact={row['bit_exact']} "
              f"MACs x{row['relative']['macs']:.3f} acc/BER {accs} ({row['seconds']:.0f}s)", flush=True)
    return results


def markdown(all_results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["# Hardening experiment (mnist5k, float32 bit flips in all Conv2d/Linear parameters, "
             "copies included)", "",
             f"Trials per BER: {args.trials}; seed {args.seed}; range margin {args.margin}; "
             f"calibration: {args.calibration_size} training inputs. Accuracy: mean [95% CI]. Latency: "
             f"CPU, {args.threads} torch thread(s), smallest median of 3 alternating rounds (original, "
             "variant); on a shared machine treat it as indicative.", ""]
    for res in all_results:
        bers = [r["ber"] for r in next(iter(res["variants"].values()))["campaign"]]
        lines += [f"## {res['model']} (clean {res['clean_accuracy']:.2%}, scores: {res['scores']})", "",
                  "| variant | clean | " + " | ".join(f"BER {b:g}" for b in bers)
                  + " | params x | MACs x | latency b1 x | latency b128 x | exact |",
                  "|---" * (len(bers) + 7) + "|"]
        for label, row in res["variants"].items():
            cis = [r.get("accuracy_ci", r.get("accuracy_ci95")) for r in row["campaign"]]  # older: ci95
            cells = [f"{r['accuracy_mean']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
                     for r, ci in zip(row["campaign"], cis)]
            rel = row["relative"]
            lines.append(f"| {label} | {row['clean_accuracy']:.4f} | " + " | ".join(cells)
                         + f" | {rel['params']:.3f} | {rel['macs']:.3f} | {rel['latency_b1_ms']:.2f} | "
                         f"{rel['latency_b128_ms']:.2f} | {'yes' if row['bit_exact'] else 'no'} |")
        disc = [(label, row["copy_discrepancy"]) for label, row in res["variants"].items()
                if "copy_discrepancy" in row]
        if disc:
            worst = max(disc, key=lambda t: t[1]["max_tolerance_ratio"])
            d = worst[1]
            lines += ["", f"Fault-free copy vs original (worst variant, {worst[0]}): max |diff| "
                      f"{d['max_abs']:.3g}, max relative {d['max_rel']:.3g}, {d['share_different']:.3%} of "
                      f"values not identical, max diff / tolerance {d['max_tolerance_ratio']:.3g} "
                      f"(tolerance: {H.RTOL:g} * min(|a|,|b|) + {H.ATOL:g})."]
        bit_rows = {label: row["critical_sdc_by_bit"] for label, row in res["variants"].items()
                    if "critical_sdc_by_bit" in row}
        if bit_rows:
            bits = sorted({int(b) for r in bit_rows.values() for b in r})
            shown = [b for b in bits if any((r.get(b) or r.get(str(b)) or 0) > 0 for r in bit_rows.values())]
            lines += ["", f"Critical-SDC rate of a single flip per bit position ({args.bit_trials} trials per bit; "
                      f"bits never causing one are left out: "
                      f"{', '.join(str(b) for b in bits if b not in shown) or 'none'}):", "",
                      "| variant | " + " | ".join(f"bit {b}" for b in shown) + " |",
                      "|---" * (len(shown) + 1) + "|"]
            for label, r in bit_rows.items():
                lines.append(f"| {label} | " + " | ".join(f"{(r.get(b, r.get(str(b))) or 0):.3f}" for b in shown) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["lenet5", "vgg11"], choices=sorted(MODEL_SETUP))
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--ber", type=float, nargs="+", default=list(BERS))
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument("--restrict", default="zero", choices=H.RESTRICT_MODES)
    p.add_argument("--margin", type=float, default=0.1)
    p.add_argument("--calibration-size", type=int, default=1000)
    p.add_argument("--bits", type=int, nargs="+", default=list(range(32)))
    p.add_argument("--bit-trials", type=int, default=20, help="single-flip trials per bit (0: skip)")
    p.add_argument("--variants", nargs="+", help="only these variants")
    p.add_argument("--epochs", type=int, help="override training epochs")
    p.add_argument("--limit", type=int, help="use only the first N test inputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (latency is measured with these)")
    p.add_argument("--out", type=Path, default=Path("runs/exp_hardening"))
    p.add_argument("--quick", action="store_true", help="smoke run: LeNet-5, 3 trials, 2 BERs, 3 bits")
    args = p.parse_args()
    if args.quick:
        args.models, args.trials, args.ber = ["lenet5"], 3, [1e-5, 1e-4]
        args.bits, args.bit_trials, args.limit = [22, 30, 31], 3, 300
        args.out = args.out / "quick"
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    new = {name: run_model(name, args, args.out) for name in args.models}
    # keep the other models' results from earlier runs (e.g. LeNet-5 today, VGG-11 later)
    previous = args.out / "results.json"
    kept = json.loads(previous.read_text())["results"] if previous.is_file() else []
    all_results = [r for r in kept if r["model"] not in new] + list(new.values())
    blob = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "tolerance": {"rtol": H.RTOL, "atol": H.ATOL}, "versions": campaign.versions(),
            "results": all_results}
    campaign.write_text(args.out / "results.json", json.dumps(blob, indent=1, default=str))
    campaign.write_text(args.out / "results.md", markdown(all_results, args))
    print(f"results: {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
