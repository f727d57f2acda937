"""Progress bars and console output that suit a terminal and a log file alike.

In a terminal, progress is a tqdm bar redrawn in place. Redirected to a file
(a batch job, ``nohup``, CI), that same bar wrote every redraw: a 10-second
``ftcnn train`` left 30 KB of updates and ``compare`` 100 KB with a thousand
cursor-up escape codes. So when stderr is not a terminal, progress is plain
lines, no escape codes, at most one every ``interval`` seconds across all bars
(5 s by default, ``FTCNN_PROGRESS_SECONDS`` to change it), and a closing line
only for a step that printed one, so a short step stays silent and a long one
shows it is alive and when it ended.

Rich tables wrap at 80 columns when the output is not a terminal (names were
cut: "pruned_finet..."); ``console()`` gives them a wide page there instead.

Estimates (issue 23): a campaign whose length the data decides (``--trials auto``,
``--precision``) counts its bar toward the trials its pilot's spread says it will take, not
toward its cap (``StopEstimate``): "at most ~68 min" and "~6m56s left" were said of a run that
took 2 min. ``benchmarks/estimates.py`` checks every estimate against the actual time.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

DEFAULT_INTERVAL = 5.0
FILE_WIDTH = 1000  # columns of a rich console writing to a file: tables are never wrapped or cut
_last_line = [0.0]  # when the last plain progress line was written (shared by every bar)


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where progress goes) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def interval() -> float:
    """Seconds between plain progress lines (``FTCNN_PROGRESS_SECONDS``, default 5)."""
    try:
        return max(0.0, float(os.environ.get("FTCNN_PROGRESS_SECONDS", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def expected(seconds: float, work: str, detail: str, bound: bool = True) -> str:
    """The one-line run-time estimate a long command prints before it starts (issue 14):
    ``expected: at most ~SPAN of WORK (DETAIL)``; DETAIL says what the bound is made of.
    ``bound=False``: an estimate from measured work, not an upper bound (``expected: ~SPAN ...``).

        >>> expected(150, "campaigns", "2 variants x 10 trials")
        'expected: at most ~2 min of campaigns (2 variants x 10 trials)'
        >>> expected(3.04, "trials", "1 point x 10 trials")
        'expected: at most ~3.0 s of trials (1 point x 10 trials)'
    """
    return f"expected: {'at most ' if bound else ''}~{_span(seconds)} of {work} ({detail})"


def _span(seconds: float) -> str:
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def expected_range(low: float, high: float, work: str, detail: str) -> str:
    """The up-front line of work whose length is only bounded (a stop decided by the data):
    ``expected: ~LOW to at most ~HIGH of WORK (DETAIL)``.

        >>> expected_range(4, 600, "trials", "x")
        'expected: ~4.0 s to at most ~10 min of trials (x)'
    """
    return f"expected: ~{_span(low)} to at most ~{_span(high)} of {work} ({detail})"


AUTO_PILOT = 50   # trials of a ``--trials auto`` point before its spread says where it will stop
RESAY = 2.0       # an expectation that moves by more than this factor from the one said is said again


def auto_pilot(margin: float, confidence: float) -> int:
    """The pilot of a ``--trials auto`` point: ``AUTO_PILOT`` trials (measured: a 15-trial pilot put
    the stop at 1.7x and the time at 1.9x the actual on LeNet-5/digits at 1e-5), never more than the
    fewest trials the stop can take, log(2/alpha) / margin (see :func:`auto_expected_trials`)."""
    return max(2, min(AUTO_PILOT, math.floor(math.log(2.0 / (1.0 - confidence)) / margin)))


class RunningSpread:
    """The sample variance of outcomes seen one at a time (Welford): constant work per trial,
    where recomputing it over every trial so far would be quadratic in a point's trials."""

    def __init__(self) -> None:
        self.n, self.mean, self._squares = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self._squares += delta * (x - self.mean)

    @property
    def variance(self) -> float:
        return self._squares / (self.n - 1) if self.n > 1 else 0.0


def auto_expected_trials(trials: int, variance: float, margin: float, confidence: float, cap: int,
                         min_trials: int = 1) -> int | None:
    """Where ``--trials auto`` is expected to stop at one point, from the ``trials`` accuracies so
    far and their sample ``variance`` (None before :func:`auto_pilot`): the betting sequence's target bets
    (``metrics.BettingCS``) reach a half-width ``margin`` near n = 2 s^2 log(2/alpha) / margin^2,
    and never before log(2/alpha) / margin (identical outcomes: 384 trials at +-0.01, 95%), so
    max(the two), between the trials already run and ``cap``.

    Why an estimate at all: the only bound known up front is the cap (Leveugle's size for the
    fault space), which an auto run rarely reaches: "at most ~68 min" for a run of 2 min
    (issue 23). Checked against ``metrics.sequential_mean`` on simulated outcomes (+-0.01, 95%,
    5 runs each): identical 386 stopped vs 369 estimated; normal s=0.05 464 vs 369; 1% / 5% / 20%
    catastrophic trials (0.1 vs 0.97) 721 / 2,359 / 7,190 vs 525 / 2,649 / 8,979. A pilot that
    has not yet seen the rare bad trials estimates low; the estimate is updated after each trial.
    """
    if trials < auto_pilot(margin, confidence):
        return None
    log_term = math.log(2.0 / (1.0 - confidence))
    stop = max(math.ceil(2.0 * variance * log_term / margin ** 2), auto_least_trials(margin, confidence, min_trials))
    return min(cap, max(trials, stop))


