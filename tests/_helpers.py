"""Helpers shared by the test modules (CLI subprocesses, waiting on a campaign's SQLite file)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


def run_cli(*args: str, cwd: Path | None = None, threads: int | None = None,
            subprocess_: bool = False) -> subprocess.CompletedProcess:
    """``ftcnn ARGS`` with its exit code, stdout and stderr as a user would see them.

    In this process by default (a subprocess costs ~3 s of imports; ~150 of them made the suite
    take 13 minutes): ``cli.main`` runs with its own argv, working folder and torch threads, and
    what it changes in the process (threads, RNG states, sys.path, user modules, warning filters,
    signal handlers, the environment) is put back afterwards. ``subprocess_=True`` (or
    FTCNN_TEST_SUBPROCESS=1 for every call) runs ``python -m ftcnn`` in a real subprocess: for
    what only a process shows (the entry point, kills, spawned workers, bits that must not depend
    on the state of the test process).
    """
    if subprocess_ or os.environ.get("FTCNN_TEST_SUBPROCESS"):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        return subprocess.run([sys.executable, "-m", "ftcnn", *args], capture_output=True, text=True,
                              cwd=cwd, timeout=600, env=env)
    return _run_in_process(list(args), cwd, threads)


def _run_in_process(args: list[str], cwd: Path | None, threads: int | None) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import random
    import signal
    import traceback
    import warnings

    import numpy as np
    import torch

    from ftcnn import cli

    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    saved = (torch.get_num_threads(), torch.get_rng_state(), np.random.get_state(), random.getstate(),
             list(sys.argv), list(sys.path), set(sys.modules), dict(os.environ), os.getcwd())
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        sys.argv = ["ftcnn", *args]
        os.environ.pop("FTCNN_DEBUG", None)
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(int(threads))
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, (int, type(None))):
                    print(exc.code, file=sys.stderr)
            except Exception:  # what a process would print before exiting 1
                traceback.print_exc()
                code = 1
    finally:
        threads_before, torch_rng, np_rng, py_rng, argv, path, modules, environ, where = saved
        os.chdir(where)
        os.environ.clear()
        os.environ.update(environ)
        sys.argv[:] = argv
        sys.path[:] = path
        for name in set(sys.modules) - modules:  # a user's --model module: the next folder's may differ
            file = getattr(sys.modules[name], "__file__", None) or ""
            if cwd is not None and str(Path(file).resolve()).startswith(str(Path(cwd).resolve())):
                del sys.modules[name]
        torch.set_num_threads(threads_before)
        torch.set_rng_state(torch_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
    return subprocess.CompletedProcess(["ftcnn", *args], code, out.getvalue(), err.getvalue())


def train_digits_model(path: Path, epochs: int, threads: int | None = None) -> subprocess.CompletedProcess:
    """A LeNet-5 trained on the built-in 8x8 digits through the CLI; fails the test if training fails."""
    r = run_cli("train", "--model", "lenet5", "--data", "digits", "--epochs", str(epochs), "-o", str(path),
                threads=threads)
    assert r.returncode == 0, r.stderr
    return r


def copy_of(checkpoint: Path, folder: Path) -> Path:
    """A private, writable copy of a shared checkpoint (conftest's ``digits_lenet5``) in ``folder``,
    so what a test writes beside it or into it stays its own."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / checkpoint.name
    shutil.copyfile(checkpoint, out)
    out.chmod(0o644)
    return out


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
