"""1, 2 and 4 ``ftcnn inject`` jobs started together against one alone (issue 24: the thread policy).

    python benchmarks/parallel_jobs.py [--checkpoint lenet5.pt] [--trials 200] [--jobs 1 2 4]
                                       [--repeats 1] [--label "idle machine"]

Workload per job: LeNet-5 on mnist5k, its 1,000 test inputs, BERs 1e-7 1e-6 1e-5 1e-4, ``--trials``
trials each (without ``--checkpoint`` a LeNet-5 is trained first, not timed, as in cli_wall.py).
Every job is a fresh ``python -m ftcnn inject`` process with its own run folder (nothing resumed),
ftcnn's default threads (OMP_NUM_THREADS/MKL_NUM_THREADS removed from its environment), timed from
the shell until the last of the N jobs ends, start-up included; each row is the best of
``--repeats``. Columns:

- x one alone: the N jobs' wall time over one job alone (at the policy's choice: every core of an
  idle machine). N jobs do N times the work, so on C cores this is at least N/C x the lone job's
  trial phase; what the policy controls is thrashing, measured by the next two columns;
- x ideal: over what the cores allow without thrashing: one job alone at the share of the cores
  each of N gets (``--threads k``, k = max(1, cores // N)), times max(1, N * k / cores) (4 jobs on
  2 cores: twice one job at 1 thread). 1.0x: no thrashing; the issue-13 thrashing (every job
  taking every core) showed as many times that. The goal: <= 1.2x;
- x back to back: over N lone jobs one after the other: below 1.0x, starting them together paid.

Prints the table and writes it to experiments/results/parallel_jobs.md (atomically) with the
commit, the date, the load average before and after, and ``--label`` (say "under load" when the
machine was not quiet: the load average shows it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_wall import BERS, DATA, DEFAULT_ENV, FTCNN, ROOT, commit, train_lenet5  # noqa: E402

RESULT = ROOT / "experiments" / "results" / "parallel_jobs.md"


def run_together(args: list[str], jobs: int, work: Path) -> tuple[float, list[dict[str, Any]]]:
    """Wall time of ``jobs`` ``ftcnn ARGS -o FOLDER`` processes started at once, until the last
    ends, and each one's summary.json ``execution`` (threads, and the policy's reason)."""
    folders = [work / f"job_{time.monotonic_ns()}_{i}" for i in range(jobs)]
    start = time.perf_counter()
    procs = [subprocess.Popen([*FTCNN, *args, "-o", str(folder)], env=DEFAULT_ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for folder in folders]
    errors = [proc.communicate()[1] for proc in procs]
    seconds = time.perf_counter() - start
    for proc, err in zip(procs, errors):
        if proc.returncode != 0:
            last = err.strip().splitlines()[-1] if err.strip() else str(proc.returncode)
            raise SystemExit(f"{shlex.join([*FTCNN, *args])} failed: {last}")
    executions = [json.loads((f / "summary.json").read_text()).get("execution", {}) for f in folders]
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return seconds, executions


def best(args: list[str], jobs: int, repeats: int, work: Path) -> tuple[float, list[dict[str, Any]]]:
    return min((run_together(args, jobs, work) for _ in range(repeats)), key=lambda r: r[0])


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def chosen(executions: list[dict[str, Any]]) -> str:
    """The threads each job ran with, and the policy's reason (of the first job)."""
    threads = "/".join(str(e.get("threads", "?")) for e in executions)
    why = executions[0].get("threads_policy", {}).get("why", "?") if executions else "?"
    return f"{threads} ({why})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a LeNet-5 for mnist5k (default: train one first)")
    parser.add_argument("--trials", type=int, default=200, help="trials per BER of every job")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 4], help="jobs started together")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs of each row")
    parser.add_argument("--label", default="", help='how the machine was, e.g. "under load" or "idle"')
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftcnn_parallel_jobs_"))
    try:
        checkpoint = args.checkpoint or train_lenet5(work)
        inject = ["inject", str(checkpoint), "--data", DATA, "--ber", *BERS, "--trials", str(args.trials)]
        load_before = os.getloadavg()
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        alone, alone_exec = best(inject, 1, args.repeats, work)
        rows = []
        for n in sorted(set(args.jobs)):
            together, executions = (alone, alone_exec) if n == 1 else best(inject, n, args.repeats, work)
            share = max(1, cores() // n)
            at_share = alone if n == 1 and share == alone_exec[0].get("threads") else \
                best([*inject, "--threads", str(share)], 1, args.repeats, work)[0]
            ideal = at_share * max(1.0, n * share / cores())
            rows.append((n, together, together / alone, together / ideal, share, together / (n * alone),
                         chosen(executions)))
        load_after = os.getloadavg()
        label = f" ({args.label})" if args.label else ""
        lines = [
            f"# 1, 2 and 4 ftcnn jobs at once against one alone (issue 24){label}",
            "",
            f"Each job: `ftcnn inject` LeNet-5, {DATA}, 1,000 test inputs, BERs {' '.join(BERS)}, "
            f"{args.trials} trials each, ftcnn's default threads; wall time from the shell until the last job "
            f"ends, start-up included, best of {args.repeats}. One alone: {alone:.1f} s.",
            "",
            "| jobs at once | wall (s) | x one alone | x ideal (k threads each) | x back to back | "
            "threads each job chose (why) |",
            "|---:|---:|---:|---:|---:|---|",
            *[f"| {n} | {t:.1f} | {a:.2f}x | {s:.2f}x (k={k}) | {b:.2f}x | {c} |"
              for n, t, a, s, k, b, c in rows],
            "",
            "- x one alone: N jobs do N times the work; x ideal is the thrashing measure (1.0x: as fast as "
            "the cores allow, goal <= 1.2x); x back to back below 1.0x: starting them together paid.",
            f"- commit {commit()}, {started}, {cores()} cores, python {sys.version.split()[0]}",
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
