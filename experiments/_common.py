"""What the experiment scripts share: the commit a result was measured on, and a CI as text."""

from __future__ import annotations

import subprocess


def commit() -> str:
    """The commit this ran on, marked when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def ci_text(mean: float, ci: tuple[float, float]) -> str:
    """A share and its interval in percent: ``96.80 [95.10, 97.90]``."""
    return f"{100 * mean:.2f} [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"
