"""spark_ext.stats: mean ± std and the paired difference with its Student-t interval and win count."""

import math

import pytest

from spark_ext.stats import mean_std, paired_difference, summarize, summary_line, t_quantile

scipy_stats = pytest.importorskip("scipy.stats", reason="the t quantile needs scipy (demo extra)")


def test_mean_std_is_the_sample_std():
    assert mean_std([2.0, 4.0, 9.0]) == pytest.approx((5.0, math.sqrt(13.0)))
    assert mean_std([3.5]) == (3.5, 0.0)
    assert summarize([1.0, 3.0]) == pytest.approx({"mean": 2.0, "std": math.sqrt(2.0), "n": 2})
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])


def test_t_quantile_matches_tables():
    assert t_quantile(2) == pytest.approx(4.302653, rel=1e-6)
    assert t_quantile(3) == pytest.approx(3.182446305284263)
    assert t_quantile(10, level=0.9) == pytest.approx(1.812461, rel=1e-6)


def test_paired_difference_matches_a_hand_computation():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 2.5, 3.0]
    res = paired_difference(a, b)
    diffs = [0.5, 1.0, 0.5, 1.0]
    m = sum(diffs) / 4
    s = math.sqrt(sum((d - m) ** 2 for d in diffs) / 3)
    half = 3.182446305284263 * s / 2  # t_{0.975, 3}
    assert res["mean"] == pytest.approx(m)
    assert (res["lo"], res["hi"]) == pytest.approx((m - half, m + half))
    assert res["wins"] == 4 and res["n"] == 4


def test_paired_difference_interval():
    p = paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 1.0])
    assert p["mean"] == pytest.approx(4 / 3) and p["lo"] < p["mean"] < p["hi"]
    # t(0.975, 2) = 4.303, sd of (1, 1, 2) = 0.57735
    assert p["hi"] - p["mean"] == pytest.approx(4.302653 * 0.5773503 / math.sqrt(3), rel=1e-5)


def test_paired_difference_matches_scipy_ttest_rel():
    a = [30.12, 30.40, 29.95, 30.31, 30.02]
    b = [30.05, 30.41, 29.80, 30.20, 30.06]
    res = paired_difference(a, b, level=0.9)
    ci = scipy_stats.ttest_rel(a, b).confidence_interval(confidence_level=0.9)
    assert (res["lo"], res["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert res["wins"] == 3 and res["n"] == 5


def test_paired_difference_edge_cases():
    one = paired_difference([1.0], [0.5])
    assert one["mean"] == 0.5 and math.isnan(one["lo"]) and math.isnan(one["hi"]) and one["wins"] == 1
    with pytest.raises(ValueError, match="must pair up, got 2 and 3"):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])


def test_summary_line():
    s = summarize([1.0, 2.0, 3.0])
    p = paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 1.0])
    assert summary_line("kd", s, None, "qat", digits=2) == "kd: 2.00 ± 1.00"
    line = summary_line("kd", s, p, "qat", digits=3, unit=" dB")
    assert line == f"kd: 2.000 ± 1.000 dB   vs qat +1.333 [{p['lo']:+.3f}, {p['hi']:+.3f}]"
