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
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

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


def expected(seconds: float, work: str, detail: str) -> str:
    """The one-line run-time estimate a long command prints before it starts (issue 14):
    ``expected: at most ~SPAN of WORK (DETAIL)``; DETAIL says what the bound is made of.

        >>> expected(150, "campaigns", "2 variants x 10 trials")
        'expected: at most ~2 min of campaigns (2 variants x 10 trials)'
        >>> expected(3.04, "trials", "1 point x 10 trials")
        'expected: at most ~3.0 s of trials (1 point x 10 trials)'
    """
    if seconds >= 90:
        span = f"{seconds / 60:.0f} min"
    else:
        span = f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    return f"expected: at most ~{span} of {work} ({detail})"


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
