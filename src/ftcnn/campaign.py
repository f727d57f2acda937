"""Statistical fault-injection campaigns (design §2).

A campaign evaluates the whole test split once per trial, each trial with its
own faults drawn from a generator seeded by (seed, fault rate, trial), so the
same seed gives the same faults whatever order or process runs the trials.
Every finished trial is committed to SQLite at once: a killed campaign loses
nothing, and running it again resumes where it stopped.

How trials run does not change what they give (design §7, §9): exact
shortcuts (``ftcnn.fastpath``), batched trials, worker processes and Ray
(``ftcnn.distributed``) all reproduce the plain path's numbers, so their
settings are not part of a campaign's identity.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import platform
import sqlite3
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ftcnn import faults as F
from ftcnn import fastpath, fingerprint, strata
from ftcnn import files
from ftcnn.metrics import (CI_BETTING, CI_STUDENT_T, METRIC_NAMES, Golden, SequentialEstimate, betting_ci,
                           leveugle_sample_size, mean_ci, sequential_mean, trial_metrics)

if TYPE_CHECKING:
    from ftcnn.distributed import Executor

DB_NAME = "results.sqlite"
SITES_KEPT = 64  # fault sites stored per trial for per-bit / per-layer analysis


@dataclass(frozen=True)
class CampaignConfig:
    """What defines a campaign. Everything but the trial budget is its identity:
    resuming with a different identity is refused rather than mixing results."""

    bers: tuple[float, ...] = ()
    counts: tuple[int, ...] = ()
    trials: int | None = 100          # None: sequential stop (betting CS), at most Leveugle's size
    margin: float = 0.01              # auto: requested half-width of the accuracy CI
    confidence: float = 0.95          # of every reported CI (and of Leveugle's size)
    min_trials: int = 10              # auto: a floor only; the CS needs none to be valid
    # time to precision: stratified trials until the accuracy CI half-width <= this (ftcnn.strata)
    precision: float | None = None
    seed: int = 0
    dtype: str = "float32"
    bits: tuple[int, ...] | None = None
    mode: str = "flip"
    include_bn: bool = False
    # attack the float values protections add (correction/restriction bounds) like parameters
    attack_protection: bool = True
    layers: tuple[str, ...] | None = None
    batch_size: int = 1000
    skip_fault_free: bool = True      # exact: a draw with no fault is the golden result
    # how trials run (exact: not part of the identity)
    shortcut: bool = True             # start each trial at its first faulted layer (fastpath)
    batch_trials: int | None = None   # trials per batched forward; None: automatic (1 on CPU)
    workers: int = 1                  # worker processes on this machine
    ray: bool = False                 # run on a local Ray started for the campaign
    ray_address: str | None = None    # run on an existing Ray cluster
    device: str | None = None         # move model and data there (None: where they are)
    cache_bytes: int = fastpath.DEFAULT_CACHE_BYTES  # golden activations kept by the shortcut
    # torch intra-op threads of the whole run, split among workers (None: distributed.default_threads)
    threads: int | None = None

    def __post_init__(self) -> None:
        if bool(self.bers) == bool(self.counts):
            raise ValueError("give fault rates (ber) or fault counts, not both and not neither")
        for ber in self.bers:
            if not (isinstance(ber, (int, float)) and 0.0 <= ber <= 1.0) or math.isnan(ber):
                raise ValueError(f"bit error rate {ber} outside [0, 1]")
        for count in self.counts:
            if count < 0:
                raise ValueError(f"fault count {count} must be >= 0")
        if self.trials is not None and self.trials < 1:
            raise ValueError(f"trials must be >= 1 (got {self.trials})")
        if not 0 < self.margin < 1 or not 0 < self.confidence < 1:
            raise ValueError("margin and confidence must lie in (0, 1)")
        if self.min_trials < 1:
            raise ValueError(f"min trials must be >= 1 (got {self.min_trials})")
        if self.dtype not in F.STORAGE_DTYPES:
            raise ValueError(f"unknown storage dtype {self.dtype!r}; choose from {', '.join(F.STORAGE_DTYPES)}")
        if self.mode not in F.MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; choose from {', '.join(F.MODES)}")
        if self.batch_size < 1:
            raise ValueError("batch size must be >= 1")
        if self.batch_trials is not None and self.batch_trials < 1:
            raise ValueError(f"batch trials must be >= 1 (got {self.batch_trials})")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1 (got {self.workers})")
        if self.cache_bytes < 0:
            raise ValueError(f"cache bytes must be >= 0 (got {self.cache_bytes})")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (got {self.threads})")
        if self.precision is not None:
            if not 0 < self.precision < 1:
                raise ValueError(f"precision must lie in (0, 1) (got {self.precision})")
            if not self.bers:
                raise ValueError("--precision needs fault rates (--ber): strata come from the binomial fault model")

    @property
    def by(self) -> str:
        return "ber" if self.bers else "count"

    @property
    def points(self) -> tuple[float, ...]:
        return tuple(float(p) for p in (self.bers or self.counts))

    def identity(self) -> dict[str, Any]:
        """The settings trial results depend on: all but the trial budget (which a
        resumed run may extend) and the execution settings (exact, see above)."""
        d = asdict(self)
        for key in ("trials", "margin", "confidence", "min_trials", "precision") + EXECUTION_FIELDS:
            d.pop(key)
        return d

    @property
    def parallel(self) -> bool:
        return self.workers > 1 or self.ray or self.ray_address is not None


# settings that change how fast trials run, never their results
EXECUTION_FIELDS = ("batch_size", "skip_fault_free", "shortcut", "batch_trials", "workers", "ray",
                    "ray_address", "device", "cache_bytes", "threads")


def trial_rng(seed: int, point: float, trial: int) -> np.random.Generator:
    """The generator of one trial: a pure function of seed, fault rate and trial."""
    key = int(np.float64(point).view(np.uint64))
    return np.random.default_rng(np.random.SeedSequence([seed, key, trial]))


def draw_trial_faults(memory: F.ParameterMemory, config: CampaignConfig, point: float,
                      trial: int, stratum: int | None = None) -> F.Faults:
    """The faults of a plain trial, or (``stratum`` set) of the stratum's ``trial``-th trial."""
    if stratum is not None:
        return strata.draw_faults(memory, strata.trial_rng(config.seed, point, stratum, trial), point,
                                  stratum, bits=config.bits, mode=config.mode)
    rng = trial_rng(config.seed, point, trial)
    if config.by == "ber":
        return F.draw_faults(memory, rng, ber=point, bits=config.bits, mode=config.mode)
    return F.draw_faults(memory, rng, count=int(point), bits=config.bits, mode=config.mode)


