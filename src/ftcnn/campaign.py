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
import json
import math
import platform
import sqlite3
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from ftcnn import faults as F
from ftcnn import fastpath
from ftcnn.checkpoint import atomic_write
from ftcnn.metrics import METRIC_NAMES, Golden, leveugle_sample_size, mean_ci, trial_metrics

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
    trials: int | None = 100          # None: sized statistically (Leveugle) with early stop
    margin: float = 0.01
    confidence: float = 0.95
    min_trials: int = 10
    seed: int = 0
    dtype: str = "float32"
    bits: tuple[int, ...] | None = None
    mode: str = "flip"
    include_bn: bool = False
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

    @property
    def by(self) -> str:
        return "ber" if self.bers else "count"

    @property
    def points(self) -> tuple[float, ...]:
        return tuple(float(p) for p in (self.bers or self.counts))

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("trials", "margin", "confidence", "min_trials") + EXECUTION_FIELDS:
            d.pop(key)
        return d

    @property
    def parallel(self) -> bool:
        return self.workers > 1 or self.ray or self.ray_address is not None


# settings that change how fast trials run, never their results
EXECUTION_FIELDS = ("batch_size", "skip_fault_free", "shortcut", "batch_trials", "workers", "ray",
                    "ray_address", "device", "cache_bytes")


def trial_rng(seed: int, point: float, trial: int) -> np.random.Generator:
    """The generator of one trial: a pure function of seed, fault rate and trial."""
    key = int(np.float64(point).view(np.uint64))
    return np.random.default_rng(np.random.SeedSequence([seed, key, trial]))


def draw_trial_faults(memory: F.ParameterMemory, config: CampaignConfig, point: float,
                      trial: int) -> F.Faults:
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

def open_db(folder: Path, config: CampaignConfig, extra_identity: dict[str, Any] | None = None
            ) -> sqlite3.Connection:
    """Open (or create) the run's SQLite file; refuse a different campaign."""
    db = sqlite3.connect(folder / DB_NAME, timeout=60)
    db.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a commit is in the WAL file before commit() returns, so it survives the
    # process being killed; only a power cut may lose the last ones. FULL adds an fsync per
    # trial (~20 ms here), longer than a fault-free trial takes.
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("""CREATE TABLE IF NOT EXISTS trials (
        point REAL, trial INTEGER, n_faults INTEGER,
        accuracy REAL, top5 REAL, sdc REAL, critical_sdc REAL, due REAL,
        sites TEXT, seconds REAL, PRIMARY KEY (point, trial))""")
    identity = json.dumps({**config.identity(), **(extra_identity or {})}, sort_keys=True)
    row = db.execute("SELECT value FROM meta WHERE key='identity'").fetchone()
    if row is None:
        db.execute("INSERT INTO meta VALUES ('identity', ?)", (identity,))
        db.commit()
    elif row[0] != identity:
        db.close()
        raise ValueError(f"{folder} holds a different campaign (other model, data or fault settings); "
                         "use another output folder")
    return db


def done_trials(db: sqlite3.Connection, point: float) -> dict[int, dict[str, float]]:
    rows = db.execute(f"SELECT trial, n_faults, {', '.join(METRIC_NAMES)} FROM trials WHERE point=?",
                      (point,)).fetchall()
    return {r[0]: dict(zip(("n_faults",) + METRIC_NAMES, r[1:])) for r in rows}


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

    @classmethod
    def of(cls, point: float, trial: int, faults: F.Faults, metrics: dict[str, float],
           seconds: float) -> "TrialResult":
        sites = faults.as_list() if faults.count <= SITES_KEPT else None
        return cls(point, trial, faults.count, sites, metrics, seconds)


def commit_result(db: sqlite3.Connection, result: TrialResult) -> None:
    """Write one trial and commit at once (the driver is the only writer)."""
    sites = json.dumps(result.sites) if result.sites is not None else None
    db.execute("INSERT OR REPLACE INTO trials VALUES (?,?,?,?,?,?,?,?,?,?)",
               (result.point, result.trial, result.n_faults,
                *(result.metrics[m] for m in METRIC_NAMES), sites, result.seconds))
    db.commit()


