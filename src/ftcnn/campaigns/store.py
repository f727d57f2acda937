"""A campaign's results on disk: the run folder's SQLite file and its summaries.

Every finished trial is committed to SQLite at once (``commit_result``): a
killed campaign loses nothing, and running it again resumes where it stopped.
A folder's identity is its content (``run_identity``): resuming with a
different model, data or setting is refused with one line naming what differs.
The file itself is untrusted input (design §8: run folders are copied, archived,
hand-edited): it is opened only as a plain file (never through a link), its
schema must be exactly ``SCHEMA``, trials need an identity row, and every stored
row must be a trial of this campaign (``check_rows``), else one line names the
file and the field; no ``sqlite3.Error`` leaves this module as a traceback.
The summary (``summary.json``, ``summary.csv``, the terminal table) is written
from the statistics ``ftcnn.campaigns.campaign`` computes over the committed trials.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import platform
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ftcnn import checkpoint, files, fingerprint, readback
from ftcnn.campaigns import strata
from ftcnn._version import __version__
from ftcnn.campaigns.metrics import METRIC_NAMES
from ftcnn.campaigns.trials import CampaignConfig, TrialResult

DB_NAME = "results.sqlite"
# the files SQLite keeps next to a database: each is opened (or created) with it
DB_FILES = (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", DB_NAME + "-journal")

# the run database's whole schema: a file holding anything else was not written by ftcnn
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
    """CREATE TABLE IF NOT EXISTS trials (
            point REAL, trial INTEGER, n_faults INTEGER,
            accuracy REAL, top5 REAL, sdc REAL, critical_sdc REAL, due REAL,
            sites TEXT, seconds REAL, PRIMARY KEY (point, trial))""",
    # time-to-precision trials (ftcnn.campaigns.strata): their own table, so folders of older
    # versions (without it) stay readable and plain trials never mix with them
    """CREATE TABLE IF NOT EXISTS strata_trials (
            stratum INTEGER, point REAL, trial INTEGER, n_faults INTEGER,
            accuracy REAL, top5 REAL, sdc REAL, critical_sdc REAL, due REAL,
            sites TEXT, seconds REAL, PRIMARY KEY (point, stratum, trial))""",
)

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
    def digest(value: Any) -> str:  # the folder's value may be anything: the file is untrusted
        return fingerprint.short(value) if isinstance(value, str) else "unreadable"

    out = []
    if stored.get("model") != given["model"]:
        out.append(f"other model (tensor digest {digest(stored.get('model'))} in the folder, "
                   f"{fingerprint.short(given['model'])} given)")
    if stored.get("architecture") != given["architecture"]:
        out.append("other model architecture")
    if stored.get("data") != given["data"]:
        out.append(f"other data (digest {digest(stored.get('data'))} in the folder, "
                   f"{fingerprint.short(given['data'])} given)")
    old, new = stored.get("config") or {}, given["config"]
    if not isinstance(old, dict):
        return out + ["other settings (unreadable in the folder)"]
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if keys:
        out.append("other settings: " + ", ".join(f"{k} {str(old.get(k))[:60]} in the folder, {new.get(k)} given"
                                                   for k in keys))
    return out


class RunDatabase(sqlite3.Connection):
    """A run folder's SQLite connection; it knows its file, so every error names it."""

    path: Path


@contextlib.contextmanager
def database_errors(path: Path | str) -> Iterator[None]:
    """Any ``sqlite3.Error`` inside as one line naming the file (a ValueError: the CLI's
    one-line refusal), never a traceback: a run database is a file from the user."""
    try:
        yield
    except sqlite3.Error as exc:
        raise ValueError(f"run database {path}: {str(exc).strip() or type(exc).__name__}") from None


def _connect(folder: Path) -> RunDatabase:
    """Open ``folder``'s run database, refusing links and anything but plain files
    (a link named results.sqlite, even a dangling one, would make SQLite read or
    create the file it points to, wherever that is)."""
    for name in DB_FILES:
        path = folder / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ValueError(f"cannot read the run database {path}: {exc.strerror}") from None
        if stat.S_ISLNK(mode):
            raise ValueError(f"{path} is a symbolic link; a run database must be a plain file in the run "
                             "folder (remove the link or use another output folder)")
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path} is not a regular file; use another output folder")
    path = folder / DB_NAME
    with database_errors(path):
        db = sqlite3.connect(path, timeout=60, factory=RunDatabase)
    db.path = path
    return db


def _path(db: sqlite3.Connection) -> Path | str:
    return getattr(db, "path", DB_NAME)


@functools.cache
def _reference_schema() -> dict[tuple[str, str, str], tuple[tuple[Any, ...], ...]]:
    """(type, name, table) -> columns of every object ``SCHEMA`` creates (its indices too)."""
    reference = sqlite3.connect(":memory:")
    try:
        for statement in SCHEMA:
            reference.execute(statement)
        return _objects(reference, known=None)
    finally:
        reference.close()