def auto_least_trials(margin: float, confidence: float, min_trials: int = 1) -> int:
    """About the fewest trials a ``--trials auto`` stop takes: log(2/alpha) / margin, what identical
    outcomes need (369 at +-0.01, 95%; measured 384), and ``min_trials``."""
    return max(min_trials, math.ceil(math.log(2.0 / (1.0 - confidence)) / margin))


class StopEstimate:
    """A stopping campaign point's progress toward its expected stop, not its cap (issue 23):
    the bar's total is the expected number of trials (the pilot's size while it runs), the cap
    is named apart, and ``say`` gets one line once the pilot has set the expectation:
    "~N trials expected, at most CAP; ~T left", T from the seconds per trial run so far
    (``clock``), so resumed trials, which cost nothing, never enter the rate; and one more
    whenever the expectation moves by more than ``RESAY`` from the last one said."""

    def __init__(self, bar: Any, cap: int, label: str, say: Callable[[str], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bar, self.cap, self.label, self.say, self.clock = bar, cap, label, say, clock
        self.expected: int | None = None
        self.said: int | None = None  # the expectation last said
        self.ran, self.start = 0, clock()

    def pilot(self, size: int) -> None:
        """The pilot starts (the clock too: what came before it is set-up, not trials); ``size``
        is what the bar counts to until the pilot gives an expectation."""
        self.start = self.clock()
        retarget(self.bar, min(size, self.cap))

    def ran_trials(self, n: int) -> None:
        """``n`` trials were run here (not found committed): they set the rate."""
        self.ran += n

    def seconds_per_trial(self) -> float | None:
        return (self.clock() - self.start) / self.ran if self.ran else None

    def update(self, expected: int | None, done: int) -> None:
        """The new expected total (None: not known yet) after ``done`` trials: it moves the bar;
        the first known one is said, later ones when they moved by more than ``RESAY``."""
        if expected is None:
            return
        expected = max(expected, done)
        self.expected = expected
        retarget(self.bar, expected)
        if self.said is not None and max(expected / self.said, self.said / expected) <= RESAY:
            return
        first = self.said is None
        self.said = expected
        if self.say is not None:
            self.say(self.line(done, first))

    def line(self, done: int, first: bool = True) -> str:
        """``expected: LABEL: ~N trials expected, at most CAP (D done); ~T left (S s per trial so far)``."""
        assert self.expected is not None
        rate = self.seconds_per_trial()
        left = "" if rate is None else \
            f"; ~{_duration(rate * (self.expected - done))} left ({rate:.2g} s per trial so far)"
        source = "from the pilot's spread" if first else "updated from the spread so far"
        return (f"expected: {self.label}: ~{self.expected} trials expected, at most {self.cap} "
                f"({done} done, {source}){left}")


def retarget(bar: Any, total: int) -> None:
    """Point a progress bar (tqdm or ``LineProgress``) at a new total."""
    bar.total = total
    bar.refresh()


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and the seconds it took (what an estimate is scaled from)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class LineProgress:
    """A tqdm look-alike for files: the same calls (iterate, ``update``,
    ``set_postfix``, ``set_description``, ``close``, ``with``), plain lines out."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 stream: TextIO | None = None, every: float | None = None) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.n = total, desc, 0
        self.stream = stream
        self.every = interval() if every is None else every
        self.start = time.monotonic()
        if not _last_line[0]:  # the clock starts with the first bar: a run of short steps still reports
            _last_line[0] = self.start
        self.postfix = ""
        self.printed = False
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar has no iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def refresh(self) -> None:
        """tqdm's redraw; lines are only written on the clock."""

    def _line(self, final: bool = False) -> str:
        elapsed = time.monotonic() - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        if self.total:
            done += f" ({100 * self.n / self.total:.0f}%)"
        eta = ""
        if not final and self.total and 0 < self.n < self.total:
            eta = f", ~{_duration(elapsed * (self.total - self.n) / self.n)} left"
        post = f" {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done}{post} [{_duration(elapsed)}{eta}]{' done' if final else ''}"

    def _write(self, text: str) -> None:
        stream = sys.stderr if self.stream is None else self.stream
        print(text, file=stream, flush=True)
        _last_line[0] = time.monotonic()
        self.printed = True

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - _last_line[0] >= self.every:
            self._write(self._line())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.printed:
                self._write(self._line(final=True))


def bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
        enabled: bool = True, leave: bool = False) -> Any:
    """A progress bar over ``iterable`` (or updated by hand up to ``total``):
    tqdm in a terminal, ``LineProgress`` otherwise, silent when not ``enabled``."""
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(iterable, total=total, desc=desc, disable=True)
    if is_terminal():
        return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc)


def console(stderr: bool = False, **kwargs: Any) -> "rich.console.Console":  # noqa: F821
    """A rich Console: the terminal's width in a terminal, a wide page (no wrapping,
    no cut names) and no escape codes when writing to a file."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if not is_terminal(stream):
        kwargs.setdefault("width", FILE_WIDTH)
    return Console(stderr=stderr, **kwargs)
