"""One rule table for every setting: its constraint, default, help and unit, and one ``check``.

Why: the same setting arrives from a flag, a campaign file or the API; it used to be checked
in up to seven places with seven messages (``0 <= ber <= 1``, the fault targets, the pruning
criterion, the limits that size the work). Here each setting is declared once, in the style
of scikit-learn's ``_parameter_constraints`` (``Interval``, ``Options``), and
:func:`check` is the one validator every caller asks: CampaignConfig, the campaign file, the
CLI's options (``ftcnn.cli._option`` builds each typer option from its rule), and the API.
Every refusal is one line naming the flag, file key or keyword the value came from.

A setting means the same in every command that has it; where a command needs another
default or help, the rule says so and why (``Rule.per_command``), and
``tests/test_vocabulary.py`` fails on any difference that is not declared here.

This module imports nothing but the standard library and ``ftcnn.constants``: the command line
builds its help from it at start-up, without torch (issue 24).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ftcnn.constants import DEFAULT_BATCH, THREADS_PER_CORE

# --- the limits of the settings that size the work (issue 19) ----------------------------------------
# A trial budget of 10^12, 10^5 threads or a precision of 1e-9 used to exhaust memory, crash the
# process or never end: refused in one line before any work.
MAX_TRIALS = 1_000_000     # trials per point: days of LeNet-5 trials; more is a typo, not a plan
# the floor of --precision and --ci-half-width (a CI half-width): Leveugle's worst case at 95%,
# (1.96 * 0.5 / e)^2, is ~960,000 trials per point at 1e-3, the trial cap; finer never finishes
MIN_CI_HALF_WIDTH = 1e-3
MAX_POINTS = 10_000        # --ber/--count values of one campaign
MAX_SEED = 2 ** 63 - 1     # a seed is stored as a 64-bit integer
MAX_BATCH = 2 ** 20        # a deployment batch; more is a typo


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _bound(value: Any) -> Any:
    """A bound: a number, or a function of the machine (``cores``) read when asked."""
    return value() if callable(value) else value


# --- constraints (scikit-learn style): each says what is wrong with a value, or None ---------------

@dataclass(frozen=True)
class Interval:
    """A number in [low, high] (``closed``: which ends belong to it); whole numbers when ``whole``."""

    whole: bool
    low: Any = None
    high: Any = None
    closed: str = "both"           # "both", "left", "right" or "neither"
    hint: str = ""                 # said after the interval, e.g. why the floor is there

    def text(self) -> str:
        low, high = _bound(self.low), _bound(self.high)
        if self.whole:
            if high is None:
                return f">= {low:,}"
            return f"{low:,}..{high:,}"
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        if high is None:
            return f"{'>=' if left == '[' else '>'} {low:g}"
        return f"{left}{low:g}, {high:g}{right}"

    def problem(self, value: Any) -> str | None:
        if self.whole and not _whole(value):
            return f"must be a whole number (got {value!r})"[:200]
        if not self.whole and not _real(value):
            return f"must be a finite number (got {value!r})"[:200]
        low, high = _bound(self.low), _bound(self.high)
        below = low is not None and (value < low or (value == low and self.closed in ("right", "neither")))
        above = high is not None and (value > high or (value == high and self.closed in ("left", "neither")))
        if below or above:
            shown = f"{value:,}" if self.whole else f"{value:g}"
            return f"must lie in {self.text()}{self.hint} (got {shown})"
        return None


@dataclass(frozen=True)
class Options:
    """One of a few names (``what``: what they are, said in the refusal)."""

    choices: tuple[str, ...]
    what: str = ""

    def text(self) -> str:
        return ", ".join(self.choices)

    def problem(self, value: Any) -> str | None:
        if value not in self.choices:
            return f"{str(value)[:100]!r} is not one of {self.text()}" + (f" (the {self.what})" if self.what else "")
        return None


@dataclass(frozen=True)
class Points:
    """A sweep: at most ``MAX_POINTS`` values, each within ``item``, none twice."""

    item: Interval

    def text(self) -> str:
        return f"up to {MAX_POINTS:,} distinct values in {self.item.text()}"

    def problem(self, values: Any) -> str | None:
        values = list(values)
        if len(values) > MAX_POINTS:
            return f"takes at most {MAX_POINTS:,} values (got {len(values):,})"
        seen: set[Any] = set()
        for v in values:
            problem = self.item.problem(v)
            if problem is not None:
                return problem
            if v in seen:
                return f"names {v:g} twice (give each point once)"
            seen.add(v)
        return None


@dataclass(frozen=True)
class Switch:
    """True or False, nothing else (1 and "yes" are refused: a switch given a number is a typo)."""

    def text(self) -> str:
        return "true or false"

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, bool):
            return f"must be true or false (got {str(value)[:100]!r})"
        return None


Constraint = Interval | Options | Points | Switch


@dataclass(frozen=True)
class Rule:
    """A setting: what it may be, its default and help (shown by every command that has it), its
    unit; ``per_command``: command -> (default, help, why), where a command differs on purpose."""

    constraint: Constraint
    default: Any = None
    help: str = ""
    unit: str = ""
    per_command: Mapping[str, tuple[Any, str, str]] = field(default_factory=dict)

    def default_for(self, command: str | None = None) -> Any:
        return self.per_command[command][0] if command in self.per_command else self.default

    def help_for(self, command: str | None = None) -> str:
        return self.per_command[command][1] if command in self.per_command else self.help


BATCH_HELP = ("deployment batch: every cost is quoted at it and budgets apply there (work done once per "
              "forward, like weight checks, is shared by the batch); latency at batch 1 is shown beside it")
TARGETS = ("parameters", "activations", "both")
CRITERIA = ("vulnerability", "l1")
RATE = Interval(False, 0.0, 1.0)
# the commands whose campaigns have a stopping rule ("auto", --precision); the others compare
# variants or candidates trial by trial, which needs the same trials for each
TRIALS_AUTO = ("inject",)
NO_AUTO = "its variants are compared trial by trial, so each runs the same number of trials; give a number"

RULES: dict[str, Rule] = {
    "seed": Rule(Interval(True, 0, MAX_SEED), 0, "seed of every random draw (same seed, same numbers)"),
    "threads": Rule(Interval(True, 1, lambda: cores() * THREADS_PER_CORE), None,
                    "torch threads of this job (default: OMP_NUM_THREADS if set, else every core of an idle "
                    "machine, a fair share next to other ftcnn jobs or load; worker processes split the cores; "
                    f"at most {THREADS_PER_CORE} per core)"),
    "workers": Rule(Interval(True, 1, cores), 1, "worker processes on this machine (at most its cores)"),
    "trials": Rule(
        Interval(True, 1, MAX_TRIALS), 100,
        "trials per point, or 'auto' (stop when the accuracy CI, a betting confidence sequence valid under "
        "early stopping, is narrow enough; at most Leveugle's size)",
        per_command={
            "compare": (30, "trials per variant and BER (default 30: 12 variants x 9 BERs; no 'auto': the "
                        "variants are compared trial by trial, so all run the same trials)",
                        "a 12-variant sweep at 100 trials takes hours; paired statistics need equal trials"),
            "demo": (10, "trials per variant and BER (default 10: the demo runs in minutes; no 'auto': "
                     "paired comparisons)", "the demo must finish in a few minutes"),
            "protect": (100, "fault-injection trials per candidate (no 'auto': candidates are compared "
                        "trial by trial)", "paired comparisons need equal trials"),
            "pipeline": (100, "end-to-end mode: trials per candidate (no 'auto': candidates are compared "
                         "trial by trial)", "paired comparisons need equal trials"),
            "study": (100, "trials per variant and BER (no 'auto': the claims' tests pair trials)",
                      "paired comparisons need equal trials"),
        }),
    "bit_trials": Rule(Interval(True, 0, MAX_TRIALS), 20, "single-flip trials per bit position (0: skip)"),
    "precision": Rule(Interval(False, MIN_CI_HALF_WIDTH, 1.0, "left",
                               hint=f": a finer one needs over {MAX_TRIALS:,} trials per point"), None,
                      "time to precision: stratified trials until the accuracy CI half-width is at most this "
                      "(e.g. 0.01), per BER point; replaces --trials"),
    "ci_half_width": Rule(Interval(False, MIN_CI_HALF_WIDTH, 1.0, "left",
                                   hint=f": a finer one needs over {MAX_TRIALS:,} trials per point"), 0.01,
                          "with --trials auto: target half-width of the accuracy CI (was --margin)"),
    "confidence": Rule(Interval(False, 0.0, 1.0, "neither", hint=": a share, e.g. 0.95"), 0.95,
                       "level of every reported CI",
                       per_command={"analyze": (None, "fi: Leveugle confidence of the fault sample (default 0.95)",
                                                "it sizes analyze's fault sample, not a reported CI")}),
    "validation_inputs": Rule(Interval(True, 1, None), 100,
                              "validation inputs each candidate's trial evaluates in protect: a seeded random "
                              "block, the same for every candidate at trial i (paired); an unbiased estimate of "
                              "the trial's accuracy on all of them at a fraction of the cost (0 is refused; a "
                              "number >= the split's size: all)"),
    "test_inputs": Rule(Interval(True, 1, None), 200,
                        "test inputs each trial of protect's test campaigns evaluates: a seeded random block "
                        "(an unbiased estimate of the trial's accuracy on the whole test split; at 100 trials the "
                        "interval is set by the trials, not the block); a number >= the split's size: all"),
    "tolerance": Rule(Interval(False, 0.0, 100.0, "left", hint=": points of accuracy, e.g. 0.25"), 0.25,
                      "points of validation accuracy a cheaper protection may lose against the most accurate one: "
                      "it is chosen only when a paired test shows it within them (else the most accurate is kept)"),
    "race": Rule(Switch(), True,
                 "race the candidates' validation campaigns: in stages, stopping a candidate once a paired test "
                 "valid at every stage shows it more than --tolerance below the most accurate (off: every "
                 "candidate runs every trial)"),
    "points": Rule(Points(RATE)),
    "count_points": Rule(Points(Interval(True, 0, None))),
    "ber": Rule(RATE, (), "bit error rates, e.g. --ber 1e-6 1e-5 1e-4", per_command={
        "compare": ((), "bit error rates (default: 9 log-spaced points 1e-7 ... 1e-3)",
                    "a comparison draws curves: it sweeps by default"),
        "study": ((), "bit error rates the claims are tested at (default: 1e-6 1e-5 1e-4)",
                  "the claims are tested at three decades by default"),
        "protect": (1e-4, "the one bit error rate the protection is chosen for (one value: candidates are "
                    "ranked at it)", "a choice needs one operating point"),
        "pipeline": (1e-4, "end-to-end mode: the one bit error rate the protection is chosen for",
                     "a choice needs one operating point"),
    }),
    "protect_ber": Rule(Interval(False, 0.0, 0.1, "right", hint=": a rate above it fails every candidate")),
    "report_ber": Rule(RATE, None, "BER of the overview table and overhead plot (default: the point 3/4 up the "
                       "sweep's nonzero BERs, where protections differ most)"),
    "target": Rule(Options(TARGETS, "fault targets"), "parameters",
                   "what faults hit: parameters (weight memory), activations (layer outputs) or both "
                   "(parameter faults at --ber plus activation faults at --activation-ber in every trial)",
                   per_command={"compare": ("parameters", "what faults hit: parameters (weight memory) or "
                                            "activations (transient flips in every Conv2d/Linear output, a "
                                            "protection's copies included; bit sensitivity: one flip per inference)",
                                            "compare also attacks what each protection adds"),
                                "protect": ("parameters", "what the candidates are ranked under: parameters "
                                            "(every stored bit at --ber), activations (transient flips in every "
                                            "Conv2d/Linear output at --ber) or both (the memory at --ber plus "
                                            "outputs at --activation-ber in every trial)",
                                            "a protection is chosen for the faults its user expects")}),
    "criterion": Rule(Options(CRITERIA, "pruning criteria"), "vulnerability",
                      "pruning criterion: vulnerability (lowest score goes; the paper's) or l1 (baseline)"),
    "range_margin": Rule(Interval(False, 0.0, None), 0.0,
                         "widen profiled ranges by this share of their width (was --margin)",
                         per_command={"compare": (0.1, "widen profiled ranges by this share of their width "
                                                  "(default 0.1 here: the comparison's restriction variants "
                                                  "follow Ranger's margin; was --margin)",
                                                  "compare's recorded results use Ranger's 10% margin")}),
    "finetune_epochs": Rule(Interval(True, 0, 10_000), 3, "fine-tuning epochs after pruning",
                            per_command={"study": (2, "fine-tuning epochs after pruning (default 2: the "
                                                   "recorded study's setting)",
                                                   "experiments/results were run with 2")}),
    "harden_ratio": Rule(RATE, 0.1, "share of each layer's channels to duplicate (top by score)"),
    "prune_ratio": Rule(Interval(False, 0.0, 1.0, "left"), 0.3,
                        "share of each layer's output channels to remove (rounded down)"),
    "batch": Rule(Interval(True, 1, MAX_BATCH), DEFAULT_BATCH, BATCH_HELP,
                  per_command={"pipeline": (DEFAULT_BATCH, "end-to-end mode: " + BATCH_HELP,
                                            "the classic pipeline prices at fixed batches")}),
}

# options that several commands have with a meaning that depends on the command (what it
# writes, what it loads, what it is relative to): their help says it per command
PER_COMMAND_MEANING: dict[str, str] = {
    "--output": "what each command writes: a checkpoint, a scores file or a run folder",
    "-o": "short for --output",
    "--model": "train: the builder; compare: either; elsewhere: the builder the checkpoint names, trusted",
    "--data": "train/study: the data set to use; elsewhere: the checkpoint's by default",
    "--epochs": "train/demo/compare: training epochs; study: each model's own by default",
    "--batch-size": "train: the optimiser's batch; inject: the evaluation batch",
    "--lr": "train: training learning rate; prune/pipeline: fine-tuning",
    "--ratio": "harden: share duplicated; prune: share removed",
    "--scores": "harden: the channels to protect; prune: the channels to remove",
    "--samples": "analyze: per method (gain inputs, fi faults per channel); prune/pipeline: gain inputs",
    "--restrict": "harden/pipeline: off unless given; compare: the mode of its restriction variants",
    "--max-macs": "harden: instead of --ratio; protect: the budget; pipeline: relative to the unpruned original",
    "--max-latency": "protect: relative to the model; pipeline: relative to the unpruned original",
    "--correction": "harden lists every correction; pipeline names the hardening step",
    "--bits": "inject: the attacked bits; analyze: fi's bits; compare: the bit-sensitivity chart's",
    "--limit": "analyze: inputs scored; inject: test inputs evaluated",
    "--activation-ber": "inject/protect: with --target both, the datapath rate in every trial beside --ber; "
                        "study: the activation rates claims 1 and 2 are tested at",
    "--device": "the same devices everywhere; commands that time latency or cost candidates say they do so on the CPU",
    "--width": "train: the model's width; compare: with --model only",
}


def rule(setting: str) -> Rule:
    return RULES[setting]


def problem(setting: str, value: Any) -> str | None:
    """What is wrong with ``value`` for ``setting``, or None."""
    return RULES[setting].constraint.problem(value)


def check(setting: str, value: Any, flag: str | None = None) -> Any:
    """``value`` when the rule of ``setting`` allows it, else a one-line ValueError naming it as
    ``flag`` (the flag, ``--trials``; the file key; the keyword; default: the setting's name)."""
    found = problem(setting, value)
    if found is not None:
        raise ValueError(f"{flag or setting} {found}")
    return value


def trials(value: Any, command: str, flag: str = "--trials") -> int | str:
    """A typed trial budget: a whole number within the limit, or "auto" where ``command`` has a
    stopping rule (``TRIALS_AUTO``; elsewhere refused in one line that says why)."""
    if value == "auto":
        if command in TRIALS_AUTO:
            return value
        raise ValueError(f"{flag} auto is not available in {command}: {NO_AUTO}")
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            shown = " or 'auto'" if command in TRIALS_AUTO else ""
            raise ValueError(f"{flag} must be a positive integer{shown} (got {value!r})"[:200]) from None
    return check("trials", value, flag)


def check_each(setting: str, values: Sequence[Any], flag: str | None = None) -> Sequence[Any]:
    """Every value of ``values`` checked against ``setting`` (a sweep's points)."""
    for value in values:
        check(setting, value, flag)
    return values


# the limits of issue 19 as they were asked before this table (``trials.LIMITS``): setting -> problem
LIMITS = {name: RULES[name].constraint.problem for name in
          ("trials", "threads", "workers", "seed", "precision", "ci_half_width", "points")}
