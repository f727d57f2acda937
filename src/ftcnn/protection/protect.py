"""Choose a protection automatically: a search over design §4's mechanisms under a budget.

``protect(model, x_train, y_train, ber=1e-4, max_macs=1.15)`` builds every
candidate protection (none; range restriction, zero or clamp, with and
without a margin; parameter-side weight checks when ``ftcnn.protection.hardening``
offers them, alone, with restriction and behind a stored-word code (``ftcnn.protection.codes``);
duplication of the channels with the highest exposure plus restriction; and the
memory-fault baselines: bounds alone, weight-level TMR, SEC-DED ECC, parity per
weight, output-level TMR), measures each one's price with ``ftcnn.protection.cost.price`` at
the deployment ``batch`` (default 128: MACs per input including corrections and
checks, the once-per-forward work shared by the batch; memory as all stored bits,
``max_memory``; latency at the batch and at batch 1, one thread, all models timed
interleaved until two timings of the same model agree or ``latency_budgets`` seconds
are spent, ``cost.stable_latency``; the baselines over budget apart, so that the
slowest models do not lengthen the rounds of those that can be chosen),
drops those over budget (baselines are still evaluated, for the table, never
chosen then), and runs the same fault campaign on each survivor (float32 bit flips
in the parameters at ``ber``, every value a protection adds attacked too).

The deployed form is what is protected: a model whose BatchNorm follows a conv is
folded first (``fold.fold_batchnorm``), every candidate and the ``none`` reference
are built from the folded model, so no BatchNorm memory is left outside the fault
space, and the written ``protected.pt`` reloads through both transforms.

The choice respects noise and has a power floor (issue 21): every candidate's
campaign draws trial ``i`` from the same generator (same seed, BER and validation
inputs), so candidates are compared paired by trial. Among those within budget, the
CHEAPEST (MACs at the batch, then latency) SHOWN to be within ``tolerance`` points of
the most accurate one wins: a one-sided paired sign-flip (permutation) test of
non-inferiority, ``mean(d) > -tolerance`` at ``ALPHA`` on the per-trial differences
(``paired.sign_flip_test`` with ``null=-tolerance``: valid at every number of trials,
it weighs each pair by its size). Why not "not significantly below": absence of
evidence is not evidence of a tie; at 30 trials that rule chose a VGG-11 candidate 6.2
points worse than the best (p 0.11). A 0.1-point tie on the means (before) sat below
the validation CIs and chose x1.50 latency over a tied x1.05. With too few trials to
show anything (fewer than 5: 2^-4 > 0.05) the most accurate candidate wins, and the
reason says so.

Racing (issue 24): the validation campaigns run in stages (``race_stages``: 25, 50 and
100 of 100 trials), each resuming the candidate's campaign folder (trials are not part of a
campaign's identity). After each stage a candidate stops once the betting confidence
sequence of its paired differences to the most accurate one (``metrics.BettingCS``, valid
at every stage at once) lies wholly below ``-tolerance``: it can never be chosen. Baselines
over budget stop after the first stage (shown, never chosen). Candidates that go on run the
same trials as without racing, so their numbers and the choice among them are unchanged;
``race=False`` runs every candidate to the end. At 1e-4 most candidates tie within a point, and a
sequence valid at every stage cannot show a 0.25-point gap in 100 trials, so racing stops only the
clearly worse ones (6 of 29 on ResNet-20). What made ``ftcnn protect`` on ResNet-20 (mnist5k, all
defaults, idle 2 cores) take 6 min 17 s instead of 15 min 43 s: campaigns build the exact shortcut
only where it pays (``fastpath.pays``), validation trials on blocks of 100 inputs, test trials on
blocks of 200 test inputs; latency timing took 89 s of it.

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

import copy
import inspect
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ftcnn import checkpoint, data as data_mod, files, progress, readback, train
from ftcnn.campaigns import campaign, store
from ftcnn.protection import cost, fold, hardening, vulnerability
from ftcnn.reporting import plots
from ftcnn import rules
from ftcnn.campaigns.metrics import BettingCS
from ftcnn.campaigns.paired import paired_test, sign_flip_test
from ftcnn.campaigns.seeds import role_seed, role_seeds
from ftcnn.campaigns.trials import input_order
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
# one-sided level of "significantly below the best" (the choice, see the module doc)
ALPHA = 0.05
DEFAULT_CONFIDENCE = 1 - ALPHA  # the campaigns' intervals; the choice's one-sided test runs at 1 - confidence
# points of validation accuracy a cheaper candidate may lose against the most accurate one, shown by test
DEFAULT_TOLERANCE = rules.RULES["tolerance"].default
# validation inputs per trial (a seeded block, the same for every candidate at trial i): at the BERs protect
# chooses at, the spread between fault draws (5-15 points at 1e-3) dwarfs a block's sampling error, and
# the paired differences the choice tests cancel most of it (the same inputs in both arms). Measured on
# ResNet-20 (mnist5k, BER 1e-4, 100 trials, idle 2 cores): 200 -> 100 inputs kept the choice and moved the
# paired differences' standard errors to the leading candidates from 0.12-0.13 to 0.12-0.16 points, and
# took protect from 12.7 to 10.8 minutes (issue 24)
DEFAULT_VALIDATION_INPUTS = rules.RULES["validation_inputs"].default
DEFAULT_TEST_INPUTS = rules.RULES["test_inputs"].default
# stored-word codes tried behind the weight check (``ftcnn.protection.codes``): measured on LeNet-5 at BER 1e-3
# (experiments/results/memory_codes.md) these two are the ones worth their memory; plain ``parity``
# zeroes too many harmless mantissa flips and is only a baseline
CODED_CHECKS: tuple[tuple[str, str], ...] = (("parity_exponent", "parity_exponent"), ("ecc", "secded"))
# suffix of the test entries whose campaign left the protection's own values unattacked (the ablation)
UNATTACKED_PROTECTION = ".protection_not_attacked"
# seconds of latency timing per batch (``cost.stable_latency``'s ``max_seconds``): interleaved rounds stop
# when the control pair agrees or this is spent (``min_rounds`` always run). Why (issue 24): on a loaded
# 2-core machine the pair rarely agreed, and timing ResNet-20's candidates for 60 rounds took 19.8 of
# ``protect``'s 52 minutes; a small model's rounds take milliseconds and still agree well inside these.
LATENCY_SECONDS = 60.0          # at the deployment batch (the budgeted latency)
LATENCY_SECONDS_BATCH1 = 20.0   # at batch 1 (shown beside it)
# the baselines over budget (shown, never chosen) are timed apart, in this share of those budgets
SHOWN_LATENCY_SHARE = 0.25
# racing the validation campaigns (issue 24): the first stage runs this share of the trials, but at least
# RACE_MIN_TRIALS (at 95% the betting sequence cannot separate two candidates in fewer: 10 pairs that all
# differ by the full -1 are the fewest that show a mean difference below 0); each later stage doubles it
RACE_FIRST_SHARE = 0.25
RACE_MIN_TRIALS = 10
# a campaign's set-up (golden inference, the shortcut's trace and caches) in inferences of ALL its inputs (a
# trial on a block pays the golden inference of the whole split: the estimates scale it by split / block): each
# racing stage resumes every candidate still running and pays it again (measured on a ResNet-20, 800
# inputs, 1 thread: 5.4 s against 1.8 s per inference on 2 idle cores; resumed, 10 s against 2.0 s at load
# 3.6). Why not keep each candidate's prepared campaign between stages: up to 1 GB of golden activations
# each (``fastpath.DEFAULT_CACHE_BYTES``)
SETUP_INFERENCES = 4.0
# the memory-fault baselines a reviewer expects (issue 21): name -> (family, code); evaluated and
# shown even over budget, chosen only within it. Names match ``ftcnn compare``'s variants.
MEMORY_BASELINES: tuple[tuple[str, str, str], ...] = (("weight_tmr", "weight TMR", "tmr3"),
                                                      ("ecc", "ECC", "secded"), ("parity", "parity", "parity"))


def weight_checks_available() -> bool:
    """Whether ``harden.harden`` takes ``check_weights`` (parameter-side bounds)."""
    return "check_weights" in inspect.signature(hardening.harden).parameters


def codes_available() -> bool:
    """Whether ``harden.harden`` takes ``code`` (stored-word codes, ``ftcnn.protection.codes``)."""
    return "code" in inspect.signature(hardening.harden).parameters


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
               corrections: Sequence[str] = CORRECTIONS, weight_checks: bool | None = None,
               codes: bool | None = None) -> list[Candidate]:
    """The search space, in a fixed order: the unprotected model, restriction, weight checks
    (alone, with restriction, behind a stored-word code), duplication, then the baselines.

    Every candidate costs a campaign, so the coded ones are few: each code of
    ``CODED_CHECKS`` behind the weight check, alone and with the cheap restriction
    (first widened range, the layers holding ``RESTRICT_SHARE`` of the parameters).
    Baselines (``baseline=True``): bounds alone (``weights_zero``), the memory codes of
    ``MEMORY_BASELINES`` alone and output-level TMR (``full_tmr``).

    Example:
        >>> [c.name for c in candidates(restricts=[("zero", 0.1)], corrections=["min"],
        ...                            weight_checks=False, codes=False)]
        ['none', 'restrict_zero_m0.1', 'dup_min+restrict_zero_m0.1', 'full_tmr']
        >>> [c.name for c in candidates(restricts=[], corrections=[], weight_checks=False, codes=True)]
        ['none', 'weight_tmr', 'ecc', 'parity', 'full_tmr']
    """
    checks = weight_checks_available() if weight_checks is None else weight_checks
    coded = codes_available() if codes is None else codes
    out = [Candidate("none", "none", None)]
    for mode, margin in restricts:
        out.append(Candidate(f"restrict_{_tag(mode, margin)}", "restriction",
                             {"ratio": 0.0, "restrict": mode, "range_margin": margin}))
    if checks:
        for check in ("zero", "clamp"):  # bounds alone (zero) is a baseline too: shown even over budget
            out.append(Candidate(f"weights_{check}", "weight check", {"ratio": 0.0, "check_weights": check},
                                 baseline=check == "zero"))
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
    if checks and coded:
        for name, code in CODED_CHECKS:
            settings = {"ratio": 0.0, "check_weights": "zero", "code": code}
            out.append(Candidate(f"{name}+weights_zero", "code + weight check", settings))
            for mode, margin in widened[:1]:
                share = f"_p{round(RESTRICT_SHARE * 100)}"
                out.append(Candidate(f"{name}+weights_zero+restrict_{_tag(mode, margin)}{share}",
                                     "code + weight check + restriction",
                                     {**settings, "restrict": mode, "range_margin": margin,
                                      "restrict_share": RESTRICT_SHARE}))
    for corr in corrections:
        for mode, margin in widened:
            settings = {"correction": corr, "restrict": mode, "range_margin": margin}
            out.append(Candidate(f"dup_{corr}+restrict_{_tag(mode, margin)}", "duplication + restriction",
                                 settings, duplicate=True))
            if checks:
                out.append(Candidate(f"dup_{corr}+weights_zero+restrict_{_tag(mode, margin)}",
                                     "duplication + weight check + restriction",
                                     {**settings, "check_weights": "zero"}, duplicate=True))
    if coded:
        for name, family, code in MEMORY_BASELINES:
            out.append(Candidate(name, family, {"ratio": 0.0, "code": code}, baseline=True))
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


def check_budget(max_macs: float, max_latency: float | None = None, ber: float | None = None,
                 trials: int | None = None, *, batch: int = cost.DEFAULT_BATCH, at_least_one: bool = True,
                 max_memory: float | None = None, target: str = "parameters",
                 activation_ber: float | None = None) -> None:
    """One-line errors for budgets and campaign settings (the fault model's too), before any work (``harden``,
    ``protect`` and ``pipeline`` share it: one budget convention, a ratio at ``batch``).

    ``at_least_one``: a budget relative to the model itself cannot lie below 1 (nothing
    costs less than the unprotected model); the end-to-end pipeline's budget is relative
    to the unpruned original, where 0.9 is a goal a pruned model can meet. ``max_memory``:
    all stored bits (``cost.memory_bits``) as a ratio, under the same rule."""
    if max_memory is not None:
        if isinstance(max_memory, bool) or not (isinstance(max_memory, (int, float)) and math.isfinite(max_memory)
                                                and max_memory > 0):
            raise ValueError(f"max_memory must be a finite ratio > 0, e.g. 1.1 for +10% stored bits "
                             f"(got {max_memory!r})")
        if at_least_one and max_memory < 1:
            raise ValueError(f"max_memory {max_memory:g} is below 1: it is a ratio to the model's stored bits "
                             "(1.1 = +10%), and nothing stores less than the unprotected model")
    if at_least_one:
        hardening.check_max_macs(max_macs)
    elif isinstance(max_macs, bool) or not (isinstance(max_macs, (int, float)) and math.isfinite(max_macs)
                                            and max_macs > 0):
        raise ValueError(f"max_macs must be a finite ratio > 0 (got {max_macs!r})")
    if max_latency is not None and not (isinstance(max_latency, (int, float)) and math.isfinite(max_latency)
                                        and max_latency > 0):
        raise ValueError(f"max latency ratio must be a finite number > 0 (got {max_latency})")
    if ber is not None:
        rules.check("protect_ber", ber, "ber")
    if trials is not None:
        rules.check("trials", trials)
    cost.check_batch(batch)
    FaultModel(target, activation_ber)


def deployed_form(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` as it is deployed, with every foldable BatchNorm folded into its conv
    (``fold.fold_batchnorm``), and what was folded. Why: an unfolded BatchNorm is memory
    (four vectors per layer) that the deployed network no longer holds, and the folded
    conv weights are what the protection must guard. A model with nothing to fold (or
    that torch.fx cannot trace) is returned itself, so its numbers stay as they were."""
    try:
        pairs = fold.foldable(model)
    except ValueError as exc:  # untraceable: protected as it is, BatchNorm attacked where it stands
        return model, {"folded": False, "layers": {}, "why": str(exc)}
    if not pairs:
        return model, {"folded": False, "layers": {}}
    source = copy.deepcopy(model).eval() if any(m.training for m in model.modules()) else model
    return fold.fold_batchnorm(source), {"folded": True, "layers": pairs}


