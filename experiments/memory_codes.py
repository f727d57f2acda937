"""Memory-fault baselines on LeNet-5: SEC-DED ECC, parity, weight-level TMR vs bounds (issue 21).

    OMP_NUM_THREADS=1 python experiments/memory_codes.py [--trials 150] [--model /tmp/lenet5.pt]

A LeNet-5 trained on mnist5k (``ftcnn train --model lenet5 --data mnist5k --epochs
5 --seed 0``; trained the same way if ``--model`` is missing, as
experiments/failsafe_bounds.py does), protected by each stored-word code of
``ftcnn.protection.codes`` alone (``harden(ratio=0, code=...)``), by the weight check alone
(``check_weights="zero"``, bounds stored twice, the default), by a code and the
weight check composed (decode first, then the bounds), or not at all.
Campaigns at each BER on the test split, each trial on a random block of 100
test inputs, with every stored bit attacked (weights, biases, bounds, check
words, copies). The question the issue asks: what does a failed parity check
do to accuracy (zeroing every weight with a flip, vs only those whose sign or
exponent flipped), and how close does each code come to ECC.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from ftcnn import data, files
from ftcnn.flows import pipeline
from ftcnn.protection import codes, cost, hardening

from _common import ci_text, commit  # experiments/_common.py (run as a script from the repo root)
from ftcnn.campaigns.campaign import CampaignConfig, run_campaign

BERS = (1e-4, 1e-3, 3e-3)
VARIANTS = {  # label -> harden() settings (None: the model as trained)
    "unprotected": None,
    "weight check (bounds, zero)": dict(check_weights="zero"),
    **{f"code {name}": dict(code=name) for name in codes.CODES},
    # composed: decode first, then the bounds (a flip a code lets through, or miscorrects, is bounded)
    **{f"code {name} + weight check": dict(code=name, check_weights="zero") for name in ("secded", "parity_exponent")},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=150)
    parser.add_argument("--model", type=Path, default=Path("/tmp/lenet5.pt"))
    parser.add_argument("--out", type=Path, default=Path("experiments/results/memory_codes.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = pipeline.train_or_load(args.model, "lenet5", "mnist5k", epochs=5, seed=0)
    x, y = data.load("mnist5k", "test").tensors
    input_shape = tuple(x.shape[1:])
    models = {label: net if kw is None else hardening.harden(net, ratio=0.0, **kw) for label, kw in VARIANTS.items()}
    base_bits, base_macs = cost.memory_bits(net), cost.macs(net, input_shape)["macs"]
    rows, clean, start = [], None, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in models.items():
            macs = cost.macs(model, input_shape)
            cells = []
            for ber in BERS:
                config = CampaignConfig(bers=(ber,), trials=args.trials, seed=0, inputs_per_trial=100)
                summary = run_campaign(model, x, y, config, Path(tmp) / f"{label}-{ber}", progress=False)
                r = summary["results"][0]
                clean = summary["golden_accuracy"]
                cells.append(ci_text(r["accuracy_mean"], r["accuracy_ci"]))
            per_input_128 = cost.macs_at_batch(model, input_shape, 128) / cost.macs_at_batch(net, input_shape, 128)
            rows.append(f"| {label} | x{cost.memory_bits(model) / base_bits:.3f} | "
                        f"x{macs['macs'] / base_macs:.3f} / x{per_input_128:.3f} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    descriptions = "\n".join(f"- `{c.name}`: {c.description}." for c in codes.CODES.values())
    text = "\n".join([
        "# Memory codes vs bounds (LeNet-5, mnist5k)", "",
        f"Command: `OMP_NUM_THREADS=1 python experiments/memory_codes.py --trials {args.trials} "
        f"--model {args.model}` on commit {commit()} ({time.time() - start:.0f} s, 1 thread, "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}).", "",
        f"Model: LeNet-5 trained on mnist5k (5 epochs, seed 0), clean test accuracy {100 * clean:.2f}%. "
        "Each protection alone on every Conv2d/Linear (`harden(ratio=0, ...)`). Every stored bit attacked: "
        "float32 weights and biases, the weight check's bounds (two stored copies), the codes' int32 check "
        f"words and copies. {args.trials} trials per cell, each on a random block of 100 of the 1,000 test "
        "inputs. Accuracy in %: mean [95% CI]. Memory: every stored bit (`cost.memory_bits`) relative to the model's. "
        "MACs per input relative to the model's at batch 1 / batch 128 (`cost.macs_at_batch`: checks and "
        "decodes run once per forward, shared by the batch).", "",
        descriptions, "",
        "| protection | memory | MACs b1 / b128 | " + " | ".join(f"BER {b:g}" for b in BERS) + " |",
        "|---|---|---|" + "---|" * len(BERS), *rows, ""])
    files.write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
