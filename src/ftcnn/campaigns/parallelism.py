"""How many torch threads a job takes (issue 24): every core for a lone job, a fair share next to others.

Issue 13's rule ("a model under 1M parameters gets one thread") kept two concurrent jobs from
thrashing but left half of an idle 2-core machine unused for the usual single job: LeNet-5,
mnist5k, 4 BERs x 200 trials took 15.7 s at one thread and 12.1 s at two, start-up included
(experiments/results/cli_wall.md). The policy now looks at the machine, not only at the model:

- the cores this process may run on (``os.sched_getaffinity``);
- the other ftcnn jobs on the machine (their command lines under /proc): exact from the moment
  they start, so two jobs started together see each other;
- the load: how busy the cores were over the last ``LOAD_WINDOW_S`` (/proc/stat) and the 1-minute
  load average (``os.getloadavg``), the smaller of the two: the average lags a minute behind a job
  that just ended, a sample catches a passing spike; either alone would take cores from a job
  that could use them;
- the model: one too small for a second thread to pay (``TINY_MODEL_PARAMS``) runs on one.

A job takes its fair share of the cores (cores / ftcnn jobs), at most the cores no one else keeps
busy, at least one; while it runs it asks again every ``REBALANCE_S`` (``Rebalance``), so a job
that started alone gives cores back to one that starts later. The policy gives intra-op threads,
not worker processes: a worker re-imports torch and re-prepares the model and its golden run,
which a usual campaign's trials do not earn back (2 cores, LeNet-5, mnist5k, 4 BERs x 200 trials,
whole command, back to back under light load: 1 thread 16.1-18.4 s, 2 threads 12.2-13.8 s, 2 workers
14.2 s; 2026-12-02). Workers
are the person's choice (``--workers``); the cores are split among them (``worker_threads``).

What a person sets always wins: ``--threads``, ``--workers``, or OMP_NUM_THREADS in the
environment. The choice never changes a result (tests/test_parallelism.py: a campaign at the
policy's threads equals the one-thread campaign bit for bit); it is recorded in summary.json
(``execution.threads_policy``) and, in a terminal, said once on stderr.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftcnn.campaigns.trials import THREADS_PER_CORE, cores

# parameters below which a model's forwards are too small to split: two threads' hand-offs cost
# more than they save (the tests' 8x8 models); LeNet-5 on mnist5k (~60k parameters, 1,000 inputs)
# gains ~1.3x over the whole command from a second thread (measured above)
TINY_MODEL_PARAMS = 10_000
LOAD_WINDOW_S = 0.05  # how long the cores' busyness is sampled (the job sleeps meanwhile)
PROC = Path("/proc")


@dataclass(frozen=True)
class Machine:
    """What the policy sees of the machine when a job starts."""

    cores: int              # cores this process may use
    busy_cores: float       # cores other processes keep busy (the smaller of a sample and the 1-min average)
    other_ftcnn_jobs: int   # other ftcnn processes on the machine


@dataclass(frozen=True)
class Plan:
    """Torch threads per process and worker processes, and why (recorded in summary.json)."""

    threads: int
    workers: int
    chosen_by: str          # "policy", or what the person set: "--threads", "--workers", "OMP_NUM_THREADS"
    why: str
    machine: Machine | None = None
    model_params: int | None = None  # what the policy weighed (asked again by ``Rebalance``)

    def record(self) -> dict[str, Any]:
        """The summary's ``execution.threads_policy``: the choice, its reason and what it saw."""
        return {"chosen_by": self.chosen_by, "why": self.why,
                **(asdict(self.machine) if self.machine is not None else {})}

    def line(self) -> str:
        """The one line a terminal shows before the work."""
        per = f"{self.workers} worker processes x {self.threads} torch thread{'s' * (self.threads != 1)}" \
            if self.workers > 1 else f"{self.threads} torch thread{'s' * (self.threads != 1)}"
        return f"threads: {per} ({self.why})"