def within_budget(rec: Mapping[str, Any], max_macs: float, max_memory: float | None) -> bool:
    """Whether a built candidate's MACs (at the batch) and stored bits fit the budget."""
    return rec["macs_ratio"] <= max_macs + 1e-12 and (max_memory is None or rec["memory_ratio"] <= max_memory + 1e-12)


def _build(model: nn.Module, cand: Candidate, scores: Mapping[str, np.ndarray] | None,
           calibration: torch.Tensor, base_macs: float, max_macs: float, input_shape: tuple[int, ...],
           batch: int, faults: FaultModel | None = None) -> tuple[nn.Module | None, dict[str, Any]]:
    """The candidate's model and its final settings; for duplication, the largest share of
    the leftover MAC budget that fits (None when nothing fits). ``base_macs``: the
    reference's MACs per input at ``batch`` (``cost.macs_at_batch``), as every count here.
    Under activation faults the unprotected model holds its layers where protected ones do
    (``hardening.aligned_names``: the same computation), so all draw the same faults per trial."""
    if cand.settings is None:
        return (model if faults is None or faults.target == "parameters" else hardening.aligned_names(model)), {}
    if not cand.duplicate:
        return hardening.harden(model, calibration=calibration, **cand.settings), dict(cand.settings)
    rest = {k: v for k, v in cand.settings.items() if k != "correction"}
    without = hardening.harden(model, ratio=0.0, calibration=calibration, **rest)
    without_macs = cost.macs_at_batch(without, input_shape, batch)
    slack = max_macs * base_macs - without_macs
    if slack <= 0 or scores is None:
        return None, dict(cand.settings)
    model_macs = cost.macs_at_batch(model, input_shape, batch)
    for share in BUDGET_SHARES:
        ratio = (without_macs + share * slack) / model_macs  # harden's max_macs: relative to ``model``
        hard = hardening.harden(model, scores, max_macs=ratio, batch=batch, calibration=calibration,
                                 input_shape=input_shape, **cand.settings)
        if hardening.protected(hard) and cost.macs_at_batch(hard, input_shape, batch) <= max_macs * base_macs:
            return hard, {**cand.settings, "max_macs": ratio, "batch": batch,
                          "duplicated_channels": sum(len(v) for v in hardening.protected(hard).values())}
    return None, dict(cand.settings)


