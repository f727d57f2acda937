"""Statistics the comparison report draws on (design §2, §6): paired tests between
variants, binomial intervals, tolerable BER and the area under the accuracy-vs-BER curve.

Why paired: every variant's campaign draws trial ``i`` at a BER from the generator
seeded by ``(seed, BER, i)`` (``campaign.trial_rng``) and evaluates the same test
inputs, so trial ``i`` of two variants shares its random numbers. The differences
``d_i = variant_i - baseline_i`` are independent across ``i`` whatever the pairing
does to their spread, so a paired test on them is valid; it gains power where the
pairing makes the two variants' trials correlated. (A variant with more parameter
memory than the baseline, copies or bounds, consumes the same stream over a
different memory, so its faults do not land on the same sites: the pairing then
shares the random numbers, not the fault sites.)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ftcnn.lazy import lazy
from ftcnn.campaigns.metrics import CI_BETTING_FIXED, CI_STUDENT_T, bounded_ci, needs_bounded_ci

stats = lazy("scipy.stats")  # 0.76 s to import: only when a test is computed


def fmt_ber(x: float | None) -> str:
    """A bit error rate as a reader writes it: 1e-5, 3.16e-6, 0 (never 9.999999999999999e-06)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def wilson_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n ((nan, nan) when n = 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 (k = n) the bound is 0 (1) exactly; rounding must not move it past the estimate
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def clopper_pearson_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a binomial proportion k/n."""
    if n <= 0:
        return float("nan"), float("nan")
    alpha = 1 - confidence
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def sign_test_p(differences: Sequence[float]) -> float:
    """Two-sided exact sign test: ties (zero differences) dropped; 1.0 when none is left."""
    d = np.asarray(differences, dtype=np.float64)
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    if pos + neg == 0:
        return 1.0
    return float(stats.binomtest(pos, pos + neg, 0.5).pvalue)


def _shares(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` checked to lie in [0, 1] (accuracies, shares): what the bounded interval needs."""
    if values.size and not (np.all(values >= 0.0) and np.all(values <= 1.0)):  # also refuses NaN
        raise ValueError(f"{what} must lie in [0, 1] for a bounded interval")
    return values


def paired_test(baseline: Sequence[float], variant: Sequence[float], confidence: float = 0.95
                ) -> dict[str, Any]:
    """Paired comparison of two variants' per-trial values in [0, 1] (trial i with trial i).

    Returns the number of pairs, the mean difference (variant - baseline), its
    interval (``ci_method``), the paired t-test's two-sided p and the exact sign
    test's. The interval follows the campaigns' rule (``metrics.needs_bounded_ci``):
    below ``metrics.BOUNDED_CI_BELOW`` pairs, or with every difference equal, the
    betting interval of the differences rescaled from [-1, 1] to [0, 1] and back
    (valid at every n, never of zero width, inside [-1, 1]); else Student-t. With
    every difference equal the t statistic is undefined: p is 1 when it is 0, else
    the sign test's (a t-test cannot say more than "all pairs moved the same way").
    """
    a, b = np.asarray(baseline, dtype=np.float64), np.asarray(variant, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in size ({a.size} vs {b.size})")
    d = _shares(b, "paired values") - _shares(a, "paired values")
    n = int(d.size)
    out: dict[str, Any] = {"test": "paired t", "n": n, "mean_difference": float(d.mean()) if n else float("nan"),
                           "ci": (float("nan"), float("nan")), "ci_method": CI_BETTING_FIXED, "p_t": float("nan"),
                           "p_sign": sign_test_p(d), "confidence": confidence}
    if n == 0:
        return out
    if needs_bounded_ci(d):
        low, high = bounded_ci((d + 1.0) / 2.0, confidence)
        out["ci"] = (2.0 * low - 1.0, 2.0 * high - 1.0)
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    if float(d.min()) == float(d.max()):  # every difference equal: no t statistic
        out["p_t"] = 1.0 if out["mean_difference"] == 0 else out["p_sign"]
        return out
    if not needs_bounded_ci(d):
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
        out["ci"] = (out["mean_difference"] - half, out["mean_difference"] + half)
        out["ci_method"] = CI_STUDENT_T
    out["p_t"] = float(stats.ttest_rel(b, a).pvalue)
    return out


def welch_test(baseline: Sequence[float], variant: Sequence[float], confidence: float = 0.95
               ) -> dict[str, Any]:
    """Unpaired comparison (Welch's t) of values in [0, 1] for trials that cannot be paired.

    The interval follows the campaigns' rule (``metrics.needs_bounded_ci``, on either
    sample): where it asks for a bounded interval, each mean's betting interval at
    confidence 1 - alpha/2 and the difference of their ends (valid by the union bound,
    never of zero width); else Welch's t-interval.
    """
    a = _shares(np.asarray(baseline, dtype=np.float64), "compared values")
    b = _shares(np.asarray(variant, dtype=np.float64), "compared values")
    diff = float(b.mean() - a.mean()) if a.size and b.size else float("nan")
    out: dict[str, Any] = {"test": "Welch t (unpaired)", "n": int(min(a.size, b.size)), "mean_difference": diff,
                           "ci": (float("nan"), float("nan")), "ci_method": CI_BETTING_FIXED,
                           "p_t": float("nan"), "p_sign": float("nan"), "confidence": confidence}
    if not (a.size and b.size):
        return out
    bounded = needs_bounded_ci(a) or needs_bounded_ci(b)
    if bounded:
        each = 1.0 - (1.0 - confidence) / 2
        (a_low, a_high), (b_low, b_high) = bounded_ci(a, each), bounded_ci(b, each)
        out["ci"] = (b_low - a_high, b_high - a_low)
    if a.size < 2 or b.size < 2:
        return out
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        out["p_t"] = 1.0 if diff == 0 else 0.0
        return out
    dof = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    if not bounded:
        half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * se
        out["ci"] = (diff - half, diff + half)
        out["ci_method"] = CI_STUDENT_T
    out["p_t"] = float(2 * stats.t.sf(abs(diff) / se, dof))
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count)."""
    p = [float(x) for x in pvalues]
    valid = sorted((x, i) for i, x in enumerate(p) if not math.isnan(x))
    m = len(valid)
    out = [float("nan")] * len(p)
    running = 0.0
    for rank, (x, i) in enumerate(valid):
        running = max(running, min(1.0, (m - rank) * x))
        out[i] = running
    return out


def tolerable_ber(bers: Sequence[float], values: Sequence[float], clean: float, tolerance: float = 0.01
                  ) -> tuple[float | None, str]:
    """Highest swept BER up to which ``values`` (accuracy, or its CI lower bound) stays
    within ``tolerance`` of ``clean`` at that BER and every lower one.

    Returns (BER, relation): relation "=" for a BER inside the sweep, ">=" when
    accuracy held at the highest BER swept (the true limit lies beyond), "<"
    with the lowest BER when it failed already there (the limit lies below).
    """
    pairs = sorted((b, v) for b, v in zip(bers, values) if b is not None and b > 0)
    if not pairs or clean is None:
        return None, ""
    best = None
    for b, v in pairs:
        if v is None or math.isnan(v) or v < clean - tolerance - 1e-12:
            break
        best = b
    if best is None:
        return pairs[0][0], "<"
    return best, (">=" if best == pairs[-1][0] else "=")


def auc_log_ber(bers: Sequence[float], means: Sequence[float], stds: Sequence[float | None] | None = None,
                trials: Sequence[int] | None = None, confidence: float = 0.95
                ) -> tuple[float, tuple[float, float]]:
    """Area under accuracy vs log10(BER) (trapezoids), divided by the log10 span:
    the mean accuracy over the sweep's decades, in [0, 1].

    The points' estimates are independent (each BER has its own trials), so the
    area's variance is sum(w_i^2 std_i^2 / n_i) with w_i the trapezoid weights;
    the interval is normal at ``confidence`` (nan without stds).
    """
    pts = sorted((math.log10(b), i) for i, b in enumerate(bers) if b is not None and b > 0)
    if len(pts) < 2:
        return float("nan"), (float("nan"), float("nan"))
    xs = [x for x, _ in pts]
    span = xs[-1] - xs[0]
    weights = [0.0] * len(pts)
    for k in range(len(pts) - 1):
        h = (xs[k + 1] - xs[k]) / span / 2
        weights[k] += h
        weights[k + 1] += h
    area = sum(w * means[i] for w, (_, i) in zip(weights, pts))
    if stds is None or trials is None:
        return area, (float("nan"), float("nan"))
    var = 0.0
    for w, (_, i) in zip(weights, pts):
        s, n = stds[i], trials[i]
        if s is None or n is None or n < 1 or (isinstance(s, float) and math.isnan(s)):
            return area, (float("nan"), float("nan"))
        var += w * w * s * s / n
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    half = z * math.sqrt(var)
    return area, (max(0.0, area - half), min(1.0, area + half))


def pareto_front(costs: Sequence[float], values: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (cost no higher and value no
    lower, one of them strictly), sorted by cost."""
    idx = [i for i in range(len(costs)) if not (math.isnan(costs[i]) or math.isnan(values[i]))]
    front = []
    for i in idx:
        dominated = any((costs[j] <= costs[i] and values[j] >= values[i])
                        and (costs[j] < costs[i] or values[j] > values[i]) for j in idx if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (costs[i], -values[i]))


# --- the study's test of means (issue 22) --------------------------------------------------------

SIGN_FLIP_EXACT_UP_TO = 16  # pairs: up to 2^16 sign vectors are enumerated, past that they are sampled
ALTERNATIVES = ("two-sided", "less", "greater")


def sign_flip_test(differences: Sequence[float], *, null: float = 0.0, alternative: str = "two-sided",
                   permutations: int = 10_000, seed: int = 0) -> float:
    """p-value of the paired sign-flip permutation test of ``mean(differences) = null``.

    Why this test: per-trial differences of fault-injection outcomes are zero-inflated and
    bimodal (most trials benign, a few catastrophic), so a t-test's normal approximation
    fails at the sizes a study affords; the sign-flip test assumes only that, under the null,
    each ``d_i - null`` is symmetric about 0 (paired trials share their random numbers, so
    swapping the arms of a pair flips its sign). Its statistic is the mean itself (a test of
    means, as the claims are about means), not the ranks. ``alternative``: "less" (the mean is
    below ``null``), "greater" or "two-sided". Up to ``SIGN_FLIP_EXACT_UP_TO`` pairs every sign
    vector is enumerated (exact p); above, ``permutations`` seeded random ones give
    (1 + hits) / (1 + permutations), a valid p (Phipson & Smyth 2010). 1.0 when every
    difference equals ``null``; NaN without differences.
    """
    if alternative not in ALTERNATIVES:
        raise ValueError(f"unknown alternative {alternative!r}; choose from {', '.join(ALTERNATIVES)}")
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations must be a whole number >= 1 (got {permutations!r})")
    d = np.asarray(differences, dtype=np.float64) - float(null)
    if d.ndim != 1:
        raise ValueError("differences must be a flat sequence of numbers")
    n = int(d.size)
    if n == 0:
        return float("nan")
    if not np.all(np.isfinite(d)):
        raise ValueError("differences must be finite numbers")
    observed = float(d.mean())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).max()))  # the same mean summed in another order

    def hits(signs: np.ndarray) -> int:
        means = (signs * d).mean(axis=1)
        if alternative == "greater":
            return int((means >= observed - tolerance).sum())
        if alternative == "less":
            return int((means <= observed + tolerance).sum())
        return int((np.abs(means) >= abs(observed) - tolerance).sum())

    if n <= SIGN_FLIP_EXACT_UP_TO:
        codes = np.arange(2 ** n, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64)
        return hits(1.0 - 2.0 * (codes & 1)) / 2 ** n
    rng = np.random.default_rng(seed)
    found, left = 0, permutations
    while left:  # in chunks: 10,000 x 100,000 pairs must not be one array
        size = min(left, max(1, 2_000_000 // n))
        found += hits(rng.choice((-1.0, 1.0), size=(size, n)))
        left -= size
    return (1 + found) / (1 + permutations)
