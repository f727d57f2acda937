"""Does protected inference run as fast as its MACs say? (issue 12, design §4)

For one model (random init is enough: latency does not depend on the values)
and each protection variant, prints

- the MACs ratio to the unprotected model (conv/linear MACs plus the
  element-wise ops of corrections, restrictions and weight checks, from
  ``ftcnn.protection.cost.macs``), at batch 1 and at batch 128 (weight checks run once per
  forward, so at batch 128 they cost 1/128 per input);
- the eager PyTorch latency ratio at batch 1 and batch 128: 1 thread, all
  variants and the baseline timed round by round in rotating order
  (``cost.interleaved_latency``), median per model;
- the same ratio in ONNX Runtime (1 intra-op thread, same interleaving),
  after ``harden.export_onnx``; a variant whose export fails is skipped with
  a note.

The target (issue 12): latency ratio <= 1.1 x MACs ratio at batch 128 for
every variant, full TMR <= 3.5x.

Examples:
    python benchmarks/protection_latency.py --model lenet5
    python benchmarks/protection_latency.py --model vgg11 --width 0.25 --rounds 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ftcnn.protection import cost, hardening as H
from ftcnn.models import MODELS

INPUT = (1, 28, 28)


def variants(model: nn.Module, calibration: torch.Tensor) -> dict[str, dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(m.weight.shape[0], generator=g).tolist()  # one score per output channel
              for n, m in H.target_layers(model).items()}
    common = dict(calibration=calibration, range_margin=0.05)
    return {
        "restriction": dict(ratio=0.0, restrict="zero", **common),
        "weight check": dict(ratio=0.0, check_weights="zero"),
        "weight check + restriction": dict(ratio=0.0, check_weights="zero", restrict="zero", **common),
        "weight check + restriction (90% of params)": dict(ratio=0.0, check_weights="zero", restrict="zero",
                                                           restrict_share=0.9, **common),
        "min 10% + restriction": dict(scores=scores, ratio=0.1, correction="min", restrict="zero", **common),
        "full TMR": dict(tmr="full"),
    }


def macs_ratios(net: nn.Module, base: dict[str, int]) -> tuple[float, float]:
    """MACs ratio at batch 1 and per input at batch 128 (weight checks amortised)."""
    m = cost.macs(net, INPUT)
    check_ops = m["weight_checks"] * H.CHECK_OPS
    b128 = m["macs"] - check_ops + check_ops / 128
    return m["macs"] / base["macs"], b128 / base["macs"]


def onnx_latency(paths: dict[str, str], batch: int, rounds: int, inner: int) -> dict[str, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sessions = {n: ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for n, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((batch, *INPUT)).astype(np.float32)
    names = list(sessions)
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {"input": x})
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            for _ in range(inner):
                sessions[n].run(None, {"input": x})
            times[n].append((time.perf_counter() - start) / inner * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5", choices=sorted(MODELS))
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (median kept)")
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = MODELS[args.model](num_classes=10, in_channels=INPUT[0], input_size=INPUT[1], width=args.width).eval()
    x = torch.randn(8, *INPUT)
    calibration = torch.cat([x, torch.randn(248, *INPUT)])  # covers x, so restriction passes x unchanged
    nets: dict[str, nn.Module] = {"unprotected": model}
    for name, kw in variants(model, calibration).items():
        nets[name] = H.harden(model, **kw).eval()
    with torch.no_grad():
        golden = model(x)
        for name, net in nets.items():
            assert torch.equal(net(x), golden), f"{name} is not bit-exact without faults"

    base = cost.macs(model, INPUT)
    rows = {name: {"macs": macs_ratios(net, base)} for name, net in nets.items()}
    for batch in (1, 128):
        lat = cost.interleaved_latency(nets, INPUT, batch=batch, rounds=args.rounds, threads=1,
                                       inner=20 if batch == 1 else 3)
        for name in nets:
            rows[name][f"eager_b{batch}"] = lat[name] / lat["unprotected"]
            rows[name][f"eager_b{batch}_ms"] = lat[name]

    notes = []
    if not args.no_onnx:
        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for name, net in nets.items():
                path = os.path.join(tmp, f"{len(paths)}.onnx")
                try:
                    H.export_onnx(net, path, INPUT)
                    paths[name] = path
                except Exception as exc:  # report, do not hide
                    notes.append(f"{name}: ONNX export failed ({type(exc).__name__}: {str(exc)[:100]})")
            if "unprotected" in paths:
                for batch in (1, 128):
                    lat = onnx_latency(paths, batch, args.rounds, 20 if batch == 1 else 3)
                    for name in paths:
                        rows[name][f"onnx_b{batch}"] = lat[name] / lat["unprotected"]

    load = os.getloadavg()[0]
    print(f"{args.model} (width {args.width:g}), input {INPUT}, 1 thread, {args.rounds} interleaved rounds, "
          f"load average {load:.2f} on {os.cpu_count()} CPUs; unprotected: "
          f"{rows['unprotected']['eager_b1_ms']:.3f} ms (b1), {rows['unprotected']['eager_b128_ms']:.2f} ms (b128)")
    header = ("variant", "MACs x b1", "MACs x b128", "eager b1", "eager b128", "b128 / MACs",
              "onnx b1", "onnx b128")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in rows.items():
        m1, m128 = r["macs"]
        cells = [name, f"{m1:.3f}", f"{m128:.3f}", f"{r['eager_b1']:.2f}", f"{r['eager_b128']:.2f}",
                 f"{r['eager_b128'] / m128:.2f}",
                 f"{r['onnx_b1']:.2f}" if "onnx_b1" in r else "-", f"{r['onnx_b128']:.2f}" if "onnx_b128" in r else "-"]
        print("| " + " | ".join(cells) + " |")
    for note in notes:
        print("note:", note)


if __name__ == "__main__":
    main()
