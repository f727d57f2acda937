"""Statistical fault-injection campaigns (design §2): statistics, stopping, orchestration.

A campaign runs trials (``ftcnn.trials``: configuration, seeded faults, the
trial runner) at each fault rate or count, through an executor
(``ftcnn.distributed``: this process, worker processes or Ray), commits each
result as it arrives (``ftcnn.store``: SQLite, resume, summaries), and decides
how many trials each point needs: a fixed budget, the betting confidence
sequence's stop (``--trials auto``) or the stratified design
(``--precision``, ``ftcnn.strata``).

Layering: trials < store, distributed < campaign. The names below that live in
``trials`` and ``store`` stay importable from here for callers of the
campaign API; code inside the package imports them from where they live.
"""

from __future__ import annotations

import itertools
import json
import math
import sqlite3
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ftcnn import activations, distributed, files, progress as progress_mod, readback, strata
from ftcnn import faults as F
from ftcnn.distributed import Executor
from ftcnn.metrics import (CI_BETTING, CI_BETTING_FIXED, CI_STUDENT_T, SequentialEstimate, betting_ci, bounded_ci,
                           leveugle_sample_size, mean_ci, needs_bounded_ci, sequential_mean)
from ftcnn.store import (CSV_FIELDS, DB_NAME, IDENTITY_FORMAT, architecture, ci_level, commit_result,
                         done_strata_trials, done_trials, format_table, identity_differences, open_db,
                         run_identity, stored_identity, summary_csv, versions, write_summary, write_text)
from ftcnn.trials import (EXECUTION_FIELDS, PRECISION_INPUTS_PER_TRIAL, SITES_KEPT, CampaignConfig, TrialResult,
                          TrialRunner, check_input_shape, draw_trial_faults, predict, prepare, stack_dataset, trial_rng)

__all__ = [
    # this module's own
    "auto_stop", "expected_time", "memory_report", "precision_stop", "run_campaign", "summarize", "trial_budget",
    # re-exported for callers of the campaign API (they live in ftcnn.trials and ftcnn.store)
    "EXECUTION_FIELDS", "PRECISION_INPUTS_PER_TRIAL", "SITES_KEPT", "CampaignConfig", "TrialResult", "TrialRunner",
    "check_input_shape",
    "draw_trial_faults", "predict", "prepare", "stack_dataset", "trial_rng",
    "CSV_FIELDS", "DB_NAME", "IDENTITY_FORMAT", "architecture", "ci_level", "commit_result",
    "done_strata_trials", "done_trials", "format_table", "identity_differences", "open_db", "run_identity",
    "stored_identity", "summary_csv", "versions", "write_summary", "write_text",
]


def trial_budget(config: CampaignConfig, memory: F.ParameterMemory) -> int:
    """Trials per point: fixed, or (auto) the cap of the sequential stop: Leveugle's size
    for the fault space (the worst case, p = 1/2, under a normal approximation)."""
    if config.precision is not None:  # time to precision: the same cap, at the precision asked
        return leveugle_sample_size(memory.total_bits(), config.precision, config.confidence)
    if config.trials is not None:
        return config.trials
    return leveugle_sample_size(memory.total_bits(), config.ci_half_width, config.confidence)


def auto_stop(accuracies: Iterable[float], config: CampaignConfig, budget: int) -> SequentialEstimate:
    """The ``--trials auto`` stop: per-trial accuracies in trial order until the betting
    confidence sequence's half-width is <= ``config.ci_half_width`` (``metrics.sequential_mean``).

    One function decides the stop both while running and when summarising (a resumed
    run recomputes it from its committed trials), and it reads ``accuracies`` lazily.
    It replaces "Student-t half-width <= margin after 10 trials", which is not valid
    when stopped on the data and stops on 10 identical benign trials (std 0): measured
    on LeNet-5/digits at BER 3e-6, its CIs covered a 2,000-trial reference in 28% of
    40 runs (nominal 95%); tests/test_sequential.py measures both.
    """
    return sequential_mean(accuracies, config.ci_half_width, config.confidence,
                           min_trials=config.min_trials, max_trials=budget)


