"""One trial of a fault-injection campaign: its configuration, its faults, its run.

A trial evaluates the whole test split once with its own faults, drawn from a
generator seeded by (seed, fault rate, trial) (``fault_space.trial_rng``), so the same seed
gives the same faults whatever order or process runs the trials. ``Runner`` is the one trial
loop, over any ``fault_space.FaultSpace``; ``ParameterSpace`` is the weight memory as one, and
``TrialRunner``/``prepare`` build a parameter campaign's runner (``ftcnn.campaigns.activations`` builds
the activation one on the same ``Runner``). This module sits below both
the campaign (``ftcnn.campaigns.campaign``: statistics, stopping, resume) and the
executors that run trials in other processes (``ftcnn.campaigns.distributed``): it knows
neither of them.

How trials run does not change what they give (design §7, §9): exact
shortcuts (``ftcnn.injection.fastpath``), batched trials, worker processes and Ray all
reproduce the plain path's numbers, so their settings are not part of a
campaign's identity (``EXECUTION_FIELDS``).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import InitVar, asdict, dataclass, field, replace
from typing import Any, ContextManager, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ftcnn import rules
from ftcnn.campaigns import strata
from ftcnn.injection import fault_space, fastpath
from ftcnn.injection import faults as F
from ftcnn.constants import PRECISION_INPUTS_PER_TRIAL, THREADS_PER_CORE  # noqa: F401 (re-exported)
from ftcnn.rules import LIMITS, MAX_POINTS, MAX_SEED, MAX_TRIALS, MIN_CI_HALF_WIDTH, cores  # noqa: F401
from ftcnn.campaigns.metrics import Golden, golden_predictions, trial_metrics
from ftcnn.train import predict

SITES_KEPT = 64  # fault sites stored per trial for per-bit / per-layer analysis


# the limits of the settings that size the work (issue 19) and every other setting's rule live in
# ftcnn.rules, the one table CampaignConfig, the campaign file, the CLI and the API ask
check_limit = rules.check


def take_old_margin(config: Any, margin: float | None, field: str) -> None:
    """A frozen config's old keyword ``margin`` (it meant three things; issue 11), for one
    release: sets ``field`` to it with a DeprecationWarning at the caller's line."""
    if margin is not None:
        warnings.warn(f"{type(config).__name__}(margin=...) is deprecated; use {field}=...", DeprecationWarning,
                      stacklevel=4)
        object.__setattr__(config, field, margin)