@torch.inference_mode()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits of ``model`` on all ``inputs``, in batches."""
    return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])


def stack_dataset(dataset: torch.utils.data.Dataset, device: str | torch.device = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as two tensors: every trial evaluates all of it."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        x, y = tensors
    else:
        xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
        x, y = torch.stack(xs), torch.as_tensor(ys)
    return x.to(device=device, dtype=torch.float32), y.to(device=device, dtype=torch.long)


def check_input_shape(model: nn.Module, inputs: torch.Tensor) -> None:
    """Fail with one clear line when the data does not fit the model."""
    try:
        with torch.inference_mode():
            model(inputs[:1])
    except RuntimeError as exc:
        shape = "x".join(str(s) for s in inputs.shape[1:])
        raise ValueError(f"model does not accept inputs of shape {shape} "
                         f"({str(exc).splitlines()[0][:120]})") from None


# --- storage -------------------------------------------------------------

IDENTITY_FORMAT = 2  # identity rows without content digests (format 1) came from ftcnn <= 0.1.0


def architecture(model: nn.Module) -> Any:
    """What the tensors alone do not say about a model: its ftcnn spec (builder,
    arguments, transforms) when it has one, else every module's name and class
    (a ReLU swapped for a Tanh changes results but no tensor)."""
    from ftcnn import checkpoint
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


@dataclass(frozen=True)
class TrialResult:
    """One finished trial as it travels from a worker to the driver: small and picklable
    (the fault sites only when few enough to be stored)."""

    point: float
    trial: int
    n_faults: int
    sites: list[tuple[str, int, int]] | None
    metrics: dict[str, float]
    seconds: float
    stratum: int | None = None   # a stratified trial (``--precision``): trial is its index in the stratum

    @classmethod
    def of(cls, point: float, trial: int, faults: F.Faults, metrics: dict[str, float],
           seconds: float, stratum: int | None = None) -> "TrialResult":
        sites = faults.as_list() if faults.count <= SITES_KEPT else None
        return cls(point, trial, faults.count, sites, metrics, seconds, stratum)


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


# --- running ---------------------------------------------------------------

@dataclass
class TrialRunner:
    """Runs trials on one model: inject, evaluate the whole split, restore.

    No copy of the model per trial: faults are applied in place and undone
    bit-exactly. ``fast`` (when set) starts trials at their first faulted
    layer (if ``config.shortcut``) and evaluates ``batch`` trials per forward;
    both give the plain path's numbers.
    """

    model: nn.Module
    memory: F.ParameterMemory
    inputs: torch.Tensor
    golden: Golden
    config: CampaignConfig
    fast: fastpath.Shortcut | None = None
    batch: int = 1
    golden_output: torch.Tensor | None = None  # the golden logits, if known (saves an inference)
    golden_metrics: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        logits = self.golden_output if self.golden_output is not None else self.golden_logits()
        self.golden_metrics = trial_metrics(logits, self.golden)

    def golden_logits(self) -> torch.Tensor:
        return predict(self.model, self.inputs, self.config.batch_size)

    def faulty_logits(self, faults: F.Faults) -> torch.Tensor:
        """Logits with ``faults`` present (from the best cut when the shortcut is on)."""
        with F.injected(self.memory, faults):
            if self.fast is not None and self.config.shortcut:
                logits = self.fast.logits(faults)
                if logits is not None:
                    return logits
            return predict(self.model, self.inputs, self.config.batch_size)

    def run(self, point: float, trial: int, stratum: int | None = None) -> tuple[F.Faults, dict[str, float]]:
        faults = draw_trial_faults(self.memory, self.config, point, trial, stratum)
        if faults.count == 0 and self.config.skip_fault_free:
            return faults, dict(self.golden_metrics)
        return faults, trial_metrics(self.faulty_logits(faults), self.golden)

    def run_many(self, tasks: Sequence[tuple[float, int] | tuple[float, int, int]]) -> list[TrialResult]:
        """Several (point, trial) pairs, or (point, index, stratum) triples of stratified
        trials (``--precision``); faulty ones ``batch`` at a time."""
        results: list[TrialResult] = []
        pending: list[tuple[float, int, F.Faults, int | None]] = []
        for point, trial, *rest in tasks:
            stratum = rest[0] if rest else None
            start = time.perf_counter()
            if self.batch == 1:
                faults, metrics = self.run(point, trial, stratum)
                results.append(TrialResult.of(point, trial, faults, metrics, time.perf_counter() - start,
                                              stratum))
                continue
            faults = draw_trial_faults(self.memory, self.config, point, trial, stratum)
            if faults.count == 0 and self.config.skip_fault_free:
                results.append(TrialResult.of(point, trial, faults, dict(self.golden_metrics),
                                              time.perf_counter() - start, stratum))
                continue
            pending.append((point, trial, faults, stratum))
            if len(pending) == self.batch:
                results += self._run_batch(pending)
                pending = []
        if pending:
            results += self._run_batch(pending)
        return results

    def _run_batch(self, pending: list[tuple[float, int, F.Faults, int | None]]) -> list[TrialResult]:
        start = time.perf_counter()
        assert self.fast is not None
        all_logits = self.fast.batched_logits([f for _, _, f, _ in pending], use_cuts=self.config.shortcut)
        seconds = (time.perf_counter() - start) / len(pending)
        return [TrialResult.of(point, trial, faults, trial_metrics(logits, self.golden), seconds, stratum)
                for (point, trial, faults, stratum), logits in zip(pending, all_logits)]


def prepare(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, config: CampaignConfig
            ) -> TrialRunner:
    """Model in its storage format, golden predictions, and a trial runner.

    With ``config.device`` set, the model (the caller's, for float32) and the
    data are moved there.
    """
    model.eval()
    if config.dtype != "float32":
        model = copy.deepcopy(model)  # rounding to the format must not touch the caller's model
    if config.device is not None:
        model, inputs, labels = model.to(config.device), inputs.to(config.device), labels.to(config.device)
    memory = F.parameter_memory(model, config.dtype, include_bn=config.include_bn,
                                layers=config.layers, include_protection=config.attack_protection)
    if memory.total_bits() == 0:
        raise ValueError("model has no Conv2d/Linear parameters to inject faults into")
    golden_logits = predict(model, inputs, config.batch_size)
    golden = Golden(labels, golden_logits.argmax(dim=1))
    fast, batch = _fast_path(model, memory, inputs, golden_logits, config)
    return TrialRunner(model, memory, inputs, golden, config, fast, batch, golden_logits)


def _fast_path(model: nn.Module, memory: F.ParameterMemory, inputs: torch.Tensor,
               golden_logits: torch.Tensor, config: CampaignConfig
               ) -> tuple[fastpath.Shortcut | None, int]:
    """The shortcut and the trials per batch, each only where it is exact here."""
    batch = config.batch_trials or fastpath.auto_batch_trials(model, inputs, config.batch_size)
    if not config.shortcut and batch == 1:
        return None, 1
    cache = config.cache_bytes if config.shortcut else 0
    fast = fastpath.build(model, memory, inputs, config.batch_size, golden_logits, cache)
    if batch > 1:
        if fast is None or not fast.batchable:
            warnings.warn("batched trials off: the model cannot be run per trial inside a batch "
                          "(untraceable, or parameters read outside module calls)", stacklevel=3)
            batch = 1
        elif not fast.batch_exact(batch, golden_logits):
            warnings.warn(f"batched trials off: a stack of {batch} input batches does not give the "
                          "same bits as each batch alone on this device", stacklevel=3)
            batch = 1
    return fast, batch


def trial_budget(config: CampaignConfig, memory: F.ParameterMemory) -> int:
    """Trials per point: fixed, or (auto) the cap of the sequential stop: Leveugle's size
    for the fault space (the worst case, p = 1/2, under a normal approximation)."""
    if config.precision is not None:  # time to precision: the same cap, at the precision asked
        return leveugle_sample_size(memory.total_bits(), config.precision, config.confidence)
    if config.trials is not None:
        return config.trials
    return leveugle_sample_size(memory.total_bits(), config.margin, config.confidence)


def auto_stop(accuracies: Iterable[float], config: CampaignConfig, budget: int) -> SequentialEstimate:
    """The ``--trials auto`` stop: per-trial accuracies in trial order until the betting
    confidence sequence's half-width is <= ``config.margin`` (``metrics.sequential_mean``).

    One function decides the stop both while running and when summarising (a resumed
    run recomputes it from its committed trials), and it reads ``accuracies`` lazily.
    It replaces "Student-t half-width <= margin after 10 trials", which is not valid
    when stopped on the data and stops on 10 identical benign trials (std 0): measured
    on LeNet-5/digits at BER 3e-6, its CIs covered a 2,000-trial reference in 28% of
    40 runs (nominal 95%); tests/test_sequential.py measures both.
    """
    return sequential_mean(accuracies, config.margin, config.confidence,
                           min_trials=config.min_trials, max_trials=budget)


def run_campaign(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 config: CampaignConfig, out_dir: str | Path, *,
                 record: dict[str, Any] | None = None, progress: bool = True,
                 runner: TrialRunner | None = None,
                 digests: tuple[str, str] | None = None) -> dict[str, Any]:
    """Run (or resume) a campaign into ``out_dir``; returns the summary.

    The folder's identity is the content (``run_identity``: digests of the
    model's tensors and of ``inputs``/``labels``, the architecture and the
    configuration); resuming with any difference is refused. ``record`` is
    information (model path, data name) stored in the summary, not identity.
    ``digests`` (model, data) spare recomputing them when the caller has them.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output folder {out}: {exc.strerror}") from None
    if not _writable(out):
        raise ValueError(f"output folder {out} is not writable")
    # digests of the model as given: before prepare() rounds a copy to the storage format
    model_digest, data_digest = digests or (None, None)
    identity = run_identity(model, inputs, labels, config, model_digest=model_digest, data_digest=data_digest)
    db = open_db(out, identity)
    from ftcnn import distributed
    try:
        if runner is None and config.parallel:  # the driver only needs the memory map and golden
            runner = prepare(model, inputs, labels, replace(config, shortcut=False, batch_trials=1))
        with distributed.using_threads(config.threads if not config.parallel else None):
            runner = runner or prepare(model, inputs, labels, config)
            budget = trial_budget(config, runner.memory)
            threads = torch.get_num_threads()
            with distributed.executor(model, inputs, labels, config, runner) as pool:
                _run_points(pool, db, config, budget, progress, runner)
        summary = summarize(db, config, runner.golden.accuracy, record, budget, runner=runner)
        summary["memory"] = memory_report(runner.model, runner.memory, config)
        # how it ran (not identity): the torch threads trials ran with, per process
        summary["execution"] = {"workers": config.workers, "threads": threads if not config.parallel else
                                distributed.worker_threads(config.workers, config.threads)}
    finally:
        db.close()
    summary["digests"] = {"model": identity["model"], "data": identity["data"]}
    write_summary(out, summary)
    return summary


