"""Per-trial metrics against the golden model, and campaign statistics (design §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from ftcnn.lazy import lazy

stats = lazy("scipy.stats")  # 0.76 s to import: only when an interval is computed

METRIC_NAMES = ("accuracy", "top5", "sdc", "critical_sdc", "due")


@dataclass(frozen=True)
class Golden:
    """What every trial is compared with: labels and the fault-free predictions."""

    labels: torch.Tensor
    predictions: torch.Tensor

    @property
    def correct(self) -> torch.Tensor:
        return self.predictions == self.labels

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean())


def safe_predictions(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 class per row, -1 where the logits hold NaN/Inf, and the finite mask.

    argmax over NaN returns the NaN's index, so a raw argmax would score a
    detected-unrecoverable error as a lucky guess.
    """
    finite = torch.isfinite(logits).all(dim=1)
    pred = logits.argmax(dim=1)
    return torch.where(finite, pred, torch.full_like(pred, -1)), finite


def golden_predictions(logits: torch.Tensor, input_index: Sequence[int] | torch.Tensor | None = None
                       ) -> torch.Tensor:
    """The fault-free predictions every trial is compared with, by the rule faulty ones follow
    (:func:`safe_predictions`), refused when any golden logit is NaN/Inf.

    Why refuse: a fault-free model whose outputs are not finite has no reference to measure
    damage against (with one NaN weight a raw argmax gave "SDC 100%, DUE 100%" at zero
    faults). The one-line error names the first non-finite output: its input (``input_index``
    maps rows to input positions when the rows were reordered) and class.
    """
    finite = torch.isfinite(logits)
    if not bool(finite.all()):
        row, column = (int(i) for i in (~finite).nonzero()[0])
        where = row if input_index is None else int(input_index[row])
        raise ValueError(f"the fault-free model's output is not finite: {float(logits[row, column])} for input "
                         f"{where}, class {column}; a campaign needs finite golden logits (check the model's "
                         "weights)")
    return safe_predictions(logits)[0]


def trial_metrics(logits: torch.Tensor, golden: Golden) -> dict[str, float]:
    """Accuracy, top-5, SDC, critical SDC and DUE of one faulty evaluation."""
    pred, finite = safe_predictions(logits)
    labels = golden.labels
    correct = pred == labels
    if logits.shape[1] >= 10:
        k = 5
        top = torch.nan_to_num(logits, nan=-math.inf).topk(k, dim=1).indices
        top5 = ((top == labels[:, None]).any(dim=1) & finite).float().mean().item()
    else:
        top5 = float("nan")
    changed = pred != golden.predictions
    return {
        "accuracy": correct.float().mean().item(),
        "top5": top5,
        "sdc": changed.float().mean().item(),
        "critical_sdc": (golden.correct & ~correct).float().mean().item(),
        "due": (~finite).float().mean().item(),
    }


CI_STUDENT_T = "student-t"
CI_BETTING = "betting confidence sequence"


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, tuple[float, float]]:
    """Mean, sample std and Student-t confidence interval of the mean.

    With one value the std and the t-interval are undefined: both come back
    NaN (they used to be 0 and a zero-width interval, which claims certainty
    from a single trial). Callers that need an interval at any size use
    :func:`betting_ci` instead.
    """
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), (float("nan"), float("nan"))
    mean = float(x.mean())
    if n == 1:
        return mean, float("nan"), (float("nan"), float("nan"))
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return mean, std, (mean - half, mean + half)


def leveugle_sample_size(population: int, margin: float = 0.01, confidence: float = 0.95,
                         p: float = 0.5) -> int:
    """Fault-injection sample size of Leveugle et al. (DATE 2009).

    n = N / (1 + e^2 (N - 1) / (t^2 p (1 - p))), t the two-sided normal quantile.
    """
    if not 0 < margin < 1 or not 0 < confidence < 1:
        raise ValueError("margin and confidence must lie in (0, 1)")
    t = float(stats.norm.ppf(0.5 + confidence / 2))
    n = population / (1 + margin ** 2 * (population - 1) / (t ** 2 * p * (1 - p)))
    return max(1, math.ceil(n))


