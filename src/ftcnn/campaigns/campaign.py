"""Statistical fault-injection campaigns (design §2): statistics, stopping, orchestration.

A campaign runs trials (``ftcnn.campaigns.trials``: configuration, seeded faults, the
trial runner) at each fault rate or count, through an executor
(``ftcnn.campaigns.distributed``: this process, worker processes or Ray), commits each
result as it arrives (``ftcnn.campaigns.store``: SQLite, resume, summaries), and decides
how many trials each point needs through its stopping rule (``ftcnn.campaigns.stopping``:
a fixed budget, the betting confidence sequence's stop, ``--trials auto``, or the
stratified design, ``--precision``). Trials run on any fault space
(``ftcnn.injection.fault_space``: parameters, activations) through one runner.

Layering: trials < store, distributed < stopping < campaign. The names below that live in
``trials`` and ``store`` stay importable from here for callers of the
campaign API; code inside the package imports them from where they live.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ftcnn import files, progress as progress_mod, readback
from ftcnn.campaigns import combined, distributed, stopping
from ftcnn.injection import faults as F
from ftcnn.campaigns.distributed import Executor
from ftcnn.injection.fault_space import FaultSpace
from ftcnn.campaigns.stopping import SAMPLE_TRIALS, auto_stop, expected_time, precision_stop, trial_budget
from ftcnn.campaigns.store import (CSV_FIELDS, DB_NAME, IDENTITY_FORMAT, architecture, ci_level, commit_result,
                         done_strata_trials, done_trials, format_table, identity_differences, open_db,
                         run_identity, stored_identity, summary_csv, versions, write_summary, write_text)
from ftcnn.campaigns.trials import (EXECUTION_FIELDS, PRECISION_INPUTS_PER_TRIAL, SITES_KEPT, CampaignConfig, Runner,
                          TrialResult, TrialRunner, check_input_shape, draw_trial_faults, predict, prepare,
                          stack_dataset, trial_rng)

__all__ = [
    # this module's own
    "memory_report", "run_campaign", "summarize",
    # the stopping rules' (ftcnn.campaigns.stopping), for callers of the campaign API
    "SAMPLE_TRIALS", "auto_stop", "expected_time", "precision_stop", "trial_budget",
    # re-exported for callers of the campaign API (they live in ftcnn.campaigns.trials and ftcnn.campaigns.store)
    "EXECUTION_FIELDS", "PRECISION_INPUTS_PER_TRIAL", "SITES_KEPT", "CampaignConfig", "Runner", "TrialResult",
    "TrialRunner", "check_input_shape",
    "draw_trial_faults", "predict", "prepare", "stack_dataset", "trial_rng",
    "CSV_FIELDS", "DB_NAME", "IDENTITY_FORMAT", "architecture", "ci_level", "commit_result",
    "done_strata_trials", "done_trials", "format_table", "identity_differences", "open_db", "run_identity",
    "stored_identity", "summary_csv", "versions", "write_summary", "write_text",
]


def run_campaign(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 config: CampaignConfig, out_dir: str | Path, *,
                 record: dict[str, Any] | None = None, progress: bool = True,
                 runner: Runner | None = None,
                 digests: tuple[str, str] | None = None,
                 announce: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a campaign into ``out_dir``; returns the summary.

    The folder's identity is the content (``run_identity``: digests of the
    model's tensors and of ``inputs``/``labels``, the architecture and the
    configuration); resuming with any difference is refused. ``record`` is
    information (model path, data name) stored in the summary, not identity.
    ``digests`` (model, data) spare recomputing them when the caller has them.
    ``announce``: called with one line, before the trials, saying what they will cost
    (:func:`expected_time`, from the timed set-up); numbers are not touched.
    """
    config = config.for_model(model)  # include_bn as it applies to this model (recorded, identity)
    out = Path(out_dir)
    files.make_folder(out)
    if not _writable(out):
        raise ValueError(f"output folder {out} is not writable")
    # digests of the model as given: before prepare() rounds a copy to the storage format
    model_digest, data_digest = digests or (None, None)
    identity = run_identity(model, inputs, labels, config, model_digest=model_digest, data_digest=data_digest)
    db = open_db(out, identity, config.points)  # every stored row checked: the file is untrusted
    try:
        finished = _finished_summary(out, db, config, identity, record) if runner is None else None
        if finished is not None:  # resuming a finished run costs its identity check, nothing more
            if announce is not None:
                trials = sum(row.get("trials", 0) for row in finished.get("results", []))
                announce(f"resumed: all {trials} trials were already committed in {out / DB_NAME}; "
                         "its summary is returned, nothing runs")
            return finished
        setup = None  # seconds of the set-up (its golden inference included), when timed here
        if runner is None and config.parallel:  # the driver only needs the memory map and golden
            runner, setup = progress_mod.timed(combined.campaign_runner, model, inputs, labels,
                                               replace(config, shortcut=False, batch_trials=1))
        with distributed.using_threads(config.threads if not config.parallel else None):
            # trials.prepare for parameter faults, activations.prepare for activation faults
            if runner is None:
                runner, setup = progress_mod.timed(combined.campaign_runner, model, inputs, labels, config)
            budget = trial_budget(config, runner.space)
            if announce is not None and setup is not None:
                done = [done_trials(db, p) for p in config.points]
                found = sum(len(d) for d in done)
                if found:  # a resumed run says what it found before what is left costs
                    announce(f"resumed: {found} trials found committed in {out / DB_NAME}; they are not run again")
                rates = None if config.parallel else _timed_sample(db, config, runner, budget, done)
                announce(expected_time(config, budget, done, setup, len(inputs), rates))
            threads = torch.get_num_threads()
            with distributed.executor(model, inputs, labels, config, runner) as pool:
                _run_points(pool, db, config, budget, progress, runner, announce)
        summary = summarize(db, config, runner.golden.accuracy, record, budget, runner=runner)
        summary["memory"] = memory_report(runner.space.model, runner.space, config)
        # how it ran (not identity): workers, the torch threads trials ran with per process, and why
        summary["execution"] = distributed.execution_record(config, threads, pool)
    finally:
        db.close()
    summary["digests"] = {"model": identity["model"], "data": identity["data"]}
    write_summary(out, summary)
    return summary


