"""Seconds per fault-injection trial against the floor: one clean inference of the test split.

    python benchmarks/campaign_throughput.py [--trials 20] [--models lenet5 vgg11]

Prints, per model, the clean inference time of 1,000 inputs, the time per
trial of ftcnn's plain path (every trial injects, evaluates all inputs,
computes the metrics and restores; no shortcut), and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ftcnn import checkpoint, data
from ftcnn.campaign import CampaignConfig, predict, prepare


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
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':8} {'params':>10} {'clean s':>9} {'trial s':>9} {'ratio':>6}")
    for name in args.models:
        model, x, y = workload(name)
        config = CampaignConfig(bers=(args.ber,), trials=args.trials, skip_fault_free=False)
        runner = prepare(model, x, y, config)
        predict(model, x)  # warm-up
        clean = timed(lambda: predict(model, x), 5)
        start = time.perf_counter()
        for trial in range(args.trials):
            runner.run(args.ber, trial)
        per_trial = (time.perf_counter() - start) / args.trials
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:8} {params:>10,} {clean:>9.4f} {per_trial:>9.4f} {per_trial / clean:>6.3f}")


if __name__ == "__main__":
    main()
