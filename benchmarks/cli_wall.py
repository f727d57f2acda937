"""Wall time as a user waits for it (issue 24): ftcnn from the shell against one inference per trial.

    python benchmarks/cli_wall.py [--checkpoint lenet5.pt] [--trials 200] [--repeats 1] [--threads 2]

Workload: LeNet-5 on mnist5k, its 1,000 test inputs, bit error rates 1e-7, 1e-6, 1e-5, 1e-4.
Without ``--checkpoint`` a LeNet-5 is trained first (``ftcnn train --model lenet5 --data mnist5k
--epochs 5 --seed 0``; not timed). Rows, each the best of ``--repeats`` fresh processes, timed with
``time.perf_counter`` around the whole command (start-up, data loading and writing included):

- ``ftcnn inject M --ber ... --trials N`` with its default threads (the thread policy,
  ``ftcnn.campaigns.parallelism``: the row says how many it chose; the notes, why), and with ``--threads 2``;
- ``ftcnn inject M --ber ... --precision 0.01`` (stratified trials until every accuracy CI is
  within +-1 point).

The reference is an independent plain Monte Carlo written here with plain torch, the cost every
tool without shortcuts pays: per trial, Binomial(bits, BER) flips at uniform random (element, bit)
positions over all Conv2d/Linear weights and biases, flipped through an int32 view, one clean full
inference of the 1,000 inputs, the flips undone; ``--threads`` torch threads; ``--trials`` trials
per BER. Only its trial loop is timed (no start-up: the ratios are lower bounds). For the precision
row, its cost is the trials it needs for +-1 point at 95% at the spread it measured
(smallest n with t(0.975, n-1) * std / sqrt(n) <= 0.01, n >= 2, per BER) times its measured
seconds per trial. OMP_NUM_THREADS/MKL_NUM_THREADS are removed from the ftcnn commands'
environment, so that "default threads" is ftcnn's own policy.

Prints the table and writes it to experiments/results/cli_wall.md (atomically) with the commit,
the date, the load average before and after, and the command line. Run it on an otherwise quiet
machine: the load average says whether it was.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BERS = ("1e-7", "1e-6", "1e-5", "1e-4")
DATA = "mnist5k"
PRECISION = 0.01  # +-1 point of accuracy
CONFIDENCE = 0.95
FTCNN = [sys.executable, "-m", "ftcnn"]
ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "experiments" / "results" / "cli_wall.md"
# "default threads" means ftcnn's own policy, not a thread count left in the caller's shell
DEFAULT_ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


@dataclass
class Timed:
    """One ftcnn command: its best wall time and the summary.json of that run."""

    seconds: float
    summary: dict[str, Any]


def run_ftcnn(args: list[str], repeats: int, work: Path) -> Timed:
    """Best wall time of ``repeats`` fresh ``ftcnn ARGS -o FOLDER`` processes, from the shell."""
    best: Timed | None = None
    for i in range(repeats):
        folder = work / f"run_{time.monotonic_ns()}_{i}"
        command = [*FTCNN, *args, "-o", str(folder)]
        start = time.perf_counter()
        r = subprocess.run(command, env=DEFAULT_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
        seconds = time.perf_counter() - start
        if r.returncode != 0:
            last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else str(r.returncode)
            raise SystemExit(f"{shlex.join(command)} failed: {last}")
        summary = json.loads((folder / "summary.json").read_text())
        shutil.rmtree(folder, ignore_errors=True)
        if best is None or seconds < best.seconds:
            best = Timed(seconds, summary)
    assert best is not None
    return best


def train_lenet5(work: Path) -> Path:
    path = work / "lenet5.pt"
    subprocess.run([*FTCNN, "train", "--model", "lenet5", "--data", DATA, "--epochs", "5", "--seed", "0",
                    "-o", str(path)], env=DEFAULT_ENV, check=True, stdout=subprocess.DEVNULL)
    return path


@dataclass
class PlainMC:
    """The reference's numbers for one BER."""

    ber: float
    trials: int
    seconds: float
    accuracy_mean: float
    accuracy_std: float

    @property
    def seconds_per_trial(self) -> float:
        return self.seconds / self.trials

    def trials_for_precision(self) -> int:
        """Smallest n >= 2 with t(0.975, n-1) * std / sqrt(n) <= PRECISION at the measured spread."""
        from scipy import stats

        quantile = 0.5 + CONFIDENCE / 2
        n = max(2, math.ceil((stats.norm.ppf(quantile) * self.accuracy_std / PRECISION) ** 2))
        while stats.t.ppf(quantile, n - 1) * self.accuracy_std / math.sqrt(n) > PRECISION:
            n += 1
        return n