def worker_threads(workers: int, threads: int | None = None) -> int:
    """Torch threads per worker: the run's threads (``threads``, else every core this process may
    use) split among the workers, so that they do not oversubscribe the cores."""
    return max(1, (threads or cores()) // workers)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None where there is none."""
    try:
        fields = (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError, IndexError):
        return None
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, sum(ticks)


def busy_now(window: float = LOAD_WINDOW_S) -> float | None:
    """Cores kept busy by other processes over ``window`` seconds: the machine's busy time less this
    process's own (its caller sleeps meanwhile, but torch's pool threads may still spin); None where
    /proc/stat is not there."""
    before, own_before, began = _cpu_times(), time.process_time(), time.monotonic()
    if before is None:
        return None
    time.sleep(window)
    after, own, elapsed = _cpu_times(), time.process_time() - own_before, time.monotonic() - began
    if after is None or after[1] <= before[1] or elapsed <= 0:
        return None
    machine = (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)
    return max(0.0, machine - own / elapsed)


def other_ftcnn_jobs() -> int:
    """Other ftcnn processes on the machine (``ftcnn ...`` or ``python -m ftcnn ...``), by their
    command lines under /proc; not this process, its parent (a launcher) or its workers (spawned
    processes run ``multiprocessing.spawn``, not ftcnn's entry point). 0 where there is no /proc."""
    mine = {os.getpid(), os.getppid()}
    count = 0
    try:
        entries = list(PROC.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if is_ftcnn_command(argv):
            count += 1
    return count


def is_ftcnn_command(argv: list[bytes]) -> bool:
    """Whether a command line runs ftcnn: its entry script, or ``-m ftcnn``, as the program (not as
    an argument of another command, such as an editor opening a file named ftcnn)."""
    words = [w for w in argv if w]
    if not words:
        return False
    program = os.path.basename(words[0])
    if program == b"ftcnn":
        return True
    if program.startswith(b"python") and len(words) > 1:
        second = words[1:3]
        return second[:2] == [b"-m", b"ftcnn"] or os.path.basename(words[1]) == b"ftcnn"
    return False


def probe() -> Machine:
    """The machine as the policy sees it now (~``LOAD_WINDOW_S`` of sleep, a scan of /proc)."""
    try:
        average = os.getloadavg()[0]
    except OSError:
        average = 0.0
    sample = busy_now()
    busy = average if sample is None else min(average, sample)
    return Machine(cores=cores(), busy_cores=round(busy, 2), other_ftcnn_jobs=other_ftcnn_jobs())


def environment_threads() -> int | None:
    """OMP_NUM_THREADS when the person set it to a whole number >= 1 (else None: ignored)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else None


def choose(machine: Machine, model_params: int | None) -> Plan:
    """The policy's threads for one process of a job on ``machine`` (nothing set by the person).

    Fair share: cores / (this job + the other ftcnn jobs); at most the cores no one keeps busy
    (a core half busy or more counts as taken: a thread sharing a core stalls its siblings at every
    join); one for a model under ``TINY_MODEL_PARAMS`` parameters; at least one."""
    share = machine.cores // (machine.other_ftcnn_jobs + 1)
    free = machine.cores - int(machine.busy_cores + 0.5)
    if model_params is not None and model_params < TINY_MODEL_PARAMS:
        return Plan(1, 1, "policy", f"a model of {model_params:,} parameters: too small for a second "
                    "thread to pay", machine, model_params)
    threads = max(1, min(share, free))
    others = machine.other_ftcnn_jobs
    if others == 0 and free >= machine.cores:
        why = f"every core of {machine.cores}: no other ftcnn job, cores idle"
    elif share <= free:
        why = (f"a fair share of {machine.cores} cores: {others} other ftcnn job{'s' * (others != 1)} "
               "running")
    else:
        why = f"{machine.busy_cores:g} of {machine.cores} cores busy with other work"
    return Plan(threads, 1, "policy", why, machine, model_params)


def plan(model_params: int | None = None, threads: int | None = None, workers: int = 1) -> Plan:
    """The threads (per process) and workers of a job: what the person set, else the policy's.

    ``threads``: the whole run's threads (``--threads``), split among ``workers``; ``workers`` > 1
    without ``threads``: every core split among them (``worker_threads``)."""
    if threads is not None:
        return Plan(worker_threads(workers, threads), workers, "--threads",
                    f"--threads {threads}" + (f" split among {workers} workers" if workers > 1 else ""))
    if workers > 1:
        return Plan(worker_threads(workers), workers, "--workers",
                    f"--workers {workers}: {cores()} cores split among them")
    from_env = environment_threads()
    if from_env is not None:
        most = cores() * THREADS_PER_CORE  # --threads' limit: 10^5 threads crashed torch
        return Plan(min(from_env, most), 1, "OMP_NUM_THREADS", f"OMP_NUM_THREADS={from_env} in the environment"
                    + (f", capped at {most} ({THREADS_PER_CORE} per core)" if from_env > most else ""))
    return choose(probe(), model_params)


_applied: list[Plan] = []  # the plan this process runs with (the last one applied)


def remember(chosen: Plan) -> Plan:
    """Keep ``chosen`` as this process's plan, for the summary to record why."""
    _applied[:] = [chosen]
    return chosen


def applied() -> Plan | None:
    """The plan last applied in this process (None: none yet)."""
    return _applied[0] if _applied else None


REBALANCE_S = 5.0     # how often a running job asks the policy again
CHANGES_KEPT = 20     # changes a summary lists (a day-long run must not grow it without bound)


@dataclass
class Rebalance:
    """The policy asked again every ``REBALANCE_S`` seconds of a run whose threads it chose: a job
    that started alone gives cores back when other ftcnn jobs start (two jobs started apart would
    otherwise hold 3 threads on 2 cores), and takes them again when they end. Threads never change
    a number, so neither does this. The campaign puts the start's threads back when it ends
    (``distributed.using_threads``)."""

    start: Plan
    every: float = REBALANCE_S
    changes: list[dict[str, Any]] = field(default_factory=list)
    _began: float = field(default_factory=time.monotonic)
    _asked: float = field(default_factory=time.monotonic)

    def due(self) -> int | None:
        """The new thread count when it is time to ask and the answer differs, else None."""
        now = time.monotonic()
        if now - self._asked < self.every:
            return None
        self._asked = now
        current = self.changes[-1]["threads"] if self.changes else self.start.threads
        fresh = choose(probe(), self.start.model_params)
        if fresh.threads == current:
            return None
        change = {"after_s": round(now - self._began, 1), "threads": fresh.threads, "why": fresh.why}
        if len(self.changes) >= CHANGES_KEPT:  # the latest is kept: it says what runs now
            self.changes.pop()
        self.changes.append(change)
        return fresh.threads

    def record(self) -> dict[str, Any]:
        """The start's record, and the changes when there were any."""
        return {**self.start.record(), **({"changes": list(self.changes)} if self.changes else {})}


def rebalance(threads_now: int) -> Rebalance | None:
    """A ``Rebalance`` for a run starting at ``threads_now`` threads, when the policy chose them
    (what a person or a caller set is never changed); else None."""
    chosen = applied()
    if chosen is None or chosen.chosen_by != "policy" or chosen.threads != threads_now:
        return None
    return Rebalance(chosen, every=REBALANCE_S)
