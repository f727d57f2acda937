"""Choose a protection automatically: a search over design §4's mechanisms under a budget.

``protect(model, x_train, y_train, ber=1e-4, max_macs=1.15)`` builds every
candidate protection (none; range restriction, zero or clamp, with and
without a margin; parameter-side weight checks when ``ftcnn.hardening``
offers them, alone and with restriction; duplication of the channels with
the highest exposure plus restriction; full TMR as the baseline), measures
each one's cost with ``ftcnn.cost`` (MACs including corrections and checks;
latency at batch 128 on one thread, all models timed interleaved), drops
those over budget, and runs the same fault campaign on each survivor
(float32 bit flips in the parameters at ``ber``, every value a protection
adds attacked too). It picks the highest accuracy under faults; candidates
within ``tie`` of the best count as tied and the cheapest of them (MACs)
wins.

No tuning on test: the campaigns run on a stratified validation split
carved from the training data (``ftcnn.splits.validation_split``); the
gain scores and the calibration ranges come from the rest of it (the fit
split). The test split enters only in :func:`evaluate_test`, after the
choice, which ``protect_run`` (the ``ftcnn protect`` command) calls.

Exposure (issue 12): duplicating a channel protects its stored values, and
a random bit flip lands in a channel in proportion to how many values it
stores, so duplication ranks channels by vulnerability score x stored
values per channel (the per-value bit count is the same everywhere, so it
does not change the ranking), and fills the MAC budget left after the
restriction greedily across the whole network (``harden.select_by_budget``
ranks by score per extra MAC). The measured finding this module is built
around (experiments/results/hardening.md): on LeNet-5 at BER 1e-4
restriction alone keeps 94.6%, duplicating 10-20% of every layer adds
nothing measurable without it and under a point with it, at 1.2-1.4x MACs.
"""

from __future__ import annotations

import inspect
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ftcnn import campaign, checkpoint, cost, data as data_mod, files, hardening, progress, train, vulnerability
from ftcnn.seeds import role_seed, role_seeds
from ftcnn.splits import calibration_subset, validation_split

# (restriction mode, range margin) pairs tried; margin 0 profiles tight ranges
# on the fit split, margin 0.1 widens them by 10% of their width.
RESTRICTS: tuple[tuple[str, float], ...] = (("zero", 0.0), ("zero", 0.1), ("clamp", 0.0), ("clamp", 0.1))
# duplication corrections tried (with restriction); "tmr" needs two copies per
# channel, which the budgets this module targets (<= 1.2x) cannot pay for usefully
CORRECTIONS: tuple[str, ...] = ("min", "range")
# share of the parameters whose layers the cheap restriction candidates restrict
RESTRICT_SHARE = 0.9
# shares of the leftover MAC budget tried for duplication, largest first
BUDGET_SHARES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
LATENCY_BATCH = 128


def weight_checks_available() -> bool:
    """Whether ``harden.harden`` takes ``check_weights`` (parameter-side bounds)."""
    return "check_weights" in inspect.signature(hardening.harden).parameters


@dataclass(frozen=True)
class Candidate:
    """One protection to try: a name, a family and the ``harden`` keywords
    (``None``: the unprotected model). ``duplicate``: the MAC budget is filled
    by the search. ``baseline``: evaluated even over budget (for the front), never chosen then."""

    name: str
    family: str
    settings: dict[str, Any] | None
    duplicate: bool = False
    baseline: bool = False


def _tag(mode: str, margin: float) -> str:
    return f"{mode}_m{margin:g}"