def plain_monte_carlo(checkpoint: Path, trials: int, threads: int, seed: int = 0) -> list[PlainMC]:
    """One clean inference of all test inputs per trial with that trial's flips (see the module doc)."""
    import numpy as np
    import torch
    from torch import nn

    import ftcnn
    from ftcnn import data
    from ftcnn.flows import pipeline

    torch.set_num_threads(threads)
    model = ftcnn.load(checkpoint).eval()
    with pipeline.inputs_for(model, DATA):  # the inputs normalised as ftcnn gives them to the model
        x, y = data.load(DATA, "test").tensors[:2]
    params = [p for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
              for p in (m.weight, m.bias) if p is not None]
    words = [p.data.view(-1).view(torch.int32) for p in params]  # float32 bits, in place
    offsets = np.cumsum([0] + [w.numel() for w in words])
    total_bits = int(offsets[-1]) * 32
    clean = [p.detach().clone() for p in params]
    rng = np.random.default_rng(seed)

    def flip(sites: np.ndarray) -> None:
        for site in sites.tolist():
            element, bit = divmod(site, 32)
            index = int(np.searchsorted(offsets, element, side="right")) - 1
            mask = 1 << bit if bit < 31 else -(1 << 31)
            words[index][element - int(offsets[index])] ^= mask

    results = []
    with torch.inference_mode():
        model(x[:1])  # warm-up, not timed
        for ber_text in BERS:
            ber = float(ber_text)
            accuracies = []
            start = time.perf_counter()
            for _ in range(trials):
                sites = rng.choice(total_bits, size=int(rng.binomial(total_bits, ber)), replace=False)
                flip(sites)
                try:
                    predictions = model(x).argmax(1)
                finally:
                    flip(sites)  # a second flip of the same bits restores every word exactly
                accuracies.append(float((predictions == y).float().mean()))
            seconds = time.perf_counter() - start
            results.append(PlainMC(ber, trials, seconds, float(np.mean(accuracies)),
                                   float(np.std(accuracies, ddof=1)) if trials > 1 else 0.0))
    if not all(torch.equal(p, c) for p, c in zip(params, clean)):
        raise SystemExit("plain Monte Carlo: a flip was not undone")
    return results


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def half_widths(timed: Timed) -> str:
    return ", ".join(f"{r['ber']:g}: {(r['accuracy_ci'][1] - r['accuracy_ci'][0]) / 2 * 100:.2f}"
                     for r in timed.summary["results"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a LeNet-5 for mnist5k (default: train one first)")
    parser.add_argument("--trials", type=int, default=200, help="trials per BER of the fixed-trial rows")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs of each ftcnn row")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the plain Monte Carlo")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftcnn_cli_wall_"))
    try:
        checkpoint = args.checkpoint or train_lenet5(work)
        load_before = os.getloadavg()
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        sweep = ["inject", str(checkpoint), "--data", DATA, "--ber", *BERS]
        fixed = run_ftcnn([*sweep, "--trials", str(args.trials)], args.repeats, work)
        fixed_2 = run_ftcnn([*sweep, "--trials", str(args.trials), "--threads", "2"], args.repeats, work)
        precise = run_ftcnn([*sweep, "--precision", str(PRECISION)], args.repeats, work)
        plain = plain_monte_carlo(checkpoint, args.trials, args.threads)
        load_after = os.getloadavg()

        plain_fixed = sum(p.seconds for p in plain)
        plain_precise = sum(p.trials_for_precision() * p.seconds_per_trial for p in plain)
        rows = [
            (f"`inject --ber {' '.join(BERS)} --trials {args.trials}` (default threads: "
             f"{fixed.summary.get('execution', {}).get('threads', '?')})", fixed.seconds, plain_fixed, ">= 3x"),
            ("same with `--threads 2`", fixed_2.seconds, plain_fixed, ">= 3x"),
            (f"`inject --ber {' '.join(BERS)} --precision {PRECISION}`", precise.seconds, plain_precise,
             ">= 10x"),
        ]
        lines = [
            "# ftcnn from the shell against one inference per trial (issue 24)",
            "",
            f"LeNet-5, {DATA}, 1,000 test inputs. ftcnn: wall time of the whole command (start-up included), "
            f"best of {args.repeats}. Plain MC: its trial loop only, {args.threads} threads "
            f"(the precision row: the trials it needs for +-1 point at 95% at its measured spread x its "
            f"seconds per trial).",
            "",
            "| what | ftcnn (s) | plain MC (s) | ratio | goal |",
            "|---|---:|---:|---:|---|",
            *[f"| {what} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.1f}x | {goal} |"
              for what, ours, theirs, goal in rows],
            "",
            "| BER | plain MC s/trial | accuracy mean | accuracy std | trials for +-1 point | "
            "ftcnn --precision trials |",
            "|---|---:|---:|---:|---:|---:|",
            *[f"| {p.ber:g} | {p.seconds_per_trial:.4f} | {p.accuracy_mean:.4f} | {p.accuracy_std:.4f} | "
              f"{p.trials_for_precision()} | {r['trials']} |"
              for p, r in zip(plain, precise.summary["results"])],
            "",
            f"- ftcnn execution (default threads): {json.dumps(fixed.summary.get('execution', {}))}; "
            f"with --threads 2: {json.dumps(fixed_2.summary.get('execution', {}))}; "
            f"--precision: {json.dumps(precise.summary.get('execution', {}))}",
            f"- ftcnn --precision CI half-widths (points): {half_widths(precise)}",
            f"- ftcnn accuracy means (fixed trials): "
            + ", ".join(f"{r['ber']:g}: {r['accuracy_mean']:.4f}" for r in fixed.summary["results"]),
            f"- commit {commit()}, {started}, {os.cpu_count()} cpus, python {sys.version.split()[0]}",
            f"- load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
            f"after: {', '.join(f'{v:.2f}' for v in load_after)}",
            f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
        ]
        text = "\n".join(lines) + "\n"
        print(text, end="")
        from ftcnn import files

        files.write_text(RESULT, text)
        print(f"written: {RESULT}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