# --- sequential estimation (design §2) ---------------------------------------------------------

class BettingCS:
    """Always-valid confidence sequence for the mean of outcomes in [0, 1].

    Why: ``--trials auto`` looks at the data after every trial and stops when
    the interval is narrow. A Student-t interval is not valid under such
    optional stopping, and it collapses when the first trials happen to be
    identical (most flips are benign): measured on LeNet-5/digits at BER
    3e-6, 40 runs of the old "t half-width <= margin after 10 trials" rule
    covered a 2,000-trial reference mean 28% of the time (nominal 95%) and
    averaged 92.12% against 90.80%. A confidence sequence holds the mean at
    *every* trial count simultaneously with probability >= ``confidence``,
    so the interval at any data-dependent stop is valid, and its width comes
    from bets that cannot win on a few identical values.

    Method: the hedged capital process with predictable plug-in bets of
    Waudby-Smith & Ramdas, "Estimating means of bounded random variables by
    betting" (JRSS-B 86(1), 2024, online 2023; arXiv 2010.09686; the
    ``betting_cs`` of the ``confseq`` package). For a candidate mean m, two gamblers bet that the mean is above
    or below m with capital K+(m) = prod(1 + l+_i(m)(x_i - m)) and
    K-(m) = prod(1 - l-_i(m)(x_i - m)), where l_i = sqrt(2 log(2/alpha) /
    (s2_{i-1} i log(1 + i))) uses only the values before trial i
    (s2 a regularised running variance, prior 1/4 from one pseudo-trial at
    1/2), truncated at c/m and c/(1 - m) with c = 1/2. m is rejected once
    max(K+, K-) / 2 >= 1/alpha (Ville's inequality makes that a level-alpha
    test at every time at once). K+ falls and K- rises with m, so the
    candidates left form an interval; running intersection keeps it the
    intersection over all trials (still valid, never wider).

    With ``target_half_width`` (what ``--trials auto`` asks for) the bets are
    the same paper's fixed-size plug-in sqrt(2 log(2/alpha) / (n s2_{i-1}))
    with n = 2 s2_{i-1} log(2/alpha) / target^2, the size at which a
    half-width of ``target`` is expected, i.e. l_i = target / s2_{i-1}: tightest
    where the run will stop. Any predictable bets keep the guarantee. Measured
    on 4,000 real LeNet-5/digits trials at BER 3e-6 (std 0.12), target 0.01,
    200 runs: 98.5% coverage, ~980 trials to stop on average against ~1,360
    with the all-time bets; a fixed-size t-interval of that precision needs
    566 trials but is not valid when the size is chosen on the data
    (``pytest -s tests/test_sequential.py`` prints the numbers).

    With ``horizon`` (a fixed number of trials known in advance: what a fixed-n
    campaign's interval uses, :func:`bounded_ci`) the bets are the same paper's
    fixed-n plug-in sqrt(2 log(2/alpha) / (horizon s2_{i-1})): tightest at that
    size, still valid there (and at every other size) by the same argument.

    The candidates are a grid of step ``resolution``; only those inside the
    current interval are tracked, so the cost per trial shrinks with the
    interval. The reported bounds are widened by one grid step, so the
    exact interval always lies inside them (conservative by at most
    ``resolution``).
    """

    def __init__(self, confidence: float = 0.95, *, target_half_width: float | None = None,
                 horizon: int | None = None, resolution: float = 1e-4, truncation: float = 0.5) -> None:
        if not 0 < confidence < 1:
            raise ValueError(f"confidence {confidence} must lie in (0, 1)")
        if target_half_width is not None and not 0 < target_half_width < 1:
            raise ValueError(f"target half-width {target_half_width} must lie in (0, 1)")
        if horizon is not None and (target_half_width is not None or horizon < 1):
            raise ValueError(f"horizon {horizon} must be >= 1 and goes without a target half-width")
        if not 0 < resolution <= 0.1:
            raise ValueError(f"resolution {resolution} must lie in (0, 0.1]")
        if not 0 < truncation < 1:
            raise ValueError(f"truncation {truncation} must lie in (0, 1)")
        self.confidence = confidence
        self.target_half_width = target_half_width
        self.horizon = horizon
        self.resolution = resolution
        alpha = 1.0 - confidence
        self._log_threshold = math.log(2.0 / alpha)  # hedged, theta = 1/2: max(K+, K-)/2 >= 1/alpha
        self._bet_scale = 2.0 * math.log(2.0 / alpha)
        steps = int(round(1.0 / resolution))
        self._m = np.linspace(0.0, 1.0, steps + 1)
        with np.errstate(divide="ignore"):
            self._cap_pos = truncation / self._m            # inf at m = 0: no cap needed there
            self._cap_neg = truncation / (1.0 - self._m)    # inf at m = 1
        self._log_pos = np.zeros_like(self._m)
        self._log_neg = np.zeros_like(self._m)
        self.n = 0
        self._sum = 0.0
        self._sq = 0.0          # sum over trials of (x_i - regularised mean after i)^2
        self.low, self.high = 0.0, 1.0

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def mean(self) -> float:
        return self._sum / self.n if self.n else float("nan")

    def update(self, x: float) -> None:
        """Add the next trial's outcome (in trial order)."""
        x = float(x)
        if not 0.0 <= x <= 1.0:  # also refuses NaN
            raise ValueError(f"outcome {x} outside [0, 1]")
        t = self.n + 1
        var_before = (0.25 + self._sq) / t           # s2_{t-1}: the values before this trial only
        if self.target_half_width is not None:
            bet = self.target_half_width / var_before
        elif self.horizon is not None:
            bet = math.sqrt(self._bet_scale / (var_before * self.horizon))
        else:
            bet = math.sqrt(self._bet_scale / (var_before * t * math.log1p(t)))
        if self._m.size:
            diff = x - self._m
            self._log_pos += np.log1p(np.minimum(bet, self._cap_pos) * diff)
            self._log_neg += np.log1p(-np.minimum(bet, self._cap_neg) * diff)
            kept = np.flatnonzero(np.maximum(self._log_pos, self._log_neg) < self._log_threshold)
            if not kept.size:  # the interval fell between two grid points: keep the last one (still valid)
                self._m = self._m[:0]
            elif kept[0] > 0 or kept[-1] < self._m.size - 1:
                keep = slice(kept[0], kept[-1] + 1)
                for name in ("_m", "_cap_pos", "_cap_neg", "_log_pos", "_log_neg"):
                    setattr(self, name, getattr(self, name)[keep])
                self.low = max(self.low, float(self._m[0]) - self.resolution)
                self.high = min(self.high, float(self._m[-1]) + self.resolution)
        self.n = t
        self._sum += x
        self._sq += (x - (0.5 + self._sum) / (t + 1)) ** 2

    def extend(self, values: Iterable[float]) -> "BettingCS":
        for x in values:
            self.update(x)
        return self


