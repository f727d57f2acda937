"""Seconds per fault-injection trial against the floor: one clean inference of the test split.

    python benchmarks/campaign_throughput.py [--trials 20] [--models lenet5 vgg11] [--ber 1e-5]

Prints, per model, the clean inference time of 1,000 inputs, the time per
trial of ftcnn's plain path (every trial injects, evaluates all inputs,
computes the metrics and restores; no shortcut), and their ratio.

Then (design §7, §9) whole campaigns, each through ``run_campaign`` into a
scratch folder (SQLite commits included): the plain path, each exact shortcut
alone and together, batched trials, and two worker processes; trials per
second, the speed-up over the plain path, and whether the summary equals the
plain path's (it must). ``setup s`` is ``prepare`` (golden run, trace, cached
activations); the workers' row includes starting the processes in its wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ftcnn import checkpoint, data
from ftcnn.campaigns.campaign import CampaignConfig, predict, prepare, run_campaign

# mode -> CampaignConfig settings (all exact; "plain" is the reference)
MODES: dict[str, dict] = {
    "plain": dict(skip_fault_free=False, shortcut=False, batch_trials=1),
    "skip fault-free": dict(skip_fault_free=True, shortcut=False, batch_trials=1),
    "first faulted layer": dict(skip_fault_free=False, shortcut=True, batch_trials=1),
    "both shortcuts": dict(skip_fault_free=True, shortcut=True, batch_trials=1),
    "batched K=4": dict(skip_fault_free=False, shortcut=False, batch_trials=4),
    "both + batched K=4": dict(skip_fault_free=True, shortcut=True, batch_trials=4),
    "both + 2 workers": dict(skip_fault_free=True, shortcut=True, batch_trials=1, workers=2),
}


def workload(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """LeNet-5 on mnist5k; VGG-11 at CIFAR shape (MNIST padded to 3x32x32)."""
    x, y = data.load("mnist5k", "test").tensors
    x, y = x[:1000], y[:1000]
    torch.manual_seed(0)
    if name == "lenet5":
        model = checkpoint.build("lenet5", num_classes=10, in_channels=1, input_size=28)
    else:
        model = checkpoint.build(name, num_classes=10, in_channels=3, input_size=32)
        x = data.pad_to(x, 32, 3)
    return model.eval(), x, y


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "vgg11"])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--ber", type=float, default=1e-5)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), metavar="MODE",
                        help="campaign modes to time: " + ", ".join(MODES))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in this process (default: torch's; worker processes "
                             "always get cores // workers)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':8} {'params':>10} {'clean s':>9} {'trial s':>9} {'ratio':>6}")
    for name in args.models:
        model, x, y = workload(name)
        config = CampaignConfig(bers=(args.ber,), trials=args.trials, **MODES["plain"])
        runner = prepare(model, x, y, config)
        predict(model, x)  # warm-up
        clean = timed(lambda: predict(model, x), 5)
        start = time.perf_counter()
        for trial in range(args.trials):
            runner.run(args.ber, trial)
        per_trial = (time.perf_counter() - start) / args.trials
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:8} {params:>10,} {clean:>9.4f} {per_trial:>9.4f} {per_trial / clean:>6.3f}")
    for name in args.models:
        campaigns(name, args.ber, args.trials, args.modes)


def campaigns(name: str, ber: float, trials: int, modes: list[str]) -> None:
    """Whole campaigns in each mode; speed-up over plain and equality with it."""
    model, x, y = workload(name)
    clean = timed(lambda: predict(model, x), 3)
    print(f"\n{name}: {trials} trials at BER {ber:g} on {len(x)} inputs; clean inference "
          f"{clean:.4f} s = {1 / clean:.2f} inferences/s; load average {os.getloadavg()[0]:.1f}")
    print(f"{'mode':22} {'setup s':>8} {'wall s':>8} {'trials/s':>9} {'speed-up':>9} {'== plain':>9}")
    reference, plain_rate = None, None
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ["plain"] + [m for m in modes if m != "plain"]:
            config = CampaignConfig(bers=(ber,), trials=trials, seed=0, **MODES[mode])
            start = time.perf_counter()
            runner = None if config.parallel else prepare(model, x, y, config)
            setup = time.perf_counter() - start
            summary = run_campaign(model, x, y, config, Path(tmp) / mode.replace(" ", "_"),
                                   progress=False, runner=runner)
            wall = time.perf_counter() - start - setup
            rate = trials / (wall + (setup if config.parallel else 0.0))
            if reference is None:
                reference, plain_rate = summary["results"], rate
            same = "yes" if summary["results"] == reference else "NO"
            print(f"{mode:22} {setup:>8.2f} {wall:>8.2f} {rate:>9.2f} {rate / plain_rate:>8.2f}x {same:>9}")


if __name__ == "__main__":  # the guard matters: worker processes re-import this file
    main()