def run_campaign(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 config: CampaignConfig, out_dir: str | Path, *,
                 record: dict[str, Any] | None = None, progress: bool = True,
                 runner: TrialRunner | None = None,
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
            runner, setup = progress_mod.timed(activations.campaign_runner, model, inputs, labels,
                                               replace(config, shortcut=False, batch_trials=1))
        with distributed.using_threads(config.threads if not config.parallel else None):
            # trials.prepare for parameter faults, activations.prepare for activation faults
            if runner is None:
                runner, setup = progress_mod.timed(activations.campaign_runner, model, inputs, labels, config)
            budget = trial_budget(config, runner.memory)
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
        summary["memory"] = memory_report(runner.model, runner.memory, config)
        # how it ran (not identity): workers, the torch threads trials ran with per process, and why
        summary["execution"] = distributed.execution_record(config, threads, pool)
    finally:
        db.close()
    summary["digests"] = {"model": identity["model"], "data": identity["data"]}
    write_summary(out, summary)
    return summary


SAMPLE_TRIALS = 3  # trials per point a campaign times before saying its cost (committed, not wasted)


def _timed_sample(db: sqlite3.Connection, config: CampaignConfig, runner: TrialRunner, budget: int,
                  done: Sequence[Iterable[int]]) -> dict[float, tuple[int, float]]:
    """Per point, (trials timed, seconds per trial) over its first ``SAMPLE_TRIALS`` trials still to
    run (``--precision``: the first pilot trial of each sampled stratum), committed like any trial:
    a trial is a pure function of (seed, point, trial), so running these first changes no number.
    Why: the set-up's time (tracing, caches, the golden run) put a fixed campaign's estimate at
    6-14x its actual time (issue 23)."""
    rates: dict[float, tuple[int, float]] = {}
    for point, committed in zip(config.points, done):
        if config.precision is not None:
            weights = strata.weights(strata.Layout.of(runner.memory, config.bits), point)
            stored = done_strata_trials(db, point)
            tasks: list[tuple[Any, ...]] = [(point, 0, h) for h, w in enumerate(weights)
                                            if w > 0 and h != strata.KNOWN and (h, 0) not in stored]
        else:
            tasks = [(point, t) for t in range(budget) if t not in committed][:SAMPLE_TRIALS]
        if tasks:
            results, seconds = progress_mod.timed(runner.run_many, tasks)
            for result in results:
                commit_result(db, result)
            rates[point] = (len(tasks), seconds / len(tasks))
    return rates


def expected_time(config: CampaignConfig, budget: int, done: Sequence[Iterable[int]], setup: float,
                  inputs: int, rates: Mapping[float, tuple[int, float]] | None = None) -> str:
    """What a campaign's trials will cost, said up front (issue 14). With ``rates`` (per point, the
    trials :func:`_timed_sample` ran and their seconds each): a fixed budget's trials left x the
    seconds per trial measured at their point; an auto or --precision stop's range, from the
    fewest trials it can take to its cap, at those rates (the trials it expects follow its pilot,
    ``progress.StopEstimate``). Without (workers run the trials): the set-up's time (one golden
    inference over the inputs, plus preparing the model: more than one trial's forward) x the
    trials still to run, an upper bound on this machine. ``done``: the committed trial indices
    per point (before the sample)."""
    capped = config.trials is None or config.precision is not None
    stop = "--precision" if config.precision is not None else "--trials auto"
    if capped:  # an auto or --precision stop: only the cap is known
        todo, cap = len(config.points) * budget, f" (the cap of {stop})"
    else:
        todo, cap = sum(budget - len([t for t in d if t < budget]) for d in done), ""
    per_trial = min(config.inputs_per_trial or inputs, inputs)  # a block of the inputs per trial
    share = per_trial / max(inputs, 1)
    points = len(config.points)
    of = f"{per_trial} inputs" + (f" (a block of {inputs})" if per_trial < inputs else "")
    after = "; the trials expected follow the pilot" if capped else ""
    if rates:
        timed = {p: rates.get(p, (0, 0.0)) for p in config.points}
        sampled = sum(n for n, _ in timed.values())
        mean = sum(n * rate for n, rate in timed.values()) / max(sampled, 1)
        measured = f"{sampled} of them timed first ({mean:.2g} s per trial; each point at its own rate)"
        if capped:  # from the fewest trials the stop can take to its cap
            least = {p: min(budget, _fewest_trials(config, n)) for p, (n, _) in timed.items()}
            low = sum(max(0, least[p] - n) * rate for p, (n, rate) in timed.items())
            high = sum(max(0, budget - n) * rate for p, (n, rate) in timed.items())
            return progress_mod.expected_range(
                low, high, "trials",
                f"{points} {config.by} point{'s' if points != 1 else ''} x {min(least.values())} to {budget} trials "
                f"(the fewest a stop takes, to the cap of {stop}) of {of}: {measured}{after}")
        left = [budget - len([t for t in d if t < budget]) - timed[p][0] for p, d in zip(config.points, done)]
        return progress_mod.expected(
            sum(n * rate for n, (_, rate) in zip(left, timed.values())), "trials",
            f"{points} {config.by} point{'s' if points != 1 else ''} x {budget} trials of {of}: {todo} to run, "
            f"{measured}", bound=False)
    return progress_mod.expected(
        setup * share * todo, "trials",
        f"{points} {config.by} point{'s' if points != 1 else ''} x {'at most ' if capped else ''}{budget} "
        f"trials{cap} of {of}: {todo} to run, from the timed set-up ({setup:.2g} s, golden "
        f"inference included); shortcuts and early stops cut it{after}")


def _fewest_trials(config: CampaignConfig, sampled: int) -> int:
    """About the fewest trials a stop takes at one point: ``--precision``, its pilot and least final
    sample in each sampled stratum (``sampled``: :func:`_timed_sample` ran one per stratum);
    ``--trials auto``, what identical outcomes need (``progress.auto_least_trials``)."""
    if config.precision is not None:
        return (strata.PILOT + strata.MIN_FINAL) * sampled
    return progress_mod.auto_least_trials(config.ci_half_width, config.confidence, config.min_trials)


def _finished_summary(out: Path, db: sqlite3.Connection, config: CampaignConfig, identity: dict[str, Any],
                      record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The stored summary of a run whose every trial is committed, when it was written
    from this same identity, configuration and record; else None (run and summarise).

    Without it, resuming a finished campaign re-prepared everything (golden inference,
    the shortcut's trace and caches): ~40 s per finished variant of a ``compare``
    (issue 14). Only fixed trial budgets qualify: an auto or --precision stop needs
    the fault memory to know its budget."""
    if config.trials is None or config.precision is not None:
        return None
    if any(len([t for t in done_trials(db, p) if t < config.trials]) < config.trials for p in config.points):
        return None
    if not (out / "summary.json").is_file():
        return None
    stored = readback.read_json(out / "summary.json", readback.CAMPAIGN_SUMMARY)  # a malformed one is refused
    expected = json.loads(files.dumps_json({**config.recorded(), **(record or {})}, note=False))
    if not isinstance(stored, dict) or stored.get("config") != expected or \
            stored.get("digests") != {"model": identity["model"], "data": identity["data"]}:
        return None
    return stored


def memory_report(model: nn.Module, memory: F.ParameterMemory, config: CampaignConfig) -> dict[str, Any]:
    """What the campaign attacked and what it left alone: the bits faults could
    hit, whether the protection values were among them (``attack_protection``),
    how many there were, and every parameter and buffer no fault hits
    (``faults.memory_coverage``), by name and in bits."""
    return {"attack_protection": config.attack_protection, "fault_target_bits": memory.total_bits(),
            **F.memory_coverage(model, memory.stored)}


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (a name of our own: another
    process starting on the same folder must not see our probe vanish)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ftcnn-write-test."):
            pass
        return True
    except OSError:
        return False


def _progress(total: int, desc: str, enabled: bool):
    return progress_mod.bar(total=total, desc=desc, enabled=enabled)  # plain periodic lines when not a terminal


def _run_points(pool: Executor, db: sqlite3.Connection, config: CampaignConfig, budget: int,
                progress: bool, runner: TrialRunner | None = None,
                announce: Callable[[str], Any] | None = None) -> None:
    """Hand out the missing trials and commit each result as it arrives.

    A fixed budget sends all trials at once. ``--trials auto`` goes in rounds
    of ``pool.round_size`` trials and applies the early stop in trial order,
    so the trials that count are those of a one-at-a-time run (results of a
    round past the stop point are stored but not summarised).
    """
    if config.precision is not None:
        for point in config.points:
            assert runner is not None, "a --precision campaign needs the trial runner"
            _run_point_precision(pool, db, config, point, budget, progress, runner, announce)
        return
    if config.trials is not None:
        done = {p: done_trials(db, p) for p in config.points}
        # read as the executor asks: up to a million trials per point are never listed up front
        todo = ((p, t) for p in config.points for t in range(budget) if t not in done[p])
        total = budget * len(config.points)
        with _progress(total, f"{len(config.points)} {config.by} point(s)", progress) as bar:
            bar.update(sum(1 for p in config.points for t in done[p] if 0 <= t < budget))
            for result in pool.map(todo):
                commit_result(db, result)
                bar.update(1)
        return
    for point in config.points:
        _run_point_auto(pool, db, config, point, budget, progress, announce)


def _run_point_auto(pool: Executor, db: sqlite3.Connection, config: CampaignConfig, point: float,
                    budget: int, progress: bool, announce: Callable[[str], Any] | None = None) -> None:
    """Feed ``auto_stop`` the point's trials in order, running missing ones as it asks; the bar
    counts toward the stop expected from the spread so far (``progress.StopEstimate``)."""
    done = done_trials(db, point)
    label = f"{config.by} {point:g}"
    with _progress(budget, f"{label} (at most {budget})", progress) as bar:
        estimate = progress_mod.StopEstimate(bar, budget, label, announce)
        estimate.pilot(progress_mod.auto_pilot(config.ci_half_width, config.confidence))
        spread = progress_mod.RunningSpread()

        def accuracies() -> Iterator[float]:
            for trial in range(budget):
                if trial not in done:
                    todo = [t for t in range(trial, budget) if t not in done][:pool.round_size]
                    for result in pool.map([(point, t) for t in todo]):
                        commit_result(db, result)
                        done[result.trial] = result.metrics
                    estimate.ran_trials(len(todo))
                accuracy = done[trial]["accuracy"]
                spread.add(accuracy)
                estimate.update(progress_mod.auto_expected_trials(
                    spread.n, spread.variance, config.ci_half_width, config.confidence, budget,
                    config.min_trials), spread.n)
                bar.update(1)
                yield accuracy

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
                         budget: int, progress: bool, runner: TrialRunner,
                         announce: Callable[[str], Any] | None = None) -> None:
    """Run the stratified trials ``precision_stop`` asks for, committing each as it arrives. The
    bar counts to the pilot, then to the pilot plus the final sizes its spread fixed (the second
    ask), the cap named apart (``progress.StopEstimate``)."""
    done = done_strata_trials(db, point)
    label = f"{config.by} {point:g} (+-{config.precision:g})"
    with _progress(budget, f"{label} (at most {budget})", progress) as bar:
        estimate = progress_mod.StopEstimate(bar, budget, label, announce)
        fetched: list[int] = []  # trials asked per call: the pilot's, then the final sample's

        def fetch(asked: list[tuple[int, int]]) -> list[float]:
            if not fetched:
                estimate.pilot(len(asked))
            else:  # the final sample: its size is the design's, from the pilot's spread
                estimate.update(sum(fetched) + len(asked), sum(fetched))
            fetched.append(len(asked))
            missing = [(point, i, h) for h, i in asked if (h, i) not in done]
            for result in pool.map(missing):
                commit_result(db, result)
                done[(result.stratum, result.trial)] = result.metrics
            estimate.ran_trials(len(missing))
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
    sensitivity = getattr(runner.memory, "catastrophic", None)  # what the MSB strata count (strata.Sensitivity)
    if sensitivity is not None:
        row["catastrophic"] = sensitivity.record()
    return row


def summarize(db: sqlite3.Connection, config: CampaignConfig, golden_accuracy: float,
              record: dict[str, Any] | None, budget: int, *,
              runner: TrialRunner | None = None) -> dict[str, Any]:
    """Per-point statistics from the committed trials (the same whatever the
    order in which they were computed).

    CIs are at ``config.confidence`` (the ``confidence`` field) and each row names
    its ``ci_method``: with ``--trials auto`` the betting confidence sequence at the
    sequential stop (the only interval valid there; the SDC one too); with a fixed
    number of trials the betting interval for that size (``metrics.bounded_ci``, valid
    for outcomes in [0, 1] at every size) below ``metrics.BOUNDED_CI_BELOW`` trials or
    when the accuracies or SDCs are all equal (a zero-width t-interval), else the
    Student-t interval (why the threshold: ``metrics.BOUNDED_CI_BELOW``). One trial
    gets [0, 1]: it says nothing at 95%. Shares are clipped to [0, 1].
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
        elif needs_bounded_ci(accuracies) or needs_bounded_ci(sdcs):  # one method for the row's intervals
            method = CI_BETTING_FIXED
            acc_ci, sdc_ci = bounded_ci(accuracies, config.confidence), bounded_ci(sdcs, config.confidence)
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
        # the fault-target fields only when not at their defaults (parameter summaries unchanged)
        "config": {**config.recorded(), **(record or {})},
        "versions": versions(),
        "results": rows,
    }


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _clip01(ci: tuple[float, float]) -> list[float]:
    """A share's interval inside [0, 1] (a t-interval can reach 104%)."""
    return [max(0.0, ci[0]), min(1.0, ci[1])]