def candidates(restricts: Sequence[tuple[str, float]] = RESTRICTS,
               corrections: Sequence[str] = CORRECTIONS, weight_checks: bool | None = None
               ) -> list[Candidate]:
    """The search space, in a fixed order.

    Example:
        >>> [c.name for c in candidates(restricts=[("zero", 0.1)], corrections=["min"],
        ...                            weight_checks=False)]
        ['none', 'restrict_zero_m0.1', 'dup_min+restrict_zero_m0.1', 'full_tmr']
    """
    checks = weight_checks_available() if weight_checks is None else weight_checks
    out = [Candidate("none", "none", None)]
    for mode, margin in restricts:
        out.append(Candidate(f"restrict_{_tag(mode, margin)}", "restriction",
                             {"ratio": 0.0, "restrict": mode, "range_margin": margin}))
    if checks:
        for check in ("zero", "clamp"):
            out.append(Candidate(f"weights_{check}", "weight check", {"ratio": 0.0, "check_weights": check}))
        for mode, margin in restricts:
            out.append(Candidate(f"weights_zero+restrict_{_tag(mode, margin)}", "weight check + restriction",
                                 {"ratio": 0.0, "check_weights": "zero", "restrict": mode, "range_margin": margin}))
        # restriction where it is cheap: the layers holding 90% of the parameters, fewest
        # restricted values per parameter first (``hardening.restriction_layers``; latency)
        for mode, margin in [(m, g) for m, g in restricts if g > 0]:
            out.append(Candidate(f"weights_zero+restrict_{_tag(mode, margin)}_p{round(RESTRICT_SHARE * 100)}",
                                 "weight check + restriction",
                                 {"ratio": 0.0, "check_weights": "zero", "restrict": mode, "range_margin": margin,
                                  "restrict_share": RESTRICT_SHARE}))
    widened = [(m, g) for m, g in restricts if g > 0] or list(restricts)
    for corr in corrections:
        for mode, margin in widened:
            settings = {"correction": corr, "restrict": mode, "range_margin": margin}
            out.append(Candidate(f"dup_{corr}+restrict_{_tag(mode, margin)}", "duplication + restriction",
                                 settings, duplicate=True))
            if checks:
                out.append(Candidate(f"dup_{corr}+weights_zero+restrict_{_tag(mode, margin)}",
                                     "duplication + weight check + restriction",
                                     {**settings, "check_weights": "zero"}, duplicate=True))
    out.append(Candidate("full_tmr", "full TMR", {"tmr": "full"}, baseline=True))
    return out


