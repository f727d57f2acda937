"""The report's statistics against values known independently (textbook examples, R, by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ftcnn.campaigns import metrics, paired


def test_fmt_ber_prints_what_a_reader_writes() -> None:
    assert paired.fmt_ber(9.999999999999999e-06) == "1e-5"
    assert paired.fmt_ber(1e-3) == "1e-3"
    assert paired.fmt_ber(3.1622776601683795e-07) == "3.16e-7"
    assert paired.fmt_ber(3e-4) == "3e-4"
    assert paired.fmt_ber(0.0) == "0"
    assert paired.fmt_ber(None) == "–"


def test_wilson_and_clopper_pearson_match_known_values() -> None:
    # R: prop.test(7, 20, correct=FALSE)$conf.int -> 0.1811918 0.5671457 (Wilson)
    low, high = paired.wilson_ci(7, 20)
    assert low == pytest.approx(0.1811918, abs=1e-6) and high == pytest.approx(0.5671457, abs=1e-6)
    # R: binom.test(7, 20)$conf.int -> 0.1539092 0.5921885 (Clopper-Pearson)
    low, high = paired.clopper_pearson_ci(7, 20)
    assert low == pytest.approx(0.1539092, abs=1e-6) and high == pytest.approx(0.5921885, abs=1e-6)
    # 0 of n: Wilson's upper bound is z^2 / (n + z^2); Clopper-Pearson's is 1 - (alpha/2)^(1/n)
    z2 = 1.959963984540054 ** 2
    assert paired.wilson_ci(0, 30) == pytest.approx((0.0, z2 / (30 + z2)))
    assert paired.clopper_pearson_ci(0, 30)[1] == pytest.approx(1 - 0.025 ** (1 / 30))
    assert all(math.isnan(x) for x in paired.wilson_ci(0, 0))


def test_sign_test_is_the_exact_binomial() -> None:
    # 9 of 10 non-zero differences positive: p = 2 * (C(10,9) + C(10,10)) / 2^10 = 22/1024
    assert paired.sign_test_p([1] * 9 + [-1] + [0, 0]) == pytest.approx(22 / 1024)
    assert paired.sign_test_p([0, 0, 0]) == 1.0


# Student's sleep data, rescaled into [0, 1] as (x + 2) / 8 (the tests take shares: accuracies);
# t statistics, degrees of freedom and p-values are unchanged by the rescaling
G1 = [(x + 2) / 8 for x in (0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0)]
G2 = [(x + 2) / 8 for x in (1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4)]


def test_paired_t_matches_a_hand_computation() -> None:
    # R: t.test(extra ~ group, data = sleep, paired = TRUE):
    # t = -4.0621, df = 9, p-value = 0.002833, 95% CI -2.4598858 -0.7001142, mean difference -1.58
    r = paired.paired_test(G2, G1)  # variant - baseline = g1 - g2
    assert r["n"] == 10 and r["mean_difference"] == pytest.approx(-1.58 / 8)
    assert r["p_t"] == pytest.approx(0.002833, abs=1e-6)
    # sign test there: 9 negative, 1 zero -> p = 2 / 2^9
    assert r["p_sign"] == pytest.approx(2 / 512)
    # 10 pairs: the bounded interval (issue 22), not R's t-interval (-2.4598858, -0.7001142) / 8
    assert r["ci_method"] == metrics.CI_BETTING_FIXED and -1 <= r["ci"][0] < r["mean_difference"] < r["ci"][1] <= 1
    # from metrics.BOUNDED_CI_BELOW pairs on, the Student-t interval of the differences
    many = paired.paired_test(G2 * 100, G1 * 100)
    d = np.subtract(G1 * 100, G2 * 100)
    low, high = stats.t.interval(0.95, d.size - 1, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(d.size))
    assert many["ci_method"] == metrics.CI_STUDENT_T and many["ci"] == pytest.approx((low, high), abs=1e-12)


def test_paired_test_with_constant_differences() -> None:
    same = paired.paired_test([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert same["mean_difference"] == 0 and same["p_t"] == 1.0
    low, high = same["ci"]  # not the zero-width (0, 0) of a t-interval on zero observed variance
    assert same["ci_method"] == metrics.CI_BETTING_FIXED and -1 <= low < 0 < high <= 1
    with pytest.raises(ValueError, match="differ in size"):
        paired.paired_test([1, 2], [1])


def test_welch_matches_r() -> None:
    # R: t.test(g1, g2) on the sleep data (Welch): t = -1.8608, df = 17.776, p = 0.07939,
    # 95% CI -3.3654832 0.2054832
    r = paired.welch_test(G2, G1)
    assert r["p_t"] == pytest.approx(0.07939, abs=1e-5)
    assert r["ci_method"] == metrics.CI_BETTING_FIXED and -1 <= r["ci"][0] < r["mean_difference"] < r["ci"][1] <= 1
    many = paired.welch_test(G2 * 100, G1 * 100)  # from 1,000 values: Welch's t-interval
    a, b = np.array(G2 * 100), np.array(G1 * 100)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    dof = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    assert many["ci_method"] == metrics.CI_STUDENT_T
    assert many["ci"] == pytest.approx((b.mean() - a.mean() - half, b.mean() - a.mean() + half), abs=1e-12)


def test_holm() -> None:
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.5), "holm") -> 0.04 0.09 0.09 0.50
    assert paired.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    out = paired.holm([float("nan"), 0.02])
    assert math.isnan(out[0]) and out[1] == pytest.approx(0.02)


def test_tolerable_ber() -> None:
    bers = [1e-6, 1e-5, 1e-4, 1e-3]
    assert paired.tolerable_ber(bers, [0.90, 0.895, 0.85, 0.2], clean=0.90) == (1e-5, "=")
    # a recovery after a drop does not count: accuracy must stay within the tolerance
    assert paired.tolerable_ber(bers, [0.90, 0.80, 0.90, 0.90], clean=0.90) == (1e-6, "=")
    assert paired.tolerable_ber(bers, [0.90] * 4, clean=0.90) == (1e-3, ">=")
    assert paired.tolerable_ber(bers, [0.5] * 4, clean=0.90) == (1e-6, "<")


def test_auc_log_ber() -> None:
    # linear in log10(BER) from 1 to 0 over two decades: mean 0.5
    area, ci = paired.auc_log_ber([1e-5, 1e-4, 1e-3], [1.0, 0.5, 0.0])
    assert area == pytest.approx(0.5) and math.isnan(ci[0])
    # weights 1/4, 1/2, 1/4; variance = sum w^2 s^2 / n
    area, ci = paired.auc_log_ber([1e-5, 1e-4, 1e-3], [1.0, 0.5, 0.0], stds=[0.2, 0.2, 0.2], trials=[4, 4, 4])
    half = 1.959963984540054 * math.sqrt((1 / 16 + 1 / 4 + 1 / 16) * 0.04 / 4)
    assert ci == pytest.approx((0.5 - half, 0.5 + half))


def test_pareto_front() -> None:
    costs = [1.0, 1.1, 3.0, 1.05, 2.0]
    values = [0.2, 0.9, 0.95, 0.1, 0.85]
    # 3 (cost 1.05, 0.1) is dominated by 0; 4 (2.0, 0.85) by 1
    assert paired.pareto_front(costs, values) == [0, 1, 2]