def commit_trial(db: sqlite3.Connection, point: float, trial: int, faults: F.Faults,
                 metrics: dict[str, float], seconds: float) -> None:
    commit_result(db, TrialResult.of(point, trial, faults, metrics, seconds))


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

    def run(self, point: float, trial: int) -> tuple[F.Faults, dict[str, float]]:
        faults = draw_trial_faults(self.memory, self.config, point, trial)
        if faults.count == 0 and self.config.skip_fault_free:
            return faults, dict(self.golden_metrics)
        return faults, trial_metrics(self.faulty_logits(faults), self.golden)

    def run_many(self, tasks: Sequence[tuple[float, int]]) -> list[TrialResult]:
        """Several (point, trial) pairs; faulty ones ``batch`` at a time."""
        results: list[TrialResult] = []
        pending: list[tuple[float, int, F.Faults]] = []
        for point, trial in tasks:
            start = time.perf_counter()
            if self.batch == 1:
                faults, metrics = self.run(point, trial)
                results.append(TrialResult.of(point, trial, faults, metrics, time.perf_counter() - start))
                continue
            faults = draw_trial_faults(self.memory, self.config, point, trial)
            if faults.count == 0 and self.config.skip_fault_free:
                results.append(TrialResult.of(point, trial, faults, dict(self.golden_metrics),
                                              time.perf_counter() - start))
                continue
            pending.append((point, trial, faults))
            if len(pending) == self.batch:
                results += self._run_batch(pending)
                pending = []
        if pending:
            results += self._run_batch(pending)
        return results

    def _run_batch(self, pending: list[tuple[float, int, F.Faults]]) -> list[TrialResult]:
        start = time.perf_counter()
        assert self.fast is not None
        all_logits = self.fast.batched_logits([f for _, _, f in pending], use_cuts=self.config.shortcut)
        seconds = (time.perf_counter() - start) / len(pending)
        return [TrialResult.of(point, trial, faults, trial_metrics(logits, self.golden), seconds)
                for (point, trial, faults), logits in zip(pending, all_logits)]


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
                                layers=config.layers)
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
    """Trials per point: fixed, or Leveugle's size for the fault space."""
    if config.trials is not None:
        return config.trials
    return leveugle_sample_size(memory.total_bits(), config.margin, config.confidence)


def ci_narrow_enough(values: Sequence[float], config: CampaignConfig) -> bool:
    if config.trials is not None or len(values) < config.min_trials:
        return False
    _, _, (low, high) = mean_ci(values, config.confidence)
    return (high - low) / 2 <= config.margin


