"""The study (issue 22): the paper's claims tested as claims, over several training seeds, per BER.

Why: one training seed, one split, uncorrected tests on the wrong quantity and hand-typed prose
carried every verdict before (issue 22, items 2, 4, 5, 7). ``ftcnn study`` regenerates them:

- for each model and each training seed it trains (``pipeline.train_or_reuse``: content-keyed,
  reused), builds the variants the claims compare (``compare.build_variant``: the comparison's own
  variants and piece cache) and runs one fixed-size campaign per variant and BER, its faults drawn
  from the test role's stream (``seeds.role_seed(seed, "test")``), the same for both arms of a
  claim, so trial ``i`` of the two arms shares its random numbers (common random numbers);
- claims 1 and 2 are tested under each fault target of ``targets`` (``CampaignConfig.target``): memory
  faults (every stored bit, at ``bers``) and datapath faults (transient flips in every Conv2d/Linear
  output per inference, at ``activation_bers``), since output TMR exists to mask compute faults and a
  weight check cannot see them (issue 22, item 8); each (target, rate) is its own cell, and a claim's
  Holm family holds the cells of both targets;
- resilience is the drop from each model's OWN clean accuracy (a pruned model that lost clean
  points is not rewarded for it): per trial, ``d_i = drop_arm_i - drop_reference_i``;
- a claim states ``mean(d) < margin``; each cell (model, seed, BER) gets two one-sided paired
  sign-flip permutation tests (``paired.sign_flip_test``): "less" (for the claim) and "greater"
  (against it), each Holm-corrected (``paired.holm``) across all cells of the claim. A cell is
  "supported" or "refuted" when the corrected test says so at ``alpha`` and its interval
  (``paired.paired_test``'s: betting below ``metrics.BOUNDED_CI_BELOW`` trials, valid at every n)
  lies on that side of the margin, else "inconclusive (no power)" (:func:`verdicts` says why both);
- claim 3 (pruning pays for hardening) compares the hardened pruned and hardened unpruned models'
  CPU latency, paired by round of interleaved timing (``cost.interleaved_timings``), tested the same
  way on the log ratios, and only where pruning kept the clean accuracy (at most ``accuracy_tolerance``
  below the unpruned one's; one-sided: faster AND more accurate supports the claim): "up to X% faster"
  means nothing when the speed was bought with accuracy, so such a cell is "inconclusive (clean
  accuracy lost)". The pruning ratio is not fixed: per model and seed it is the largest ratio of
  ``prune_grid`` whose pruned, fine-tuned, hardened model (claim 2's own variant, built at that
  ratio) keeps clean accuracy within the tolerance on a validation split of the training data
  (``splits.validation_split``), never on the test inputs the verdict is computed on
  (:func:`search_ratio`); where none keeps it the cell says so and times nothing. The models are
  trained on the whole training split, those inputs included, so the choice is in-sample and may be
  optimistic: the verdict checks clean accuracy again on the test inputs;
- across seeds a verdict is stated only when it holds in every seed, with the mean and spread of
  the seeds' mean differences and each seed's interval;
- ``study.md`` (tables, then verdict sentences written from the same formatted numbers) and
  ``study.json`` (strict JSON: config, versions, seeds, input hashes, results) are generated,
  never typed.

Resume: each cell (model, seed, claim, BER) is a JSON file under ``cells/`` written atomically
with its key (``pipeline.store_key``: the settings and data digests it was computed from, and
its own digest) once both arms' campaigns finished; the campaigns commit every trial to SQLite
as it completes. A killed study loses nothing computed; a rerun skips done cells and says so.
Files in the folder are untrusted (design §8): a cell is reused only when its key matches and
it passes a schema (``readback``), else recomputed with one line saying why.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ftcnn import data, files, fingerprint, models, progress, readback
from ftcnn.campaigns import activations, campaign, paired, store
from ftcnn.flows import compare, pipeline
from ftcnn.protection import cost
from ftcnn.campaigns.campaign import CampaignConfig
from ftcnn.campaigns.metrics import BOUNDED_CI_BELOW, Golden, fixed_n_ci, golden_predictions, mean_ci
from ftcnn.campaigns.seeds import role_seed
from ftcnn.campaigns.trials import check_limit

# name -> (width, training epochs): the settings experiments/hardening.py and pruning.py used
MODEL_SETUP = {"lenet5": (1.0, 5), "vgg11": (0.25, 3), "resnet20": (0.5, 3)}
DEFAULT_MODELS = ("lenet5", "vgg11", "resnet20")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_BERS = (1e-6, 1e-5, 1e-4)
# what faults hit (``CampaignConfig.target``, the one name across CLI, API and JSON): the weight memory, and
# transient flips in every Conv2d/Linear output (the datapath), each at its own rates. Why both: output-level
# TMR exists to mask compute faults and a weight check cannot see them, so claims tested under memory faults
# alone favour one side (issue 22, item 8)
TARGETS = ("parameters", "activations")
# activation rates per bit of every layer output per inference: three decades that take the unprotected
# models from a fraction of a point to tens of points lost (LeNet-5 holds 0.21 M output bits per input,
# VGG-11 w0.25 0.97 M, ResNet-20 w0.5 2.5 M; datapath.md's pilot on LeNet-5: 1e-7 -0.06, 1e-6 -0.44, 1e-5 -4.48)
DEFAULT_ACTIVATION_BERS = (1e-7, 1e-6, 1e-5)
CELL_FORMAT = 1  # bump when a cell's content changes meaning: older cells are recomputed

SUPPORTED, REFUTED, NO_POWER, DISAGREE = ("supported", "refuted", "inconclusive (no power)",
                                          "inconclusive (seeds disagree)")
UNEQUAL = "inconclusive (clean accuracy lost)"
NO_RATIO = "inconclusive (no ratio keeps clean accuracy)"
# claim 3's pruning ratios, tried from the largest down (typed, not computed: 0.1 * 3 is not 0.3, and a
# ratio equal to ``prune_ratio`` reuses claim 2's built variant only when it is the same float)
DEFAULT_PRUNE_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MAX_PRUNE_GRID = 100
# how the validation split is drawn and the ratio chosen: recorded in claim 3's cell key
VALIDATION_RULE = "splits.validation_split(train, validation_fraction, seed), stratified"
SEARCH_RULE = "largest ratio of the grid keeping validation clean accuracy; descending, stop at the first kept"
FAULTS, LATENCY = "faults", "latency"  # what a claim compares: accuracy drops under faults, or latency


@dataclass(frozen=True)
class Claim:
    """A claim as a test: ``mean(drop of arm - drop of reference) < margin``, per BER."""

    name: str
    title: str          # what the tables and sentences call it (no digits: the prose check reads numbers)
    arm: str            # variant names of ``compare.default_variants``
    reference: str
    statement: str      # the claim in words, ``{margin}`` in accuracy points
    kind: str = FAULTS  # FAULTS: one cell per BER; LATENCY: one cell per model and seed (no BER)


def claims(config: "StudyConfig") -> tuple[tuple[Claim, float], ...]:
    """The claims this study tests, each with its margin (a share of the inputs)."""
    return (
        (Claim("hardening_vs_tmr", "selective hardening vs full TMR", "harden_min", "tmr_full",
               "selective hardening (min rule, top {ratio} of channels) loses at most {margin} accuracy "
               "point(s) more under faults than full output-level TMR"), config.tmr_margin),
        (Claim("vulnerability_vs_l1_pruning", "vulnerability vs L1 pruning", "pruned_vuln_harden_min",
               "pruned_l1_harden_min",
               "at the same pruning ratio ({prune}), vulnerability-based pruning (then hardening) loses less "
               "accuracy under faults than L1 pruning (then hardening){margin_text}"), config.pruning_margin),
        (Claim("pruning_pays_for_hardening", "hardened pruned vs hardened unpruned latency", "pruned_vuln_harden_min",
               "harden_min", "at no loss of clean accuracy (at most {tolerance} point below on the test inputs), the "
               "hardened model pruned by vulnerability, at the largest ratio of {grid} that keeps clean accuracy "
               "within that tolerance on a validation split of the training data, runs faster than the hardened "
               "unpruned one (CPU, batch {batch})", LATENCY), 0.0),
    )


def check_grid(grid: Sequence[float]) -> None:
    """Refuse a pruning-ratio grid that cannot be searched, in one line before any work: each ratio a
    number in (0, 1) (pruning all or nothing says nothing about claim 3), none twice, at least one.

    Example:
        >>> check_grid((0.2, 0.4))
        >>> check_grid((0.5, 1.0))
        Traceback (most recent call last):
        ...
        ValueError: --prune-grid ratio 1 must lie in (0, 1): a pruned model keeps some channels
    """
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence):
        raise ValueError(f"--prune-grid must be a list of ratios (got {type(grid).__name__})")
    if not grid:
        raise ValueError("--prune-grid needs at least one pruning ratio")
    if len(grid) > MAX_PRUNE_GRID:
        raise ValueError(f"--prune-grid holds {len(grid)} ratios; at most {MAX_PRUNE_GRID}")
    for ratio in grid:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ValueError(f"--prune-grid ratio {str(ratio)[:40]!r} is not a number")
        if not 0.0 < ratio < 1.0:  # NaN fails this too
            raise ValueError(f"--prune-grid ratio {ratio:g} must lie in (0, 1): a pruned model keeps some channels")
    if len(set(grid)) != len(grid):
        raise ValueError("--prune-grid names a ratio twice")


def _check_names(names: Sequence[str], known: Sequence[str], flag: str, what: str) -> None:
    """At least one name, each known, none twice: else one line saying which.

    Example:
        >>> _check_names(("parameters", "memory"), TARGETS, "--targets", "fault target")
        Traceback (most recent call last):
        ...
        ValueError: unknown fault target 'memory'; choose from parameters, activations
    """
    if not names:
        raise ValueError(f"{flag} needs at least one {what}")
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} {str(name)[:40]!r}; choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{flag} names a{'n' if what[0] in 'aeiou' else ''} {what.split()[-1]} twice")


@dataclass(frozen=True)
class StudyConfig:
    """What the study computes. A cell's key holds the fields its numbers depend on (``cell_key``);
    the analysis fields (margins, alpha, confidence, permutations) are applied afresh to the stored
    cells on every run, so changing them recomputes nothing. The accuracy tolerance is both: it
    chooses claim 3's pruning ratio (so it is in that claim's cell key, with the grid and the
    validation split) and judges the test accuracies afresh."""

    models: tuple[str, ...] = DEFAULT_MODELS
    data: str = "mnist5k"
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    bers: tuple[float, ...] = DEFAULT_BERS
    trials: int = 100
    epochs: int | None = None            # None: each model's own (MODEL_SETUP)
    finetune_epochs: int = 2
    harden_ratio: float = 0.1
    prune_ratio: float = 0.3
    tmr_margin: float = 0.01             # claim 1: "close to TMR" = at most this many more points lost
    pruning_margin: float = 0.0          # claim 2: vulnerability pruning loses less than L1 (by > 0)
    alpha: float = 0.05
    confidence: float = 0.95
    permutations: int = 10_000
    accuracy_tolerance: float = 0.003    # claim 3: "no loss of clean accuracy" = at most this share below
    latency_rounds: int = 30             # claim 3: interleaved timing rounds (each a paired observation)
    latency_batch: int = 1
    prune_grid: tuple[float, ...] = DEFAULT_PRUNE_GRID  # claim 3: ratios searched (largest kept wins)
    validation_fraction: float = 0.2     # claim 3: share of each class of the training data to choose on
    targets: tuple[str, ...] = TARGETS   # claims 1 and 2 are tested under each: memory, then datapath faults
    activation_bers: tuple[float, ...] = DEFAULT_ACTIVATION_BERS  # the rates of activation faults
    device: str = "cpu"                  # where training, scores and campaigns run (latency: the CPU)

    def __post_init__(self) -> None:
        _check_names(self.models, models.model_names(), "--models", "model")
        if not self.seeds:
            raise ValueError("--seeds needs at least one training seed")
        for seed in self.seeds:
            check_limit("seed", seed, "--seeds")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("--seeds names a seed twice")
        check_limit("points", self.bers, "--ber")
        for ber in self.bers:
            if not (isinstance(ber, (int, float)) and 0.0 < ber <= 1.0):
                raise ValueError(f"--ber {ber} must lie in (0, 1]: a claim at BER 0 has nothing to test")
        check_limit("trials", self.trials, "--trials")
        if self.trials < 2:
            raise ValueError("--trials must be >= 2: a paired test needs pairs")
        if self.epochs is not None and (isinstance(self.epochs, bool) or self.epochs < 1):
            raise ValueError(f"--epochs must be >= 1 (got {self.epochs})")
        if isinstance(self.finetune_epochs, bool) or self.finetune_epochs < 0:
            raise ValueError(f"--finetune-epochs must be >= 0 (got {self.finetune_epochs})")
        if not 0.0 < self.harden_ratio <= 1.0:
            raise ValueError(f"--harden-ratio must lie in (0, 1] (got {self.harden_ratio:g})")
        if not 0.0 < self.prune_ratio < 1.0:
            raise ValueError(f"--prune-ratio must lie in (0, 1) (got {self.prune_ratio:g})")
        for flag, value in (("--tmr-margin", self.tmr_margin), ("--pruning-margin", self.pruning_margin)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{flag} must lie in [0, 1): a share of the inputs (got {value:g})")
        if isinstance(self.latency_rounds, bool) or not isinstance(self.latency_rounds, int) or self.latency_rounds < 2:
            raise ValueError(f"--latency-rounds must be a whole number >= 2 (got {self.latency_rounds!r})")
        if isinstance(self.latency_batch, bool) or not isinstance(self.latency_batch, int) or self.latency_batch < 1:
            raise ValueError(f"--latency-batch must be a whole number >= 1 (got {self.latency_batch!r})")
        for flag, value in (("--alpha", self.alpha), ("--confidence", self.confidence),
                            ("--accuracy-tolerance", self.accuracy_tolerance),
                            ("--validation-fraction", self.validation_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{flag} must lie in (0, 1) (got {value:g})")
        check_grid(self.prune_grid)
        _check_names(self.targets, TARGETS, "--targets", "fault target")
        check_limit("points", self.activation_bers, "--activation-ber")
        for ber in self.activation_bers:
            if not (isinstance(ber, (int, float)) and 0.0 < ber <= 1.0):
                raise ValueError(f"--activation-ber {ber} must lie in (0, 1]: a claim at rate 0 has nothing to test")
        data.info(self.data)  # an unknown data set or a missing folder: one line before any work

    def setup(self, model: str) -> tuple[float, int]:
        """(width, training epochs) of ``model`` in this study."""
        width, epochs = MODEL_SETUP.get(model, (1.0, 5))
        return width, self.epochs or epochs

    def rates(self, target: str) -> tuple[float, ...]:
        """The fault rates claims are tested at under ``target``."""
        return self.bers if target == "parameters" else self.activation_bers

    def compare_config(self, seed: int) -> compare.CompareConfig:
        """The comparison settings the variants of ``seed`` are built with (its scores, fine-tune, ranges)."""
        return compare.CompareConfig(bers=self.bers, trials=self.trials, seed=seed, harden_ratio=self.harden_ratio,
                                     prune_ratio=self.prune_ratio, finetune_epochs=self.finetune_epochs)


# --- cells: stored as they complete, reused when their key matches ------------------------------

_SHARE = readback.Num(0.0, 1.0)
CELL_SCHEMA = readback.Obj(required={
    "clean": readback.Obj(required={"arm": _SHARE, "reference": _SHARE}),
    "accuracy": readback.Obj(required={"arm": readback.ListOf(_SHARE, min_len=2),
                                       "reference": readback.ListOf(_SHARE, min_len=2)}),
    "critical_sdc": readback.Obj(required={"arm": readback.ListOf(_SHARE), "reference": readback.ListOf(_SHARE)}),
    "model_digests": readback.Obj(required={"arm": readback.Text(), "reference": readback.Text()}),
}, optional={"seconds": readback.Num(0.0, 1e9)})
_MS = readback.Num(1e-9, 1e9)  # ms per forward: positive (a ratio of timings is taken)
_RATIO = readback.Num(1e-12, 1.0 - 1e-12)  # a pruning ratio: in (0, 1)
SEARCH_SCHEMA = readback.Obj(required={
    "grid": readback.ListOf(_RATIO, min_len=1, max_len=MAX_PRUNE_GRID),
    "tolerance": _SHARE, "validation_inputs": readback.Num(1, readback.MAX_INT, integer=True),
    "reference_validation_accuracy": _SHARE,
    "tried": readback.ListOf(readback.Obj(required={"ratio": _RATIO, "validation_accuracy": _SHARE,
                                                    "kept": readback.Flag()}), max_len=MAX_PRUNE_GRID),
    "chosen": readback.Num(1e-12, 1.0 - 1e-12, nullable=True)}, optional={"seconds": readback.Num(0.0, 1e9)})
# claim 3's cell: the search always; the arm's accuracy, digest and timings only where a ratio was chosen
LATENCY_CELL_SCHEMA = readback.Obj(required={
    "search": SEARCH_SCHEMA,
    "clean": readback.Obj(required={"reference": _SHARE}, optional={"arm": _SHARE}),
    "model_digests": readback.Obj(required={"reference": readback.Text()}, optional={"arm": readback.Text()}),
}, optional={"seconds": readback.Num(0.0, 1e9),
             "latency_ms": readback.Obj(required={"arm": readback.ListOf(_MS, min_len=2),
                                                 "reference": readback.ListOf(_MS, min_len=2)})})


@dataclass(frozen=True)
class Cell:
    """One test: a claim on one model, one training seed, one fault target and rate."""

    model: str
    seed: int
    claim: Claim
    ber: float | None  # None: a latency claim's cell
    target: str = "parameters"  # what the faults hit (``TARGETS``); parameter cells keep their first paths

    @property
    def where(self) -> str:
        if self.ber is None:
            return "latency"
        return ("" if self.target == "parameters" else f"{self.target}_") + f"ber_{paired.fmt_ber(self.ber)}"

    @property
    def label(self) -> str:
        return f"{self.model} seed {self.seed} {self.claim.name} " + (
            "latency" if self.ber is None else f"{rate_name(self.target)} {paired.fmt_ber(self.ber)}")

    def path(self, root: Path) -> Path:
        return root / "cells" / self.model / f"seed{self.seed}" / self.claim.name / f"{self.where}.json"


def rate_name(target: str) -> str:
    """How tables and sentences name a rate under ``target``: a memory BER or an activation BER."""
    return "BER" if target == "parameters" else "activation BER"


def cell_key(cell: Cell, config: StudyConfig, digests: Mapping[str, str]) -> dict[str, Any]:
    """What a cell's numbers depend on: the model's training, the variants' settings, the data
    (by content) and the campaign (BER, trials, the test role's fault seed)."""
    width, epochs = config.setup(cell.model)
    key = {"format": CELL_FORMAT, "model": cell.model, "width": width, "epochs": epochs, "seed": cell.seed,
           "data": config.data, "train data": digests["train"], "test data": digests["test"],
           "harden_ratio": config.harden_ratio, "prune_ratio": config.prune_ratio,
           "finetune_epochs": config.finetune_epochs, "claim": cell.claim.name, "arm": cell.claim.arm,
           "reference": cell.claim.reference}
    if cell.claim.kind == LATENCY:  # its ratio is searched (the grid's), not ``prune_ratio``
        key.pop("prune_ratio")
        return {**key, "latency_rounds": config.latency_rounds, "latency_batch": config.latency_batch,
                "prune_grid": sorted(config.prune_grid), "accuracy_tolerance": config.accuracy_tolerance,
                "validation_fraction": config.validation_fraction, "validation": VALIDATION_RULE,
                "search": SEARCH_RULE}
    key = {**key, "ber": cell.ber, "trials": config.trials, "fault seed": role_seed(cell.seed, "test")}
    if cell.target != "parameters":  # parameter cells keep the key they were first stored under
        key.update(target=cell.target, activation_mode="transient")
    return key


def check_search(stored: Mapping[str, Any], path: Path) -> None:
    """What the schema cannot say about claim 3's stored search: it is the search :func:`search_ratio`
    makes (ratios of its grid tried from the largest down, each kept exactly when its validation
    accuracy is within the tolerance, stopping at the first kept one, which is the chosen one), and a
    chosen ratio comes with the arm's accuracy, digest and timings. A one-line ValueError otherwise."""
    search = stored["search"]
    tried = [t["ratio"] for t in search["tried"]]
    order = sorted(search["grid"], reverse=True)
    kept = [keeps(t["validation_accuracy"], search["reference_validation_accuracy"], search["tolerance"])
            for t in search["tried"]]
    expected = (next((r for r, k in zip(tried, kept) if k), None))
    problem = ("its tried ratios are not the grid's from the largest down" if tried != order[:len(tried)] else
               "a tried ratio's 'kept' does not match its accuracy" if kept != [t["kept"] for t in search["tried"]] else
               "it tried ratios after the first kept one" if expected is not None and tried[-1] != expected else
               "it stopped before the end of the grid without keeping a ratio" if expected is None and
               len(tried) != len(order) else
               "its chosen ratio is not the first kept one" if search["chosen"] != expected else
               "a chosen ratio has no arm accuracy, digest or timings" if expected is not None and not (
                   "arm" in stored["clean"] and "arm" in stored["model_digests"] and "latency_ms" in stored) else "")
    if problem:
        raise ValueError(f"{path}: search: {problem}")


def stored_cell(cell: Cell, root: Path, key: dict[str, Any], trials: int) -> dict[str, Any] | None:
    """The cell's stored content when it was computed from ``key`` and passes its schema, else None
    (said in one line; the file is untrusted and will be rewritten)."""
    path = cell.path(root)
    if not pipeline.is_current(path, key, cell.label):
        return None
    latency = cell.claim.kind == LATENCY
    try:
        stored = readback.read_json(path, LATENCY_CELL_SCHEMA if latency else CELL_SCHEMA)
        if latency:
            check_search(stored, path)
        if latency and stored["search"]["chosen"] is None:  # nothing at equal accuracy was timed
            return stored
        lengths = {len(stored[k][arm]) for k in (("latency_ms",) if latency else ("accuracy", "critical_sdc"))
                   for arm in ("arm", "reference")}
        if lengths != {trials}:
            raise ValueError(f"{path}: holds {sorted(lengths)} values per arm, not {trials}")
    except ValueError as exc:
        pipeline.note(f"recomputing {cell.label}: {str(exc).splitlines()[0][:200]}", "study")
        return None
    return stored


def arm_trials(net: nn.Module, x: torch.Tensor, y: torch.Tensor, config: CampaignConfig, folder: Path,
               digests: tuple[str, str], name: str) -> tuple[float, list[float], list[float]]:
    """One arm's campaign at one BER (resumed trial by trial from its SQLite file): the clean
    accuracy on the inputs and the per-trial accuracies and critical-SDC shares, in trial order."""
    summary, _ = compare.resumed_campaign(net, x, y, config, folder, digests, f"campaign of {name}", progress=False)
    # the identity run_campaign just checked and recorded (it applies the config to the model first)
    db = store.open_db(folder, store.stored_identity(folder), config.points)  # re-checks every row
    try:
        done = store.done_trials(db, config.points[0])
    finally:
        db.close()
    rows = [done[t] for t in range(config.trials)]
    return summary["golden_accuracy"], [r["accuracy"] for r in rows], [r["critical_sdc"] for r in rows]


def compute_cell(cell: Cell, nets: Mapping[str, nn.Module], net_digests: Mapping[str, str], x: torch.Tensor,
                 y: torch.Tensor, test_digest: str, config: StudyConfig, root: Path,
                 search: "RatioSearch | None" = None) -> dict[str, Any]:
    """Both arms' campaigns of ``cell`` (faults from the test role's stream, the same for both arms),
    or for a latency claim their interleaved timings at the ratio ``search`` chose."""
    if cell.claim.kind == LATENCY:
        if search is None:
            raise ValueError(f"{cell.label}: a latency claim's cell needs its pruning-ratio search")
        return latency_cell(cell, nets, net_digests, x, y, config, search)
    cfg = CampaignConfig(bers=(cell.ber,), trials=config.trials, seed=role_seed(cell.seed, "test"),
                         device=config.device, target=cell.target)
    out: dict[str, Any] = {"clean": {}, "accuracy": {}, "critical_sdc": {}, "model_digests": {}}
    for side, variant in (("arm", cell.claim.arm), ("reference", cell.claim.reference)):
        folder = root / cell.model / f"seed{cell.seed}" / "campaigns" / variant / cell.where
        clean, accuracy, critical = arm_trials(nets[variant], x, y, cfg, folder,
                                               (net_digests[variant], test_digest), variant)
        out["clean"][side], out["accuracy"][side], out["critical_sdc"][side] = clean, accuracy, critical
        out["model_digests"][side] = net_digests[variant]
    return out


def clean_accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``net`` on ``x`` (the validation inputs of the search, the test inputs of the verdict)."""
    with torch.inference_mode():
        return float((campaign.predict(net, x).argmax(1) == y).float().mean())


def latency_cell(cell: Cell, nets: Mapping[str, nn.Module], net_digests: Mapping[str, str], x: torch.Tensor,
                 y: torch.Tensor, config: StudyConfig, search: "RatioSearch") -> dict[str, Any]:
    """The search, the clean test accuracies of both arms and ``latency_rounds`` rounds of their CPU
    latency, timed interleaved on one thread (``cost.interleaved_timings``: each round times both, in
    rotating order, so load on a shared machine hits both alike and round ``i`` pairs the two). Where
    no ratio kept validation accuracy there is no arm: the reference's accuracy and the search only."""
    reference = nets[cell.claim.reference]
    if search.net is None:
        return {"search": search.record, "clean": {"reference": clean_accuracy(reference, x, y)},
                "model_digests": {"reference": net_digests[cell.claim.reference]}}
    arm = search.net
    clean = {side: clean_accuracy(net, x, y) for side, net in (("arm", arm), ("reference", reference))}
    times = cost.interleaved_timings({"arm": arm, "reference": reference}, tuple(x.shape[1:]),
                                     batch=config.latency_batch, rounds=config.latency_rounds, threads=1)
    return {"search": search.record, "clean": clean, "latency_ms": times,
            "model_digests": {"arm": search.digest, "reference": net_digests[cell.claim.reference]}}


# --- claim 3's pruning ratio: chosen on a validation split ---------------------------------------

def keeps(accuracy: float, reference: float, tolerance: float) -> bool:
    """Whether ``accuracy`` is at most ``tolerance`` below ``reference`` (one-sided: more accurate keeps)."""
    return accuracy >= reference - tolerance - 1e-12


def largest_kept_ratio(grid: Sequence[float], accuracy: Callable[[float], float], reference: float,
                       tolerance: float) -> tuple[float | None, list[tuple[float, float, bool]]]:
    """The largest ratio of ``grid`` whose ``accuracy(ratio)`` keeps within ``tolerance`` of
    ``reference`` (None when none does), and every (ratio, accuracy, kept) tried, in order.

    Why descending with a stop at the first kept ratio, not bisection: it finds the largest kept
    ratio whatever the shape of accuracy against ratio, and near the boundary the shape is not
    monotone (the standard error of an accuracy near 97% on mnist5k's 800 validation inputs is 0.6
    point, twice the 0.3-point tolerance; on digits, 1 epoch, seed 0: 35.2% at 0.6, 30.7% at 0.5),
    where bisection's answer would depend on the order it probed in. What it pays for that: the
    ratios above the answer, which are the cheapest to build (a convolution pruned by ``r`` keeps
    about ``(1 - r)**2`` of its MACs, so its fine-tune is that much shorter).

    Example:
        >>> measured = {0.2: 0.9, 0.4: 0.86, 0.6: 0.8}
        >>> largest_kept_ratio([0.2, 0.4, 0.6], measured.get, reference=0.88, tolerance=0.03)
        (0.4, [(0.6, 0.8, False), (0.4, 0.86, True)])
    """
    tried = []
    for ratio in sorted(grid, reverse=True):
        value = accuracy(ratio)
        kept = keeps(value, reference, tolerance)
        tried.append((ratio, value, kept))
        if kept:
            return ratio, tried
    return None, tried


@dataclass
class RatioSearch:
    """Claim 3's search for one model and seed: its record (stored in the cell) and the chosen
    ratio's hardened pruned model and digest (None when no ratio kept validation accuracy)."""

    record: dict[str, Any]
    net: nn.Module | None = None
    digest: str | None = None


def search_ratio(claim: Claim, net: nn.Module, scores: dict, reference: nn.Module, train_set: Any,
                 config: StudyConfig, seed: int, folder: Path) -> RatioSearch:
    """Build ``claim.arm`` (claim 2's variant: prune by vulnerability, fine-tune, re-score, harden) at
    the ratios of ``config.prune_grid`` from the largest down with ``compare.build_variant`` (its
    checkpoints and keys: a rerun reloads them), each judged on the validation split of the training
    data against ``reference`` (the unpruned hardened model); the first kept ratio is chosen.

    The validation inputs are never the test inputs the verdict uses, so choosing on them cannot
    bias the verdict's equal-accuracy check. They are part of the training split the models were
    trained and fine-tuned on (claims 1 and 2's models, unchanged; a model trained without them
    would be another model than the one whose latency is timed). Measured once on LeNet-5/mnist5k
    (seed 0; a probe with the study's 5 training and 2 fine-tuning epochs): the models underfit, so
    accuracy on these inputs tracks the test accuracy (unpruned 97.62 vs 96.70%; change from pruning
    by 0.3/0.5/0.7: +0.38/-1.75/-8.74 vs +0.30/-1.00/-7.70 points), while a twin trained without
    them was 1.5 points worse on test and, at 0.3, lost 0.37 validation point where its test
    accuracy gained 0.3.
    A ratio equal to ``prune_ratio`` is claim 2's own variant in ``folder`` (the same key), reused."""
    began = time.perf_counter()
    cmp = config.compare_config(seed)
    x_train, y_train = train_set.tensors
    _, (x_val, y_val) = pipeline.validation_split(x_train, y_train, config.validation_fraction, seed)
    reference_accuracy = clean_accuracy(reference, x_val, y_val)
    input_shape = tuple(x_train.shape[1:])
    built: dict[float, nn.Module] = {}

    def accuracy_at(ratio: float) -> float:
        variant = {v.name: v for v in compare.default_variants(cmp.harden_ratio, ratio, cmp.restrict)}[claim.arm]
        where = folder if ratio == config.prune_ratio else folder / "prune_search" / f"ratio_{ratio!r}"
        files.make_folder(where)
        arm = compare.build_variant(variant, net, scores, train_set, cmp, input_shape, where,
                                    device=config.device).eval()
        built.clear()  # only the last one built can be the chosen one (the search stops there)
        built[ratio] = arm
        accuracy = clean_accuracy(arm, x_val, y_val)
        _log(f"{claim.arm} at ratio {ratio:g}: validation accuracy {accuracy:.2%} (unpruned {reference_accuracy:.2%})")
        return accuracy

    chosen, tried = largest_kept_ratio(config.prune_grid, accuracy_at, reference_accuracy, config.accuracy_tolerance)
    record = {"grid": sorted(config.prune_grid), "tolerance": config.accuracy_tolerance,
              "validation_fraction": config.validation_fraction, "validation_inputs": len(x_val),
              "reference_validation_accuracy": reference_accuracy,
              "tried": [{"ratio": r, "validation_accuracy": a, "kept": k} for r, a, k in tried], "chosen": chosen,
              "seconds": time.perf_counter() - began}  # building (or reloading) and judging the tried ratios
    if chosen is None:
        _log(f"no ratio of {', '.join(f'{r:g}' for r in record['grid'])} keeps validation accuracy within "
             f"{100 * config.accuracy_tolerance:g} point: {claim.name} is not timed")
        return RatioSearch(record)
    return RatioSearch(record, built[chosen], fingerprint.model_digest(built[chosen]))


# --- statistics of a cell, of a claim, across seeds ---------------------------------------------

def latency_statistics(stored: Mapping[str, Any], config: StudyConfig) -> dict[str, Any]:
    """The arm's latency relative to the reference's, paired by round: the geometric mean of the
    rounds' ratios minus 1 (negative: faster) with a t-interval on the log ratios (timings are not
    bounded, so the betting interval does not apply; rounds are independent pairs), and the two
    one-sided sign-flip p-values on the log ratios (uncorrected); with the search's chosen ratio and
    record. Where no ratio was chosen there is nothing to test (``tested`` false, numbers None)."""
    search = stored["search"]
    found = {"prune_ratio": search["chosen"], "search": dict(search), "tested": search["chosen"] is not None}
    if search["chosen"] is None:
        return {**found, "rounds": 0, "clean_arm": None, "clean_reference": float(stored["clean"]["reference"]),
                "latency_arm_ms": None, "latency_reference_ms": None, "mean_difference": None,
                "difference_ci": None, "difference_ci_method": None, "accuracy_kept": None,
                "p_support": None, "p_refute": None}
    arm = np.asarray(stored["latency_ms"]["arm"], dtype=np.float64)
    reference = np.asarray(stored["latency_ms"]["reference"], dtype=np.float64)
    if np.any(arm <= 0) or np.any(reference <= 0):
        raise ValueError("latency cell holds a non-positive timing")
    logs = np.log(arm / reference)
    mean, _, (low, high) = mean_ci(logs, config.confidence)
    clean_arm, clean_ref = float(stored["clean"]["arm"]), float(stored["clean"]["reference"])
    return {**found, "rounds": int(logs.size), "clean_arm": clean_arm, "clean_reference": clean_ref,
            "latency_arm_ms": float(np.median(arm)), "latency_reference_ms": float(np.median(reference)),
            "mean_difference": math.expm1(mean), "difference_ci": [math.expm1(low), math.expm1(high)],
            "difference_ci_method": "student-t on log ratios",
            # one-sided: a pruned model that is faster AND more accurate supports the claim; one that
            # bought its speed with clean accuracy does not (issue 22, item 6)
            "accuracy_kept": clean_arm >= clean_ref - config.accuracy_tolerance - 1e-12,
            "p_support": paired.sign_flip_test(logs, alternative="less", permutations=config.permutations),
            "p_refute": paired.sign_flip_test(logs, alternative="greater", permutations=config.permutations)}


def cell_statistics(stored: Mapping[str, Any], margin: float, config: StudyConfig) -> dict[str, Any]:
    """Per-trial drops from each arm's own clean accuracy, their paired difference (mean, interval),
    and the two one-sided sign-flip p-values against ``margin`` (uncorrected)."""
    acc_arm = np.asarray(stored["accuracy"]["arm"], dtype=np.float64)
    acc_ref = np.asarray(stored["accuracy"]["reference"], dtype=np.float64)
    clean_arm, clean_ref = float(stored["clean"]["arm"]), float(stored["clean"]["reference"])
    d = (clean_arm - acc_arm) - (clean_ref - acc_ref)
    # d_i = (acc_ref_i - acc_arm_i) + (clean_arm - clean_ref): the paired accuracy difference shifted by a
    # constant, so its interval is paired_test's (valid at every n) shifted by the same constant
    test = paired.paired_test(acc_arm, acc_ref, config.confidence)
    offset = clean_arm - clean_ref
    ci_arm, method = fixed_n_ci(acc_arm, config.confidence)
    ci_ref, _ = fixed_n_ci(acc_ref, config.confidence)
    return {
        "trials": int(d.size), "clean_arm": clean_arm, "clean_reference": clean_ref,
        "accuracy_arm": float(acc_arm.mean()), "accuracy_arm_ci": list(ci_arm),
        "accuracy_reference": float(acc_ref.mean()), "accuracy_reference_ci": list(ci_ref),
        "accuracy_ci_method": method,
        "critical_sdc_arm": float(np.mean(stored["critical_sdc"]["arm"])),
        "critical_sdc_reference": float(np.mean(stored["critical_sdc"]["reference"])),
        "drop_arm": float((clean_arm - acc_arm).mean()), "drop_reference": float((clean_ref - acc_ref).mean()),
        "mean_difference": float(d.mean()),
        "difference_ci": [test["ci"][0] + offset, test["ci"][1] + offset], "difference_ci_method": test["ci_method"],
        "p_support": paired.sign_flip_test(d, null=margin, alternative="less", permutations=config.permutations),
        "p_refute": paired.sign_flip_test(d, null=margin, alternative="greater", permutations=config.permutations),
    }


def verdicts(rows: list[dict[str, Any]], margin: float, alpha: float) -> None:
    """Holm-correct each family (for, against) across all cells of one claim, in place; then each
    cell's verdict: "supported" (or "refuted") when the corrected test says so at ``alpha`` AND the
    cell's interval lies wholly below (above) ``margin``, else "inconclusive (no power)".

    Why both: the sign-flip test assumes each difference symmetric about the margin under the null;
    zero-inflated outcomes are skewed, and with a few trials all of one sign it rejects while the
    interval (betting: valid for bounded outcomes at every n, no symmetry needed) still spans the
    margin. Measured on a 6-trial smoke run: p = 0.03 against an interval of [-50, +80] points. A
    verdict is stated only when both agree. The two one-sided p-values sum to about 1, so at most one
    is small. A row that tested nothing (``tested`` false: claim 3 where no pruning ratio kept
    validation accuracy) is no member of the families and says so."""
    tested = [r for r in rows if r.get("tested", True)]
    for family in ("p_support", "p_refute"):
        for row, adjusted in zip(tested, paired.holm([r[family] for r in tested])):
            row[f"{family}_holm"] = adjusted
    for row in rows:
        if not row.get("tested", True):
            row.update(p_support_holm=None, p_refute_holm=None, verdict=NO_RATIO)
            continue
        low, high = row["difference_ci"]
        row["verdict"] = (UNEQUAL if not row.get("accuracy_kept", True) else
                          SUPPORTED if row["p_support_holm"] < alpha and high < margin else
                          REFUTED if row["p_refute_holm"] < alpha and low > margin else NO_POWER)


def across_seeds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One (claim, model, BER) over its seeds: mean and spread (sample sd) of the seeds' mean
    differences, each seed's interval, and the verdict, stated only when every seed holds it. The
    mean and spread are of the seeds that measured a difference (claim 3 without a kept ratio: none)."""
    means = [r["mean_difference"] for r in rows if r["mean_difference"] is not None]
    found = [r["verdict"] for r in rows]
    if len(set(found)) == 1:
        verdict = found[0]
    elif SUPPORTED in found and REFUTED in found:
        verdict = DISAGREE
    else:
        verdict = NO_POWER
    return {"seeds": [r["seed"] for r in rows], "mean_difference": statistics.fmean(means) if means else None,
            "spread": statistics.stdev(means) if len(means) > 1 else None,
            "seed_cis": [r["difference_ci"] for r in rows], "verdict": verdict,
            "holding": max(found.count(SUPPORTED), found.count(REFUTED)), "of": len(rows)}


def analyse(cells: Sequence[Cell], stored: Mapping[Cell, Mapping[str, Any]], config: StudyConfig
            ) -> list[dict[str, Any]]:
    """Every claim's cells with their statistics and verdicts, and the verdicts across seeds."""
    out = []
    for claim, margin in claims(config):
        rows = []
        for cell in (c for c in cells if c.claim == claim):
            numbers = (latency_statistics(stored[cell], config) if claim.kind == LATENCY else
                       cell_statistics(stored[cell], margin, config))
            rows.append({"model": cell.model, "seed": cell.seed, "target": cell.target, "ber": cell.ber, **numbers,
                         "model_digests": dict(stored[cell]["model_digests"])})
        verdicts(rows, margin, config.alpha)
        summary = []
        for target in (("parameters",) if claim.kind == LATENCY else config.targets):
            for model in config.models:
                for ber in ((None,) if claim.kind == LATENCY else config.rates(target)):
                    group = [r for r in rows if r["model"] == model and r["ber"] == ber and r["target"] == target]
                    if group:
                        summary.append({"model": model, "target": target, "ber": ber, **across_seeds(group)})
        out.append({"name": claim.name, "title": claim.title, "kind": claim.kind, "arm": claim.arm,
                    "reference": claim.reference, "margin": margin, "statement": statement(claim, margin, config),
                    "cells": rows, "across_seeds": summary})
    return out


def statement(claim: Claim, margin: float, config: StudyConfig) -> str:
    return claim.statement.format(ratio=f"{config.harden_ratio:.0%}", prune=f"{config.prune_ratio:g}",
                                  grid=", ".join(f"{r:g}" for r in sorted(config.prune_grid)),
                                  tolerance=f"{100 * config.accuracy_tolerance:g}", batch=config.latency_batch,
                                  margin=f"{100 * margin:g}",
                                  margin_text=f" by more than {100 * margin:g} point(s)" if margin else "")


# --- the results files ---------------------------------------------------------------------------

def points(x: float | None) -> str:
    """An accuracy difference in points, signed (the one format tables and sentences share)."""
    return "–" if x is None else f"{100 * x:+.2f}"


def share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def interval(ci: Sequence[float] | None, fmt: Callable[[float], str] = points) -> str:
    return "–" if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def pvalue(p: float) -> str:
    return "–" if p is None or math.isnan(p) else f"{p:.3g}"


def verdict_sentence(claim: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """One generated sentence per (claim, model, BER): every number in it is a table cell's text."""
    spread = "" if row["spread"] is None else f", spread {share(row['spread'])} across seeds"
    if row["verdict"] in (SUPPORTED, REFUTED):
        holds = f"{row['verdict']} in every seed ({row['holding']} of {row['of']})"
    elif row["verdict"] == UNEQUAL:
        holds = "not stated: the pruned model lost more clean accuracy than the tolerance"
    elif row["verdict"] == NO_RATIO:
        holds = "not stated: no pruning ratio of the grid kept validation clean accuracy within the tolerance"
    elif row["verdict"] == DISAGREE:
        holds = f"not stated: the seeds disagree ({row['holding']} of {row['of']} agree at most)"
    else:
        holds = f"not stated: no power ({row['holding']} of {row['of']} seeds decided)"
    if claim["kind"] == LATENCY and row["mean_difference"] is None:
        return f"- {claim['title']}, {row['model']}: {holds}; no latency was timed."
    if claim["kind"] == LATENCY:
        return (f"- {claim['title']}, {row['model']}: {holds}; the arm's latency changes by "
                f"{points(row['mean_difference'])}% on average{spread}.")
    return (f"- {claim['title']}, {row['model']} at {rate_name(row['target'])} {paired.fmt_ber(row['ber'])}: "
            f"{holds}; the arm's "
            f"drop minus the reference's is {points(row['mean_difference'])} points on average{spread}.")


def markdown(result: Mapping[str, Any]) -> str:
    """study.md: how it was made, the tables, then the verdict sentences generated from them."""
    cfg = result["config"]
    lines = ["# Study: the paper's claims as tests (generated by `ftcnn study`; do not edit)", "",
             f"Data {cfg['data']}; models {', '.join(cfg['models'])}; training seeds "
             f"{', '.join(str(s) for s in cfg['seeds'])}; {cfg['trials']} trials per variant and rate on the "
             "whole test split, faults from the test role's stream (`seeds.role_seed(seed, \"test\")`), the same "
             "draws for both arms of a claim. Fault targets: " + "; ".join(
                 f"{t} ({rate_name(t)} " + ", ".join(paired.fmt_ber(b) for b in
                                                      (cfg["bers"] if t == "parameters" else cfg["activation_bers"]))
                 + ")" for t in cfg["targets"]) + " (`CampaignConfig.target`: parameters flip every stored bit once "
             "per trial, every protection's added values included; activations flip each bit of every Conv2d/Linear "
             "output independently at each inference, output TMR's replicas each on their own, the vote and any "
             "restriction fault-free). Resilience: drop from each model's own clean accuracy. Difference: "
             "the arm's drop minus the reference's, in accuracy points, paired by trial, with its "
             f"{cfg['confidence']:.0%} interval (betting below {result['bounded_ci_below']} trials). Tests: one-sided "
             "paired sign-flip permutation tests of the mean difference against the claim's margin, "
             f"Holm-corrected across all cells of a claim, alpha {cfg['alpha']}; a cell's verdict also needs its "
             "interval wholly on one side of the margin. A verdict across seeds is stated only when it holds in "
             "every seed.", ""]
    if len(cfg["seeds"]) < 3:
        lines += [f"Only {len(cfg['seeds'])} training seed(s): a smoke run, not the study (it needs >= 3).", ""]
    for claim in result["claims"]:
        lines += [f"## {claim['title']}", "", f"Claim: {claim['statement']}.", "",
                  f"Arm `{claim['arm']}`, reference `{claim['reference']}`.", ""]
        if claim["kind"] == LATENCY:
            lines += latency_table(claim, cfg)
            continue
        for target in cfg["targets"]:
            rate = rate_name(target)
            lines += [f"### {TARGET_TITLES[target]}", "",
                      f"| model | {rate} | seed | clean arm | clean ref. | acc. arm [CI] | acc. ref. [CI] | "
                      "crit. SDC arm | crit. SDC ref. | difference [CI] | p for (Holm) | p against (Holm) | verdict |",
                      "|---" * 13 + "|"]
            for r in (r for r in claim["cells"] if r["target"] == target):
                lines.append(
                    f"| {r['model']} | {paired.fmt_ber(r['ber'])} | {r['seed']} | {share(r['clean_arm'])} | "
                    f"{share(r['clean_reference'])} | {share(r['accuracy_arm'])} "
                    f"{interval(r['accuracy_arm_ci'], share)} | "
                    f"{share(r['accuracy_reference'])} {interval(r['accuracy_reference_ci'], share)} | "
                    f"{share(r['critical_sdc_arm'])} | {share(r['critical_sdc_reference'])} | "
                    f"{points(r['mean_difference'])} {interval(r['difference_ci'])} | {pvalue(r['p_support_holm'])} | "
                    f"{pvalue(r['p_refute_holm'])} | {r['verdict']} |")
            lines += across_seeds_table(claim, target)
    lines += [VERDICTS_HEADING, ""]
    for claim in result["claims"]:
        lines += [verdict_sentence(claim, r) for r in claim["across_seeds"]]
    lines += ["", f"Compute time of the cells: {result['cell_seconds']:.0f} s in all ({result['timed_cells']} of "
                  f"{result['cells']} cells timed when computed; each cell's campaigns or timings, measured as it ran; "
                  f"training, fine-tuning and scoring not included). Wall time of this run: {result['seconds']:.0f} s "
                  f"({result['computed_cells']} cells computed, {result['reused_cells']} reused)."]
    return "\n".join(lines) + "\n"


VERDICTS_HEADING = "## Verdicts (generated from the tables above)"


TARGET_TITLES = {"parameters": "Memory faults (every stored bit: weights, BatchNorm, what protections add)",
                 "activations": "Datapath faults (transient flips in every Conv2d/Linear output, each inference)"}


def across_seeds_table(claim: Mapping[str, Any], target: str = "parameters") -> list[str]:
    lines = ["", "Across seeds:", "",
             f"| model | {rate_name(target)} | mean difference | spread | seeds' CIs | holds in | verdict |",
             "|---" * 7 + "|"]
    for r in (r for r in claim["across_seeds"] if r["target"] == target):
        cis = "; ".join(interval(ci) for ci in r["seed_cis"])
        lines.append(f"| {r['model']} | {paired.fmt_ber(r['ber'])} | {points(r['mean_difference'])} | "
                     f"{share(r['spread'])} | {cis} | {r['holding']} of {r['of']} | {r['verdict']} |")
    return lines + [""]


def latency_table(claim: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
    """The latency claim's cells: the pruning ratio chosen on the validation split, clean test
    accuracies (equal within the tolerance?), median latencies, the relative latency change in %
    (negative: faster) with its interval, the tests, the verdict; then how each ratio was chosen."""
    def ms(x: float | None) -> str:
        return "–" if x is None else f"{x:.3f}"

    def ratio(x: float | None) -> str:
        return "none" if x is None else f"{x:g}"

    lines = [f"{cfg['latency_rounds']} interleaved rounds on one CPU thread, batch {cfg['latency_batch']}; change: "
             "the geometric mean of the rounds' latency ratios minus 1, in %. Ratio: the pruning ratio chosen on "
             "the validation split (below); clean accuracies on the test inputs.", "",
             "| model | seed | ratio | clean arm | clean ref. | accuracy kept | latency arm ms | latency ref. ms | "
             "change [CI] | p for (Holm) | p against (Holm) | verdict |", "|---" * 12 + "|"]
    for r in claim["cells"]:
        kept = "–" if r["accuracy_kept"] is None else "yes" if r["accuracy_kept"] else "no"
        lines.append(f"| {r['model']} | {r['seed']} | {ratio(r['prune_ratio'])} | {share(r['clean_arm'])} | "
                     f"{share(r['clean_reference'])} | {kept} | {ms(r['latency_arm_ms'])} | "
                     f"{ms(r['latency_reference_ms'])} | {points(r['mean_difference'])} "
                     f"{interval(r['difference_ci'])} | {pvalue(r['p_support_holm'])} | "
                     f"{pvalue(r['p_refute_holm'])} | {r['verdict']} |")
    lines += ["", f"Pruning ratio per model and seed: the largest of {', '.join(f'{g:g}' for g in cfg['prune_grid'])} "
              "whose pruned, fine-tuned, hardened model keeps clean accuracy at most "
              f"{100 * cfg['accuracy_tolerance']:g} point below the unpruned hardened one on a validation split "
              f"({cfg['validation_fraction']:.0%} of each class of the training data, seeded by the training seed; the "
              "models were trained on it, the test inputs never enter the choice), tried from the largest down "
              "until one keeps it.", "",
              "| model | seed | validation inputs | validation ref. | tried (ratio: validation accuracy) | "
              "chosen ratio | search seconds |", "|---" * 7 + "|"]
    for r in claim["cells"]:
        search = r["search"]
        tried = "; ".join(f"{t['ratio']:g}: {share(t['validation_accuracy'])}" for t in search["tried"])
        lines.append(f"| {r['model']} | {r['seed']} | {search['validation_inputs']} | "
                     f"{share(search['reference_validation_accuracy'])} | {tried} | {ratio(search['chosen'])} | "
                     f"{search.get('seconds', 0.0):.0f} |")
    return lines + across_seeds_table(claim)


def verdict_table(result: Mapping[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(claim, model, target, rate, mean difference, spread, verdict) rows: what the command prints."""
    return [(c["title"], r["model"], "–" if r["ber"] is None else r["target"], paired.fmt_ber(r["ber"]),
             points(r["mean_difference"]), share(r["spread"]), r["verdict"])
            for c in result["claims"] for r in c["across_seeds"]]


# --- the run -------------------------------------------------------------------------------------

def plan(config: StudyConfig) -> list[Cell]:
    """Every cell, in the order they are computed (a model's seeds together: its variants load once;
    within a claim, the parameter cells, then the activation cells)."""
    return [Cell(model, seed, claim, ber, target) for model in config.models for seed in config.seeds
            for claim, _ in claims(config)
            for target in (("parameters",) if claim.kind == LATENCY else config.targets)
            for ber in ((None,) if claim.kind == LATENCY else config.rates(target))]


def values_per_arm(cell: Cell, config: StudyConfig) -> int:
    """How many values each arm of a stored cell holds: trials, or timing rounds."""
    return config.latency_rounds if cell.claim.kind == LATENCY else config.trials


def _log(msg: str) -> None:
    pipeline.note(msg, "study")


def build_arms(model: str, seed: int, needed: set[str], config: StudyConfig, root: Path, train_set: Any,
               search: Claim | None = None) -> tuple[dict[str, nn.Module], dict[str, str], RatioSearch | None]:
    """Train (or reuse) ``model`` for ``seed`` and build (or reuse) the ``needed`` variants with the
    comparison's own code and piece cache; their digests; and, for ``search`` (claim 3, when its cell
    is to be computed), the pruning ratio chosen on the validation split with its arm
    (:func:`search_ratio`; its reference must be among ``needed``)."""
    width, epochs = config.setup(model)
    folder = root / model / f"seed{seed}"
    files.make_folder(folder / "models")
    net = pipeline.train_or_reuse(folder / "model.pt", model, config.data, epochs=epochs, width=width, seed=seed,
                                  log=_log, device=config.device).eval()
    cmp = config.compare_config(seed)
    x_train, y_train = train_set.tensors
    scores = compare.variant_scores(net, x_train, y_train, cmp, folder / "models" / "scores.json",
                             device=config.device)
    variants = {v.name: v for v in compare.default_variants(cmp.harden_ratio, cmp.prune_ratio, cmp.restrict)}
    input_shape = tuple(x_train.shape[1:])
    nets = {name: compare.build_variant(variants[name], net, scores, train_set, cmp, input_shape,
                                        folder / "models", device=config.device).eval()
            for name in sorted(needed)}
    digests = {name: fingerprint.model_digest(n) for name, n in nets.items()}
    found = None if search is None else search_ratio(search, net, scores, nets[search.reference], train_set,
                                                     config, seed, folder / "models")
    return nets, digests, found


def activation_trial_seconds(net: nn.Module, x: torch.Tensor, logits: torch.Tensor, rate: float) -> float:
    """Seconds of one activation trial of ``net`` at ``rate`` on ``x`` (``logits``: its clean ones):
    drawing the faults and the hooks cost on top of the forward (an activation cell of VGG-11 ran
    past what one clean inference per trial said), so activation cells are estimated from such a
    trial, not from the inference."""
    y = logits.argmax(1)
    golden = Golden(y, golden_predictions(logits))
    _, seconds = progress.timed(activations.run_trial, net, x, y, golden, ber=rate, trial=0)
    return seconds


def estimate(nets: Mapping[str, nn.Module], x: torch.Tensor, todo: Sequence[Cell], config: StudyConfig) -> str:
    """The campaigns' cost of ``todo`` (one model and seed): parameter cells from one timed clean
    inference per variant, activation cells from one timed activation trial per variant and rate
    (:func:`activation_trial_seconds`). An upper bound of the parameter cells (fault-free trials and
    the shortcut skip work); for activation cells, what one trial took."""
    inference: dict[str, float] = {}
    logits: dict[str, torch.Tensor] = {}
    for name, net in nets.items():
        logits[name], inference[name] = progress.timed(campaign.predict, net, x)
    todo = [c for c in todo if c.claim.kind == FAULTS]  # timings cost seconds, not campaigns
    act: dict[tuple[str, float], float] = {}
    for c in todo:
        if c.target != "parameters":
            for name in (c.claim.arm, c.claim.reference):
                if (name, c.ber) not in act:
                    act[name, c.ber] = activation_trial_seconds(nets[name], x, logits[name], c.ber)

    def per_trial(name: str, cell: Cell) -> float:
        return inference[name] if cell.target == "parameters" else act[name, cell.ber]

    seconds = sum((per_trial(c.claim.arm, c) + per_trial(c.claim.reference, c)) * config.trials for c in todo)
    return progress.expected(seconds, "campaigns", f"{len(todo)} cells x 2 arms x {config.trials} trials of "
                             f"{len(x)} inputs, from one timed inference per variant"
                             + (" and one timed activation trial per variant and rate" if act else ""))


# a variant's forward relative to its model's, for the up-front estimate (MACs: a copy of the top share of
# channels; three copies; the pruned model's convs lose about the pruned share of their inputs and outputs)
def _forward_factors(config: StudyConfig) -> dict[str, float]:
    pruned = (1 - config.prune_ratio) ** 2 * (1 + config.harden_ratio)
    return {"harden_min": 1 + config.harden_ratio, "tmr_full": 3.0, "pruned_vuln_harden_min": pruned,
            "pruned_l1_harden_min": pruned}


def upfront_estimate(config: StudyConfig, x: torch.Tensor, train_size: int, todo: Sequence[Cell]) -> str:
    """What the cells left will cost, before anything is trained: one timed inference of the test
    split per model (untrained: the same cost), scaled by each variant's forward (``_forward_factors``)
    and the trials, plus training and fine-tuning (a backward pass taken as twice a forward), claim 3's
    search included as if it tried every ratio of the grid (a model pruned by ``r`` costs about
    ``(1 - r)**2`` of the unpruned one's epoch); an activation cell's trials scaled by one timed
    activation trial of the model at its rate over its inference (drawing and hooks cost on top). An
    upper bound of the parameter campaigns: fault-free trials and the shortcut skip work."""
    info = data.info(config.data)
    factors = _forward_factors(config)
    seconds = 0.0
    for model in dict.fromkeys(c.model for c in todo):
        width, epochs = config.setup(model)
        net = models.build(model, num_classes=info.num_classes, in_channels=info.in_channels,
                           input_size=info.input_size, width=width).eval()
        logits, inference = progress.timed(campaign.predict, net, x)
        mine = [c for c in todo if c.model == model]
        overhead = {rate: activation_trial_seconds(net, x, logits, rate) / max(inference, 1e-9)
                    for rate in {c.ber for c in mine if c.claim.kind == FAULTS and c.target != "parameters"}}
        seconds += sum((factors[c.claim.arm] + factors[c.claim.reference]) * config.trials * inference
                       * (1.0 if c.target == "parameters" else max(1.0, overhead[c.ber]))
                       for c in mine if c.claim.kind == FAULTS)
        seeds = len({c.seed for c in mine})
        per_epoch = 3 * inference * train_size / max(len(x), 1)
        seconds += seeds * per_epoch * (epochs + 2 * config.finetune_epochs)
        searches = len({c.seed for c in mine if c.claim.kind == LATENCY})
        seconds += searches * per_epoch * config.finetune_epochs * sum((1 - r) ** 2 for r in config.prune_grid)
    return progress.expected(seconds, "study", f"{len(todo)} cells x 2 arms x {config.trials} trials of {len(x)} "
                             "inputs, the training and the pruning-ratio searches, from one timed inference per "
                             "model; a bound, the shortcut, fault-free trials and a search's early stop cut it")


def run_study(config: StudyConfig, out_dir: str | Path, results_dir: str | Path | None = None) -> dict[str, Any]:
    """Compute (or resume) every cell into ``out_dir``; write study.json and study.md into
    ``results_dir`` (default ``out_dir``); return the results."""
    start = time.perf_counter()
    root = Path(out_dir)
    results = Path(results_dir) if results_dir is not None else root
    with files.exclusive_folder(root):
        files.make_folder(results)
        train_set, test_set = data.load(config.data, "train"), data.load(config.data, "test")
        x, y = campaign.stack_dataset(test_set)
        digests = {"train": fingerprint.data_digest(*train_set.tensors), "test": fingerprint.data_digest(x, y)}
        cells = plan(config)
        keys = {c: cell_key(c, config, digests) for c in cells}
        stored: dict[Cell, dict[str, Any]] = {}
        for c in cells:
            found = stored_cell(c, root, keys[c], values_per_arm(c, config))
            if found is not None:
                stored[c] = found
        todo = [c for c in cells if c not in stored]
        rates = sum(len(config.rates(t)) for t in config.targets)
        _log(f"{len(cells)} cells ({len(config.models)} model(s) x {len(config.seeds)} seed(s) x (claims per rate "
             f"x {rates} rate(s) of {len(config.targets)} fault target(s) + latency claims)): {len(stored)} done "
             "earlier, skipped; "
             f"{len(todo)} to compute")
        if todo:
            _log(upfront_estimate(config, x, len(train_set), todo))
        with progress.bar(total=len(todo), desc="study cells") as bar:
            for model in config.models:
                for seed in config.seeds:
                    group = [c for c in todo if c.model == model and c.seed == seed]
                    if not group:
                        continue
                    # claim 3's arm is built at the ratio its search chooses, not at ``prune_ratio``
                    needed = {name for c in group for name in (c.claim.arm, c.claim.reference)
                              if not (c.claim.kind == LATENCY and name == c.claim.arm)}
                    searched = next((c.claim for c in group if c.claim.kind == LATENCY), None)
                    nets, net_digests, found = build_arms(model, seed, needed, config, root, train_set, searched)
                    _log(f"{model} seed {seed}: " + estimate(nets, x, group, config))
                    for c in group:
                        began = time.perf_counter()
                        content = compute_cell(c, nets, net_digests, x, y, digests["test"], config, root,
                                               search=found if c.claim.kind == LATENCY else None)
                        content["seconds"] = time.perf_counter() - began  # what the study costs, said on its page
                        path = c.path(root)
                        files.make_folder(path.parent)
                        files.write_json(path, content, indent=None)
                        pipeline.store_key(path, keys[c])
                        stored[c] = content
                        bar.update(1)
        result = {
            "kind": "study", "config": {**asdict(config), "models": list(config.models), "seeds": list(config.seeds),
                                        "bers": list(config.bers), "prune_grid": sorted(config.prune_grid),
                                        "targets": list(config.targets),
                                        "activation_bers": list(config.activation_bers)},
            "versions": campaign.versions(),
            "seeds": {"training": list(config.seeds),
                      "faults (test role)": {str(s): role_seed(s, "test") for s in config.seeds}},
            "inputs": {"data": config.data, "train data": digests["train"], "test data": digests["test"],
                       "test inputs": len(x)},
            "bounded_ci_below": BOUNDED_CI_BELOW,
            "claims": analyse(cells, stored, config),
            "computed_cells": len(todo), "reused_cells": len(cells) - len(todo),
            "cell_seconds": sum(float(stored[c].get("seconds", 0.0)) for c in cells),
            "timed_cells": sum("seconds" in stored[c] for c in cells), "cells": len(cells),
            "seconds": time.perf_counter() - start,
        }
        files.write_json(results / "study.json", result, indent=1)
        files.write_text(results / "study.md", markdown(result))
    return result