@dataclass(frozen=True)
class CampaignConfig:
    """What defines a campaign. Everything but the trial budget is its identity:
    resuming with a different identity is refused rather than mixing results."""

    bers: tuple[float, ...] = ()
    counts: tuple[int, ...] = ()
    trials: int | None = 100          # None: sequential stop (betting CS), at most Leveugle's size
    ci_half_width: float = 0.01       # auto: requested half-width of the accuracy CI (was `margin`)
    confidence: float = 0.95          # of every reported CI (and of Leveugle's size)
    min_trials: int = 10              # auto: a floor only; the CS needs none to be valid
    # time to precision: stratified trials until the accuracy CI half-width <= this (ftcnn.campaigns.strata)
    precision: float | None = None
    seed: int = 0
    dtype: str = "float32"
    bits: tuple[int, ...] | None = None
    mode: str = "flip"
    # attack BatchNorm's parameters and running statistics (memory a deployed network reads); None:
    # the default, True for parameter faults, False for activation faults (no memory); for_model()
    # records False on a model with no BatchNorm, where both choices attack the same bits
    include_bn: bool | None = None
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
    # torch intra-op threads of the whole run, split among workers (None: parallelism.plan's choice)
    threads: int | None = None
    # what faults hit (issue 14): "parameters" (the weight memory) or "activations" (layer outputs,
    # ``ftcnn.campaigns.activations``); for activations, "transient" (per value per inference) or "permanent"
    # faults, and per-layer rates that replace the swept one in the named layers: ((layer, rate), ...)
    target: str = "parameters"
    activation_mode: str = "transient"
    ber_per_layer: tuple[tuple[str, float], ...] = ()
    # target "both" (``ftcnn.campaigns.combined``): the activation rate of every trial, beside the swept
    # parameter BER (the campaign's points); None for the other targets
    activation_ber: float | None = None
    # inputs each trial evaluates (None: all): a seeded random block of the split per trial, an
    # unbiased estimate of the trial's accuracy on all of it at a fraction of the cost (design §2)
    inputs_per_trial: int | None = None
    # activation counts per input image (PyTorchFI's convention, ``--per-input``), not per trial
    per_input: bool = False
    margin: InitVar[float | None] = None  # deprecated spelling of ci_half_width (one release)

    def __post_init__(self, margin: float | None = None) -> None:
        take_old_margin(self, margin, "ci_half_width")
        if bool(self.bers) == bool(self.counts):
            raise ValueError("give fault rates (ber) or fault counts, not both and not neither")
        if self.bers:
            check_limit("points", self.bers, "bers")
        else:
            check_limit("count_points", self.counts, "counts")
        if self.trials is not None:
            check_limit("trials", self.trials)
        check_limit("seed", self.seed)
        check_limit("confidence", self.confidence)
        check_limit("ci_half_width", self.ci_half_width)
        if self.min_trials < 1:
            raise ValueError(f"min trials must be >= 1 (got {self.min_trials})")
        if self.dtype not in F.STORAGE_DTYPES:
            raise ValueError(f"unknown storage dtype {self.dtype!r}; choose from {', '.join(F.STORAGE_DTYPES)}")
        F.fault_mode(self.mode)  # a registered fault mode (faults.FAULT_MODES), or one clear line
        if self.batch_size < 1:
            raise ValueError("batch size must be >= 1")
        if self.batch_trials is not None and self.batch_trials < 1:
            raise ValueError(f"batch trials must be >= 1 (got {self.batch_trials})")
        check_limit("workers", self.workers)
        if self.cache_bytes < 0:
            raise ValueError(f"cache bytes must be >= 0 (got {self.cache_bytes})")
        if self.threads is not None:
            check_limit("threads", self.threads)
        if self.inputs_per_trial is not None:
            if isinstance(self.inputs_per_trial, bool) or not isinstance(self.inputs_per_trial, int) \
                    or self.inputs_per_trial < 1:
                raise ValueError(f"inputs per trial must be a whole number >= 1 (got {self.inputs_per_trial})")
            if self.target != "parameters":
                raise ValueError("--inputs-per-trial is for parameter faults (activation faults are drawn "
                                 "per input)")
        if self.precision is not None:
            check_limit("precision", self.precision)
            if not self.bers:
                raise ValueError("--precision needs fault rates (--ber): strata come from the binomial fault model")
            if self.inputs_per_trial is None and self.target == "parameters":  # a block per trial (design §2)
                object.__setattr__(self, "inputs_per_trial", PRECISION_INPUTS_PER_TRIAL)
        self._check_target()

    def _check_target(self) -> None:
        if self.include_bn is None:
            object.__setattr__(self, "include_bn", self.target in ("parameters", "both"))
        if isinstance(self.ber_per_layer, Mapping):  # {layer: rate} from the API: pairs, in name order
            object.__setattr__(self, "ber_per_layer", tuple(sorted(self.ber_per_layer.items())))
        elif isinstance(self.ber_per_layer, (list, tuple)):
            pairs = [tuple(p) if isinstance(p, list) else p for p in self.ber_per_layer]
            object.__setattr__(self, "ber_per_layer", tuple(sorted(
                pairs, key=lambda p: str(p[0]) if isinstance(p, tuple) and p else "")))
        check_limit("target", self.target)
        if self.activation_mode not in ACTIVATION_MODES:
            raise ValueError(f"unknown activation fault mode {self.activation_mode!r}; "
                             f"choose from {', '.join(ACTIVATION_MODES)}")
        if isinstance(self.ber_per_layer, (str, bytes)) or not isinstance(self.ber_per_layer, tuple):
            raise ValueError("ber_per_layer must be a tuple of (layer name, rate) pairs")
        seen: set[str] = set()
        for pair in self.ber_per_layer:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and pair[0]):
                raise ValueError(f"ber_per_layer entries are (layer name, rate) pairs, not {pair!r}")
            name, rate = pair
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
                raise ValueError(f"bit error rate {rate!r} of layer {name!r} outside [0, 1]")
            if name in seen:
                raise ValueError(f"layer {name!r} appears twice in ber_per_layer")
            seen.add(name)
        if self.ber_per_layer and self.counts:
            raise ValueError("per-layer rates need fault rates (ber), not exact counts")
        if self.precision is not None and self.ber_per_layer:
            raise ValueError("--precision needs one rate for every layer (the strata weights come from one "
                             "binomial); drop --ber-per-layer or use --trials")
        if self.target == "both":
            self._check_both()
            return
        if self.activation_ber is not None:
            raise ValueError("--activation-ber is the datapath rate of target both; with target "
                             f"{self.target} give the rates with --ber")
        if self.target == "parameters":
            if self.activation_mode != "transient":
                raise ValueError("the activation mode applies to activation faults only (target \"activations\")")
            if self.per_input:
                raise ValueError("--per-input counts activation faults per input: it needs --target activations")
            return
        if self.per_input and (not self.counts or self.activation_mode != "transient"):
            raise ValueError("--per-input counts transient activation faults per input: it needs --count "
                             "and --activation-mode transient")
        if self.include_bn:
            raise ValueError("--include-bn is for parameter faults; name BatchNorm modules in --layers instead")
        if self.dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"activation faults hit {', '.join(ACTIVATION_DTYPES)} values, not {self.dtype}")
        if self.activation_mode == "transient" and self.mode != "flip":
            raise ValueError("transient activation faults are bit flips; stuck-at faults need "
                             "--activation-mode permanent")
        if self.mode not in ACTIVATION_KINDS:
            raise ValueError(f"activation faults take modes {', '.join(ACTIVATION_KINDS)}, not {self.mode}")

    def _check_both(self) -> None:
        """Target both: parameter faults at the swept BERs plus transient activation flips at
        ``activation_ber`` in every trial (``ftcnn.campaigns.combined``)."""
        rate = self.activation_ber
        if rate is None or isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate <= 1.0:
            raise ValueError(f"target both needs --activation-ber in (0, 1] (got {rate!r})")
        if not self.bers:
            raise ValueError("target both sweeps parameter BERs (--ber), not fault counts")
        if self.precision is not None:
            raise ValueError("--precision stratifies one fault target; give --trials for target both")
        if self.ber_per_layer:
            raise ValueError("target both takes one parameter rate per point and one activation rate; "
                             "drop --ber-per-layer")
        if self.activation_mode != "transient" or self.per_input:
            raise ValueError("target both adds transient activation faults (no --activation-mode permanent, "
                             "no --per-input)")
        if self.mode != "flip":
            raise ValueError("target both takes bit flips (transient activation faults are flips)")
        if self.dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"target both needs a format layers compute in ({', '.join(ACTIVATION_DTYPES)}), "
                             f"not {self.dtype}")

    def for_model(self, model: nn.Module) -> CampaignConfig:
        """This configuration as it applies to ``model``: ``include_bn`` is False when the model
        holds no BatchNorm (the same bits are attacked either way). So a model without BatchNorm
        records, and resumes, the identity it had before BatchNorm was attacked by default."""
        if self.include_bn and not any(isinstance(m, F.BN_LAYER_TYPES) for m in model.modules()):
            return replace(self, include_bn=False)
        return self

    @property
    def by(self) -> str:
        return "ber" if self.bers else "count"

    @property
    def points(self) -> tuple[float, ...]:
        return tuple(float(p) for p in (self.bers or self.counts))

    def identity(self) -> dict[str, Any]:
        """The settings trial results depend on: all but the trial budget (which a
        resumed run may extend) and the execution settings (exact, see above)."""
        d = self.recorded()
        for key in ("trials", "ci_half_width", "confidence", "min_trials", "precision") + EXECUTION_FIELDS:
            d.pop(key)
        if pairs_unattacked(self):  # protection values drawn, then spared (issue 21): not the old draws
            d["unattacked_draws"] = "paired"
        return d

    def recorded(self) -> dict[str, Any]:
        """``asdict`` without the fields at the defaults that existed before them (the fault-target
        fields of parameter faults unless set, ``inputs_per_trial`` of all inputs): such a campaign's identity
        and stored config are what they were before (run folders made then resume, numbers stay
        byte-identical); an activation campaign records all three target fields."""
        d = asdict(self)
        if self.inputs_per_trial is None:  # all inputs, as before the option existed
            d.pop("inputs_per_trial")
        if not self.per_input:  # counts per trial, as before the option existed
            d.pop("per_input")
        if self.activation_ber is None:  # every target but both, as before the option existed
            d.pop("activation_ber")
        if self.target == TARGET_DEFAULTS["target"]:  # parameter campaigns keep only what they set
            for key, default in TARGET_DEFAULTS.items():
                if key == "target" or d[key] == default:  # a per-layer table is recorded (issue 23)
                    d.pop(key)
        return d

    @property
    def parallel(self) -> bool:
        return self.workers > 1 or self.ray or self.ray_address is not None


