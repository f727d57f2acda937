"""Are ftcnn's time estimates honest? The README's ``ftcnn inject`` commands, estimate vs actual (issue 23).

    python benchmarks/estimates.py [--data digits] [--scale 1] [--epochs 3] [--checkpoint lenet5.pt]

Each command of the README's "Commands" and "Activation faults" blocks runs through ``ftcnn``'s
own entry point, in this process (``--threads 1``; fixed trial counts multiplied by ``--scale``, at
least 2, so a small run stays small). Its stderr lines are stamped with ``time.perf_counter`` as they
are written, and so is the end of its trials (the moment ``campaign.summarize`` starts):

- the up-front line, said before the trials: ``expected: ~T of trials (...)`` of a fixed budget
  (from a few trials timed first), ``expected: ~LOW to at most ~HIGH`` of an auto or --precision
  stop (its fewest trials to its cap), against the time from that line to the end of the trials;
- for ``--trials auto`` and ``--precision``, the line each point says once its pilot has run,
  ``expected: ber B: ~N trials expected, at most CAP (...); ~T left``, against the time from that
  line to the next point's first line or the end of the trials, and N against the trials the
  summary reports.

A ratio (estimate / actual) within [0.5, 2] is what issue 23 asks of every estimate. Without
``--checkpoint`` a LeNet-5 is trained first on ``--data`` (not timed). The load average before and
after is printed: "under load" when it exceeds the cores, since other processes stretch the actual
times and not the estimates. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FTCNN = [sys.executable, "-m", "ftcnn"]
ENV = {**os.environ, "FTCNN_PROGRESS_SECONDS": "30"}  # the training run's environment
# the README's inject commands (CHECKPOINT, DATA and the run folder filled in); TRIALS: scaled
COMMANDS = {
    "fixed": "--ber 1e-6 1e-5 1e-4 --trials {t100} --seed 0",
    "auto": "--ber 1e-5 --trials auto --ci-half-width 0.01 --confidence 0.95",
    "count": "--count 1 --bits 30 --trials {t500}",
    "int8": "--ber 1e-4 --dtype int8 --trials {t100}",
    "precision": "--ber 1e-5 --precision 0.01",
    "blocks": "--ber 1e-4 --trials {t400} --inputs-per-trial 100",
    "activations": "--target activations --ber 1e-5 1e-4 --trials {t30}",
    "per-input": "--target activations --count 1 --per-input --trials {t30}",
}
UP_FRONT = re.compile(r"expected: .*?(at most )?~([\d.]+) (s|min) of trials")
RANGE = re.compile(r"expected: ~([\d.]+) (s|min) to at most")
AFTER_PILOT = re.compile(r"expected: (.+?): ~(\d+) trials expected, at most (\d+) .*?; ~(?:(\d+)m)?(\d+)s left")


@dataclass
class Run:
    name: str
    wall: float = 0.0
    lines: list[tuple[float, str]] = field(default_factory=list)   # (seconds since start, stderr line)
    summary: dict = field(default_factory=dict)
    code: int = 0
    trials_end: float = 0.0   # seconds since start when the trials ended (the summary began)


class Stamped(io.TextIOBase):
    """A stderr that keeps each line with the seconds since ``start`` when it was completed."""

    def __init__(self, start: float) -> None:
        self.start, self.pending, self.lines = start, "", []

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self.lines.append((time.perf_counter() - self.start, line))
        return len(text)

    def isatty(self) -> bool:
        return False


def run(name: str, args: list[str], out: Path) -> Run:
    """One command through ``ftcnn.cli.main``: its stderr lines and the end of its trials, stamped."""
    from ftcnn import cli
    from ftcnn.campaigns import campaign

    result = Run(name)
    start = time.perf_counter()
    ends: list[float] = []
    summarize = campaign.summarize

    def stamped_summarize(*a, **k):
        ends.append(time.perf_counter() - start)
        return summarize(*a, **k)

    stderr, argv = sys.stderr, sys.argv
    sys.stderr, sys.argv = Stamped(start), ["ftcnn", *args, "-o", str(out)]
    campaign.summarize = stamped_summarize
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main()
    except SystemExit as exc:
        result.code = exc.code if isinstance(exc.code, int) else 1
    finally:
        result.lines = sys.stderr.lines  # type: ignore[attr-defined]
        sys.stderr, sys.argv, campaign.summarize = stderr, argv, summarize
    result.wall = time.perf_counter() - start
    result.trials_end = ends[-1] if ends else result.wall
    if (out / "summary.json").is_file():
        result.summary = json.loads((out / "summary.json").read_text())
    return result


def rows(r: Run) -> list[tuple[str, float, float, str]]:
    """(what, estimated s, actual s, note) per estimate line of one run."""
    out = []
    marks = [(t, line) for t, line in r.lines if AFTER_PILOT.search(line)]
    for t, line in r.lines:
        m = UP_FRONT.search(line)
        if m:
            seconds = float(m.group(2)) * (60 if m.group(3) == "min" else 1)
            ranged = RANGE.search(line)
            if ranged:  # a stop: its fewest trials to its cap; is the actual time inside?
                low = float(ranged.group(1)) * (60 if ranged.group(2) == "min" else 1)
                inside = low / 2 <= r.trials_end - t <= seconds * 2
                out.append(("up front, the range's low end", low, r.trials_end - t,
                            f"range {low:g}..{seconds:g} s: {'holds' if inside else 'MISSED'} the actual"))
                continue
            what = "up front (an upper bound)" if m.group(1) else "up front (from timed trials)"
            out.append((what, seconds, r.trials_end - t, ""))
    labels = [AFTER_PILOT.search(line).group(1) for _, line in marks]  # type: ignore[union-attr]
    for i, (t, line) in enumerate(marks):
        m = AFTER_PILOT.search(line)
        assert m is not None
        left = int(m.group(4) or 0) * 60 + int(m.group(5))
        # the point ends where the next point's first line comes, or with the command
        end = next((marks[j][0] for j in range(i + 1, len(marks)) if labels[j] != labels[i]), r.trials_end)
        point = float(m.group(1).split()[1])
        trials = next((row["trials"] for row in r.summary.get("results", [])
                       if row.get("ber") == point or row.get("count") == point), None)
        out.append((f"after the pilot, {m.group(1)}", float(left), end - t,
                    f"~{m.group(2)} trials expected (cap {m.group(3)}), {trials} run"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--scale", type=float, default=1.0, help="fixed trial counts x this (README: 1)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--only", nargs="*", help="run only these commands: " + ", ".join(COMMANDS))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = args.checkpoint
        if ckpt is None:
            ckpt = folder / "lenet5.pt"
            subprocess.run(FTCNN + ["train", "--model", "lenet5", "--data", args.data, "--epochs",
                                    str(args.epochs), "--seed", "0", "--threads", "1", "-o", str(ckpt)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        trials = {f"t{n}": max(2, round(n * args.scale)) for n in (30, 100, 400, 500)}
        table = []
        for name, flags in COMMANDS.items():
            if args.only and name not in args.only:
                continue
            command = [str(ckpt), "--data", args.data, "--threads", "1", *flags.format(**trials).split()]
            r = run(name, ["inject", *command], folder / name)
            if r.code != 0:
                table.append((name, "failed: " + (r.lines[-1][1] if r.lines else "?"), 0.0, r.wall, ""))
                continue
            table += [(name, *row) for row in rows(r)]
    load_after = os.getloadavg()[0]
    loaded = max(load_before, load_after) > cores
    print(f"# ftcnn time estimates vs actual ({args.data}, scale {args.scale:g}, 1 thread; load average "
          f"{load_before:.1f} -> {load_after:.1f} on {cores} cores{': under load' if loaded else ''})")
    print(f"{'command':12} {'estimate':36} {'est. s':>8} {'actual s':>9} {'ratio':>6}  note")
    for name, what, estimate, actual, note in table:
        ratio = estimate / actual if actual > 0 else float("inf")
        flag = "" if 0.5 <= ratio <= 2 or what.startswith("up front, the range") else "  (outside 2x)"
        print(f"{name:12} {what:36} {estimate:8.1f} {actual:9.1f} {ratio:6.2f}  {note}{flag}")


if __name__ == "__main__":
    main()