def _timed_sample(db: sqlite3.Connection, config: CampaignConfig, runner: Runner, budget: int,
                  done: Sequence[Iterable[int]]) -> dict[float, tuple[int, float]]:
    """Per point, (trials timed, seconds per trial) over the trials its stopping rule times first
    (``stopping.StoppingRule.sample_tasks``: the first ``SAMPLE_TRIALS`` still to run; ``--precision``:
    the first pilot trial of each sampled stratum), committed like any trial: a trial is a pure
    function of (seed, point, trial), so running these first changes no number.
    Why: the set-up's time (tracing, caches, the golden run) put a fixed campaign's estimate at
    6-14x its actual time (issue 23)."""
    rule = stopping.rule(config)
    rates: dict[float, tuple[int, float]] = {}
    for point, committed in zip(config.points, done):
        tasks = rule.sample_tasks(db, point, budget, committed, runner)
        if tasks:
            results, seconds = progress_mod.timed(runner.run_many, tasks)
            for result in results:
                commit_result(db, result)
            rates[point] = (len(tasks), seconds / len(tasks))
    return rates


def _finished_summary(out: Path, db: sqlite3.Connection, config: CampaignConfig, identity: dict[str, Any],
                      record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The stored summary of a run whose every trial is committed, when it was written
    from this same identity, configuration and record; else None (run and summarise).

    Without it, resuming a finished campaign re-prepared everything (golden inference,
    the shortcut's trace and caches): ~40 s per finished variant of a ``compare``
    (issue 14). Only fixed trial budgets qualify (``stopping.StoppingRule.finished``): an auto
    or --precision stop needs the fault space to know its budget."""
    if not stopping.rule(config).finished(db):
        return None
    if not (out / "summary.json").is_file():
        return None
    stored = readback.read_json(out / "summary.json", readback.CAMPAIGN_SUMMARY)  # a malformed one is refused
    expected = json.loads(files.dumps_json({**config.recorded(), **(record or {})}, note=False))
    if not isinstance(stored, dict) or stored.get("config") != expected or \
            stored.get("digests") != {"model": identity["model"], "data": identity["data"]}:
        return None
    return stored


def memory_report(model: nn.Module, memory: FaultSpace | F.ParameterMemory, config: CampaignConfig
                  ) -> dict[str, Any]:
    """What the campaign attacked and what it left alone: the bits faults could
    hit, whether the protection values were among them (``attack_protection``),
    how many there were, and every parameter and buffer no fault hits
    (``faults.memory_coverage``), by name and in bits. ``memory``: the fault space (or a
    parameter memory): its ``total_bits()`` and ``stored`` tensors."""
    spared = getattr(memory, "spared", frozenset())
    targets = [name for name in memory.stored if name not in spared]
    bits = memory.total_bits() - sum(memory.stored[n].numel() * memory.stored[n].element_size() * 8 for n in spared)
    return {"attack_protection": config.attack_protection, "fault_target_bits": bits,
            **F.memory_coverage(model, targets)}


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (a name of our own: another
    process starting on the same folder must not see our probe vanish)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ftcnn-write-test."):
            pass
        return True
    except OSError:
        return False


def _run_points(pool: Executor, db: sqlite3.Connection, config: CampaignConfig, budget: int,
                progress: bool, runner: Runner | None = None,
                announce: Callable[[str], Any] | None = None) -> None:
    """Hand out the missing trials and commit each result as it arrives, as the campaign's
    stopping rule says (``stopping``: a fixed budget sends all trials at once; ``--trials auto``
    goes in rounds of ``pool.round_size`` in trial order; ``--precision`` asks for its pilot, then
    its final sample)."""
    stopping.rule(config).run(pool, db, budget, progress, runner, announce)


def summarize(db: sqlite3.Connection, config: CampaignConfig, golden_accuracy: float,
              record: dict[str, Any] | None, budget: int, *,
              runner: Runner | None = None) -> dict[str, Any]:
    """Per-point statistics from the committed trials (the same whatever the
    order in which they were computed): each row is the stopping rule's (``stopping``).

    CIs are at ``config.confidence`` (the ``confidence`` field) and each row names
    its ``ci_method``: with ``--trials auto`` the betting confidence sequence at the
    sequential stop (the only interval valid there; the SDC one too); with a fixed
    number of trials the betting interval for that size (``metrics.bounded_ci``, valid
    for outcomes in [0, 1] at every size) below ``metrics.BOUNDED_CI_BELOW`` trials or
    when the accuracies or SDCs are all equal (a zero-width t-interval), else the
    Student-t interval (why the threshold: ``metrics.BOUNDED_CI_BELOW``); with
    ``--precision`` the stratified t-interval. One trial gets [0, 1]: it says nothing at 95%.
    Shares are clipped to [0, 1].
    """
    rule = stopping.rule(config)
    rows = [rule.row(db, point, budget, runner) for point in config.points]
    methods = {r["ci_method"] for r in rows}
    return {
        "golden_accuracy": golden_accuracy,
        "seed": config.seed,
        "confidence": config.confidence,
        "ci_method": methods.pop() if len(methods) == 1 else "mixed (see each result)",
        # the fault-target fields only when not at their defaults (parameter summaries unchanged)
        "config": {**config.recorded(), **(record or {})},
        "versions": versions(),
        "results": rows,
    }