# what faults hit; the activation settings are defined here, where CampaignConfig checks them
# (``ftcnn.campaigns.activations`` sits above this module, takes them from here, and is never imported by it)
TARGETS = rules.TARGETS
ACTIVATION_MODES = ("transient", "permanent")
ACTIVATION_KINDS = ("flip", "stuck0", "stuck1")
ACTIVATION_DTYPES = fault_space.ACTIVATION_DTYPES
# the fault-target fields' defaults: left out of parameter campaigns' identities and stored configs
TARGET_DEFAULTS: dict[str, Any] = {"target": "parameters", "activation_mode": "transient", "ber_per_layer": ()}

# settings that change how fast trials run, never their results
EXECUTION_FIELDS = ("batch_size", "skip_fault_free", "shortcut", "batch_trials", "workers", "ray",
                    "ray_address", "device", "cache_bytes", "threads")


def trial_rng(seed: int, point: float, trial: int) -> np.random.Generator:
    """The generator of one trial: a pure function of seed, fault rate and trial
    (``fault_space.trial_rng``, the one key every fault space's campaign trials use)."""
    return fault_space.trial_rng(seed, point, trial)


def draw_trial_faults(memory: F.ParameterMemory, config: CampaignConfig, point: float,
                      trial: int, stratum: int | None = None) -> F.Faults:
    """The faults of a plain trial, or (``stratum`` set) of the stratum's ``trial``-th trial."""
    rng = fault_space.trial_rng(config.seed, point, trial, stratum)
    if stratum is not None:
        faults = strata.draw_faults(memory, rng, point, stratum, bits=config.bits, mode=config.mode)
    elif config.by == "ber":
        rates = F.layer_rates(memory, point, dict(config.ber_per_layer)) if config.ber_per_layer else None
        faults = F.draw_faults(memory, rng, ber=point, bits=config.bits, mode=config.mode, rates=rates)
    else:
        faults = F.draw_faults(memory, rng, count=int(point), bits=config.bits, mode=config.mode)
    return F.spare(faults, memory.spared) if memory.spared else faults


