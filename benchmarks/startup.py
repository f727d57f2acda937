"""Fixed costs of the command line, from the shell (issue 24): what a user waits for before work.

    python benchmarks/startup.py [--repeats 3] [--checkpoint lenet5.pt]

Prints, best of ``--repeats`` fresh processes each: ``python -c 'import torch'`` (the floor
every command that computes pays), ``ftcnn --help``, ``--version`` and ``inject --help``
(goal <= 0.5 s: no torch), and ``ftcnn inject CKPT --data mnist5k --count 0 --trials 1``
end to end (one fault-free trial of 1,000 inputs, well under a second, so the rest is
start-up) with a cold data cache (an empty ``FTCNN_CACHE`` each time: the CSV is decoded)
and a warm one (goal: at most 1 s more than importing torch, trial included). Without
``--checkpoint`` an untrained LeNet-5 for mnist5k is saved first (start-up does not depend
on the weights). Run it on an otherwise quiet machine; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

FTCNN = [sys.executable, "-m", "ftcnn"]


def best_of(repeats: int, command: list[str], env: dict[str, str] | None = None,
            before: Callable[[], object] | None = None) -> float:
    """The shortest wall time of ``repeats`` runs of ``command`` (``before()`` ahead of each)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        r = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
        if r.returncode != 0:
            last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else str(r.returncode)
            raise SystemExit(f"{' '.join(command)} failed: {last}")
    return min(times)


def untrained_lenet5(folder: Path) -> Path:
    import ftcnn

    path = folder / "lenet5.pt"
    model = ftcnn.build("lenet5", num_classes=10, in_channels=1, input_size=28)
    ftcnn.save(model, path, data="mnist5k")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, help="a LeNet-5 (or any) checkpoint for mnist5k")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftcnn_startup_"))
    try:
        checkpoint = args.checkpoint or untrained_lenet5(work)
        cold, warm, run = work / "cold_cache", work / "warm_cache", work / "run"

        def fresh(*folders: Path):
            return lambda: [shutil.rmtree(f, ignore_errors=True) for f in folders]

        inject = [*FTCNN, "inject", str(checkpoint), "--data", "mnist5k", "--count", "0", "--trials", "1",
                  "-o", str(run)]
        subprocess.run(inject, env={**os.environ, "FTCNN_CACHE": str(warm)}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fills the warm cache
        print(f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}, best of {args.repeats}, "
              f"python {sys.version.split()[0]}")
        torch_s = best_of(args.repeats, [sys.executable, "-c", "import torch"])
        rows = [
            ("python -c 'import torch'", torch_s, ""),
            ("ftcnn --help", best_of(args.repeats, [*FTCNN, "--help"]), "<= 0.5 s"),
            ("ftcnn --version", best_of(args.repeats, [*FTCNN, "--version"]), "<= 0.5 s"),
            ("ftcnn inject --help", best_of(args.repeats, [*FTCNN, "inject", "--help"]), ""),
            ("ftcnn inject ... --count 0 --trials 1, cold data cache",
             best_of(args.repeats, inject, {**os.environ, "FTCNN_CACHE": str(cold)}, fresh(cold, run)), ""),
            ("ftcnn inject ... --count 0 --trials 1, warm data cache",
             best_of(args.repeats, inject, {**os.environ, "FTCNN_CACHE": str(warm)}, fresh(run)),
             f"<= {torch_s + 1:.1f} s (import torch + 1 s)"),
        ]
        width = max(len(name) for name, _, _ in rows)
        print(f"| {'what':<{width}} | wall (s) | x import torch | goal |")
        print(f"|{'-' * (width + 2)}|---------:|---------------:|------|")
        for name, seconds, goal in rows:
            print(f"| {name:<{width}} | {seconds:8.2f} | {seconds / torch_s:14.2f} | {goal} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
