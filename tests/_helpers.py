"""Helpers shared by the test modules (CLI subprocesses, waiting on a campaign's SQLite file)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


def run_cli(*args: str, cwd: Path | None = None, threads: int | None = None) -> subprocess.CompletedProcess:
    """`python -m ftcnn ARGS` in a subprocess, as a user would run it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    return subprocess.run([sys.executable, "-m", "ftcnn", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env=env)


def train_digits_model(path: Path, epochs: int, threads: int | None = None) -> subprocess.CompletedProcess:
    """A LeNet-5 trained on the built-in 8x8 digits through the CLI; fails the test if training fails."""
    r = run_cli("train", "--model", "lenet5", "--data", "digits", "--epochs", str(epochs), "-o", str(path),
                threads=threads)
    assert r.returncode == 0, r.stderr
    return r


def wait_for_trials(proc: subprocess.Popen, db_path: Path, at_least: int, timeout: float = 120) -> None:
    """Block until a running campaign has committed ``at_least`` trials (or ended, or timed out)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if db_path.exists():
            try:
                committed = sqlite3.connect(db_path).execute("SELECT COUNT(*) FROM trials").fetchone()[0]
            except sqlite3.OperationalError:
                committed = 0
            if committed >= at_least:
                return
        time.sleep(0.05)


def cli_in_process(monkeypatch, capsys, *args: str) -> subprocess.CompletedProcess:
    """``ftcnn ARGS`` through ``cli.main`` in this process (exit code and output as a
    subprocess would give them; a subprocess per case would cost seconds of imports)."""
    from ftcnn import cli

    monkeypatch.setattr(sys, "argv", ["ftcnn", *args])
    monkeypatch.delenv("FTCNN_DEBUG", raising=False)
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def assert_one_line_refusal(r: subprocess.CompletedProcess, match: str) -> None:
    """Exit 2 and exactly one ``error:`` line naming ``match`` (no traceback)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