def pairs_unattacked(config: CampaignConfig) -> bool:
    """Whether protection values left unattacked (``attack_protection=False``) are drawn and then
    dropped (``faults.spare``), so that every other fault equals the attacked campaign's, trial by
    trial: the ablation is paired. Only for rates in float32 memory: a fault count over a smaller
    memory is another quantity, and int8 cannot store an unprofiled (infinite) bound even to spare it."""
    return not config.attack_protection and config.by == "ber" and config.dtype == "float32"


# --- a block of inputs per trial (``inputs_per_trial``) ------------------------------------------

_BLOCK_TAG = 0x424C4B  # in the seeds of the input order and of each trial's block: never a fault seed


def input_order(seed: int, n: int) -> np.ndarray:
    """The campaign's fixed random order of the split: consecutive runs of ``inputs_per_trial``
    of it are the blocks (random subsets, so no block is one class of a sorted split)."""
    return fault_space.rng(seed, _BLOCK_TAG, n).permutation(n)


def trial_block(config: CampaignConfig, point: float, trial: int, stratum: int | None, n: int) -> int:
    """The block a trial evaluates: chosen with probability size / n, so the block's accuracy
    is an unbiased estimate of the trial's accuracy on all ``n`` inputs (design §2). A pure
    function of (seed, point, stratum, trial), drawn apart from the trial's faults."""
    m = config.inputs_per_trial
    assert m is not None
    sizes = np.array([min(m, n - start) for start in range(0, n, m)], dtype=np.float64)
    rng = fault_space.rng(config.seed, float(point), _BLOCK_TAG, 0 if stratum is None else stratum + 1, trial)
    return int(rng.choice(len(sizes), p=sizes / n))


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


