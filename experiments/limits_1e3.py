"""What keeps the protected LeNet-5 more than 3 points below clean at BER 1e-3 (issue 12)?

    python experiments/limits_1e3.py [--trials 200] [--out experiments/results/limits_1e3.md]

The model of experiments/protect.py (runs/exp_protect/lenet5/model.pt, trained
there; trained here the same way if missing), hardened with the weight check
and range restriction (margin 0.1, ranges profiled on 1,000 training inputs,
as the protect search does), and the unprotected model. Campaigns at BER 1e-3
on the mnist5k test split flip only one group of bits at a time (the sign bit
31; the exponent MSB 30; the other exponent bits 23-29; the mantissa 0-22),
then all bits, every value the protection adds attacked too. Each trial
evaluates a random block of 100 test inputs (unbiased; ``inputs_per_trial``).
The accuracy each group costs says which faults the bounds cannot see.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ftcnn import data, splits
from ftcnn.flows import pipeline
from ftcnn.protection import hardening
from ftcnn.campaigns.campaign import CampaignConfig, run_campaign

GROUPS = {"sign (31)": [31], "exponent MSB (30)": [30], "exponent 23-29": list(range(23, 30)),
          "mantissa 0-22": list(range(23)), "all bits": None}
BER = 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--model", type=Path, default=Path("runs/exp_protect/lenet5/model.pt"))
    parser.add_argument("--out", type=Path, default=Path("experiments/results/limits_1e3.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = pipeline.train_or_load(args.model, "lenet5", "mnist5k", epochs=5, seed=0)
    train_x, _ = data.load("mnist5k", "train").tensors
    x, y = data.load("mnist5k", "test").tensors
    calibration = splits.calibration_subset(train_x, 1000, seed=0)
    models = {"unprotected": net,
              "weight check + restriction": hardening.harden(net, ratio=0.0, check_weights="zero", restrict="zero",
                                                             range_margin=0.1, calibration=calibration)}
    rows = []
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for group, bits in GROUPS.items():
            cells = []
            for label, model in models.items():
                config = CampaignConfig(bers=(BER,), trials=args.trials, seed=0, inputs_per_trial=100,
                                        bits=None if bits is None else tuple(bits))
                s = run_campaign(model, x, y, config, Path(tmp) / f"{label}-{group}", progress=False)
                r = s["results"][0]
                cells.append(f"{100 * r['accuracy_mean']:.1f} [{100 * r['accuracy_ci'][0]:.1f}, "
                             f"{100 * r['accuracy_ci'][1]:.1f}]")
                clean = s["golden_accuracy"]
            rows.append(f"| {group} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    text = "\n".join([
        "# What limits protection at BER 1e-3 (LeNet-5, mnist5k)", "",
        f"Command: `python experiments/limits_1e3.py --trials {args.trials}` ({time.time() - start:.0f} s, 1 thread).",
        f"Clean test accuracy {100 * clean:.1f}%. BER {BER:g} on the listed bits only (every other bit "
        "fault-free), float32 parameters and every protection value; "
        f"{args.trials} trials per cell, each on a random block of 100 of the 1,000 test inputs (unbiased). "
        "Accuracy in %: mean [95% CI].", "",
        "| bits flipped | unprotected | weight check + restriction (zero, margin 0.1) |", "|---|---|---|",
        *rows, ""])
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