def _campaign(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bers: Sequence[float], trials: int,
              seed: int, folder: Path, device: str = "cpu", inputs_per_trial: int | None = None,
              attack_protection: bool = True, confidence: float = DEFAULT_CONFIDENCE,
              faults: FaultModel | None = None) -> dict[str, Any]:
    """A campaign on ``device``; the model is given back where it was. ``attack_protection=False``
    leaves the values protections add (bounds, code words) out of the fault space: the ablation.
    ``faults``: what the faults hit (default: parameters); activation faults are drawn per input, so
    there a trial evaluates every input of a fixed seeded subset of ``inputs_per_trial`` of them
    (:meth:`FaultModel.subset`) instead of a random block per trial."""
    faults = faults or FaultModel()
    if faults.target != "parameters" and inputs_per_trial is not None and inputs_per_trial < len(x):
        x, y = faults.subset(x, y, inputs_per_trial, seed)
        inputs_per_trial = None
    config = campaign.CampaignConfig(bers=tuple(bers), trials=trials, seed=seed, device=device,
                                     inputs_per_trial=inputs_per_trial, attack_protection=attack_protection,
                                     confidence=confidence, **faults.campaign_settings())
    with train.on_device(model, device):
        return campaign.run_campaign(model, x, y, config, folder, progress=False)


