"""Seconds for ``vulnerability.gain`` on a full-width VGG-11: the per-layer path against the reference.

    python benchmarks/gain_speed.py [--inputs 256] [--threads 2] [--width 1.0] [--seed 0]

VGG-11 (9.2M parameters at width 1) at CIFAR shape (3x32x32 inputs, 10
classes), random weights and inputs: the timings depend on shapes, not on
values. Both paths run in this one process on the same inputs: ``gain`` (each
layer's squared per-sample gradients from its inputs and output gradients)
and ``gain_reference`` (``vmap(grad)``: per-sample gradients of every
parameter, what ``ftcnn analyze --method gain`` did before issue 13). Prints
both times, the speed-up and the largest relative difference of a channel's
normalised score (channels the reference scores 0 must be 0 in both).

Float32 scores are reproducible only to the rounding of the margins d_c =
z_p - z_c, which 1/d_c^2 amplifies for near-tied classes: the reference run
with another ``batch`` moves by as much (see tests/test_gain_fast.py).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from ftcnn.protection import vulnerability as V
from ftcnn.models import build


def max_relative_difference(new: dict[str, list[float]], old: dict[str, list[float]]) -> float:
    """Largest |new - old| / |old| over all channels (inf if old is 0 where new is not)."""
    worst = 0.0
    for name in old:
        a, b = np.asarray(new[name]), np.asarray(old[name])
        if np.any((b == 0) & (a != 0)):
            return float("inf")
        nz = b != 0
        if nz.any():
            worst = max(worst, float(np.max(np.abs(a[nz] - b[nz]) / np.abs(b[nz]))))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=256, help="inputs scored (gain's samples)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--width", type=float, default=1.0, help="VGG-11 width multiplier")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build("vgg11", num_classes=10, in_channels=3, input_size=32, width=args.width).eval()
    x = torch.randn(args.inputs, 3, 32, 32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"VGG-11 width {args.width:g} ({n_params / 1e6:.2f}M parameters), {args.inputs} inputs, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path must not fall back here
        start = time.perf_counter()
        new = V.gain(model, x, None, samples=args.inputs)
        t_new = time.perf_counter() - start
    start = time.perf_counter()
    old = V.gain_reference(model, x, None, samples=args.inputs)
    t_old = time.perf_counter() - start

    print(f"reference (vmap per-sample grads): {t_old:9.2f} s")
    print(f"gain (per-layer, ghost/unfold):    {t_new:9.2f} s")
    print(f"speed-up:                          {t_old / t_new:9.1f}x")
    print(f"max relative difference:           {max_relative_difference(new, old):9.2e}")


if __name__ == "__main__":
    main()