def betting_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float]:
    """The betting confidence sequence's interval after ``values`` (see :class:`BettingCS`).

    Valid at any number of values, including one (where a t-interval does not
    exist), and at a data-dependent stop; always inside [0, 1].
    """
    cs = BettingCS(confidence).extend(values)
    return cs.low, cs.high


# --- intervals of fixed-size samples (issue 22, item 3) -----------------------------------------

CI_BETTING_FIXED = "betting (fixed n)"
# From this many values on, a fixed-size sample of outcomes in [0, 1] gets the Student-t interval
# (unless all values are equal); below it, the bounded betting interval. Why 1,000: fault-injection
# outcomes are zero-inflated (most trials benign, a few catastrophic), and the t-interval's coverage
# depends on how many catastrophic trials the sample holds. Measured (2,000 runs each, nominal 95%)
# with catastrophes (accuracy 0.1 vs 0.97) in 1% / 3% of trials: 62% / 81% at 100 trials, 80% / 93%
# at 300, 94% / 93% at 1,000, 95% / 96% at 10,000; on 0.97 w.p. 0.8 else uniform(0, 0.5): 89% at 10
# trials, 92-93% at 30-100. The betting interval covered 97.5-100% in all these cases at ~1.2x the
# t width (where t is valid) and costs ~0.05 s per interval at 1,000 values (0.4 s at 10,000).
BOUNDED_CI_BELOW = 1000


