"""A campaign's results on disk: the run folder's SQLite file and its summaries.

Every finished trial is committed to SQLite at once (``commit_result``): a
killed campaign loses nothing, and running it again resumes where it stopped.
A folder's identity is its content (``run_identity``): resuming with a
different model, data or setting is refused with one line naming what differs.
The summary (``summary.json``, ``summary.csv``, the terminal table) is written
from the statistics ``ftcnn.campaign`` computes over the committed trials.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ftcnn import checkpoint, files, fingerprint
from ftcnn._version import __version__
from ftcnn.metrics import METRIC_NAMES
from ftcnn.trials import CampaignConfig, TrialResult

DB_NAME = "results.sqlite"

IDENTITY_FORMAT = 2  # identity rows without content digests (format 1) came from ftcnn <= 0.1.0


def architecture(model: nn.Module) -> Any:
    """What the tensors alone do not say about a model: its ftcnn spec (builder,
    arguments, transforms) when it has one, else every module's name and class
    (a ReLU swapped for a Tanh changes results but no tensor)."""
    try:
        return checkpoint.get_spec(model)
    except ValueError:
        return [f"{name}:{type(m).__module__}.{type(m).__qualname__}" for name, m in model.named_modules()]


def run_identity(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, config: CampaignConfig,
                 *, model_digest: str | None = None, data_digest: str | None = None) -> dict[str, Any]:
    """A run folder's identity is its content (design §8): digests of the model's
    tensors as given (before any rounding to the storage format) and of the
    evaluation data, its architecture, and the configuration. File names and
    paths are not part of it: a checkpoint retrained into the same path is
    another model. Digests may be passed in when the caller has them."""
    return json.loads(json.dumps({  # as stored: tuples become lists
        "format": IDENTITY_FORMAT,
        "model": model_digest or fingerprint.model_digest(model),
        "architecture": architecture(model),
        "data": data_digest or fingerprint.data_digest(inputs, labels),
        "config": config.identity(),
    }, default=_json_default))


def identity_differences(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """What differs between a folder's identity and the one given, in words
    (empty when they are the same campaign)."""
    if not isinstance(stored, dict) or stored.get("format") != IDENTITY_FORMAT:
        return ["a run of an older ftcnn, recorded without content digests"]
    out = []
    if stored.get("model") != given["model"]:
        out.append(f"other model (tensor digest {fingerprint.short(stored.get('model'))} in the folder, "
                   f"{fingerprint.short(given['model'])} given)")
    if stored.get("architecture") != given["architecture"]:
        out.append("other model architecture")
    if stored.get("data") != given["data"]:
        out.append(f"other data (digest {fingerprint.short(stored.get('data'))} in the folder, "
                   f"{fingerprint.short(given['data'])} given)")
    old, new = stored.get("config") or {}, given["config"]
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if keys:
        out.append("other settings: " + ", ".join(f"{k} {old.get(k)} in the folder, {new.get(k)} given"
                                                   for k in keys))
    return out


def stored_identity(folder: Path) -> dict[str, Any] | None:
    """The identity a run folder holds (None: no run there yet). Read-only."""
    path = Path(folder) / DB_NAME
    if not path.is_file():
        return None
    db = sqlite3.connect(path, timeout=60)
    try:
        row = db.execute("SELECT value FROM meta WHERE key='identity'").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None  # created but not yet initialised
        return {}  # unreadable: not this campaign
    except sqlite3.DatabaseError:
        return {}
    finally:
        db.close()
    return None if row is None else _parse_identity(row[0])


def _parse_identity(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def open_db(folder: Path, identity: dict[str, Any]) -> sqlite3.Connection:
    """Open (or create) the run's SQLite file; refuse a different campaign with
    one line naming what differs.

    The identity row is read and, for a new folder, written inside one write
    transaction (BEGIN IMMEDIATE): of two processes starting on one folder, the
    second waits for the first to commit, then reads its row and either resumes
    (same campaign) or refuses; never an IntegrityError.
    """
    db = sqlite3.connect(folder / DB_NAME, timeout=60)
    try:
        _set_wal(db)
        # WAL + NORMAL: a commit is in the WAL file before commit() returns, so it survives the
        # process being killed; only a power cut may lose the last ones. FULL adds an fsync per
        # trial (~20 ms here), longer than a fault-free trial takes.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("BEGIN IMMEDIATE")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("""CREATE TABLE IF NOT EXISTS trials (
            point REAL, trial INTEGER, n_faults INTEGER,
            accuracy REAL, top5 REAL, sdc REAL, critical_sdc REAL, due REAL,
            sites TEXT, seconds REAL, PRIMARY KEY (point, trial))""")
        # time-to-precision trials (ftcnn.strata): their own table, so folders of older
        # versions (without it) stay readable and plain trials never mix with them
        db.execute("""CREATE TABLE IF NOT EXISTS strata_trials (
            stratum INTEGER, point REAL, trial INTEGER, n_faults INTEGER,
            accuracy REAL, top5 REAL, sdc REAL, critical_sdc REAL, due REAL,
            sites TEXT, seconds REAL, PRIMARY KEY (point, stratum, trial))""")
        row = db.execute("SELECT value FROM meta WHERE key='identity'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('identity', ?)", (json.dumps(identity, sort_keys=True),))
        db.commit()
    except sqlite3.DatabaseError as exc:
        db.close()
        raise ValueError(f"cannot open the run database {folder / DB_NAME}: {exc}") from None
    except BaseException:
        db.close()
        raise
    differences = [] if row is None else identity_differences(_parse_identity(row[0]), identity)
    if differences:
        db.close()
        raise ValueError(f"{folder} holds a different campaign: {'; '.join(differences)}; "
                         "use another output folder")
    return db


def _set_wal(db: sqlite3.Connection, attempts: int = 600) -> None:
    """Switch to WAL. On a new file racing with another process the switch can
    answer 'locked' at once (SQLite does not wait there), so retry a while."""
    for _ in range(attempts):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            time.sleep(0.1)
    db.execute("PRAGMA journal_mode=WAL")


def done_trials(db: sqlite3.Connection, point: float) -> dict[int, dict[str, float]]:
    rows = db.execute(f"SELECT trial, n_faults, {', '.join(METRIC_NAMES)} FROM trials WHERE point=?",
                      (point,)).fetchall()
    return {r[0]: dict(zip(("n_faults",) + METRIC_NAMES, r[1:])) for r in rows}


def done_strata_trials(db: sqlite3.Connection, point: float) -> dict[tuple[int, int], dict[str, float]]:
    """The committed stratified trials of a point, by (stratum, index)."""
    rows = db.execute(f"SELECT stratum, trial, n_faults, {', '.join(METRIC_NAMES)} FROM strata_trials "
                      "WHERE point=?", (point,)).fetchall()
    return {(r[0], r[1]): dict(zip(("n_faults",) + METRIC_NAMES, r[2:])) for r in rows}

def commit_result(db: sqlite3.Connection, result: TrialResult) -> None:
    """Write one trial and commit at once (the driver is the only writer)."""
    sites = json.dumps(result.sites) if result.sites is not None else None
    values = (result.point, result.trial, result.n_faults, *(result.metrics[m] for m in METRIC_NAMES), sites,
              result.seconds)
    if result.stratum is None:
        db.execute("INSERT OR REPLACE INTO trials VALUES (?,?,?,?,?,?,?,?,?,?)", values)
    else:
        db.execute("INSERT OR REPLACE INTO strata_trials VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                   (result.stratum, *values))
    db.commit()


def versions() -> dict[str, str]:
    """The versions a summary records (information, not identity)."""
    return {"ftcnn": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


CSV_FIELDS = ("ber", "count", "trials", "accuracy_mean", "accuracy_std", "accuracy_ci_low",
              "accuracy_ci_high", "confidence", "ci_method", "top5_mean", "sdc_mean", "sdc_ci_low",
              "sdc_ci_high", "critical_sdc_mean", "due_mean", "n_faults_mean")


def summary_csv(summary: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in summary["results"]:
        flat = {**row, "accuracy_ci_low": row["accuracy_ci"][0], "accuracy_ci_high": row["accuracy_ci"][1],
                "sdc_ci_low": row["sdc_ci"][0], "sdc_ci_high": row["sdc_ci"][1]}
        writer.writerow(flat)
    return buf.getvalue()


def write_text(path: Path, text: str) -> None:
    files.write_text(path, text)


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    files.write_json(out / "summary.json", summary)  # strict: an undefined rate is null, never NaN
    write_text(out / "summary.csv", summary_csv(summary))


def _json_default(obj: Any) -> Any:
    """JSON for what ``json`` does not know: numpy scalars, tuples (as lists), else ``str``."""
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    return str(obj)


def format_table(summary: dict[str, Any]) -> "rich.table.Table":  # noqa: F821
    """A terminal table of the summary."""
    from rich.table import Table
    by = summary["config"].get("bers") and "ber" or "count"
    table = Table(title=f"fault campaign (golden accuracy {summary['golden_accuracy']:.2%}; "
                        f"CI: {summary['ci_method']})")
    for col in (by, "trials", "accuracy", f"{ci_level(summary)} CI", "SDC", "critical SDC", "DUE",
                "faults/trial"):
        table.add_column(col, justify="right")
    for r in summary["results"]:
        low, high = r["accuracy_ci"]
        table.add_row(f"{r[by]:g}", str(r["trials"]), f"{r['accuracy_mean']:.2%}",
                      f"[{low:.2%}, {high:.2%}]", f"{r['sdc_mean']:.2%}", f"{r['critical_sdc_mean']:.2%}",
                      f"{r['due_mean']:.2%}", f"{r['n_faults_mean']:.2f}")
    return table


def ci_level(summary: dict[str, Any]) -> str:
    """The summary's confidence level for headers: "95%", "99.9%"."""
    return f"{100 * summary['confidence']:.4g}%"