def exposure(model: nn.Module, scores: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
    """Expected damage per channel: its vulnerability score x the values it stores
    (weights of the filter/neuron plus its bias).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> exposure(net, {"0": [1.0, 0.5]})["0"].tolist()
        [5.0, 2.5]
    """
    layers = hardening.target_layers(model)
    checked = hardening.check_scores(layers, scores)
    out = {}
    for name, s in checked.items():
        layer = layers[name]
        per_channel = layer.weight[0].numel() + (1 if getattr(layer, "bias", None) is not None else 0)
        out[name] = np.asarray(s, dtype=np.float64) * per_channel
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, accuracy) points: True where no other point is at least as cheap and at
    least as accurate and strictly better in one of them.

    Example:
        >>> pareto_front([(1.0, 0.5), (1.1, 0.9), (1.2, 0.8), (1.0, 0.5)])
        [True, True, False, True]
    """
    flags = []
    for i, (c, a) in enumerate(points):
        dominated = any(cj <= c and aj >= a and (cj < c or aj > a)
                        for j, (cj, aj) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


@dataclass
class ProtectResult:
    """What :func:`protect` found: every candidate's record (JSON-able), the built
    models of those evaluated, the chosen one and why."""

    chosen: str
    reason: str
    records: list[dict[str, Any]]
    models: dict[str, nn.Module]
    config: dict[str, Any]
    test: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.models[self.chosen]

    def record(self, name: str) -> dict[str, Any]:
        return next(r for r in self.records if r["name"] == name)


def check_budget(max_macs: float, max_latency: float | None, ber: float, trials: int) -> None:
    """One-line errors for budgets and campaign settings, before any work."""
    if not (isinstance(max_macs, (int, float)) and math.isfinite(max_macs) and max_macs > 0):
        raise ValueError(f"max MACs ratio must be a finite number > 0 (got {max_macs})")
    if max_latency is not None and not (isinstance(max_latency, (int, float)) and math.isfinite(max_latency)
                                        and max_latency > 0):
        raise ValueError(f"max latency ratio must be a finite number > 0 (got {max_latency})")
    if not (isinstance(ber, (int, float)) and 0 < ber <= 0.1):
        raise ValueError(f"bit error rate must lie in (0, 0.1] (got {ber})")
    if not (isinstance(trials, int) and trials >= 1):
        raise ValueError(f"trials must be an integer >= 1 (got {trials})")


def _layer_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    return cost.macs(model, input_shape)["layer_macs"]


def _macs_at_batch(macs: Mapping[str, int], batch: int) -> float:
    """MACs per input when ``batch`` inputs share one forward: weight checks run once per
    forward whatever the batch (``cost.macs`` counts them at batch 1), the rest per input."""
    checks = macs.get("weight_checks", 0) * hardening.CHECK_OPS
    return macs["macs"] - checks + checks / batch


def _build(model: nn.Module, cand: Candidate, scores: Mapping[str, np.ndarray] | None,
           calibration: torch.Tensor, base_macs: int, max_macs: float, input_shape: tuple[int, ...],
           check_batch: int) -> tuple[nn.Module | None, dict[str, Any]]:
    """The candidate's model and its final settings; for duplication, the largest share of
    the leftover MAC budget that fits (None when nothing fits)."""
    if cand.settings is None:
        return model, {}
    if not cand.duplicate:
        return hardening.harden(model, calibration=calibration, **cand.settings), dict(cand.settings)
    rest = {k: v for k, v in cand.settings.items() if k != "correction"}
    without = hardening.harden(model, ratio=0.0, calibration=calibration, **rest)
    without_macs = cost.macs(without, input_shape)
    slack = max_macs * base_macs - _macs_at_batch(without_macs, check_batch)
    if slack <= 0 or scores is None:
        return None, dict(cand.settings)
    model_layer = _layer_macs(model, input_shape)
    fixed = without_macs["macs"] - model_layer  # restriction and checks, at batch 1 (harden's budget counts so)
    for share in BUDGET_SHARES:
        budget = (fixed + share * slack) / model_layer  # harden's budget: all it adds, at batch 1
        hard = hardening.harden(model, scores, budget=budget, calibration=calibration,
                                 input_shape=input_shape, **cand.settings)
        if hardening.protected(hard) and \
                _macs_at_batch(cost.macs(hard, input_shape), check_batch) <= max_macs * base_macs:
            return hard, {**cand.settings, "budget": budget,
                          "duplicated_channels": sum(len(v) for v in hardening.protected(hard).values())}
    return None, dict(cand.settings)


def _campaign(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bers: Sequence[float], trials: int,
              seed: int, folder: Path, device: str = "cpu", inputs_per_trial: int | None = None) -> dict[str, Any]:
    """A campaign on ``device``; the model is given back where it was."""
    config = campaign.CampaignConfig(bers=tuple(bers), trials=trials, seed=seed, device=device,
                                     inputs_per_trial=inputs_per_trial)
    with train.on_device(model, device):
        return campaign.run_campaign(model, x, y, config, folder, progress=False)


def expected_time(reference: nn.Module, x_val: torch.Tensor, records: Sequence[Mapping[str, Any]], trials: int,
                  device: str = "cpu") -> str:
    """What the validation campaigns will cost, said before they start (issue 14): one timed
    inference of ``reference`` over ``x_val`` x each candidate's cost ratio to it (measured
    latency, else MACs at batch 1) x ``trials``. An upper bound: exact shortcuts cut it."""
    reference.eval()
    with train.on_device(reference, device), torch.inference_mode():
        _, seconds = progress.timed(campaign.predict, reference, x_val.to(device))
    ratios = [max(1.0, r.get("latency_ratio") or r["macs_ratio_b1"]) for r in records]
    return progress.expected(seconds * trials * sum(ratios), "validation campaigns",
                             f"{len(records)} candidates x {trials} trials of {len(x_val)} inputs, from one "
                             f"timed inference ({seconds:.2g} s) x each candidate's cost ratio; shortcuts cut it")


def _point(summary: dict[str, Any], ber: float) -> dict[str, Any]:
    row = next(r for r in summary["results"] if math.isclose(r["ber"], ber))
    return {"accuracy": row["accuracy_mean"], "accuracy_ci": list(row["accuracy_ci"]),
            "trials": row["trials"], "sdc": row["sdc_mean"], "due": row["due_mean"]}


def _choose(records: list[dict[str, Any]], tie: float, ber: float, max_macs: float,
            max_latency: float | None) -> tuple[str, str]:
    eligible = [r for r in records if r["within_budget"] and r["validation"] is not None]
    if not eligible:
        raise ValueError(f"no candidate fits the budget (MACs <= x{max_macs:g}"
                         + (f", latency <= x{max_latency:g}" if max_latency else "") + ")")
    best = max(r["validation"]["accuracy"] for r in eligible)
    tied = [r for r in eligible if r["validation"]["accuracy"] >= best - tie]
    pick = min(tied, key=lambda r: (r["macs_ratio"], -r["validation"]["accuracy"]))
    acc, (lo, hi) = pick["validation"]["accuracy"], pick["validation"]["accuracy_ci"]
    budget = f"MACs <= x{max_macs:g}" + (f" and latency <= x{max_latency:g}" if max_latency else "")
    reason = (f"highest validation accuracy at BER {ber:g} among the {len(eligible)} candidates within "
              f"budget ({budget}): {acc:.2%} [{lo:.2%}, {hi:.2%}] at x{pick['macs_ratio']:.3f} MACs")
    top = max(eligible, key=lambda r: (r["validation"]["accuracy"], -r["macs_ratio"]))
    if top is not pick:
        reason = (f"the cheapest of the candidates within {100 * tie:.2g} point(s) of the most accurate "
                  f"one within budget ({budget}; {len(eligible)} candidates): {acc:.2%} [{lo:.2%}, {hi:.2%}] at "
                  f"validation BER {ber:g} and x{pick['macs_ratio']:.3f} MACs, vs {top['name']} "
                  f"{top['validation']['accuracy']:.2%} at x{top['macs_ratio']:.3f}")
    else:
        rest = sorted((r for r in eligible if r is not pick), key=lambda r: -r["validation"]["accuracy"])
        if rest:
            reason += f"; runner-up: {rest[0]['name']} {rest[0]['validation']['accuracy']:.2%}"
    return pick["name"], reason


def protect(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, *, ber: float = 1e-4,
            max_macs: float = 1.15, max_latency: float | None = None, trials: int = 100, seed: int = 0,
            scores: Mapping[str, Sequence[float]] | None = None, reference: nn.Module | None = None,
            validation_fraction: float = 0.2, calibration_size: int = 1000, tie: float = 0.001,
            measure_latency: bool = True, check_batch: int = LATENCY_BATCH,
            space: Sequence[Candidate] | None = None,
            work_dir: str | Path | None = None, log: Callable[[str], Any] | None = None,
            device: str = "cpu") -> ProtectResult:
    """Search the protections of design §4 for the most robust one within a cost budget.

    Args:
        model: the trained model to protect (left untouched).
        x_train, y_train: its TRAINING data; split here into fit (scores,
            calibration ranges) and validation (the campaigns). No test data.
        ber: bit error rate of the selection campaigns (float32 parameter flips).
        max_macs: MACs per input allowed, as a ratio to ``reference``'s: copies, corrections,
            restrictions and weight checks included; weight checks run once per forward,
            so they count divided by ``check_batch`` (``macs_ratio_b1`` in the records
            counts them whole, as at batch 1).
        max_latency: latency allowed at batch 128 (1 thread, interleaved), ratio to ``reference``'s.
        trials: trials per candidate campaign.
        seed: seed of the split, the calibration subset, the scores and the campaigns (the
            validation campaigns draw faults with it; test and end-to-end campaigns with
            seeds derived from it, ``ftcnn.seeds.role_seed``, recorded in ``config``).
        scores: vulnerability scores per layer (default: ``gain`` on 256 fit inputs).
        reference: the model costs are relative to (default: ``model``; the
            end-to-end pipeline passes the unpruned original).
        validation_fraction: share of the training data held out per class.
        calibration_size: fit inputs the ranges are profiled on.
        tie: accuracies within this of the best count as tied; the cheapest wins.
        measure_latency: time every candidate (needed when ``max_latency`` is given).
        check_batch: inputs per forward the weight checks are shared by (the latency batch).
        space: the candidates (default: :func:`candidates`).
        work_dir: where campaign folders go (resumable); default a temporary folder.
        log: called with progress lines.
        device: where the scores and the campaigns are computed (``cpu``, ``cuda``, ...); the
            candidates are built, costed and timed on the CPU. Recorded in ``config``.

    Returns:
        A :class:`ProtectResult`; ``.model`` is the chosen protected model.

    Example (minutes of CPU, so not run as a doctest)::

            result = protect(model, x_train, y_train, ber=1e-4, max_macs=1.15, trials=20)
            result.chosen, result.record(result.chosen)["macs_ratio"] <= 1.15
        ('restrict_zero_m0.1', True)
    """
    check_budget(max_macs, max_latency, ber, trials)
    if not 0 <= tie < 1:
        raise ValueError(f"tie must lie in [0, 1) (got {tie})")
    if check_batch < 1:
        raise ValueError(f"check batch must be >= 1 (got {check_batch})")
    say = log or (lambda *_: None)
    reference = model if reference is None else reference
    measure_latency = measure_latency or max_latency is not None
    (x_fit, y_fit), (x_val, y_val) = validation_split(x_train, y_train, validation_fraction, seed)
    input_shape = tuple(x_train.shape[1:])
    calibration = calibration_subset(x_fit, calibration_size, seed)
    space = list(candidates() if space is None else space)
    names = [c.name for c in space]
    if len(set(names)) != len(names):
        raise ValueError("candidate names must be unique")
    if any(c.duplicate for c in space) and scores is None:
        say("scoring channels (gain, fit split) ...")
        with train.on_device(model, device):
            scores = vulnerability.analyze(model, x_fit.to(device), y_fit.to(device), method="gain", samples=256,
                                           seed=seed)["layers"]
    ranked = exposure(model, scores) if scores is not None else None
    ref_cost = {"params": cost.parameters(reference), **cost.macs(reference, input_shape)}

    records: list[dict[str, Any]] = []
    built: dict[str, nn.Module] = {}
    for cand in space:
        net, settings = _build(model, cand, ranked, calibration, ref_cost["macs"], max_macs, input_shape,
                               check_batch)
        rec: dict[str, Any] = {"name": cand.name, "family": cand.family, "settings": settings,
                               "baseline": cand.baseline}
        if net is None:
            rec.update(built=False, within_budget=False, note="no duplication fits the MAC budget")
            records.append(rec)
            continue
        c = {"params": cost.parameters(net), **cost.macs(net, input_shape)}
        amortised = _macs_at_batch(c, check_batch)
        rec.update(built=True, params=c["params"], macs=amortised, macs_b1=c["macs"], elementwise=c["elementwise"],
                   weight_checks=c.get("weight_checks", 0), params_ratio=c["params"] / ref_cost["params"],
                   macs_ratio=amortised / ref_cost["macs"], macs_ratio_b1=c["macs"] / ref_cost["macs"])
        rec["within_budget"] = rec["macs_ratio"] <= max_macs + 1e-12
        built[cand.name] = net
        records.append(rec)

    timed = {n: m for n, m in built.items() if measure_latency and
             (next(r for r in records if r["name"] == n)["within_budget"] or n == "full_tmr")}
    if timed:
        say(f"timing {len(timed)} candidates (batch {LATENCY_BATCH}, 1 thread, interleaved) ...")
        ms = cost.interleaved_latency({"__reference__": reference, **timed}, input_shape,
                                      batch=LATENCY_BATCH, rounds=9, threads=1)
        for rec in records:
            if rec["name"] in timed:
                rec["latency_b128_ms"] = ms[rec["name"]]
                rec["latency_ratio"] = ms[rec["name"]] / ms["__reference__"]
                if max_latency is not None and rec["latency_ratio"] > max_latency:
                    rec["within_budget"] = False
    work = Path(work_dir) if work_dir is not None else None
    tmp = tempfile.TemporaryDirectory(prefix="ftcnn-protect-") if work is None else None
    try:
        root = work if work is not None else Path(tmp.name)  # type: ignore[union-attr]
        to_run = [r for r in records if r.get("built") and (r["within_budget"] or r["baseline"])]
        say(expected_time(reference, x_val, to_run, trials, device))
        for rec in records:
            rec["validation"] = None
            if not any(rec is r for r in to_run):
                continue
            say(f"campaign on validation: {rec['name']} (x{rec['macs_ratio']:.3f} MACs) ...")
            summary = _campaign(built[rec["name"]], x_val, y_val, [ber], trials, role_seed(seed, "validation"),
                                root / "validation" / rec["name"], device)
            rec["validation_clean"] = summary["golden_accuracy"]
            rec["validation"] = _point(summary, ber)
    finally:
        if tmp is not None:
            tmp.cleanup()
    evaluated = [r for r in records if r["validation"] is not None]
    flags = pareto_front([(r["macs_ratio"], r["validation"]["accuracy"]) for r in evaluated])
    for rec in records:
        rec["pareto"] = False
    for rec, flag in zip(evaluated, flags):
        rec["pareto"] = flag
    chosen, reason = _choose(records, tie, ber, max_macs, max_latency)
    for rec in records:
        rec["chosen"] = rec["name"] == chosen
    config = {"ber": ber, "max_macs": max_macs, "max_latency": max_latency, "trials": trials, "seed": seed,
              "validation_fraction": validation_fraction, "validation_size": len(x_val),
              "fit_size": len(x_fit), "calibration_size": len(calibration), "tie": tie,
              "check_batch": check_batch,
              "latency": {"batch": LATENCY_BATCH, "threads": 1, "method": "cost.interleaved_latency"}
              if measure_latency else None,
              "reference": ref_cost, "weight_checks_available": weight_checks_available(),
              "fault_model": "float32 bit flips in Conv2d/Linear parameters, protection values attacked",
              "fault_seeds": role_seeds(seed),  # each role's campaign seed: disjoint fault draws (ftcnn.seeds)
              "device": device}
    models = {n: m for n, m in built.items() if next(r for r in records if r["name"] == n)["validation"]}
    return ProtectResult(chosen, reason, records, models, config)


def evaluate_test(result: ProtectResult, x_test: torch.Tensor, y_test: torch.Tensor, *,
                  names: Sequence[str] | None = None, bers: Sequence[float] | None = None,
                  trials: int | None = None, work_dir: str | Path | None = None,
                  inputs_per_trial: int | None = None, role: str = "test") -> dict[str, Any]:
    """Test-split numbers (clean, and at ``ber`` and 10x ``ber``) for the chosen protection
    (or ``names``), once the choice is made; stored in ``result.test`` and returned. The
    campaigns run on the device the search ran on (``result.config["device"]``);
    ``inputs_per_trial``: each trial on a random block of the test split (unbiased, cheaper).
    Their faults come from ``role``'s stream (``ftcnn.seeds``: never the validation trials'
    fault sets), recorded with each entry as ``role`` and ``fault_seed``.

    Example (minutes of CPU, so not run as a doctest)::

            evaluate_test(result, x_test, y_test)[result.chosen]["bers"]["0.0001"]["accuracy"]
    """
    cfg = result.config
    bers = list(bers or (cfg["ber"], min(1.0, 10 * cfg["ber"])))
    trials = trials or cfg["trials"]
    fault_seed = role_seed(cfg["seed"], role)
    out: dict[str, Any] = dict(result.test or {})
    tmp = tempfile.TemporaryDirectory(prefix="ftcnn-protect-test-") if work_dir is None else None
    try:
        root = Path(work_dir) if work_dir is not None else Path(tmp.name)  # type: ignore[union-attr]
        for name in names or [result.chosen]:
            summary = _campaign(result.models[name], x_test, y_test, bers, trials, fault_seed,
                                root / role / name, cfg.get("device", "cpu"), inputs_per_trial)
            out[name] = {"clean": summary["golden_accuracy"], "role": role, "fault_seed": fault_seed,
                         "bers": {f"{b:g}": _point(summary, b) for b in bers}}
    finally:
        if tmp is not None:
            tmp.cleanup()
    result.test = out
    return out


def front_json(result: ProtectResult) -> str:
    """Strict JSON (no NaN/Inf) of every candidate, the choice and the reason."""
    blob = {"format": "ftcnn-protect/1", "config": result.config, "chosen": result.chosen,
            "reason": result.reason, "candidates": result.records, "test": result.test, **result.extra}
    return files.dumps_json(blob, indent=1)


def plot_front(result: ProtectResult, path: str | Path) -> None:
    """Validation accuracy under faults vs MACs ratio, 95% CI bars, the Pareto front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (the formatter below)

    recs = [r for r in result.records if r["validation"] is not None]
    accs = [100 * r["validation"]["accuracy"] for r in recs]
    # zoom on the candidates that matter (within 15 points of the best); those below sit on the
    # bottom edge with their accuracy written beside them
    floor = max(0.0, min(min(100 * r["validation"]["accuracy_ci"][0] for r, a in zip(recs, accs)
                             if a >= max(accs) - 15) - 1.0, max(accs) - 15))
    fig, (ax, key) = plt.subplots(1, 2, figsize=(11, 5.5), gridspec_kw={"width_ratios": [2.2, 1]})
    lines = []
    for i, (r, acc) in enumerate(zip(recs, accs), 1):
        lo, hi = (100 * v for v in r["validation"]["accuracy_ci"])
        color = "tab:red" if r["chosen"] else "tab:blue" if r["within_budget"] else "tab:gray"
        shown = max(acc, floor + 0.3)
        ax.errorbar(r["macs_ratio"], shown, yerr=[[max(0.0, shown - max(lo, floor))], [max(0.0, hi - shown)]],
                    fmt="v" if acc < floor else "o", color=color, capsize=3,
                    markersize=7 if r["chosen"] else 5, alpha=0.85)
        # numbers, not names, beside the markers (the key on the right names them): candidates
        # often share a MACs ratio, so those alternate sides
        same = sum(1 for q in recs[:i - 1] if abs(q["macs_ratio"] - r["macs_ratio"]) < 0.005 * r["macs_ratio"])
        dx = 5 + 9 * (same // 2) if same % 2 == 0 else -12 - 9 * (same // 2)
        ax.annotate(str(i) + (f" ({acc:.0f}%)" if acc < floor else ""), (r["macs_ratio"], shown),
                    textcoords="offset points", xytext=(dx, 3), fontsize=7.5, color=color)
        lines.append((f"{i:>2}  {r['name']}  {acc:.1f}% x{r['macs_ratio']:.2f}"
                      + ("  (front)" if r["pareto"] else ""), color))
    front = sorted((r["macs_ratio"], max(a, floor + 0.3)) for r, a in zip(recs, accs) if r["pareto"])
    if front:
        ax.step(*zip(*front), where="post", color="tab:green", lw=1, label="Pareto front")
    ax.set_ylim(floor, min(100.0, max(100 * r["validation"]["accuracy_ci"][1] for r in recs) + 0.5))
    ax.axvline(result.config["max_macs"], color="tab:orange", ls="--", lw=1,
               label=f"budget x{result.config['max_macs']:g} MACs")
    key.axis("off")
    for j, (text, color) in enumerate(lines):
        key.text(0.0, 1.0 - j * 0.055, text, transform=key.transAxes, fontsize=7.5, color=color,
                 family="monospace", va="top")
    key.text(0.0, 1.0 - (len(lines) + 1) * 0.055, "red: chosen; gray: over budget (baseline);\n"
             "triangles: below the plotted range (accuracy in brackets)",
             transform=key.transAxes, fontsize=7.5, va="top")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    ax.set_xlabel("MACs relative to the reference model (log scale)")
    ax.set_ylabel(f"validation accuracy at BER {result.config['ber']:g} (%)")
    ax.set_title(f"protection candidates (chosen in red: {result.chosen})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=130)
    try:
        files.atomic_write(path, write)
    finally:
        plt.close(fig)


def write_result(result: ProtectResult, out: str | Path, **meta: Any) -> dict[str, Path]:
    """Write the chosen model (``protected.pt``), ``front.json`` and ``front.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"model": out / "protected.pt", "front": out / "front.json", "plot": out / "front.png"}
    rec = result.record(result.chosen)
    checkpoint.save(result.model, paths["model"], protection=rec["name"],
                    protection_settings=files.jsonable(rec["settings"]), reason=result.reason, **meta)
    files.write_text(paths["front"], front_json(result) + "\n")
    plot_front(result, paths["plot"])
    return paths


def protect_run(model: nn.Module, data: str, out: str | Path, *, ber: float = 1e-4, max_macs: float = 1.15,
                max_latency: float | None = None, trials: int = 100, seed: int = 0,
                allow_builder: str | None = None, source: str | None = None,
                log: Callable[[str], Any] | None = None, device: str = "cpu") -> ProtectResult:
    """``ftcnn protect``: search on ``data``'s training split, report on its test split, write ``out``;
    scores and campaigns on ``device``.

    Example (minutes of CPU, so not run as a doctest)::

            protect_run(ftcnn.load("lenet5.pt"), "mnist5k", "runs/protect", ber=1e-4, max_macs=1.15)
    """
    check_budget(max_macs, max_latency, ber, trials)
    out = Path(out)
    train_set, test_set = data_mod.load(data, "train"), data_mod.load(data, "test")
    campaign.check_input_shape(model, test_set.tensors[0][:1])
    with files.exclusive_folder(out), checkpoint.allowing(allow_builder):  # one writer for the whole run
        result = protect(model, *train_set.tensors, ber=ber, max_macs=max_macs, max_latency=max_latency,
                         trials=trials, seed=seed, work_dir=out / "campaigns", log=log, device=device)
        evaluate_test(result, *test_set.tensors, work_dir=out / "campaigns")
        write_result(result, out, data=data, source=source)
    return result