def needs_bounded_ci(values: Sequence[float]) -> bool:
    """Whether a fixed-size sample's interval must be :func:`bounded_ci` rather than Student-t:
    fewer than ``BOUNDED_CI_BELOW`` values, or all of them equal (a t-interval of zero width
    claims certainty from zero observed variance: "all 10 trials 0.967" is what 10 benign
    trials show whatever the share of catastrophic ones)."""
    x = np.asarray(values, dtype=np.float64)
    return x.size < BOUNDED_CI_BELOW or bool(x.min() == x.max())


def bounded_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """An interval for the mean of a fixed-size sample of outcomes in [0, 1], valid at every size.

    The betting interval of :class:`BettingCS` with the fixed-n bets for ``len(values)``
    (Waudby-Smith & Ramdas): always inside [0, 1], never of zero width (its width comes
    from bets that cannot win on a few identical values, not from the sample variance),
    (0, 1) for no values at all.
    """
    x = np.asarray(values, dtype=np.float64)
    cs = BettingCS(confidence, horizon=max(1, x.size)).extend(x.tolist())
    return cs.low, cs.high


def fixed_n_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[tuple[float, float], str]:
    """The interval of a fixed-size sample of outcomes in [0, 1] and the name of its method:
    :func:`bounded_ci` where :func:`needs_bounded_ci`, else the Student-t interval clipped to [0, 1]."""
    if needs_bounded_ci(values):
        return bounded_ci(values, confidence), CI_BETTING_FIXED
    low, high = mean_ci(values, confidence)[2]
    return (max(0.0, low), min(1.0, high)), CI_STUDENT_T


@dataclass(frozen=True)
class SequentialEstimate:
    """Where a sequential run stopped and what it reports there."""

    trials: int            # values used (the stop)
    mean: float
    low: float             # the confidence sequence's interval at the stop
    high: float
    narrow: bool           # half-width <= margin reached (False: stopped by the budget or the data ran out)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def sequential_mean(values: Iterable[float], margin: float, confidence: float = 0.95, *,
                    min_trials: int = 1, max_trials: int | None = None) -> SequentialEstimate:
    """Consume ``values`` in order until the betting CS half-width is <= ``margin``.

    The stop is a pure function of the values in order (a resumed campaign
    recomputes it from its committed trials and gets the same one), and
    ``values`` is read lazily: nothing past the stop is requested. Stops
    at ``max_trials`` at the latest; the interval reported there is still
    valid, only wider than asked. ``min_trials`` is only a floor: the CS
    needs none for validity, and identical outcomes do not stop it early
    (measured: 384 trials all at 0.85 before a half-width of 0.01 at 95%,
    the evidence needed to rule out a ~1% share of catastrophic trials).
    """
    if not 0 < margin < 1:
        raise ValueError(f"margin {margin} must lie in (0, 1)")
    cs = BettingCS(confidence, target_half_width=margin)
    narrow = False
    if max_trials is None or max_trials > 0:
        for x in values:
            cs.update(x)
            if cs.n >= min_trials and cs.half_width <= margin:
                narrow = True
                break
            if max_trials is not None and cs.n >= max_trials:
                break
    return SequentialEstimate(cs.n, cs.mean, cs.low, cs.high, narrow)