def memory_report(model: nn.Module, memory: F.ParameterMemory, config: CampaignConfig) -> dict[str, Any]:
    """What the campaign attacked and what it left alone: the bits faults could
    hit, whether the protection values were among them (``attack_protection``),
    how many there were, and the protection memory no fault hits (int64
    indices; the bounds too when excluded), by name and in bits."""
    return {"attack_protection": config.attack_protection, "fault_target_bits": memory.total_bits(),
            **F.protection_memory(model, memory.stored)}


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (a name of our own: another
    process starting on the same folder must not see our probe vanish)."""
    import tempfile
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ftcnn-write-test."):
            pass
        return True
    except OSError:
        return False


def _progress(total: int, desc: str, enabled: bool):
    from ftcnn import progress as progress_mod  # plain periodic lines when not a terminal
    return progress_mod.bar(total=total, desc=desc, enabled=enabled)


def _run_points(pool: Executor, db: sqlite3.Connection, config: CampaignConfig, budget: int,
                progress: bool, runner: TrialRunner | None = None) -> None:
    """Hand out the missing trials and commit each result as it arrives.

    A fixed budget sends all trials at once. ``--trials auto`` goes in rounds
    of ``pool.round_size`` trials and applies the early stop in trial order,
    so the trials that count are those of a one-at-a-time run (results of a
    round past the stop point are stored but not summarised).
    """
    if config.precision is not None:
        for point in config.points:
            assert runner is not None, "a --precision campaign needs the trial runner"
            _run_point_precision(pool, db, config, point, budget, progress, runner)
        return
    if config.trials is not None:
        done = {p: done_trials(db, p) for p in config.points}
        todo = [(p, t) for p in config.points for t in range(budget) if t not in done[p]]
        total = budget * len(config.points)
        with _progress(total, f"{len(config.points)} {config.by} point(s)", progress) as bar:
            bar.update(total - len(todo))
            for result in pool.map(todo):
                commit_result(db, result)
                bar.update(1)
        return
    for point in config.points:
        _run_point_auto(pool, db, config, point, budget, progress)


def _run_point_auto(pool: Executor, db: sqlite3.Connection, config: CampaignConfig, point: float,
                    budget: int, progress: bool) -> None:
    """Feed ``auto_stop`` the point's trials in order, running missing ones as it asks."""
    done = done_trials(db, point)
    with _progress(budget, f"{config.by} {point:g}", progress) as bar:
        def accuracies() -> Iterator[float]:
            for trial in range(budget):
                if trial not in done:
                    todo = [t for t in range(trial, budget) if t not in done][:pool.round_size]
                    for result in pool.map([(point, t) for t in todo]):
                        commit_result(db, result)
                        done[result.trial] = result.metrics
                bar.update(1)
                yield done[trial]["accuracy"]

        auto_stop(accuracies(), config, budget)


