"""Activation-fault campaigns with and without the exact shortcut (issue 24), on one thread.

    python benchmarks/activation_speed.py [--trials 40] [--ber 1e-7 1e-6 1e-5 1e-4] [--inputs 1000]
    python benchmarks/activation_speed.py --precision 0.01 [--ber 1e-7 1e-6]

LeNet-5 (untrained: where faults land, which is all the shortcut looks at, does
not depend on the weights) on the first 1,000 mnist5k test inputs, transient
faults in every Conv2d/Linear output. Per BER, a fixed number of trials
through ``run_campaign`` into a scratch folder (SQLite commits included):
the plain path (``shortcut=False``: each trial with a fault runs every input
through the whole model) and the shortcut (``fastpath.ActivationShortcut``:
inputs without a fault keep their golden logits, the others start at the cut
before their first faulted layer). Prints wall seconds of each, the speed-up,
whether the two summaries are equal (they must be), and the floor every
peer pays: one clean inference of the inputs per trial.

With ``--precision P``: LeNet-5 trained one epoch on mnist5k (in a scratch
folder), a ``--precision P`` campaign per BER (stratified trials, shortcut on),
its wall seconds and trials, against plain Monte Carlo at one clean
inference per trial: the trials it needs for the same half-width,
(z sigma / P)^2, with sigma the spread of one plain trial computed exactly
from the strata (sum_h W_h (s_h^2 + (m_h - m)^2)), times one inference.

Measured 2026-12-02, under load (six other helpers' jobs on the 2-core machine;
one clean inference then took 250-280 ms where it takes far less idle), 1 thread,
``--trials 100``:

         BER trials  plain s shortcut s speed-up vs 1 inference/trial equal
       1e-07    100    41.45       3.76   11.04x                6.90x  True
       1e-06    100    29.92       5.92    5.05x                4.38x  True
       1e-05    100    26.15      21.32    1.23x                1.22x  True
      0.0001    100    38.97      39.31    0.99x                0.66x  True
         all    400   136.49      70.31    1.94x                1.47x

--precision 0.01, LeNet-5 trained 1 epoch (trials include the pilot):

    transient    BER trials wall s half-width plain MC trials plain MC s speed-up
               1e-07     93    4.3     0.0002               1        0.2     0.1x
               1e-06     93    4.6     0.0011               1        0.2     0.1x
               1e-05     95   24.0     0.0032               2        0.6     0.0x
               1e-04     99   41.7     0.0053               6        1.7     0.0x
    permanent  1e-06     93   25.8     0.0009              57       14.4     0.6x
               1e-05    746  146.9     0.0086             694      175.0     1.2x

A transient trial averages independent faults over 1,000 inputs, so its accuracy
hardly varies and plain Monte Carlo reaches +-1 point in a few trials; the
stratified design's floor (15 pilot + 15 final trials per stratum) dominates.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from ftcnn import checkpoint, data
from ftcnn.flows import pipeline
from ftcnn.campaigns.campaign import CampaignConfig, predict, run_campaign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--ber", type=float, nargs="+", default=None)
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--precision", type=float, default=None)
    parser.add_argument("--mode", choices=["transient", "permanent"], default="transient",
                        help="activation fault mode of the --precision table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = data.load("mnist5k", "test").tensors
    x, y = x[:args.inputs], y[:args.inputs]
    with tempfile.TemporaryDirectory() as scratch:
        if args.precision is not None:
            model = pipeline.train_or_load(Path(scratch) / "lenet5.pt", "lenet5", "mnist5k", epochs=1).eval()
            inference = clean_inference(model, x)
            print(f"LeNet-5 (1 epoch), mnist5k, {len(x)} inputs, 1 thread; one clean inference: "
                  f"{inference * 1e3:.1f} ms")
            precision_table(model, x, y, args.ber or [1e-6, 1e-5], args.precision, inference, Path(scratch),
                            args.mode)
            return
        torch.manual_seed(0)
        model = checkpoint.build("lenet5", num_classes=10, in_channels=1, input_size=28).eval()
        inference = clean_inference(model, x)
        print(f"LeNet-5, mnist5k, {len(x)} inputs, 1 thread; one clean inference: {inference * 1e3:.1f} ms")
        fixed_table(model, x, y, args.ber or [1e-7, 1e-6, 1e-5, 1e-4], args.trials, inference, Path(scratch))


def clean_inference(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds of one clean inference of ``x`` (best of 5, after a warm-up)."""
    predict(model, x, 1000)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        predict(model, x, 1000)
        times.append(time.perf_counter() - start)
    return min(times)


def precision_table(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bers: list[float],
                    precision: float, inference: float, scratch: Path, mode: str) -> None:
    print(f"{mode} faults, --precision {precision:g}")
    print(f"{'BER':>8} {'trials':>6} {'wall s':>7} {'half-width':>10} {'plain MC trials':>15} "
          f"{'plain MC s':>10} {'speed-up':>8}")
    for ber in bers:
        config = CampaignConfig(bers=(ber,), precision=precision, seed=1, target="activations", threads=1,
                                activation_mode=mode)
        start = time.perf_counter()
        row = run_campaign(model, x, y, config, scratch / f"p{ber:g}", progress=False)["results"][0]
        wall = time.perf_counter() - start
        mean = row["accuracy_mean"]
        variance = sum(s["weight"] * ((s["accuracy_std"] or 0.0) ** 2 + (s["accuracy_mean"] - mean) ** 2)
                       for s in row["strata"] if s["weight"] > 0 and s["accuracy_mean"] is not None)
        needed = max(1, math.ceil((1.96 * math.sqrt(variance) / precision) ** 2))
        half = (row["accuracy_ci"][1] - row["accuracy_ci"][0]) / 2
        print(f"{ber:>8g} {row['trials']:>6} {wall:>7.1f} {half:>10.4f} {needed:>15} {needed * inference:>10.1f} "
              f"{needed * inference / wall:>7.1f}x")


def fixed_table(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bers: list[float], trials: int,
                inference: float, scratch: Path) -> None:
    print(f"{'BER':>8} {'trials':>6} {'plain s':>8} {'shortcut s':>10} {'speed-up':>8} "
          f"{'vs 1 inference/trial':>20} {'equal':>5}")
    totals = [0.0, 0.0]
    for ber in bers:
        seconds, results = [], []
        for on in (False, True):
            config = CampaignConfig(bers=(ber,), trials=trials, seed=1, target="activations", shortcut=on, threads=1)
            start = time.perf_counter()
            summary = run_campaign(model, x, y, config, scratch / f"{ber:g}-{on}", progress=False)
            seconds.append(time.perf_counter() - start)
            results.append(summary["results"])
        totals = [t + s for t, s in zip(totals, seconds)]
        print(f"{ber:>8g} {trials:>6} {seconds[0]:>8.2f} {seconds[1]:>10.2f} {seconds[0] / seconds[1]:>7.2f}x "
              f"{trials * inference / seconds[1]:>19.2f}x {str(results[0] == results[1]):>5}")
    print(f"{'all':>8} {trials * len(bers):>6} {totals[0]:>8.2f} {totals[1]:>10.2f} "
          f"{totals[0] / totals[1]:>7.2f}x {trials * len(bers) * inference / totals[1]:>19.2f}x")


if __name__ == "__main__":
    main()