@dataclass(frozen=True)
class FaultModel:
    """What protect's campaigns attack (issue 22, item 8): ``target`` as ``CampaignConfig`` names it
    (parameters: the memory at the BER; activations: transient flips in every Conv2d/Linear output at
    the BER; both: the memory at the BER plus the outputs at ``activation_ber`` in every trial). The
    search ranks candidates under it, so a protection is chosen for the faults its user expects:
    under activation faults a weight check or a code protects nothing, restriction and output TMR do.

    Example:
        >>> FaultModel("both", 1e-6).campaign_settings()
        {'target': 'both', 'activation_ber': 1e-06}
        >>> FaultModel().campaign_settings()
        {}
    """

    target: str = "parameters"
    activation_ber: float | None = None

    def __post_init__(self) -> None:
        rules.check("target", self.target, "--target")
        if (self.target == "both") != (self.activation_ber is not None):
            raise ValueError("--activation-ber is the datapath rate of --target both: give it with both, "
                             "and only then")
        if self.activation_ber is not None:
            rules.check("protect_ber", self.activation_ber, "--activation-ber")

    def campaign_settings(self) -> dict[str, Any]:
        """CampaignConfig keywords: none for parameters (identities, folders and numbers unchanged)."""
        if self.target == "parameters":
            return {}
        return {"target": self.target, **({"activation_ber": self.activation_ber} if self.activation_ber else {})}

    @staticmethod
    def subset(x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded random subset of ``size`` inputs, the same for every candidate (paired)."""
        order = torch.as_tensor(input_order(seed, len(x))[:size])
        return x[order], y[order]

    def describe(self, ber: float) -> str:
        memory = ("float32 bit flips in Conv2d/Linear parameters, BatchNorm parameters and statistics (none left "
                  f"once folded), protection values and code words attacked, at BER {ber:g}")
        datapath = ("transient float32 bit flips in every Conv2d/Linear output (copies included; votes and "
                    "restrictions fault-free), per value per inference, at {:g}")
        if self.target == "parameters":
            return memory
        if self.target == "activations":
            return datapath.format(ber)
        return memory + "; plus " + datapath.format(self.activation_ber) + " in every trial"


def latency_budgets(batch: int) -> dict[int, float]:
    """Seconds of latency timing per batch (``cost.stable_latency``'s ``max_seconds``): the
    deployment ``batch`` first, then batch 1.

        >>> latency_budgets(128)
        {128: 60.0, 1: 20.0}
    """
    return {b: LATENCY_SECONDS if b == batch else LATENCY_SECONDS_BATCH1 for b in dict.fromkeys((batch, 1))}


def _time_group(reference: nn.Module, group: Mapping[str, nn.Module], input_shape: tuple[int, ...],
                budgets: Mapping[int, float]) -> dict[int, dict[str, Any]]:
    """``group`` timed with the reference (``__reference__``), interleaved, within ``budgets``
    (batch -> seconds). A candidate that IS the reference module (the unprotected ``none``) is
    not timed a second time: it takes the reference's timing (its ratio is 1 by definition,
    where timing it again measured 0.88-0.99)."""
    if not group:
        return {}
    same = [n for n, m in group.items() if m is reference]
    models = {"__reference__": reference, **{n: m for n, m in group.items() if m is not reference}}
    out = {}
    for b, seconds in budgets.items():
        timing = cost.stable_latency(models, input_shape, b, threads=1, max_seconds=seconds)
        for name in same:
            timing["ms"][name] = timing["ms"]["__reference__"]
            timing["iqr"][name] = timing["iqr"]["__reference__"]
        out[b] = timing
    return out


def _forward_seconds(model: nn.Module, input_shape: tuple[int, ...], batch: int) -> float:
    """Seconds of one forward at ``batch`` on one thread (after one untimed warm-up)."""
    x = torch.zeros((batch, *input_shape))
    model.eval()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            model(x)
            return progress.timed(model, x)[1]
    finally:
        torch.set_num_threads(saved)


def expected_timing(reference: nn.Module, input_shape: tuple[int, ...], groups: Sequence[Mapping[str, nn.Module]],
                    budgets: Mapping[int, float], ratios: Mapping[str, Mapping[int, float]] | None = None) -> str:
    """What the latency timing will cost, said before it starts: per batch and group of models
    timed together (the choosable ones; the baselines over budget, in ``SHOWN_LATENCY_SHARE`` of
    the budget), its time budget, or the ``min_rounds`` a group always runs when those take longer
    (one timed forward of ``reference`` at the batch x each model's cost ratio, ``ratios``: name ->
    batch -> ratio, default 1), or its ``cost.MAX_TIMING_ROUNDS`` when those fit well inside the
    budget. An upper bound: timing stops earlier once the control pair agrees."""
    total, parts = 0.0, []
    for b, seconds in budgets.items():
        forward = _forward_seconds(reference, input_shape, b)
        inner = 20 if b == 1 else 2  # cost.interleaved_timings' default
        for share, group in zip((1.0, SHOWN_LATENCY_SHARE), groups):
            if not group:
                continue
            units = 2 + sum((ratios or {}).get(n, {}).get(b, 1.0) for n in group if group[n] is not reference)
            per_round = forward * units * inner
            # stable_latency's min_rounds (and the warm-up) run whatever the budget; max_rounds stop it before
            floor, cap = per_round * (5 + 3 / inner), per_round * (cost.MAX_TIMING_ROUNDS + 3 / inner)
            total += min(max(share * seconds, floor), cap)
        parts.append(f"{seconds:g} s at batch {b}")
    shown = sum(len(g) for g in groups[1:])
    return progress.expected(total, "latency timing", f"{sum(len(g) for g in groups)} candidates, 1 thread, "
                             f"interleaved until a control pair agrees within {cost.AGREEMENT:g}, at most "
                             f"{' and '.join(parts)}" + (f"; {_baselines_over(shown)} apart, in "
                             f"{SHOWN_LATENCY_SHARE:g} of that" if shown else ""))


def _baselines_over(n: int) -> str:
    return f"the {n} baseline{'s' if n != 1 else ''} over budget"


def _cost_ratio(rec: Mapping[str, Any]) -> float:
    """A candidate's campaign forwards relative to the reference's: its measured latency ratio at the
    deployment batch, else its MACs ratio there (a campaign evaluates its inputs in batches of up to
    1,000, where work done once per forward is shared as at the deployment batch); at least 1."""
    latency = rec.get("cost", {}).get("latency_ratio")
    return max(1.0, latency if latency is not None else rec["macs_ratio"])


def block_size(inputs: int | None, available: int) -> int | None:
    """Inputs per trial for a campaign's ``inputs_per_trial``: None (every input) when ``inputs``
    is None or covers all ``available``.

        >>> block_size(100, 800), block_size(800, 800), block_size(None, 800)
        (100, None, None)
    """
    return None if inputs is None or inputs >= available else int(inputs)


def inference_seconds(reference: nn.Module, x_val: torch.Tensor, device: str = "cpu") -> float:
    """Seconds of one timed inference of ``reference`` over ``x_val`` on ``device``."""
    reference.eval()
    with train.on_device(reference, device), torch.inference_mode():
        return progress.timed(campaign.predict, reference, x_val.to(device))[1]


def validation_seconds(seconds: float, records: Sequence[Mapping[str, Any]], trials: int,
                       stages: Sequence[int] | None = None, setup: float = SETUP_INFERENCES) -> tuple[float, float]:
    """(low, high) seconds of the validation campaigns from ``seconds`` per inference of the
    reference (of what one trial evaluates): per candidate its cost ratio x (its trials + ``setup``
    such inferences per campaign run or resumed). Without racing (one stage) both are every candidate's ``trials``. Raced:
    the baselines over budget stop after the first stage, the choosable ones run to the end at
    most (high) or, at best, all but one stop there (low).

        >>> recs = [{"macs_ratio": 1.0, "within_budget": True}, {"macs_ratio": 3.0, "within_budget": False}]
        >>> validation_seconds(1.0, recs, 100)
        (416.0, 416.0)
        >>> validation_seconds(1.0, recs, 100, [25, 50, 100])
        (199.0, 199.0)
    """
    stages = list(stages or [trials])
    ratios = [_cost_ratio(r) for r in records]
    if len(stages) == 1:
        return (seconds * (trials + setup) * sum(ratios),) * 2  # type: ignore[return-value]
    first, resumes = stages[0], len(stages) - 1
    going = [q for q, r in zip(ratios, records) if r["within_budget"]]
    per_candidate = seconds * ((trials - first) + setup * resumes)
    start = seconds * (first + setup) * sum(ratios)
    return start + per_candidate * min(going, default=0.0), start + per_candidate * sum(going)


def expected_time(reference: nn.Module, x_val: torch.Tensor, records: Sequence[Mapping[str, Any]], trials: int,
                  device: str = "cpu", *, stages: Sequence[int] | None = None,
                  seconds: float | None = None, source: str | None = None, setup: float = SETUP_INFERENCES) -> str:
    """What the validation campaigns will cost, said before they start (issue 14): one timed
    inference of ``reference`` over ``x_val`` (or ``seconds``) x each candidate's cost ratio
    (:func:`_cost_ratio`) x its trials and set-ups. Raced (``stages``, issue 24): a range, from every choosable
    candidate but one stopping after the first stage to none of them stopping
    (:func:`validation_seconds`). Bounds: exact shortcuts cut both. ``source``: where ``seconds``
    came from when not from the timed inference (the first campaign, re-estimating)."""
    if seconds is None:
        seconds = inference_seconds(reference, x_val, device)
    low, high = validation_seconds(seconds, records, trials, stages, setup)
    detail = (f"{len(records)} candidates x {trials} trials of {len(x_val)} inputs, from "
              f"{source or f'one timed inference ({seconds:.2g} s)'} x each candidate's cost ratio, "
              f"{setup:g} more per campaign set-up")
    if not stages or len(stages) == 1:
        return progress.expected(high, "validation campaigns", detail + "; shortcuts cut it")
    over = sum(not r["within_budget"] for r in records)
    return progress.expected_range(
        low, high, "validation campaigns",
        detail + f", raced in stages of {'/'.join(str(n) for n in stages)} trials: the low end if all candidates "
        f"but the most accurate stop after {stages[0]}, the high one if none does"
        + (f" ({_baselines_over(over)} stop there)" if over else "") + "; shortcuts cut both")


def race_stages(trials: int, race: bool = True) -> list[int]:
    """The trial counts the validation campaigns are run to, stage by stage (issue 24): the first
    ``RACE_FIRST_SHARE`` of ``trials`` (at least ``RACE_MIN_TRIALS``), doubled stage by stage, then
    ``trials``; a stage is kept only while at least half as many trials again are left after it
    (a resumed campaign pays its set-up again). ``race=False``: one stage, every trial.

        >>> race_stages(100), race_stages(24), race_stages(12), race_stages(100, race=False)
        ([25, 50, 100], [10, 24], [12], [100])
    """
    if not race:
        return [trials]
    stages, n = [], max(RACE_MIN_TRIALS, math.ceil(RACE_FIRST_SHARE * trials))
    while 3 * n <= 2 * trials:
        stages.append(n)
        n *= 2
    return stages + [trials]


def race_bound(leader: Mapping[str, Any], rec: Mapping[str, Any], confidence: float = DEFAULT_CONFIDENCE
               ) -> dict[str, Any]:
    """``rec``'s validation accuracy minus ``leader``'s, paired by trial (the trials both ran, in
    trial order): the mean difference and the betting confidence sequence's interval for it
    (``metrics.BettingCS`` on ``(d + 1) / 2``, as differences lie in [-1, 1]). Anytime-valid: it
    holds at every stage at once, so looking after each stage and stopping on it is allowed."""
    a = leader["validation"]["trial_accuracy"]
    b = rec["validation"]["trial_accuracy"]
    common = sorted(set(a) & set(b), key=int)
    d = [b[t] - a[t] for t in common]
    cs = BettingCS(confidence).extend((x + 1.0) / 2.0 for x in d)
    return {"trials": len(d), "difference": float(np.mean(d)) if d else None,
            "ci": [2.0 * cs.low - 1.0, 2.0 * cs.high - 1.0], "confidence": confidence,
            "method": "betting confidence sequence (metrics.BettingCS) of the paired differences"}


def race_stops(running: Sequence[Mapping[str, Any]], trials: int, tolerance: float = DEFAULT_TOLERANCE,
               confidence: float = DEFAULT_CONFIDENCE) -> dict[str, dict[str, Any]]:
    """Which of the ``running`` candidates (each with ``trials`` validation trials) stop here, and why.

    A baseline over budget stops: it is shown, never chosen, and the trials it has are its row. A
    choosable one stops only when it can never be chosen: the betting confidence sequence of its
    paired differences to the current most accurate choosable candidate (:func:`race_bound`; the
    leader as :func:`choose` picks its best: highest mean, then cheapest) lies wholly below
    ``-tolerance`` points. The leader never stops. Each stop's error is at most ``1 - confidence``
    per leader looked at (the sequence is valid at every stage; the leader may change between
    stages), and a wrong stop can only cost a cheaper choice, never the accuracy of the one made."""
    out: dict[str, dict[str, Any]] = {}
    for rec in running:
        if not rec["within_budget"]:
            out[rec["name"]] = {"stopped_at": trials, "why": "over budget: a baseline shown, never chosen, "
                                f"with the {trials} trials of the first stage"}
    choosable = [r for r in running if r["within_budget"]]
    if len(choosable) < 2:
        return out
    leader = max(choosable, key=lambda r: (r["validation"]["accuracy"], [-x for x in _price_key(r)]))
    for rec in choosable:
        if rec is leader:
            continue
        bound = race_bound(leader, rec, confidence)
        high = bound["ci"][1]
        if bound["trials"] and high < -tolerance / 100:
            out[rec["name"]] = {
                "stopped_at": trials, "versus": leader["name"], **bound,
                "why": f"shown more than {tolerance:g} points below {leader['name']} after {trials} trials: "
                       f"{100 * bound['difference']:+.2f} points, at most {100 * high:+.2f} "
                       f"({confidence:.0%} betting confidence sequence, valid at every stage)"}
    return out


def _validate(to_run: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]], built: Mapping[str, nn.Module],
              x_val: torch.Tensor, y_val: torch.Tensor, ber: float, stages: Sequence[int], root: Path, seed: int,
              device: str, confidence: float, tolerance: float, batch: int, say: Callable[[str], Any],
              race: bool, measured: Callable[[float, Mapping[str, Any], float], Any] | None = None,
              inputs_per_trial: int | None = None, setup: float = SETUP_INFERENCES,
              faults: FaultModel | None = None) -> None:
    """The validation campaigns of ``to_run``, stage by stage (``stages``: the trial counts; one
    stage without racing): every candidate still running resumes its campaign folder to the
    stage's trials (trials are not part of a campaign's identity; trial ``i`` is the same
    whenever it runs), then :func:`race_stops` says who stops. Fills each record's
    ``validation`` (and ``raced`` when ``race``: None, or where and why it stopped).
    ``measured``: called once, after the second campaign (the first pays the process's one-time
    warm-up: 1.8 s against 0.2 s for a LeNet-5 campaign), with its seconds per reference inference
    (its seconds / ((trials + ``setup``) x its cost ratio)), its record and its seconds
    per trial: what the estimate is checked against."""
    for rec in records:
        rec["validation"] = None
    if race:
        for rec in to_run:
            rec["raced"] = None
    running, ran, staged = list(to_run), 0, len(stages) > 1
    for k, n in enumerate(stages):
        if staged:
            say(f"stage {k + 1}/{len(stages)}: {len(running)} candidates, validation trials {ran}-{n - 1} ...")
        rates: dict[str, float] = {}
        for rec in running:
            say(f"campaign on validation: {rec['name']} (x{rec['macs_ratio']:.3f} MACs at batch {batch})"
                + (f", trials {ran}-{n - 1}" if staged else "") + " ...")
            folder = root / "validation" / rec["name"]
            summary, seconds = progress.timed(_campaign, built[rec["name"]], x_val, y_val, [ber], n,
                                              role_seed(seed, "validation"), folder, device, confidence=confidence,
                                              inputs_per_trial=inputs_per_trial, faults=faults)
            rec["validation_clean"] = summary["golden_accuracy"]
            rec["validation"] = _point(summary, ber)
            # what the paired choice compares: every candidate's trial i drew from the same generator
            rec["validation"]["trial_accuracy"] = trial_accuracies(folder, ber, rec["validation"]["trials"])
            rates[rec["name"]] = seconds / (n - ran)
            if measured is not None and k == 0 and len(rates) == 2:  # the first paid the process's warm-up
                measured(seconds / ((n + setup) * _cost_ratio(rec)), rec, seconds / n)
        if k == len(stages) - 1:
            break
        stops = race_stops(running, n, tolerance, confidence)
        for rec in running:
            if rec["name"] in stops:
                rec["raced"] = stops[rec["name"]]
        running = [r for r in running if r["name"] not in stops]
        left = sum(rates[r["name"]] for r in running) * (stages[-1] - n)
        said = "; ".join(f"{name}: {why['why']}" for name, why in stops.items()) or "none"
        say(f"stage {k + 1}/{len(stages)} done: stopped {len(stops)} ({said})")
        say(progress.expected(left, "validation campaigns left", f"{len(running)} candidates on to {stages[-1]} "
                              "trials, from this stage's seconds per trial; less if more stop"))
        ran = n


def _point(summary: dict[str, Any], ber: float) -> dict[str, Any]:
    row = next(r for r in summary["results"] if math.isclose(r["ber"], ber))
    return {"accuracy": row["accuracy_mean"], "accuracy_ci": list(row["accuracy_ci"]),
            "trials": row["trials"], "sdc": row["sdc_mean"], "due": row["due_mean"]}


def trial_accuracies(folder: Path, ber: float, trials: int) -> dict[str, float]:
    """Per-trial validation accuracy at ``ber`` (trial index as text -> accuracy) of the
    campaign in ``folder``: what the paired choice compares. Read-only, every row checked
    (the folder may be a resumed, hand-edited one: ``report``'s reader)."""
    got = store.read_trials(folder / campaign.DB_NAME, "point, trial, accuracy", readback.CAMPAIGN_ROWS)
    rows = got[0] if got is not None else []
    return {str(t): float(a) for p, t, a in rows if math.isclose(p, ber, rel_tol=1e-9) and 0 <= t < trials}


def versus_best(best: Mapping[str, Any], rec: Mapping[str, Any], alpha: float = ALPHA,
                tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """``rec``'s validation accuracy minus ``best``'s, paired by trial (the trials both ran:
    same seed, BER and inputs, so trial ``i`` shares its random numbers): the mean
    difference ``d``; the one-sided p of the paired sign-flip test that it lies within
    ``tolerance`` points (``mean(d) > -tolerance``: ``within_tolerance`` when p < ``alpha``,
    ``p_within``) and the one that it lies below 0 (``significantly_below``, for the reader);
    and ``paired.paired_test``'s interval at ``1 - 2 alpha`` (the campaigns' interval rule;
    below 1,000 pairs the betting interval, wider than the test). Without per-trial
    accuracies nothing can be shown: never within tolerance unless it IS the best."""
    a = best["validation"].get("trial_accuracy") or {}
    b = rec["validation"].get("trial_accuracy") or {}
    common = sorted(set(a) & set(b), key=int)
    out: dict[str, Any] = {"test": "paired sign-flip, one-sided", "alpha": alpha, "trials": len(common),
                           "tolerance_points": tolerance, "difference": None, "p_within": None,
                           "p_one_sided": None, "ci": None, "confidence": 1 - 2 * alpha, "ci_method": None,
                           "within_tolerance": rec is best, "significantly_below": rec is not best}
    if rec is best:
        out.update(difference=0.0, ci=[0.0, 0.0])
    if rec is best or not common:
        return out
    ours, theirs = [b[t] for t in common], [a[t] for t in common]
    interval = paired_test(theirs, ours, confidence=1 - 2 * alpha)
    d = [x - y for x, y in zip(ours, theirs)]
    p = sign_flip_test(d, alternative="less")
    p_within = sign_flip_test(d, null=-tolerance / 100, alternative="greater")
    out.update(difference=interval["mean_difference"], p_within=p_within, p_one_sided=p, ci=list(interval["ci"]),
               ci_method=interval["ci_method"], within_tolerance=bool(p_within < alpha),
               significantly_below=bool(p < alpha))
    return out


def _price_key(rec: Mapping[str, Any]) -> tuple[float, float]:
    """Cheapest first: MACs at the deployment batch, then latency (untimed: last)."""
    latency = rec.get("latency_ratio")
    return rec["macs_ratio"], math.inf if latency is None else latency


def choose(records: list[dict[str, Any]], ber: float, max_macs: float, max_latency: float | None,
           batch: int = cost.DEFAULT_BATCH, alpha: float = ALPHA, max_memory: float | None = None,
           tolerance: float = DEFAULT_TOLERANCE) -> tuple[str, str]:
    """The cheapest candidate within budget shown to be within ``tolerance`` points of the most
    accurate one (:func:`versus_best`; the most accurate itself when nothing cheaper is shown),
    and why; records ``choice`` on every evaluated candidate (its paired difference to the best,
    interval, p-values, verdict, why).

    Candidates may have run different numbers of trials (raced, issue 24): each comparison pairs
    the trials both ran (trial ``i`` is the same fault draw for every candidate). A candidate
    stopped early (``raced``, :func:`race_stops`) was shown more than ``tolerance`` below the most
    accurate: it is compared and shown, never the best nor chosen."""
    eligible = [r for r in records if r["within_budget"] and r["validation"] is not None]
    budget = f"MACs <= x{max_macs:g}" + (f" and latency <= x{max_latency:g}" if max_latency else "") + \
        f" at batch {batch}" + (f", memory <= x{max_memory:g}" if max_memory is not None else "")
    if not eligible:
        raise ValueError(f"no candidate fits the budget ({budget})")
    # raced out (``race_stops``): shown below the most accurate by more than the tolerance, on fewer trials
    finished = [r for r in eligible if not r.get("raced")] or eligible
    best = max(finished, key=lambda r: (r["validation"]["accuracy"], [-x for x in _price_key(r)]))
    tests = {r["name"]: versus_best(best, r, alpha, tolerance) for r in eligible}
    shown = [r for r in finished if tests[r["name"]]["within_tolerance"]]
    pick = min(shown, key=lambda r: (*_price_key(r), -r["validation"]["accuracy"], r["name"]))
    acc, (lo, hi) = pick["validation"]["accuracy"], pick["validation"]["accuracy_ci"]
    where = (f"{acc:.2%} [{lo:.2%}, {hi:.2%}] at validation BER {ber:g}, x{pick['macs_ratio']:.3f} MACs at "
             f"batch {batch}")
    rule = (f"the cheapest (MACs at batch {batch}, then latency) of the {len(shown)} of {len(eligible)} candidates "
            f"within budget ({budget}) shown to be within {tolerance:g} points of the most accurate (one-sided "
            f"paired sign-flip test of non-inferiority by trial, alpha {alpha:g})")
    fewest = min(tests[r["name"]]["trials"] for r in finished)
    if len(finished) > 1 and 0.5 ** fewest >= alpha:
        rule += (f"; with {fewest} trials nothing can be shown: the most accurate is kept; add trials to let a "
                 f"cheaper one win")
    if pick is best:
        reason = f"{rule}: the most accurate itself, {where}"
    else:
        t = tests[pick["name"]]
        reason = (f"{rule}: {where}; vs {best['name']} {best['validation']['accuracy']:.2%} at "
                  f"x{best['macs_ratio']:.3f}: {100 * t['difference']:+.2f} points "
                  f"[{100 * t['ci'][0]:+.2f}, {100 * t['ci'][1]:+.2f}], p within {tolerance:g} points "
                  f"{t['p_within']:.2g}")
    for rec in records:
        if rec.get("validation") is None:
            continue
        if not any(rec is r for r in eligible):
            rec["choice"] = {"versus_best": None, "why": "over budget: evaluated as a baseline, never chosen"}
            continue
        t = tests[rec["name"]]
        if rec.get("raced") and rec is not pick:
            why = f"stopped early, never chosen: {rec['raced']['why']}"
        elif rec is pick:
            why = "chosen: " + ("the most accurate, and nothing cheaper is shown to be within tolerance of it"
                                if rec is best else f"the cheapest shown within {tolerance:g} points of {best['name']}")
        elif t["within_tolerance"]:
            why = (f"within {tolerance:g} points of {best['name']}, but costs more than {pick['name']} "
                   f"(x{rec['macs_ratio']:.3f} vs x{pick['macs_ratio']:.3f} MACs at batch {batch})")
        elif t["difference"] is None:
            why = f"no per-trial accuracies to compare with {best['name']}"
        else:
            why = (f"not shown within {tolerance:g} points of {best['name']} ({100 * t['difference']:+.2f} points, "
                   f"p {t['p_within']:.2g} >= {alpha:g})")
        rec["choice"] = {"versus_best": {"best": best["name"], **t}, "why": why}
    return pick["name"], reason


def protect(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, *, ber: float = 1e-4,
            max_macs: float = 1.15, max_latency: float | None = None, max_memory: float | None = None,
            trials: int = 100, seed: int = 0,
            scores: Mapping[str, Sequence[float]] | None = None, reference: nn.Module | None = None,
            validation_fraction: float = 0.2, calibration_size: int = 1000,
            measure_latency: bool = True, batch: int = cost.DEFAULT_BATCH,
            space: Sequence[Candidate] | None = None,
            work_dir: str | Path | None = None, log: Callable[[str], Any] | None = None,
            device: str = "cpu", confidence: float = DEFAULT_CONFIDENCE,
            tolerance: float = DEFAULT_TOLERANCE, race: bool = True,
            validation_inputs: int | None = DEFAULT_VALIDATION_INPUTS,
            faults: FaultModel | None = None) -> ProtectResult:
    """Search the protections of design §4 for the most robust one within a cost budget.

    Args:
        model: the trained model to protect (left untouched). A foldable BatchNorm is folded
            into its conv first (:func:`deployed_form`): every candidate, the unprotected
            ``none`` among them, is built from that deployed form (recorded in ``config``).
        x_train, y_train: its TRAINING data; split here into fit (scores,
            calibration ranges) and validation (the campaigns). No test data.
        ber: bit error rate of the selection campaigns (float32 parameter flips).
        max_macs: MACs per input allowed at ``batch``, as a ratio to ``reference``'s: copies,
            corrections, restrictions and weight checks included (``cost.macs_at_batch``:
            work done once per forward is shared by the batch; each record's ``cost`` holds
            the ratio at batch 1 beside it).
        confidence: of every campaign's interval; the choice's one-sided paired test runs at
            ``1 - confidence`` (0.05 at the default 0.95).
        tolerance: points of validation accuracy a cheaper candidate may lose against the most
            accurate one; it wins only when a test shows it within them (:func:`choose`).
        max_latency: latency allowed at ``batch`` (1 thread, interleaved), ratio to ``reference``'s.
        max_memory: stored bits allowed (``cost.memory_bits``: weights, bounds, copies, code
            words), ratio to ``reference``'s; None: no limit. Baselines over it are still
            evaluated and shown, never chosen.
        trials: trials per candidate campaign (the most any candidate runs, see ``race``).
        race: run the validation campaigns in stages (:func:`race_stages`) and stop a candidate
            once an anytime-valid paired test shows it more than ``tolerance`` below the most
            accurate (:func:`race_stops`; baselines over budget stop after the first stage). Those
            that go on run every trial, the same trials as without racing. False: every
            candidate runs every trial (the behaviour and numbers before issue 24).
        seed: seed of the split, the calibration subset, the scores and the campaigns (the
            validation campaigns draw faults with it; test and end-to-end campaigns with
            seeds derived from it, ``ftcnn.campaigns.seeds.role_seed``, recorded in ``config``).
        scores: vulnerability scores per layer (default: ``gain`` on 256 fit inputs).
        reference: the model costs are relative to (default: ``model``'s deployed form; the
            end-to-end pipeline passes the unpruned original, folded the same way).
        validation_fraction: share of the training data held out per class.
        validation_inputs: validation inputs each trial evaluates, a seeded random block that is the
            same for every candidate at trial ``i`` (so the choice stays paired); None or at least
            the split's size: all of them. Default 100: an eighth of mnist5k's 800 per trial. Under
            activation faults (drawn per input) a fixed seeded subset of that size.
        faults: what the campaigns attack (:class:`FaultModel`; default parameters): ``ber`` is the
            memory BER, or with target activations the activation rate; recorded in ``config``.
        calibration_size: fit inputs the ranges are profiled on.
        measure_latency: time every candidate (needed when ``max_latency`` is given), within
            ``latency_budgets`` seconds per batch; the baselines over budget apart from the rest.
        batch: the deployment batch: budgets apply and costs are quoted there (latency also
            at batch 1, recorded beside it).
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
    check_budget(max_macs, max_latency, ber, trials, batch=batch, at_least_one=reference is None,
                 max_memory=max_memory)
    rules.check("confidence", confidence, "confidence")
    rules.check("tolerance", tolerance, "tolerance")
    if validation_inputs is not None:
        rules.check("validation_inputs", validation_inputs, "validation_inputs")
    rules.check("race", race, "race")
    faults = faults or FaultModel()
    alpha = round(1 - confidence, 12)  # the choice's one-sided test: 0.05 at the default 0.95
    say = log or (lambda *_: None)
    model, folding = deployed_form(model)
    if folding["folded"]:
        say(f"folded {len(folding['layers'])} BatchNorm layers into their convolutions (the deployed form)")
    reference = model if reference is None else deployed_form(reference)[0]
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
    ref_cost = {"params": cost.parameters(reference), **cost.macs(reference, input_shape),
                "macs_at_batch": cost.macs_at_batch(reference, input_shape, batch),
                "memory_bits": cost.memory_bits(reference)}

    records: list[dict[str, Any]] = []
    built: dict[str, nn.Module] = {}
    for cand in space:
        net, settings = _build(model, cand, ranked, calibration, ref_cost["macs_at_batch"], max_macs,
                               input_shape, batch, faults)
        rec: dict[str, Any] = {"name": cand.name, "family": cand.family, "settings": settings,
                               "baseline": cand.baseline}
        if net is None:
            rec.update(built=False, within_budget=False, note="no duplication fits the MAC budget")
            records.append(rec)
            continue
        c = {"params": cost.parameters(net), **cost.macs(net, input_shape)}
        price = cost.price(net, reference, input_shape, batch)
        rec.update(built=True, batch=batch, params=c["params"], macs=price["macs_ratio"] * ref_cost["macs_at_batch"],
                   macs_b1=c["macs"], elementwise=c["elementwise"], weight_checks=c.get("weight_checks", 0),
                   memory_bits=cost.memory_bits(net), params_ratio=c["params"] / ref_cost["params"],
                   macs_ratio=price["macs_ratio"], memory_ratio=price["memory_ratio"], cost=price)
        rec["within_budget"] = within_budget(rec, max_macs, max_memory)
        built[cand.name] = net
        records.append(rec)

    by_name = {r["name"]: r for r in records}
    # what can be chosen is timed apart from the baselines over budget (shown, never chosen): those are
    # the slowest models (output TMR: x3), and timed together they made every round of the others longer
    choosable = {n: m for n, m in built.items() if measure_latency and by_name[n]["within_budget"]}
    shown = {n: m for n, m in built.items()
             if measure_latency and not by_name[n]["within_budget"] and by_name[n]["baseline"]}
    budgets = latency_budgets(batch)
    to_run = [r for r in records if r.get("built") and (r["within_budget"] or r["baseline"])]
    stages = race_stages(trials, race)
    if choosable or shown:  # what the timing and the campaigns will cost, before either starts
        say(expected_timing(reference, input_shape, [choosable, shown], budgets,
                            {r["name"]: {batch: r["macs_ratio"], 1: r["cost"]["macs_ratio_batch1"]}
                             for r in records if r.get("built")}))
    block = block_size(validation_inputs, len(x_val))
    x_trial = x_val if block is None else x_val[:block]  # what one trial evaluates: the estimates' unit
    per_inference = inference_seconds(reference, x_trial, device)
    setup = SETUP_INFERENCES * len(x_val) / len(x_trial)  # the golden inference is of the whole split
    say(expected_time(reference, x_trial, to_run, trials, device, stages=stages, seconds=per_inference, setup=setup))
    said = [validation_seconds(per_inference, to_run, trials, stages, setup)[1]]  # the validation estimate last said

    def resay(seconds: float, why: str, source: str | None = None) -> None:
        """Say the validation estimate again when it moved by more than ``progress.RESAY`` from the one said
        (as a stopping campaign's progress does): a timed inference misses what a trial adds to it."""
        high = validation_seconds(seconds, to_run, trials, stages, setup)[1]
        if not said[0] / progress.RESAY <= high <= said[0] * progress.RESAY:
            said[0] = high
            say(f"re-estimated from {why}: " + expected_time(reference, x_trial, to_run, trials, device, stages=stages,
                                                              seconds=seconds, source=source, setup=setup))

    timings: dict[int, dict[str, Any]] = {}
    shown_timings: dict[int, dict[str, Any]] = {}
    if choosable or shown:
        say(f"timing {len(choosable) + len(shown)} candidates (batch {batch} and 1, 1 thread, interleaved until "
            f"two timings of the same model agree within {cost.AGREEMENT:g}, at most "
            f"{' + '.join(f'{s:g} s' for s in budgets.values())} of rounds"
            + (f"; {_baselines_over(len(shown))} apart, in {SHOWN_LATENCY_SHARE:g} of that" if shown else "")
            + ") ...")
        timings = _time_group(reference, choosable, input_shape, budgets)
        shown_timings = _time_group(reference, shown, input_shape,
                                    {b: SHOWN_LATENCY_SHARE * s for b, s in budgets.items()})
        for rec in records:
            name = rec["name"]
            if name in choosable or name in shown:
                rec["cost"] = cost.price(built[name], reference, input_shape, batch,
                                         timings if name in choosable else shown_timings,
                                         name=name, reference_name="__reference__")
                rec["latency_ratio"] = rec["cost"]["latency_ratio"]
                if max_latency is not None and rec["latency_ratio"] > max_latency:
                    rec["within_budget"] = False
        spent = sum(t["seconds"] for group in (timings, shown_timings) for t in group.values())
        say(f"timed in {spent:.0f} s: " + "; ".join(
            f"batch {b}: {t['rounds']} rounds, {'agreed' if t['converged'] else 'stopped by ' + t['stopped_by']} "
            f"(control pair {100 * t['agreement']:.1f}%)" for b, t in timings.items()))
    work = Path(work_dir) if work_dir is not None else None
    tmp = tempfile.TemporaryDirectory(prefix="ftcnn-protect-") if work is None else None
    try:
        root = work if work is not None else Path(tmp.name)  # type: ignore[union-attr]
        to_run = [r for r in records if r.get("built") and (r["within_budget"] or r["baseline"])]
        if timings:
            resay(per_inference, "the measured latency")

        def measured(seconds: float, rec: Mapping[str, Any], per_trial: float) -> None:
            resay(seconds, "a campaign", f"{rec['name']}'s campaign ({per_trial:.2g} s per trial, set-up included)")

        _validate(to_run, records, built, x_val, y_val, ber, stages, root, seed, device, confidence, tolerance,
                  batch, say, race, measured, inputs_per_trial=block, setup=setup, faults=faults)
    finally:
        if tmp is not None:
            tmp.cleanup()
    evaluated = [r for r in records if r["validation"] is not None]
    flags = pareto_front([(r["macs_ratio"], r["validation"]["accuracy"]) for r in evaluated])
    for rec in records:
        rec["pareto"] = False
    for rec, flag in zip(evaluated, flags):
        rec["pareto"] = flag
    chosen, reason = choose(records, ber, max_macs, max_latency, batch, alpha=alpha, max_memory=max_memory,
                            tolerance=tolerance)
    for rec in records:
        rec["chosen"] = rec["name"] == chosen
    config = {"ber": ber, "max_macs": max_macs, "max_latency": max_latency, "max_memory": max_memory,
              "trials": trials, "seed": seed, "fold_bn": folding, "confidence": confidence,
              "validation_fraction": validation_fraction, "validation_size": len(x_val),
              "validation_inputs_per_trial": block or len(x_val),
              "fit_size": len(x_fit), "calibration_size": len(calibration), "batch": batch,
              "choice": {"rule": "cheapest (MACs at batch, then latency) shown within tolerance of the most "
                                 "accurate, paired by trial", "test": "paired sign-flip of non-inferiority "
                                 "(paired.sign_flip_test, null -tolerance)", "tolerance_points": tolerance,
                         "alpha": alpha, "one_sided": True,
                         "paired_by": "trial index: same validation seed, BER and inputs for every candidate"},
              "latency": {"batches": sorted({batch, 1}), "threads": 1, "method": "cost.stable_latency",
                          "agreement": cost.AGREEMENT,
                          "rounds": {str(b): t["rounds"] for b, t in timings.items()},
                          "converged": {str(b): t["converged"] for b, t in timings.items()},
                          "stopped_by": {str(b): t["stopped_by"] for b, t in timings.items()},
                          "seconds": {str(b): t["seconds"] for b, t in timings.items()},
                          "max_seconds": {str(b): v for b, v in budgets.items()},
                          # the baselines over budget, timed apart (with the reference) in a share of the budget
                          "shown": {"names": sorted(shown), "max_seconds_share": SHOWN_LATENCY_SHARE,
                                    "rounds": {str(b): t["rounds"] for b, t in shown_timings.items()},
                                    "converged": {str(b): t["converged"] for b, t in shown_timings.items()},
                                    "seconds": {str(b): t["seconds"] for b, t in shown_timings.items()}}
                          if shown else None}
              if measure_latency else None,
              "race": {"enabled": race, "stages": stages,
                       "test": "betting confidence sequence (metrics.BettingCS) of the paired per-trial "
                               "differences to the most accurate choosable candidate, (d + 1) / 2; stop when "
                               "it lies below -tolerance", "confidence": confidence,
                       "stopped": {r["name"]: r["raced"]["stopped_at"] for r in records if r.get("raced")}},
              "reference": ref_cost, "weight_checks_available": weight_checks_available(),
              "fault_model": faults.describe(ber), "target": faults.target,
              "activation_ber": faults.activation_ber,
              "fault_seeds": role_seeds(seed),  # each role's campaign seed: disjoint fault draws (ftcnn.campaigns.seeds)
              "device": device}
    models = {n: m for n, m in built.items() if next(r for r in records if r["name"] == n)["validation"]}
    return ProtectResult(chosen, reason, records, models, config)


def evaluate_test(result: ProtectResult, x_test: torch.Tensor, y_test: torch.Tensor, *,
                  names: Sequence[str] | None = None, bers: Sequence[float] | None = None,
                  trials: int | None = None, work_dir: str | Path | None = None,
                  inputs_per_trial: int | None = None, role: str = "test",
                  attack_protection: bool = True) -> dict[str, Any]:
    """Test-split numbers (clean, and at ``ber`` and 10x ``ber``) for the chosen protection
    (or ``names``), once the choice is made; stored in ``result.test`` and returned. The
    campaigns run on the device the search ran on (``result.config["device"]``);
    ``inputs_per_trial``: each trial on a random block of the test split (unbiased, cheaper).
    Their faults come from ``role``'s stream (``ftcnn.campaigns.seeds``: never the validation trials'
    fault sets), recorded with each entry as ``role`` and ``fault_seed``.

    ``attack_protection=False`` (the ablation of issue 21): the same fault draws with the
    protection's own values (bounds, code words) left out of the fault space; entries are
    stored as ``NAME`` + ``UNATTACKED_PROTECTION`` beside the attacked ones (a candidate-name key,
    as ``ftcnn report`` reads them).

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
            key = name if attack_protection else f"{name}{UNATTACKED_PROTECTION}"
            summary = _campaign(result.models[name], x_test, y_test, bers, trials, fault_seed,
                                root / role / key, cfg.get("device", "cpu"), inputs_per_trial, attack_protection,
                                cfg.get("confidence", DEFAULT_CONFIDENCE), fault_model(cfg))
            out[key] = {"clean": summary["golden_accuracy"], "role": role, "fault_seed": fault_seed,
                        "attack_protection": attack_protection, "trials": trials,
                        "inputs_per_trial": min(inputs_per_trial or len(x_test), len(x_test)),
                        "bers": {f"{b:g}": _point(summary, b) for b in bers}}
    finally:
        if tmp is not None:
            tmp.cleanup()
    result.test = out
    return out


def fault_model(config: Mapping[str, Any]) -> FaultModel:
    """The fault model a result was chosen under (its ``config``; parameters for results made before)."""
    return FaultModel(config.get("target", "parameters"), config.get("activation_ber"))


def front_json(result: ProtectResult) -> str:
    """Strict JSON (no NaN/Inf) of every candidate, the choice and the reason."""
    blob = {"format": "ftcnn-protect/1", "config": result.config, "chosen": result.chosen,
            "reason": result.reason, "candidates": result.records, "test": result.test, **result.extra}
    return files.dumps_json(blob, indent=1)


def plot_front(result: ProtectResult, path: str | Path) -> None:
    """Draw the front (``ftcnn.reporting.plots.protect_front``) from what ``front.json`` stores, so that
    ``ftcnn report`` redraws the same figure from the file."""
    plots.protect_front(files.loads_strict(front_json(result)), Path(path))


def write_result(result: ProtectResult, out: str | Path, **meta: Any) -> dict[str, Path]:
    """Write the chosen model (``protected.pt``), ``front.json`` and ``front.png`` into ``out``."""
    out = Path(out)
    files.make_folder(out)
    paths = {"model": out / "protected.pt", "front": out / "front.json", "plot": out / "front.png"}
    rec = result.record(result.chosen)
    checkpoint.save(result.model, paths["model"], protection=rec["name"],
                    protection_settings=files.jsonable(rec["settings"]), reason=result.reason, **meta)
    files.write_text(paths["front"], front_json(result) + "\n")
    plot_front(result, paths["plot"])
    return paths


def protect_run(model: nn.Module, data: str, out: str | Path, *, ber: float = 1e-4, max_macs: float = 1.15,
                max_latency: float | None = None, max_memory: float | None = None, trials: int = 100, seed: int = 0,
                batch: int = cost.DEFAULT_BATCH,
                allow_builder: str | None = None, source: str | None = None,
                log: Callable[[str], Any] | None = None, device: str = "cpu",
                confidence: float = DEFAULT_CONFIDENCE, tolerance: float = DEFAULT_TOLERANCE,
                race: bool = True, validation_inputs: int | None = DEFAULT_VALIDATION_INPUTS,
                test_inputs: int | None = DEFAULT_TEST_INPUTS, target: str = "parameters",
                activation_ber: float | None = None) -> ProtectResult:
    """``ftcnn protect``: search on ``data``'s training split, report on its test split, write ``out``;
    scores and campaigns on ``device``; ``race``, ``validation_inputs``: see :func:`protect`;
    ``test_inputs``: the test campaigns' block per trial (None: every test input). Why blocks: on
    ResNet-20 (mnist5k, 100 trials at BER 1e-4 and 1e-3) the whole 1,000-input split took 3.8 of
    12.5 minutes, and the betting interval at 100 trials is set by the trials, not the block.

    Example (minutes of CPU, so not run as a doctest)::

            protect_run(ftcnn.load("lenet5.pt"), "mnist5k", "runs/protect", ber=1e-4, max_macs=1.15)
    """
    check_budget(max_macs, max_latency, ber, trials, batch=batch, max_memory=max_memory)
    faults = FaultModel(target, activation_ber)  # what the campaigns attack (:class:`FaultModel`)
    rules.check("race", race, "race")
    if validation_inputs is not None:
        rules.check("validation_inputs", validation_inputs, "--validation-inputs")
    if test_inputs is not None:
        rules.check("test_inputs", test_inputs, "--test-inputs")
    out = Path(out)
    train_set, test_set = data_mod.load(data, "train"), data_mod.load(data, "test")
    campaign.check_input_shape(model, test_set.tensors[0][:1])
    with files.exclusive_folder(out), checkpoint.allowing(allow_builder):  # one writer for the whole run
        result = protect(model, *train_set.tensors, ber=ber, max_macs=max_macs, max_latency=max_latency,
                         max_memory=max_memory, trials=trials, seed=seed, batch=batch,
                         work_dir=out / "campaigns", log=log, device=device, confidence=confidence,
                         tolerance=tolerance, race=race, validation_inputs=validation_inputs, faults=faults)
        evaluate_test(result, *test_set.tensors, work_dir=out / "campaigns",
                      inputs_per_trial=block_size(test_inputs, len(test_set)))
        write_result(result, out, data=data, source=source)
    return result