def _objects(db: sqlite3.Connection, known: dict[tuple[str, str, str], Any] | None
             ) -> dict[tuple[str, str, str], tuple[tuple[Any, ...], ...]]:
    """The database's objects, with each table's columns (name, declared type, not null,
    default, primary-key position); only tables of ``known`` are asked for their columns
    (a name read from a hostile file goes into no statement)."""
    found: dict[tuple[str, str, str], tuple[tuple[Any, ...], ...]] = {}
    for kind, name, table in db.execute("SELECT type, name, tbl_name FROM sqlite_master"):
        key = (kind, name, table)
        asked = kind == "table" and (known is None or key in known)
        found[key] = tuple(tuple(c[1:]) for c in db.execute("SELECT * FROM pragma_table_info(?)", (name,))) \
            if asked else ()
    return found


def _check_schema(db: sqlite3.Connection) -> None:
    """Refuse a database whose tables, columns or other objects (views, triggers, indices)
    are not those ``SCHEMA`` makes; a file without some of them yet is fine (created next)."""
    reference = _reference_schema()
    for key, columns in _objects(db, reference).items():
        kind, name, _ = key
        if key not in reference:
            raise ValueError(f"{_path(db)} is not an ftcnn run database: unexpected {kind} {name[:60]!r}; "
                             "use another output folder")
        if columns != reference[key]:
            raise ValueError(f"{_path(db)} is not an ftcnn run database: table {name!r} has other columns "
                             f"({', '.join(str(c[0])[:40] for c in columns)}); use another output folder")


def _holds_trials(db: sqlite3.Connection) -> bool:
    tables = {name for _, name, _ in _objects(db, {})}
    return any(db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None
               for table in ("trials", "strata_trials") if table in tables)


def stored_identity(folder: Path) -> dict[str, Any] | None:
    """The identity a run folder holds (None: no run there yet; {}: not a campaign this
    ftcnn can resume: unreadable, another schema, or trials without an identity). Read-only;
    a linked database is refused as ``open_db`` refuses it."""
    if not os.path.lexists(Path(folder) / DB_NAME):
        return None
    db = _connect(Path(folder))
    try:
        _check_schema(db)
        if ("table", "meta", "meta") not in _objects(db, {}):
            return {} if _holds_trials(db) else None  # created but not yet initialised
        row = db.execute("SELECT value FROM meta WHERE key='identity'").fetchone()
        if row is None:
            return {} if _holds_trials(db) else None
    except (sqlite3.Error, ValueError):
        return {}  # unreadable or not ours: not this campaign
    finally:
        db.close()
    return _parse_identity(row[0])