def precision_stop(config: CampaignConfig, memory: F.ParameterMemory, point: float, budget: int,
                   fetch: strata.Fetch, golden_accuracy: float) -> strata.StratifiedEstimate:
    """The ``--precision`` design at one BER point (``strata.precision_run``): one function for
    running and for summarising, so a resumed run recomputes the same sizes from its trials.
    The fault-free stratum is known exactly (the golden accuracy; ``skip_fault_free`` is the
    same fact) and takes no trial."""
    weights = strata.weights(strata.Layout.of(memory, config.bits), point)
    return strata.precision_run(weights, fetch, config.precision, config.confidence,
                                known={strata.KNOWN: golden_accuracy}, max_trials=budget)


def _run_point_precision(pool: Executor, db: sqlite3.Connection, config: CampaignConfig, point: float,
                         budget: int, progress: bool, runner: TrialRunner) -> None:
    """Run the stratified trials ``precision_stop`` asks for, committing each as it arrives."""
    done = done_strata_trials(db, point)
    with _progress(budget, f"{config.by} {point:g} (+-{config.precision:g})", progress) as bar:
        def fetch(asked: list[tuple[int, int]]) -> list[float]:
            missing = [(point, i, h) for h, i in asked if (h, i) not in done]
            for result in pool.map(missing):
                commit_result(db, result)
                done[(result.stratum, result.trial)] = result.metrics
            bar.update(len(asked))
            return [done[key]["accuracy"] for key in asked]

        precision_stop(config, runner.memory, point, budget, fetch, runner.golden_metrics["accuracy"])


