"""What the fail-safe bound layouts cost in latency (issue 21): the weight check (and the check plus
restriction on 90% of the parameters) with every bound stored 2, 3 or 5 times, against the unprotected
model, at batch 1 and 128 (``cost.stable_latency``: 1 thread, interleaved rounds until a control pair
agrees within 3%, at most 60 rounds). Random initialisation: latency does not depend on the values.

Example:
    python benchmarks/bound_copies_latency.py
    python benchmarks/bound_copies_latency.py --models lenet5 --batches 1
"""

from __future__ import annotations

import argparse

import torch

import ftcnn
from ftcnn.protection import cost, fold, hardening

MODELS = {"lenet5": 1.0, "vgg11": 0.25, "resnet20": 1.0}
LAYOUTS = (2, 3, 5)
PROTECTIONS = {"weights_zero": {"check_weights": "zero"},
               "weights_zero+restrict_p90": {"check_weights": "zero", "restrict": "zero", "range_margin": 0.1,
                                             "restrict_share": 0.9}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 128])
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| model | protection | copies | memory x | " + " | ".join(f"latency x b{b}" for b in args.batches) + " |")
    print("|---|---|---|---|" + "---|" * len(args.batches))
    for name in args.models:
        net = ftcnn.build(name, num_classes=10, in_channels=1, input_size=28, width=MODELS[name]).eval()
        net = fold.fold_batchnorm(net) if fold.foldable(net) else net
        calibration = torch.randn(64, 1, 28, 28)
        built = {(p, c): hardening.harden(net, ratio=0.0, calibration=calibration, bound_copies=c, **s)
                 for p, s in PROTECTIONS.items() for c in LAYOUTS}
        timings = {b: cost.stable_latency({"none": net, **{f"{p}/{c}": m for (p, c), m in built.items()}},
                                          (1, 28, 28), b, threads=1) for b in args.batches}
        for (p, c), m in built.items():
            ratios = [timings[b]["ms"][f"{p}/{c}"] / timings[b]["ms"]["none"] for b in args.batches]
            memory = cost.memory_bits(m) / cost.memory_bits(net)
            print(f"| {name} | {p} | {c} | {memory:.3f} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |", flush=True)
        print(f"<!-- {name}: rounds " + ", ".join(f"b{b} {timings[b]['rounds']} "
              f"({'agreed' if timings[b]['converged'] else 'not converged'})" for b in args.batches) + " -->")


if __name__ == "__main__":
    main()