def run_campaign(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 config: CampaignConfig, out_dir: str | Path, *,
                 record: dict[str, Any] | None = None, progress: bool = True,
                 runner: TrialRunner | None = None) -> dict[str, Any]:
    """Run (or resume) a campaign into ``out_dir``; returns the summary.

    ``record`` is extra configuration (model path, data name) stored in the
    summary and made part of the campaign's identity.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output folder {out}: {exc.strerror}") from None
    if not _writable(out):
        raise ValueError(f"output folder {out} is not writable")
    if runner is None and config.parallel:  # the driver only needs the memory map and golden
        runner = prepare(model, inputs, labels, replace(config, shortcut=False, batch_trials=1))
    runner = runner or prepare(model, inputs, labels, config)
    db = open_db(out, config, record)
    budget = trial_budget(config, runner.memory)
    from ftcnn import distributed
    try:
        with distributed.executor(model, inputs, labels, config, runner) as pool:
            _run_points(pool, db, config, budget, progress)
        summary = summarize(db, config, runner.golden.accuracy, record, budget)
    finally:
        db.close()
    write_summary(out, summary)
    return summary


def _writable(folder: Path) -> bool:
    try:
        with open(folder / ".ftcnn-write-test", "w"):
            pass
        (folder / ".ftcnn-write-test").unlink()
        return True
    except OSError:
        return False


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _run_points(pool: Executor, db: sqlite3.Connection, config: CampaignConfig, budget: int,
                progress: bool) -> None:
    """Hand out the missing trials and commit each result as it arrives.

    A fixed budget sends all trials at once. ``--trials auto`` goes in rounds
    of ``pool.round_size`` trials and applies the early stop in trial order,
    so the trials that count are those of a one-at-a-time run (results of a
    round past the stop point are stored but not summarised).
    """
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
    done = done_trials(db, point)
    accuracies: list[float] = []
    trial = 0
    with _progress(budget, f"{config.by} {point:g}", progress) as bar:
        while trial < budget:
            if trial not in done:
                todo = [t for t in range(trial, budget) if t not in done][:pool.round_size]
                for result in pool.map([(point, t) for t in todo]):
                    commit_result(db, result)
                    done[result.trial] = result.metrics
            accuracies.append(done[trial]["accuracy"])
            trial += 1
            bar.update(1)
            if ci_narrow_enough(accuracies, config):
                break


def summarize(db: sqlite3.Connection, config: CampaignConfig, golden_accuracy: float,
              record: dict[str, Any] | None, budget: int) -> dict[str, Any]:
    """Per-point statistics from the committed trials (the same whatever the
    order in which they were computed)."""
    rows = []
    for point in config.points:
        done = done_trials(db, point)
        trials = [done[t] for t in sorted(done) if t < budget]
        if config.trials is None:  # auto: the early stop decides how many count
            kept = []
            for t in trials:
                kept.append(t)
                if ci_narrow_enough([k["accuracy"] for k in kept], config):
                    break
            trials = kept
        row: dict[str, Any] = {config.by: point, "trials": len(trials)}
        if config.by == "count":
            row["ber"] = None
        acc_mean, acc_std, acc_ci = mean_ci([t["accuracy"] for t in trials], config.confidence)
        # accuracy is a share: clip the t-interval to [0, 1] rather than report 104%
        acc_ci = (max(0.0, acc_ci[0]), min(1.0, acc_ci[1]))
        row.update(accuracy_mean=acc_mean, accuracy_std=acc_std, accuracy_ci95=list(acc_ci))
        for name in ("top5", "sdc", "critical_sdc", "due", "n_faults"):
            values = [t[name] for t in trials if t[name] is not None and not _isnan(t[name])]
            row[f"{name}_mean"] = float(np.mean(values)) if values else None
        row["sdc_ci95"] = list(mean_ci([t["sdc"] for t in trials], config.confidence)[2])
        rows.append(row)
    return {
        "golden_accuracy": golden_accuracy,
        "seed": config.seed,
        "config": {**asdict(config), **(record or {})},
        "versions": versions(),
        "results": rows,
    }


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def versions() -> dict[str, str]:
    import ftcnn
    return {"ftcnn": ftcnn.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


CSV_FIELDS = ("ber", "count", "trials", "accuracy_mean", "accuracy_std", "accuracy_ci95_low",
              "accuracy_ci95_high", "top5_mean", "sdc_mean", "critical_sdc_mean", "due_mean",
              "n_faults_mean")


def summary_csv(summary: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in summary["results"]:
        flat = {**row, "accuracy_ci95_low": row["accuracy_ci95"][0],
                "accuracy_ci95_high": row["accuracy_ci95"][1]}
        writer.writerow(flat)
    return buf.getvalue()


def write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    write_text(out / "summary.json", json.dumps(summary, indent=2, default=_json_default))
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
    table = Table(title=f"fault campaign (golden accuracy {summary['golden_accuracy']:.2%})")
    for col in (by, "trials", "accuracy", "95% CI", "SDC", "critical SDC", "DUE", "faults/trial"):
        table.add_column(col, justify="right")
    for r in summary["results"]:
        low, high = r["accuracy_ci95"]
        table.add_row(f"{r[by]:g}", str(r["trials"]), f"{r['accuracy_mean']:.2%}",
                      f"[{low:.2%}, {high:.2%}]", f"{r['sdc_mean']:.2%}", f"{r['critical_sdc_mean']:.2%}",
                      f"{r['due_mean']:.2%}", f"{r['n_faults_mean']:.2f}")
    return table