def _precision_row(db: sqlite3.Connection, config: CampaignConfig, runner: TrialRunner, point: float,
                   budget: int) -> dict[str, Any]:
    """A ``--precision`` point's row: stratified means (sum_h W_h mean_h) of every metric over the
    final sample (the fault-free stratum: the golden metrics), the stratified t-intervals of
    accuracy and SDC, and per-stratum details. ``trials`` counts every trial run, pilot included."""
    done = done_strata_trials(db, point)

    def fetch(asked: list[tuple[int, int]]) -> list[float]:
        missing = [key for key in asked if key not in done]
        if missing:
            raise ValueError(f"the run folder lacks stratified trials {missing[:3]} at ber {point:g}; run it again")
        return [done[key]["accuracy"] for key in asked]

    golden = {**runner.golden_metrics, "n_faults": 0.0}
    stop = precision_stop(config, runner.memory, point, budget, fetch, golden["accuracy"])
    weights = stop.weights
    live = [h for h, w in enumerate(weights) if w > 0 and h != strata.KNOWN]
    used = {h: [done[(h, stop.pilot[h] + i)] for i in range(stop.trials[h])] for h in live}

    def stratified(name: str) -> float | None:
        means = {h: [t[name] for t in used[h] if t[name] is not None and not _isnan(t[name])] for h in live}
        if any(not v for v in means.values()) or _isnan(golden[name]):
            return None
        return float(weights[strata.KNOWN] * golden[name] + sum(weights[h] * np.mean(means[h]) for h in live))

    known = {strata.KNOWN: golden["sdc"]} if weights[strata.KNOWN] > 0 else {}
    _, sdc_low, sdc_high, _ = strata.stratified_t(weights, {h: [t["sdc"] for t in used[h]] for h in live},
                                                  known, config.confidence)
    row: dict[str, Any] = {"ber": point, "trials": stop.total, "accuracy_mean": stop.mean, "accuracy_std": None,
                           "accuracy_ci": _clip01((stop.low, stop.high)), "confidence": config.confidence,
                           "ci_method": strata.CI_STRATIFIED, "precision": config.precision,
                           "narrow": stop.narrow}
    for name in ("top5", "sdc", "critical_sdc", "due", "n_faults"):
        row[f"{name}_mean"] = stratified(name)
    row["sdc_ci"] = _clip01((sdc_low, sdc_high))
    row["strata"] = [{"stratum": strata.STRATUM_NAMES[h], "weight": weights[h], "pilot_trials": stop.pilot[h],
                      "trials": stop.trials[h], "accuracy_mean": None if _isnan(stop.means[h]) else stop.means[h],
                      "accuracy_std": None if _isnan(stop.stds[h]) else stop.stds[h]}
                     for h in range(len(weights))]
    return row


