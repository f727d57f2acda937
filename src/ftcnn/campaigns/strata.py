"""Time-to-precision campaigns: trials stratified by their exponent-MSB flips (design §2).

Why: what users need is "accuracy at this BER, +-1 point, 95% confidence",
not a number of trials, and plain Monte Carlo spends most of its trials
measuring a mixture whose spread comes almost entirely from one kind of
fault. A float32 flip of bit 30 (the exponent's most significant bit) turns a
weight below 2 into ~1e38 or Inf: one such flip usually wrecks the
evaluation, while trials without one stay near the golden accuracy. The
number of bit-30 flips is known *before* a trial runs, and so is its
probability: each stored bit flips independently with probability ``ber``,
so the count S of bit-30 sites over the N eligible elements is
Binomial(N, ber), independent of the count T of other flips, Binomial(M, ber)
over the M other eligible sites. Four strata with exact weights: "no fault"
(S = 0, T = 0), "faults, no MSB flip" (S = 0, T >= 1), "1 MSB flip" (S = 1)
and ">=2 MSB flips" (S >= 2).

What is catastrophic is the model's, not the format's (issue 22): a hardened model clamps a
huge weight, while a restriction bound's sign flip or the flips of bits 23-29 that shrink a
bound of about 1 wreck it. So for parameter faults the "MSB" sites are measured before any
trial (``measure_sensitivity``, a single-flip pass per target group and bit): the S sites are
the elements' bits in the (group, bit) pairs found catastrophic, the T sites all other eligible
bits, each count still exactly binomial over its sites (``Layout``). Where the pass finds bit
30 of every group (unprotected LeNet-5), layout and draws are the bit-30 design's, bit for bit.
The names keep "MSB" for that reason; summary.json records the measured pairs.

Drawing a trial of a stratum (``draw_faults``): S and T from their binomials
conditioned on the stratum (exact, from the probability tables), then S
elements uniform without replacement over all N elements and T sites uniform
over the M others (given its count, a set of independent equal-probability
flips is uniform, which is also what the plain draw's per-tensor binomials
amount to). So a stratum's trials are
i.i.d. from the plain fault model conditioned on the stratum, and
sum_h W_h * mean_h has the plain campaign's mean: the stratified estimate is
unbiased for any sizes fixed in advance. The trials themselves run through
the unchanged ``TrialRunner`` (plain path, shortcut, batching): only the draw
differs, and each trial is a pure function of (seed, point, stratum, index).

The stratum "no fault" (S = 0 and no other flip either) is the golden result
exactly: it takes no trial (the same fact as ``skip_fault_free``), and its
weight leaves the interval. The other three are sampled.

Design and why its interval covers (``precision_run``): a fixed two-stage
design. A pilot of ``PILOT`` trials per sampled stratum gives each stratum's
standard deviation s_h; Neyman allocation (n_h proportional to W_h s_h, total
(z sum_h W_h s_h / precision)^2 x ``INFLATION``, at least ``MIN_FINAL`` each)
fixes the final sizes; then a final sample of *fresh* trials (indices after
the pilot's) gives the estimate sum_h W_h mean_h and the stratified Student-t
interval (Satterthwaite degrees of freedom). The pilot only chooses the sizes,
so given the pilot the final sample is a fixed-size stratified sample: the
estimate is exactly unbiased and the interval is the textbook one, with no
optional stopping (the trap of design §2: "std 0 after 10 benign trials" is a
stop on the data; here nothing stops on the data). Each stratum's variance in
the interval is the larger of its final and pilot sample variances (the pilot
is independent of the final sample, so this only widens): it guards small
strata whose few final trials happen to miss their rare bad outcomes. A
stratum whose trials are all identical (a std of 0 says nothing, design §2)
gets the variance of one more pseudo-trial at the far end of [0, 1]
(``_identical_floor``) rather than a zero-width share of the interval.
Measured on real LeNet-5/digits trials, 400 resampled runs per BER at +-0.01,
95%: coverage 98.0% (1e-6), 95.5% (1e-5), 97.0% (1e-4); the nominal-rate
t-interval without the pilot floor measured 93.2-95.8%. A run that misses the
precision (the pilot underestimated a std; 4-16% of runs at 1e-5..1e-4) keeps
its valid, slightly wider interval and says so (``narrow``); it is not
extended, which would make the sizes depend on the final sample.

Trials on a block of inputs (``CampaignConfig.inputs_per_trial``, 100 by default with
``--precision``): each trial evaluates one block of the split's fixed seeded random order,
chosen with probability size / n, independently of its faults. Given the faults, the
block's accuracy has the trial's whole-split accuracy as its mean, so each stratum's
trials stay i.i.d. with the same stratum mean, and the design above (pilot, Neyman sizes,
final sample, t-interval) applies unchanged to these cheaper outcomes; their extra spread
(at most p(1-p)/100 per trial) is in the sample variances the interval uses. It pays where
the spread between trials dominates, which it does from BER 1e-5 up for parameter faults:
on LeNet-5/mnist5k at 1e-5 and 1e-4 the trials needed grew 5-11% while each cost 1/6-1/9
(``benchmarks/peers.py --precision 0.01``: 19.8 CPU s for the four-BER sweep, 138.1 with all inputs).

Why not the betting confidence sequences of ``--trials auto`` per stratum
(with a union bound over strata): measured here they need *more* trials than
plain ``--trials auto`` (3,176 vs 2,564 at BER 1e-5 on LeNet-5/digits): a CS
for bounded outcomes must rule out rare catastrophes in every stratum (about
log(1/alpha)/width trials even for a constant stratum), the union bound adds
a third, and the linear sum of stratum widths adds more.

Measured (+-0.01 at 95%, 1 thread, a loaded 2-core machine; trials include the
pilot; ``pytest -s tests/test_precision.py`` prints them):
- LeNet-5/digits, BER 1e-5, 200 runs: coverage 95.0%, 351 trials vs 2,769 for
  ``--trials auto`` (7.9x fewer; CPU est. 5.4x: stratified trials all hold
  faults, plain ones are often fault-free and free);
- VGG-11 w0.25/mnist5k (500 inputs), BER 1e-6, 200 runs (slow test): coverage
  94.5%, 1,655 vs 8,254 trials (5.0x; CPU est. 2.4x);
- LeNet-5/mnist5k (1,000 inputs), the sweep 1e-7..1e-4 through ``run_campaign``
  (``benchmarks/peers.py --precision 0.01``): 93/109/1,974/2,409 trials vs
  456/1,200/4,120/2,974, CPU 163 s vs 219 s in all (1.3x): at 1e-7 plain trials
  are nearly all fault-free (1.4 s vs 1.1 s), at 1e-4 the MSB strata carry most
  of the weight and the variance is within them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ftcnn.injection import faults as F
from ftcnn.injection.fault_space import FORMATS, STRATUM_TAG, FaultSpace
from ftcnn.injection.fault_space import rng as derive_rng
from ftcnn.injection.fault_space import trial_rng as campaign_trial_rng
from ftcnn.lazy import lazy

stats = lazy("scipy.stats")  # 0.76 s to import: only when strata are drawn

STRATA = (0, 1, 2, 3)
STRATUM_NAMES = ("no fault", "faults, no MSB flip", "1 MSB flip", ">=2 MSB flips")
KNOWN = 0                   # the fault-free stratum: its outcome is the golden one, no trial needed
PILOT = 15                  # pilot trials per sampled stratum (allocation and a variance floor)
MIN_FINAL = 15              # final-sample trials per sampled stratum, at least
INFLATION = 1.3             # final size x this: a 15-trial pilot's variance is itself uncertain
_TAG = STRATUM_TAG          # in each stratified trial's seed: never the seed of a plain trial
CI_STRATIFIED = "stratified student-t (two-stage, Neyman allocation)"


def strata_bit(dtype: str) -> int:
    """The bit whose flips define the strata: the exponent MSB of floats, the MSB of int8
    (``fault_space.FORMATS``)."""
    return FORMATS[dtype].stratum_bit


def trial_rng(seed: int, point: float, stratum: int, index: int) -> np.random.Generator:
    """The generator of one stratified trial: a pure function of (seed, point, stratum, index)
    (``fault_space.trial_rng``, the campaign trials' one key)."""
    return campaign_trial_rng(seed, point, index, stratum)


@dataclass(frozen=True)
class Layout:
    """The fault space split for stratification: the catastrophic sites (each element's stratum
    bits) and the M other eligible sites.

    Without ``hot`` every element has one stratum bit, ``msb`` (N = elements such sites), and
    ``others`` are the remaining eligible bits of every element. With ``hot`` (a measured
    ``Sensitivity``), tensor t's catastrophic bits are ``hot[t]`` and its other eligible bits
    ``cold[t]``: the stratum sites are sum_t numel_t x |hot[t]|, the rest sum_t numel_t x |cold[t]|.
    """

    names: tuple[str, ...]
    numels: tuple[int, ...]
    msb: int | None            # the stratum bit, None when it is not among the eligible bits
    others: np.ndarray         # the other eligible bits
    hot: tuple[np.ndarray, ...] | None = None    # per tensor: its catastrophic bits (replaces msb)
    cold: tuple[np.ndarray, ...] | None = None   # per tensor: its other eligible bits (replaces others)

    @classmethod
    def of(cls, memory: F.ParameterMemory | FaultSpace, bits: Sequence[int] | None) -> "Layout":
        """The layout of parameter memory; any other fault space (``fault_space.FaultSpace``)
        brings its own (``strata_layout``: ``trials.ParameterSpace`` asks this for its memory,
        ``activations.ActivationSpace`` makes its values the elements). A memory
        whose catastrophic bits were measured (``memory.catastrophic``, ``measure_sensitivity``)
        is split by them, tensor by tensor; where they are the stratum bit everywhere, the
        layout (and every draw) is the unmeasured one's."""
        if not isinstance(memory, F.ParameterMemory):
            return memory.strata_layout(bits)
        allowed = F.allowed_bits(memory, bits)
        bit = strata_bit(memory.dtype)
        names = tuple(memory.stored)
        numels = tuple(memory.numel(n) for n in names)
        plain = cls(names, numels, bit if bit in allowed else None, allowed[allowed != bit])
        sensitivity: Sensitivity | None = getattr(memory, "catastrophic", None)
        if sensitivity is None:
            return plain
        hot = tuple(allowed[np.isin(allowed, sensitivity.bits_of(n))] for n in names)
        if all(np.array_equal(h, allowed[allowed == bit]) for h in hot):
            return plain
        return cls(names, numels, plain.msb, plain.others, hot,
                   tuple(allowed[~np.isin(allowed, h)] for h in hot))

    def bits_of(self, tensor: int) -> tuple[np.ndarray, np.ndarray]:
        """Tensor number ``tensor``'s (catastrophic bits, other eligible bits)."""
        if self.hot is not None and self.cold is not None:
            return self.hot[tensor], self.cold[tensor]
        msb = np.array([] if self.msb is None else [self.msb], dtype=np.int64)
        return msb, self.others

    @property
    def n_msb(self) -> int:
        """Catastrophic sites (N): the sites whose flips the strata count."""
        return sum(n * len(self.bits_of(t)[0]) for t, n in enumerate(self.numels))

    @property
    def n_other(self) -> int:
        return sum(n * len(self.bits_of(t)[1]) for t, n in enumerate(self.numels))


def weights(layout: Layout, ber: float) -> np.ndarray:
    """Exact stratum probabilities from the binomial fault model: with S ~ Binomial(N, ber) the
    MSB flips and T ~ Binomial(M, ber) the other flips (independent), P(S = 0, T = 0),
    P(S = 0, T >= 1), P(S = 1), P(S >= 2)."""
    n, m = layout.n_msb, layout.n_other
    if ber == 0.0:
        return np.array([1.0, 0.0, 0.0, 0.0])
    s0, s1 = (stats.binom.pmf([0, 1], n, ber) if n else (1.0, 0.0))
    s2 = float(stats.binom.sf(1, n, ber)) if n else 0.0  # not 1 - s0 - s1: exact in the tail
    t0 = float(stats.binom.pmf(0, m, ber)) if m else 1.0
    t1 = float(stats.binom.sf(0, m, ber)) if m else 0.0
    w = np.array([s0 * t0, s0 * t1, s1, s2], dtype=np.float64)
    return w / w.sum()


@functools.lru_cache(maxsize=64)
def _table(size: int, ber: float, at_least: int) -> tuple[np.ndarray, np.ndarray]:
    """The values k >= ``at_least`` of Binomial(size, ber) that carry any mass (to 1e-17),
    with their probabilities conditional on k >= ``at_least``."""
    lo = max(at_least, int(stats.binom.ppf(1e-17, size, ber)))
    # scipy's isf(1e-17) returns ``size`` for large sizes (a table of millions of values, 14 ms
    # per draw): walk out from the mean until the pmf is below 1e-30 instead
    mean, sd = size * ber, math.sqrt(size * ber * (1 - ber))
    reach = 10 * sd + 30
    while mean + reach < size and stats.binom.pmf(int(mean + reach), size, ber) > 1e-30:
        reach *= 2
    ks = np.arange(lo, max(lo, min(int(mean + reach), size)) + 1)
    pmf = stats.binom.pmf(ks, size, ber)
    return ks, pmf / pmf.sum()


def _conditional_binomial(rng: np.random.Generator, size: int, ber: float, at_least: int) -> int:
    ks, probs = _table(size, float(ber), at_least)
    return int(rng.choice(ks, p=probs))


def _spread(rng: np.random.Generator, count: int, numels: Sequence[int], per_element: Sequence[int]
            ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``count`` distinct sites uniform over the tensors' numel x per_element slots (per tensor):
    (tensor number, element indices, slot within the element)."""
    if not count:
        return []
    per = np.asarray(per_element, dtype=np.int64)
    sizes = np.asarray(numels, dtype=np.int64) * per
    pos = np.sort(rng.choice(int(sizes.sum()), size=count, replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(starts, pos, side="right") - 1
    return [(int(t), (pos[which == t] - starts[t]) // per[t], (pos[which == t] - starts[t]) % per[t])
            for t in np.unique(which)]


def draw_faults(memory: F.ParameterMemory, rng: np.random.Generator, ber: float, stratum: int, *,
                bits: Sequence[int] | None = None, mode: str = "flip") -> F.Faults:
    """Faults of the plain BER model conditioned on the stratum (see the module doc).

    The MSB flip count S and the other-bit count T are drawn from their binomials
    conditioned on the stratum, then placed uniformly without replacement (given
    its count, a set of independent equal-probability flips is uniform).
    """
    sites = draw_sites(Layout.of(memory, bits), rng, ber, stratum)
    return F.drawn_faults(sites, mode, rng)


def draw_sites(layout: Layout, rng: np.random.Generator, ber: float, stratum: int
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The sites of one trial of ``stratum`` (see ``draw_faults``): per tensor of ``layout``
    with any, (element indices, bit positions). Parameter and activation strata share it."""
    if stratum not in STRATA:
        raise ValueError(f"unknown stratum {stratum}")
    n, m = layout.n_msb, layout.n_other
    if (stratum >= 2 and not n) or (stratum == 1 and not m):
        raise ValueError(f"stratum {STRATUM_NAMES[stratum]!r} is empty for these bits")
    if stratum == 0:
        return {}
    s = {1: 0, 2: 1}.get(stratum) if stratum < 3 else _conditional_binomial(rng, n, ber, 2)
    t = _conditional_binomial(rng, m, ber, 1) if stratum == 1 else (int(rng.binomial(m, ber)) if m else 0)
    idx: dict[str, list[np.ndarray]] = {}
    bit: dict[str, list[np.ndarray]] = {}
    per_tensor = [layout.bits_of(k) for k in range(len(layout.names))]
    for which, count in ((0, s), (1, t)):  # the catastrophic sites, then the others
        for tensor, elements, slot in _spread(rng, count, layout.numels, [len(b[which]) for b in per_tensor]):
            idx.setdefault(layout.names[tensor], []).append(elements)
            bit.setdefault(layout.names[tensor], []).append(per_tensor[tensor][which][slot])
    return {name: (np.concatenate(idx[name]).astype(np.int64), np.concatenate(bit[name]).astype(np.int64))
            for name in layout.names if name in idx}

# --- what is catastrophic for this model: a single-flip sensitivity pass ------------------------

SENSITIVITY_SAMPLES = 8     # values flipped one at a time per (target group, bit)
CATASTROPHIC_DROP = 0.1     # a (group, bit) pair whose single flips cost more accuracy than this, on average
_SENSITIVITY_TAG = 0x534E53  # in the pass's seed: never the seed of a trial


@dataclass(frozen=True)
class Sensitivity:
    """The (target group, bit) pairs whose single flip is catastrophic for one model: the
    catastrophic stratum's sites (``Layout.of``), and what summary.json records.

    ``groups``: group -> its catastrophic bits; ``tensors``: stored tensor -> its group;
    ``drops``: group -> per measured bit, the mean accuracy drop of its single flips."""

    groups: dict[str, tuple[int, ...]]
    tensors: dict[str, str]
    drops: dict[str, dict[int, float]]

    def bits_of(self, name: str) -> tuple[int, ...]:
        return self.groups[self.tensors[name]]

    def record(self) -> dict[str, object]:
        """What summary.json says about the catastrophic stratum (``catastrophic`` of each row)."""
        return {"method": f"single-flip sensitivity: {SENSITIVITY_SAMPLES} sampled values per (group, bit), "
                          f"catastrophic where the mean accuracy drop > {CATASTROPHIC_DROP}",
                "bits": {g: list(b) for g, b in self.groups.items()},
                "max_drop": {g: round(max(d.values()), 6) if d else None for g, d in self.drops.items()}}


def target_groups(model: torch.nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Per stored tensor name, its target group: ``weight``/``bias`` of the layers,
    ``batchnorm.<name>`` of BatchNorm parameters and statistics, ``<Module>.<buffer>`` of
    each protection value kind and code word (a bound, a check's bound, a copy). Values of a
    group play one role, so one bit is about as catastrophic for all of them."""
    modules = dict(model.named_modules())
    groups = {}
    for name in names:
        path, _, attr = name.rpartition(".")
        module = modules.get(path)
        if isinstance(module, F.BN_LAYER_TYPES):
            groups[name] = f"batchnorm.{attr}"
        elif module is not None and attr in F.protection_buffers(module):
            groups[name] = f"{type(module).__name__}.{attr}"
        else:
            groups[name] = attr
    return groups


def measure_sensitivity(model: torch.nn.Module, memory: F.ParameterMemory,
                        accuracy: Callable[[F.Faults], float], *, seed: int,
                        bits: Sequence[int] | None = None, mode: str = "flip") -> Sensitivity:
    """The pilot's single-flip pass: per target group, ``SENSITIVITY_SAMPLES`` values drawn
    uniformly over the group's elements (seeded by ``seed`` alone), each flipped alone at each
    eligible bit; a (group, bit) pair is catastrophic when the mean accuracy drop of its flips
    (``accuracy(faults)`` against ``accuracy`` without faults) exceeds ``CATASTROPHIC_DROP``.

    Why measured: bit 30 is catastrophic for a weight below 2, but for a bound of 1.5 the
    shrinking flips of bits 26-29 are (all activations clipped to ~0) and bit 30 is not. The pass
    runs before any trial and depends on no trial, so the strata stay a fixed partition of the
    fault space: their weights are exact and the estimate unbiased whatever it finds; it only
    decides how much variance the strata remove."""
    allowed = F.allowed_bits(memory, bits)
    groups = target_groups(model, list(memory.stored))
    rng = derive_rng(seed, _SENSITIVITY_TAG)
    golden = accuracy(F.Faults({}, mode))
    hot: dict[str, tuple[int, ...]] = {}
    drops: dict[str, dict[int, float]] = {}
    for group in dict.fromkeys(groups.values()):  # in memory order
        names = [n for n in memory.stored if groups[n] == group]
        picks = [(names[t], elements) for t, elements, _ in
                 _spread(rng, min(SENSITIVITY_SAMPLES, sum(memory.numel(n) for n in names)),
                         [memory.numel(n) for n in names], [1] * len(names))]
        sites = [(name, int(i)) for name, elements in picks for i in elements]
        drops[group] = {}
        for bit in allowed.tolist():
            lost = [golden - accuracy(F.drawn_faults({name: (np.array([i]), np.array([bit]))}, mode, rng))
                    for name, i in sites]
            drops[group][bit] = float(np.mean(lost)) if lost else 0.0
        hot[group] = tuple(b for b, d in drops[group].items() if d > CATASTROPHIC_DROP)
    return Sensitivity(hot, groups, drops)


# --- the two-stage design ------------------------------------------------------------------------

Fetch = Callable[[list[tuple[int, int]]], list[float]]
"""Outcomes (accuracies) of (stratum, index) trials, in the order asked."""


@dataclass(frozen=True)
class StratifiedEstimate:
    """What a precision run measured at one point."""

    weights: tuple[float, ...]
    pilot: tuple[int, ...]           # per stratum: pilot trials (indices 0..pilot-1), allocation only
    trials: tuple[int, ...]          # per stratum: final-sample trials (indices pilot..pilot+n-1)
    means: tuple[float, ...]         # per stratum, final sample (the known stratum: its value)
    stds: tuple[float, ...]
    mean: float                      # sum_h W_h mean_h
    low: float
    high: float
    df: float                        # Satterthwaite degrees of freedom of the t-interval
    narrow: bool                     # half-width <= precision reached

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def total(self) -> int:
        """Every trial run, pilot included."""
        return sum(self.trials) + sum(self.pilot)


def stratified_t(weights: Sequence[float], samples: dict[int, Sequence[float]], known: dict[int, float],
                 confidence: float, min_vars: dict[int, float] | None = None
                 ) -> tuple[float, float, float, float]:
    """Mean, CI bounds and Satterthwaite df of sum_h W_h mean_h from per-stratum samples
    of fixed sizes (known strata add W_h * value and no variance). ``min_vars``: per-stratum
    variances from independent data (the pilot) used where larger (conservative)."""
    w = np.asarray(weights, dtype=np.float64)
    mean = sum(w[h] * v for h, v in known.items())
    terms = []
    for h, xs in samples.items():
        x = np.asarray(xs, dtype=np.float64)
        mean += w[h] * x.mean()
        var = x.var(ddof=1) if len(x) > 1 else float("inf")
        var = max(var, (min_vars or {}).get(h, 0.0))
        terms.append((w[h] ** 2 * var / len(x), len(x) - 1))
    total = sum(v for v, _ in terms)
    if not terms or total == 0.0:
        return float(mean), float(mean), float(mean), float("inf")
    df = total ** 2 / sum(v ** 2 / d for v, d in terms if v > 0)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(total)
    return float(mean), float(mean - half), float(mean + half), float(df)


def final_sizes(weights: Sequence[float], stds: dict[int, float], precision: float, confidence: float,
                budget: int | None = None) -> dict[int, int]:
    """Neyman allocation for a CI half-width of ``precision``: n = (z sum W_h s_h / precision)^2
    inflated by ``INFLATION``, n_h proportional to W_h s_h, at least ``MIN_FINAL`` each, at most
    ``budget`` in all (then proportionally fewer)."""
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    ws = {h: weights[h] * stds[h] for h in stds}
    total_ws = sum(ws.values())
    n = INFLATION * (z * total_ws / precision) ** 2
    if budget is not None:
        n = min(n, max(0, budget - MIN_FINAL * len(stds)))
    return {h: MIN_FINAL + (math.ceil(n * ws[h] / total_ws) if total_ws > 0 else 0) for h in stds}


def _identical_floor(values: Sequence[float]) -> float:
    """The variance a stratum is given when all its trials (pilot and final) are identical:
    that of one more pseudo-trial at the far end of [0, 1], i.e. a share 1/(n+1) of outcomes
    unlike the rest (0 otherwise). A sample std of 0 says nothing (design §2); without this a
    stratum of all-benign trials would claim certainty."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0 or np.any(x != x[0]):
        return 0.0
    share, reach = 1.0 / (len(x) + 1), max(x[0], 1.0 - x[0])
    return share * (1.0 - share) * reach ** 2


def precision_run(stratum_weights: Sequence[float], fetch: Fetch, precision: float,
                  confidence: float = 0.95, *, known: dict[int, float] | None = None,
                  max_trials: int | None = None) -> StratifiedEstimate:
    """The two-stage stratified design (see the module doc): a pilot of ``PILOT`` trials per
    sampled stratum, Neyman sizes from its standard deviations, then a final sample of fresh
    trials whose stratified mean is the estimate and whose stratified t-interval the CI.

    ``known`` gives the strata whose outcome is certain (the fault-free one: the golden
    accuracy); they take no trial. ``fetch`` is called twice (pilot, final); the result is a
    pure function of the trials' outcomes, so a resumed campaign recomputes it.
    """
    if not 0 < precision < 1:
        raise ValueError(f"precision {precision} must lie in (0, 1)")
    w = tuple(float(x) for x in stratum_weights)
    known = {h: float(v) for h, v in (known or {}).items() if w[h] > 0}
    live = [h for h in range(len(w)) if w[h] > 0 and h not in known]
    asked = [(h, i) for h in live for i in range(PILOT)]
    outcomes = fetch(asked) if asked else []
    pilot = {h: [x for (k, _), x in zip(asked, outcomes) if k == h] for h in live}
    stds = {h: float(np.std(pilot[h], ddof=1)) for h in live}
    budget = None if max_trials is None else max_trials - len(asked)
    sizes = final_sizes(w, stds, precision, confidence, budget)
    asked = [(h, PILOT + i) for h in live for i in range(sizes[h])]
    outcomes = fetch(asked) if asked else []
    final = {h: [x for (k, _), x in zip(asked, outcomes) if k == h] for h in live}
    floors = {h: max(stds[h] ** 2, _identical_floor(pilot[h] + final[h])) for h in live}
    mean, low, high, df = stratified_t(w, final, known, confidence, floors)
    strata_ = range(len(w))
    return StratifiedEstimate(
        w, tuple(PILOT if h in live else 0 for h in strata_), tuple(sizes.get(h, 0) for h in strata_),
        tuple(known[h] if h in known else float(np.mean(final[h])) if h in final else float("nan")
              for h in strata_),
        tuple(float(np.std(final[h], ddof=1)) if h in final else 0.0 if h in known else float("nan")
              for h in strata_),
        mean, max(0.0, low), min(1.0, high), df, (high - low) / 2 <= precision + 1e-12)