def _parse_identity(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def open_db(folder: Path, identity: dict[str, Any], points: Sequence[float] | None = None) -> RunDatabase:
    """Open (or create) the run's SQLite file; refuse a different campaign with
    one line naming what differs.

    The file is untrusted input (design §8): a link, another schema, trials without an
    identity row, or a row that is no trial of this campaign (``points``: the campaign's
    BERs or counts; see :func:`check_rows`) is refused in one line naming the file and
    the field, never adopted.

    The identity row is read and, for a new folder, written inside one write
    transaction (BEGIN IMMEDIATE): of two processes starting on one folder, the
    second waits for the first to commit, then reads its row and either resumes
    (same campaign) or refuses; never an IntegrityError.
    """
    db = _connect(folder)
    try:
        with database_errors(db.path):
            _check_schema(db)  # before anything is written into the file
            _set_wal(db)
            # WAL + NORMAL: a commit is in the WAL file before commit() returns, so it survives the
            # process being killed; only a power cut may lose the last ones. FULL adds an fsync per
            # trial (~20 ms here), longer than a fault-free trial takes.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA:
                db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key='identity'").fetchone()
            other = db.execute("SELECT key FROM meta WHERE key != 'identity' LIMIT 1").fetchone()
            if other is not None:
                raise ValueError(f"{db.path} is not an ftcnn run database: unexpected meta key "
                                 f"{str(other[0])[:60]!r}; use another output folder")
            if row is None:
                if _holds_trials(db):
                    raise ValueError(f"{db.path} holds trials but no identity row (the file was edited or "
                                     "damaged): they cannot be adopted as this campaign's; use another output "
                                     "folder")
                db.execute("INSERT INTO meta VALUES ('identity', ?)", (json.dumps(identity, sort_keys=True),))
            db.commit()
            differences = [] if row is None else identity_differences(_parse_identity(row[0]), identity)
            if differences:
                raise ValueError(f"{folder} holds a different campaign: {'; '.join(differences)}; "
                                 "use another output folder")
            if points is not None:
                check_rows(db, points)
    except BaseException:
        db.close()
        raise
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


ROW_FIELDS = ("point", "trial", "n_faults") + METRIC_NAMES


def check_rows(db: sqlite3.Connection, points: Sequence[float]) -> None:
    """Refuse, in one line naming the file, the table and the field, any row that is no
    trial of this campaign: a point that is not one of ``points``, a trial index or stratum
    out of range, a fault count that is not an integer >= 0, a metric that is not a number
    in [0, 1] (NULL stands for NaN only in top-5, undefined below 10 classes), sites that
    are not text, seconds that are not a number. A trial index at or past the budget is
    legitimate (the budget is no part of the identity: a resumed run may shrink or extend
    it) and is left out of the summary as before; a negative one never is a trial."""
    allowed = {float(p) for p in points}
    for table, extra in (("trials", ()), ("strata_trials", ("stratum",))):
        columns = ", ".join(extra + ROW_FIELDS)
        query = f"SELECT {columns}, typeof(sites), typeof(seconds) FROM {table}"
        for values in db.execute(query):
            row = dict(zip(extra + ROW_FIELDS + ("sites", "seconds"), values))
            problem = _row_problem(row, allowed)
            if problem is not None:
                field, value = problem
                at = f"point {_short(row['point'])}, trial {_short(row['trial'])}"
                raise ValueError(f"{_path(db)}: {table} row ({at}): {field} = {_short(value)} is not valid "
                                 "(the file was edited or damaged); use another output folder")


def _row_problem(row: dict[str, Any], points: set[float]) -> tuple[str, Any] | None:
    """The first field of a stored trial that no trial of this campaign could hold."""
    def count(v: Any) -> bool:
        return isinstance(v, int) and v >= 0

    def share(v: Any, optional: bool = False) -> bool:
        if v is None:
            return optional
        return isinstance(v, (int, float)) and not math.isnan(v) and 0.0 <= v <= 1.0

    checks = [("point", isinstance(row["point"], float) and row["point"] in points),
              ("trial", count(row["trial"])), ("n_faults", count(row["n_faults"]))]
    if "stratum" in row:
        checks.insert(0, ("stratum", isinstance(row["stratum"], int)
                          and 0 <= row["stratum"] < len(strata.STRATUM_NAMES)))
    checks += [(name, share(row[name], optional=name == "top5")) for name in METRIC_NAMES]
    checks += [("sites", row["sites"] in ("text", "null")), ("seconds", row["seconds"] in ("real", "integer", "null"))]
    for field, ok in checks:
        if not ok:
            return field, (f"a {row[field]} value" if field in ("sites", "seconds") else row[field])
    return None


def _short(value: Any) -> str:
    """A value from the file, for a one-line message: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def done_trials(db: sqlite3.Connection, point: float) -> dict[int, dict[str, float]]:
    with database_errors(_path(db)):
        rows = db.execute(f"SELECT trial, n_faults, {', '.join(METRIC_NAMES)} FROM trials WHERE point=?",
                          (point,)).fetchall()
    return {r[0]: dict(zip(("n_faults",) + METRIC_NAMES, r[1:])) for r in rows}


def done_strata_trials(db: sqlite3.Connection, point: float) -> dict[tuple[int, int], dict[str, float]]:
    """The committed stratified trials of a point, by (stratum, index)."""
    with database_errors(_path(db)):
        rows = db.execute(f"SELECT stratum, trial, n_faults, {', '.join(METRIC_NAMES)} FROM strata_trials "
                          "WHERE point=?", (point,)).fetchall()
    return {(r[0], r[1]): dict(zip(("n_faults",) + METRIC_NAMES, r[2:])) for r in rows}


def commit_result(db: sqlite3.Connection, result: TrialResult) -> None:
    """Write one trial and commit at once (the driver is the only writer)."""
    sites = json.dumps(result.sites) if result.sites is not None else None
    values = (result.point, result.trial, result.n_faults, *(result.metrics[m] for m in METRIC_NAMES), sites,
              result.seconds)
    with database_errors(_path(db)):
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


def discard_run(folder: Path) -> None:
    """Remove the campaign in ``folder``: its database with SQLite's side files and the summaries
    written from it (the folder and anything else in it stay). The caller holds the folder's lock
    (``files.exclusive_folder``): no other run has the database open."""
    for name in (*DB_FILES, "summary.json", "summary.csv"):
        (Path(folder) / name).unlink(missing_ok=True)


def read_trials(db_path: Path, columns: str, rows_schema: readback.Schema
                 ) -> tuple[list[tuple], int | None] | None:
    """Read-only: the ``columns`` of every trial in ``db_path`` (checked against ``rows_schema``: the file may
    have been edited) and the seed its identity records; None when there is no readable database."""
    if not db_path.is_file():
        return None
    try:
        db = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = db.execute(f"SELECT {columns} FROM trials ORDER BY point, trial").fetchall()
            meta = db.execute("SELECT value FROM meta WHERE key='identity'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    readback.check(rows, rows_schema, f"{db_path} (its trials)")
    seed = None
    if meta:
        try:
            seed = json.loads(meta[0]).get("config", {}).get("seed")
        except (ValueError, AttributeError, RecursionError, TypeError):
            seed = None
    if isinstance(seed, bool) or not isinstance(seed, int):
        seed = None
    return rows, seed