# --- the parameter fault space ------------------------------------------------------------------

@dataclass
class ParameterSpace:
    """The weight memory as a ``fault_space.FaultSpace``: a campaign's parameter faults (design §1).

    ``draw`` is ``draw_trial_faults`` with the campaign's settings; ``faulty_logits`` writes the
    faults into the memory, runs the trial from the cut before its first faulted layer when the
    shortcut (``fast``) has one (else the whole model, ``config.batch_size`` inputs at a time),
    and restores the memory bit for bit; ``batched_logits`` runs several trials per forward.
    """

    model: nn.Module
    memory: F.ParameterMemory
    inputs: torch.Tensor
    config: CampaignConfig
    fast: fastpath.Shortcut | None = None

    @property
    def stored(self) -> Mapping[str, torch.Tensor]:
        return self.memory.stored

    @property
    def catastrophic(self) -> strata.Sensitivity | None:
        return self.memory.catastrophic

    @property
    def spared(self) -> frozenset[str]:
        """Targets drawn over but never faulted (``pairs_unattacked``)."""
        return self.memory.spared

    def total_bits(self) -> int:
        return self.memory.total_bits()

    def strata_layout(self, bits: Sequence[int] | None = None) -> strata.Layout:
        return strata.Layout.of(self.memory, bits)

    def draw(self, point: float, trial: int, stratum: int | None = None) -> F.Faults:
        return draw_trial_faults(self.memory, self.config, point, trial, stratum)

    def injected(self, faults: F.Faults) -> ContextManager[F.Undo]:
        return F.injected(self.memory, faults)

    def faulty_logits(self, faults: F.Faults, block: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Logits with ``faults`` present, of every input or of batch ``block`` of
        ``config.batch_size`` inputs; no extra fields."""
        with F.injected(self.memory, faults):
            if self.fast is not None and self.config.shortcut:
                logits = self.fast.logits(faults, block)
                if logits is not None:
                    return logits, {}
            inputs = self.inputs if block is None else self.inputs[self.rows(block)]
            return predict(self.model, inputs, self.config.batch_size), {}

    def rows(self, block: int) -> slice:
        """The inputs of a block: batch ``block`` of the evaluation (``prepare`` sets the batch
        size to ``inputs_per_trial``)."""
        return slice(block * self.config.batch_size, (block + 1) * self.config.batch_size)

    def fault_free(self, faults: F.Faults) -> dict[str, Any]:
        return {}

    def golden_logits(self) -> torch.Tensor:
        return predict(self.model, self.inputs, self.config.batch_size)

    def batched_logits(self, trials: Sequence[F.Faults]) -> list[torch.Tensor]:
        assert self.fast is not None, "batched trials need the shortcut's trace"
        return self.fast.batched_logits(list(trials), use_cuts=self.config.shortcut)


# --- running ---------------------------------------------------------------

Task = tuple[float, int] | tuple[float, int, int]
"""A trial to run: (point, trial), or (point, index, stratum) of a ``--precision`` stratum."""


class Runner:
    """The one trial runner, over any ``fault_space.FaultSpace``: draw a trial's faults, give a
    draw without any its golden result exactly (``skip_fault_free``), else inject, evaluate the
    inputs (or the trial's block of them), restore; ``batch`` faulty trials per forward where
    the space batches. Campaigns, their store and their executors take any runner.

    ``TrialRunner`` (parameters) and ``activations.ActivationRunner`` build one from their
    settings; any other space plugs in as ``Runner(space, golden)``.
    """

    space: fault_space.FaultSpace
    golden: Golden
    golden_metrics: dict[str, float]
    skip_fault_free: bool = True
    batch: int = 1   # faulty trials per forward (> 1 only for a fault_space.BatchedSpace)

    def __init__(self, space: fault_space.FaultSpace, golden: Golden, *, skip_fault_free: bool = True,
                 golden_output: torch.Tensor | None = None) -> None:
        self.space, self.golden, self.skip_fault_free = space, golden, skip_fault_free
        self._golden_metrics(golden_output)

    def _golden_metrics(self, golden_output: torch.Tensor | None) -> None:
        logits = golden_output if golden_output is not None else self.space.golden_logits()
        self.golden_metrics = trial_metrics(logits, self.golden)

    @property
    def blocks(self) -> bool:
        """Whether each trial evaluates one block of the inputs (``TrialRunner``: inputs_per_trial)."""
        return False

    def block(self, point: float, trial: int, stratum: int | None) -> int | None:
        """The block of inputs a trial evaluates (None: all of them)."""
        return None

    def golden_of(self, block: int | None) -> Golden:
        """The golden predictions of ``block``'s inputs (all of them for None)."""
        return self.golden

    def run(self, point: Any, trial: int, stratum: int | None = None) -> tuple[Any, dict[str, Any]]:
        """One trial: its faults and ``trial_metrics``' dict plus the space's extra fields."""
        faults = self.space.draw(point, trial, stratum)
        if faults.count == 0 and self.skip_fault_free:
            # every block's golden result averages to this, the exact expectation: no block needed
            return faults, {**self.golden_metrics, **self.space.fault_free(faults)}
        block = self.block(point, trial, stratum)
        logits, extra = self.space.faulty_logits(faults, block)
        return faults, {**trial_metrics(logits, self.golden_of(block)), **extra}

    def run_many(self, tasks: Sequence[Task]) -> list[TrialResult]:
        """Several (point, trial) pairs, or (point, index, stratum) triples of stratified
        trials (``--precision``); faulty ones ``batch`` at a time."""
        results: list[TrialResult] = []
        pending: list[tuple[float, int, Any, int | None]] = []
        for point, trial, *rest in tasks:
            stratum = rest[0] if rest else None
            start = time.perf_counter()
            if self.batch == 1 or self.blocks:
                faults, metrics = self.run(point, trial, stratum)
                results.append(TrialResult.of(point, trial, faults, metrics, time.perf_counter() - start,
                                              stratum))
                continue
            faults = self.space.draw(point, trial, stratum)
            if faults.count == 0 and self.skip_fault_free:
                results.append(TrialResult.of(point, trial, faults,
                                              {**self.golden_metrics, **self.space.fault_free(faults)},
                                              time.perf_counter() - start, stratum))
                continue
            pending.append((point, trial, faults, stratum))
            if len(pending) == self.batch:
                results += self._run_batch(pending)
                pending = []
        if pending:
            results += self._run_batch(pending)
        return results

    def _run_batch(self, pending: list[tuple[float, int, Any, int | None]]) -> list[TrialResult]:
        start = time.perf_counter()
        space = self.space
        assert isinstance(space, fault_space.BatchedSpace), "batched trials need a space that batches"
        all_logits = space.batched_logits([f for _, _, f, _ in pending])
        seconds = (time.perf_counter() - start) / len(pending)
        return [TrialResult.of(point, trial, faults, trial_metrics(logits, self.golden), seconds, stratum)
                for (point, trial, faults, stratum), logits in zip(pending, all_logits)]


@dataclass
class TrialRunner(Runner):
    """The runner of a parameter campaign: a ``Runner`` over the ``ParameterSpace`` of
    (``model``, ``memory``, ``inputs``, ``config``, ``fast``), built from those fields (so
    ``dataclasses.replace(runner, config=...)`` gives the runner of another configuration).

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
        self.space = ParameterSpace(self.model, self.memory, self.inputs, self.config, self.fast)
        self.skip_fault_free = self.config.skip_fault_free
        self._golden_metrics(self.golden_output)

    @property
    def blocks(self) -> bool:
        """Whether each trial evaluates one block of ``inputs_per_trial`` inputs (``prepare`` then
        orders the inputs by ``input_order`` and evaluates in batches of exactly one block)."""
        m = self.config.inputs_per_trial
        return m is not None and m < len(self.inputs)

    def block(self, point: float, trial: int, stratum: int | None) -> int | None:
        return trial_block(self.config, point, trial, stratum, len(self.inputs)) if self.blocks else None

    def golden_of(self, block: int | None) -> Golden:
        if block is None:
            return self.golden
        rows = self.space.rows(block)
        return Golden(self.golden.labels[rows], self.golden.predictions[rows])

    def golden_logits(self) -> torch.Tensor:
        return self.space.golden_logits()

    def faulty_logits(self, faults: F.Faults, block: int | None = None) -> torch.Tensor:
        """Logits with ``faults`` present (from the best cut when the shortcut is on), of every
        input or of one block (batch ``block`` of ``config.batch_size`` inputs)."""
        return self.space.faulty_logits(faults, block)[0]

    def first_block_accuracy(self, faults: F.Faults) -> float:
        """Accuracy with ``faults`` on the first block of inputs (all of them without blocks): what
        the ``--precision`` pilot's single-flip pass (``strata.measure_sensitivity``) compares."""
        block = 0 if self.blocks else None
        return trial_metrics(self.faulty_logits(faults, block), self.golden_of(block))["accuracy"]


def prepare(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, config: CampaignConfig
            ) -> TrialRunner:
    """Model in its storage format, golden predictions, and a trial runner.

    With ``config.device`` set, the model (the caller's, for float32) and the
    data are moved there. With ``config.inputs_per_trial`` below the split's size, the inputs
    are put in the campaign's ``input_order`` and evaluated in batches of one block each, so a
    trial's block gives the bits it gives within a whole evaluation.
    """
    model.eval()
    order = None  # the input position of each evaluated row, when they are reordered
    if config.inputs_per_trial is not None and config.inputs_per_trial < len(inputs):
        order = torch.as_tensor(input_order(config.seed, len(inputs)))
        inputs, labels = inputs[order], labels[order]
        config = replace(config, batch_size=config.inputs_per_trial, batch_trials=1)
    if config.dtype != "float32":
        model = copy.deepcopy(model)  # rounding to the format must not touch the caller's model
    if config.device is not None:
        model, inputs, labels = model.to(config.device), inputs.to(config.device), labels.to(config.device)
    paired = pairs_unattacked(config)
    memory = F.parameter_memory(model, config.dtype, include_bn=config.include_bn, layers=config.layers,
                                include_protection=config.attack_protection or paired)
    if paired:
        kept = F.fault_targets(model, include_bn=config.include_bn, layers=config.layers, include_protection=False)
        memory.spared = frozenset(name for name in memory.stored if name not in kept)
    if memory.total_bits() == 0:
        raise ValueError("model has no Conv2d/Linear parameters to inject faults into")
    if config.ber_per_layer:  # a layer that holds no fault target: one line before any trial
        F.layer_rates(memory, 0.0, dict(config.ber_per_layer))
    golden_logits = predict(model, inputs, config.batch_size)
    golden = Golden(labels, golden_predictions(golden_logits, order))
    fast, batch = _fast_path(model, memory, inputs, golden_logits, config)
    runner = TrialRunner(model, memory, inputs, golden, config, fast, batch, golden_logits)
    if config.precision is not None:  # the catastrophic stratum: what is catastrophic for this model
        memory.catastrophic = strata.measure_sensitivity(model, memory, runner.first_block_accuracy,
                                                         seed=config.seed, bits=config.bits, mode=config.mode)
    return runner


def _fast_path(model: nn.Module, memory: F.ParameterMemory, inputs: torch.Tensor,
               golden_logits: torch.Tensor, config: CampaignConfig
               ) -> tuple[fastpath.Shortcut | None, int]:
    """The shortcut and the trials per batch, each only where it is exact here."""
    batch = config.batch_trials or fastpath.auto_batch_trials(model, inputs, config.batch_size)
    if not config.shortcut and batch == 1:
        return None, 1
    if batch == 1 and config.by == "ber" and config.trials is not None and config.precision is None \
            and not config.ber_per_layer:  # rates known up front: build the cuts only where they pay
        trials_at: dict[float, int] = {}
        for ber in config.bers:
            trials_at[float(ber)] = trials_at.get(float(ber), 0) + config.trials
        if not fastpath.pays(model, memory, inputs, trials_at, config.inputs_per_trial or len(inputs),
                             len(F.allowed_bits(memory, config.bits)))[0]:
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
