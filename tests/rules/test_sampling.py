"""The degradation's interval on a sample of G (issue 36 item 6): the formula against a plain loop, the growth rule,
the settings."""

from __future__ import annotations

import math
import random

import pytest

from editing.core.errors import ConfigError
from editing.rules.sampling import (
    AUTO_FIRST,
    Interval,
    parse_general_sample,
    parse_level,
    ratio_interval,
    sample_order,
    sample_sizes,
    t_quantile,
)

# Student's t quantiles from printed tables (two-sided 95%: p = 0.975)
T_TABLE = {(0.975, 10): 2.228, (0.975, 30): 2.042, (0.975, 63): 1.998, (0.975, 120): 1.980, (0.95, 20): 1.725,
           (0.995, 40): 2.704}


@pytest.mark.parametrize(("p", "df"), sorted(T_TABLE))
def test_t_quantile_matches_the_tables(p, df):
    assert abs(t_quantile(p, df) - T_TABLE[(p, df)]) < 2e-3


def reference_interval(a: list[float], b: list[float], total: int, t: float) -> tuple[float, float, float]:
    """SPEC 5 and the issue's rule, as plain loops: the token-weighted degradation of the sample is
    sum(a) / sum(b) - 1; the delta-method variance of a ratio estimator without replacement."""
    sa = 0.0
    sb = 0.0
    for x in a:
        sa += x
    for y in b:
        sb += y
    d = sa / sb - 1.0
    n = len(a)
    ss = 0.0
    for x, y in zip(a, b, strict=True):
        r = (x - y) - d * y
        ss += r * r
    var = (1.0 - n / total) * (ss / (n - 1)) / n
    half = t * math.sqrt(var) / (sb / n)
    return d, d - half, d + half


def test_interval_matches_a_plain_loop():
    rng = random.Random(3)
    b = [rng.uniform(20, 400) for _ in range(80)]  # p0's summed NLL per text (texts of different lengths)
    a = [y * (1 + rng.gauss(2e-3, 5e-3)) for y in b]
    got = ratio_interval(a, b, total=500, level=0.95)
    want = reference_interval(a, b, 500, t_quantile(0.975, 79))
    assert (got.degradation, got.low, got.high) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert (got.texts, got.total, got.level) == (80, 500, 0.95)
    # a wider level gives a wider interval around the same estimate
    wide = ratio_interval(a, b, total=500, level=0.99)
    assert wide.low < got.low < got.degradation < got.high < wide.high


def test_all_of_g_is_the_exact_degradation():
    b = [10.0, 20.0, 30.0]
    a = [10.5, 19.0, 31.0]
    exact = sum(a) / sum(b) - 1
    got = ratio_interval(a, b, total=3)
    assert got.exact and got.low == got.high == got.degradation == pytest.approx(exact, rel=1e-15)
    assert got.inside(exact + 1e-12) is True and got.inside(exact) is False  # strictly below, as the ball rule


def test_the_interval_rule_decides_only_when_it_clears_the_edge():
    iv = Interval(2e-4, 1e-4, 3e-4, 0.95, 64, 2007)
    assert iv.inside(1e-3) is True
    assert iv.inside(1e-4) is False  # low == eps: at the edge counts as outside, as the strict ball rule
    assert iv.inside(2e-4) is None
    assert iv.clears([1e-3, 1e-5]) and not iv.clears([1e-3, 2e-4])
    assert Interval(math.nan, math.nan, math.nan, 0.95, 64, 2007).inside(1.0) is False


def test_order_and_sizes():
    order = sample_order(2007, seed=0)
    assert sorted(order) == list(range(2007)) and order != list(range(2007))
    assert order == sample_order(2007, seed=0) and order != sample_order(2007, seed=1)
    assert sample_sizes(2007, 64) == [64, 128, 256, 512, 1024, 2007]
    assert sample_sizes(50, 64) == [50] and sample_sizes(128, 64) == [64, 128]


@pytest.mark.parametrize(("value", "first"), [("all", None), (None, None), ("auto", AUTO_FIRST), (200, 200),
                                              ("32", 32)])
def test_settings(value, first):
    assert parse_general_sample(value) == first


@pytest.mark.parametrize("value", ["some", 1, 0, -5, True, 2.5])
def test_bad_settings_name_the_option(value):
    with pytest.raises(ConfigError, match=r"--budget.general_sample.*'auto'.*'all'"):
        parse_general_sample(value)
    with pytest.raises(ConfigError, match="--budget.interval_level"):
        parse_level(1.0 if value != 0 else 0)