def summarize(db: sqlite3.Connection, config: CampaignConfig, golden_accuracy: float,
              record: dict[str, Any] | None, budget: int, *,
              runner: TrialRunner | None = None) -> dict[str, Any]:
    """Per-point statistics from the committed trials (the same whatever the
    order in which they were computed).

    CIs are at ``config.confidence`` (the ``confidence`` field) and each row names
    its ``ci_method``: with ``--trials auto`` the betting confidence sequence at the
    sequential stop (the only interval valid there; the SDC one too); with a fixed
    number of trials the Student-t interval, except for a single trial, which has no
    t-interval and gets the betting CS's (then [0, 1]: one trial says nothing at 95%).
    Shares are clipped to [0, 1].
    """
    rows = []
    for point in config.points:
        if config.precision is not None:
            if runner is None:
                raise ValueError("summarising a --precision campaign needs its trial runner")
            rows.append(_precision_row(db, config, runner, point, budget))
            continue
        done = done_trials(db, point)
        stop: SequentialEstimate | None = None
        if config.trials is None:  # auto: the sequential stop, recomputed from the trials in order
            in_order = list(itertools.takewhile(done.__contains__, range(budget)))
            stop = auto_stop((done[t]["accuracy"] for t in in_order), config, budget)
            trials = [done[t] for t in in_order[:stop.trials]]
        else:
            trials = [done[t] for t in sorted(done) if t < budget]
        row: dict[str, Any] = {config.by: point, "trials": len(trials)}
        if config.by == "count":
            row["ber"] = None
        accuracies, sdcs = [t["accuracy"] for t in trials], [t["sdc"] for t in trials]
        acc_mean, acc_std, acc_ci = mean_ci(accuracies, config.confidence)
        sdc_ci = mean_ci(sdcs, config.confidence)[2]
        method = CI_STUDENT_T
        if stop is not None:
            method, acc_ci, sdc_ci = CI_BETTING, (stop.low, stop.high), betting_ci(sdcs, config.confidence)
        elif len(trials) < 2:
            method = CI_BETTING
            acc_ci, sdc_ci = betting_ci(accuracies, config.confidence), betting_ci(sdcs, config.confidence)
        row.update(accuracy_mean=acc_mean, accuracy_std=None if _isnan(acc_std) else acc_std,
                   accuracy_ci=_clip01(acc_ci), confidence=config.confidence, ci_method=method)
        for name in ("top5", "sdc", "critical_sdc", "due", "n_faults"):
            values = [t[name] for t in trials if t[name] is not None and not _isnan(t[name])]
            row[f"{name}_mean"] = float(np.mean(values)) if values else None
        row["sdc_ci"] = _clip01(sdc_ci)
        rows.append(row)
    methods = {r["ci_method"] for r in rows}
    return {
        "golden_accuracy": golden_accuracy,
        "seed": config.seed,
        "confidence": config.confidence,
        "ci_method": methods.pop() if len(methods) == 1 else "mixed (see each result)",
        "config": {**asdict(config), **(record or {})},
        "versions": versions(),
        "results": rows,
    }


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _clip01(ci: tuple[float, float]) -> list[float]:
    """A share's interval inside [0, 1] (a t-interval can reach 104%)."""
    return [max(0.0, ci[0]), min(1.0, ci[1])]


def versions() -> dict[str, str]:
    import ftcnn
    return {"ftcnn": ftcnn.__version__, "torch": torch.__version__, "numpy": np.__version__,
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
