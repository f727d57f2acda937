"""The CUDA path against the CPU, and its speed (issue 13): one prepared script for a lent GPU.

    python benchmarks/cuda_check.py [--device cuda] [--trials 20] [--inputs 1000] [--out FILE]

For VGG-11 and ResNet-18 at CIFAR shape (3x32x32, 10 classes; random weights
and inputs, seeded: the check is about arithmetic, not accuracy):

1. **Same faults, same answers.** The same trials (same seeds, hence the same
   fault lists) run on the CPU and on ``--device``: every trial's accuracy
   must be equal, and the faulty logits of a few trials within float
   tolerance (rtol 1e-3, atol 1e-3 where both are finite; the same NaN/Inf
   pattern). Printed per model; the script exits 1 on a mismatch.
2. **Speed.** Trials per second on ``--device`` at BER 1e-6 with the shortcut,
   with batched trials off (``batch_trials=1``) and automatic (``None``),
   against clean inferences per second of the same inputs.

Without CUDA (``--device cpu``) it runs both halves on the CPU as a smoke test
(the check then compares the CPU with itself). Output goes to stdout and,
with ``--out``, to that file (e.g. experiments/results/cuda_check.txt).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from ftcnn import checkpoint
from ftcnn.campaigns import trials as T
from ftcnn.campaigns.campaign import CampaignConfig, run_campaign

MODELS = ("vgg11", "resnet18")
BER_CHECK = 1e-5
BER_SPEED = 1e-6


def workload(name: str, inputs: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = checkpoint.build(name, num_classes=10, in_channels=3, input_size=32).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(inputs, 3, 32, 32, generator=g), torch.randint(0, 10, (inputs,), generator=g)


def check(name: str, device: str, trials: int, inputs: int, say) -> bool:
    """Same trials on the CPU and on ``device``: accuracies equal, logits close."""
    model, x, y = workload(name, inputs)
    results = {}
    for dev in ("cpu", device):
        config = CampaignConfig(bers=(BER_CHECK,), trials=trials, seed=3, device=dev, shortcut=False)
        runner = T.prepare(model.to("cpu"), x, y, config)
        results[dev] = (runner, [runner.run(BER_CHECK, t) for t in range(trials)])
    (cpu_runner, cpu), (dev_runner, dev) = results["cpu"], results[device]
    same_faults = all(a[0].as_list() == b[0].as_list() for a, b in zip(cpu, dev))
    equal = sum(a[1]["accuracy"] == b[1]["accuracy"] for a, b in zip(cpu, dev))
    worst = 0.0
    close = True
    for t, (faults, _) in enumerate(cpu[:3]):
        if faults.count == 0:
            continue
        a = cpu_runner.faulty_logits(faults).double()
        b = dev_runner.faulty_logits(faults).double().cpu()
        finite = torch.isfinite(a) & torch.isfinite(b)
        close &= bool(torch.equal(torch.isfinite(a), torch.isfinite(b)))
        close &= bool(torch.allclose(a[finite], b[finite], rtol=1e-3, atol=1e-3))
        if finite.any():
            worst = max(worst, float(((a - b).abs()[finite] / (a.abs()[finite] + 1e-6)).max()))
    ok = same_faults and equal == trials and close
    say(f"{name}: {trials} trials at BER {BER_CHECK:g} on cpu and {device}: same fault lists {same_faults}; "
        f"accuracies equal in {equal}/{trials}; logits of 3 faulty trials within rtol 1e-3: {close} "
        f"(largest relative difference {worst:.2e}) -> {'OK' if ok else 'MISMATCH'}")
    return ok


def speed(name: str, device: str, trials: int, inputs: int, say) -> None:
    model, x, y = workload(name, inputs)
    model, xd = model.to(device), x.to(device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(2):
            model(xd[:256])
        sync()
        start = time.perf_counter()
        for _ in range(3):
            T.predict(model, xd)
        sync()
        clean = 3 / (time.perf_counter() - start)
    line = f"{name} on {device}, {inputs} inputs: clean inferences/s {clean:.2f}"
    for batch in (1, None):
        config = CampaignConfig(bers=(BER_SPEED,), trials=trials, seed=5, device=device, batch_trials=batch)
        with tempfile.TemporaryDirectory() as tmp:
            sync()
            start = time.perf_counter()
            summary = run_campaign(model, x, y, config, Path(tmp), progress=False)
            sync()
            rate = trials / (time.perf_counter() - start)
        acc = summary["results"][0]["accuracy_mean"]
        line += (f"; trials/s with batch_trials={'auto' if batch is None else batch}: {rate:.2f} "
                 f"({rate / clean:.2f}x clean; accuracy mean {acc:.4f})")
    say(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else "none"
    say(f"torch {torch.__version__}, device {args.device} ({gpu}), {args.trials} trials, {args.inputs} inputs")
    ok = all([check(m, args.device, args.trials, min(args.inputs, 256), say) for m in args.models])
    for m in args.models:
        speed(m, args.device, args.trials, args.inputs, say)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
