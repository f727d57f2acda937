"""Two ``ftcnn demo`` runs started together against one alone (issue 13: threads that fit the machine).

    python benchmarks/two_jobs.py [--repeats 1]

Each run gets a fresh folder (nothing resumed). Prints the wall time of one
demo alone, of two started at once (until both finish), and the ratio; the
goal is <= 2.3x on a 2-core machine (torch's default of one intra-op thread
per core in each job made two jobs many times slower than one after the other).
Run it on an otherwise quiet machine. For 1, 2 and 4 ``ftcnn inject`` jobs under the thread policy
of issue 24 (every core for a lone job), see benchmarks/parallel_jobs.py.
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


def demo(folder: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ftcnn", "demo", "-o", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_all(jobs: list[subprocess.Popen]) -> None:
    for job in jobs:
        _, err = job.communicate()
        if job.returncode != 0:
            raise SystemExit(f"demo failed: {err.strip().splitlines()[-1] if err.strip() else job.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}")
    for r in range(args.repeats):
        root = Path(tempfile.mkdtemp(prefix="ftcnn-two-jobs-"))
        try:
            start = time.perf_counter()
            wait_all([demo(root / "alone")])
            alone = time.perf_counter() - start
            start = time.perf_counter()
            wait_all([demo(root / "a"), demo(root / "b")])
            together = time.perf_counter() - start
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"run {r + 1}: one demo alone {alone:.1f} s; two started together {together:.1f} s; "
              f"ratio {together / alone:.2f}x (goal <= 2.3x)", flush=True)


if __name__ == "__main__":
    main()
