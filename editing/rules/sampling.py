"""The degradation measured on a sample of the general set G (issue 36 item 6): the interval and the growth rule.

A practitioner's fit (``edit()``, ``editing fit`` on a task of one's own) need not score all of G after every epoch
to know whether an edit is inside a ball: it scores a seeded sample of G, in a fixed order, and grows it until the
interval of the degradation clears every ball's edge or G is used up. The paper's protocol (built-in tasks, sweeps,
test runs) keeps all of G (``all``).

The estimate. For text i of the sample, ``a_i`` is its summed token NLL under the edit and ``b_i`` under p0 (the
same tokens), so the general NLL of a set of texts is ``sum(a) / sum(tokens)`` (SPEC section 5) and the degradation
``general_nll(edit) / general_nll(p0) - 1`` on the sample is the ratio estimate ``D = sum(d) / sum(b)`` of the paired
per-text differences ``d_i = a_i - b_i``. The interval is the t-interval of a ratio estimator (the delta method)
for sampling without replacement from the ``N`` texts of G::

    e_i = d_i - D * b_i,   s2 = sum(e_i ** 2) / (n - 1),
    se  = sqrt((1 - n / N) * s2 / n) / mean(b),
    D -/+ t_{n-1, (1 + level) / 2} * se

The finite-population factor ``1 - n / N`` makes the interval a point when the sample is all of G: the decision is
then the exact one of ``editing.rules.budget.inside``. The rule has no model and no I/O: the callback
(``callbacks/degradation_budget.py``) and ``editing.evaluation.sampled_general`` supply the per-text sums.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

from editing.core.errors import ConfigError

ALL = "all"
AUTO = "auto"
AUTO_FIRST = 64
"""The first sample size of ``auto``: texts scored before the interval is first looked at; each growth doubles it."""
DEFAULT_LEVEL = 0.95
SETTING = "--budget.general_sample"
LEVEL_SETTING = "--budget.interval_level"


def parse_general_sample(value: str | int | None, setting: str = SETTING) -> int | None:
    """The first sample size of a ``general_sample`` setting, or None for ``all`` (every text of G, every epoch).

    Args:
        value: ``all``, ``auto`` (a first sample of ``AUTO_FIRST`` texts) or a number of texts >= 2.
        setting: the option's name, for the message.

    Raises:
        ConfigError: any other value, naming the option and the values it takes.
    """
    if value is None or value == ALL:
        return None
    if value == AUTO:
        return AUTO_FIRST
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigError(f"{setting}={value!r}: give 'auto' (a sample of G grown until its interval clears the "
                          f"ball's edge, starting at {AUTO_FIRST} texts), 'all' (every text of G, the paper's "
                          "protocol) or a first sample size >= 2")
    return value


def parse_level(value: float, setting: str = LEVEL_SETTING) -> float:
    """A confidence level strictly between 0 and 1 (e.g. 0.95).

    Raises:
        ConfigError: any other value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ConfigError(f"{setting}={value!r}: give a confidence level between 0 and 1, e.g. 0.95")
    return float(value)


def sample_order(total: int, seed: int) -> list[int]:
    """The order in which the texts of G join the sample: a seeded permutation of ``range(total)``, so that a
    sample of n texts is always the first n of it (p0's per-text NLLs are reused as the sample grows)."""
    return random.Random(f"general-sample/{seed}").sample(range(total), total)


def sample_sizes(total: int, first: int) -> list[int]:
    """The sample sizes tried in turn: ``first``, doubled until it reaches ``total`` (G used up), ``total`` last."""
    sizes = []
    n = min(first, total)
    while n < total:
        sizes.append(n)
        n *= 2
    return [*sizes, total]


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom: the normal quantile with the
    Cornish-Fisher terms of Abramowitz and Stegun 26.7.5 (within 1e-3 of the exact value from 5 degrees of freedom;
    samples here have at least ``AUTO_FIRST - 1`` unless a smaller first size is asked for)."""
    z = NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


@dataclass(frozen=True)
class Interval:
    """The degradation estimated on a sample of G and its confidence interval.

    Attributes:
        degradation: the ratio estimate ``sum(d) / sum(b)`` (exact when ``texts == total``).
        low: the interval's lower end.
        high: the interval's upper end.
        level: its confidence level.
        texts: the sample size n.
        total: the texts of G, N.
    """

    degradation: float
    low: float
    high: float
    level: float
    texts: int
    total: int

    @property
    def exact(self) -> bool:
        """Whether the sample is all of G (the interval is then the exact degradation)."""
        return self.texts >= self.total

    def inside(self, eps: float) -> bool | None:
        """The interval rule for the ball of ``eps``: True when the whole interval is inside (strictly below eps,
        as ``editing.rules.budget.inside``), False when it is entirely outside (at or above eps) or the estimate is
        not finite, None when it straddles the edge (the sample must grow). On all of G: the exact decision."""
        if not math.isfinite(self.degradation):
            return False
        if self.exact:
            return self.degradation < eps
        if self.high < eps:
            return True
        if self.low >= eps:
            return False
        return None

    def clears(self, balls: Iterable[float]) -> bool:
        """Whether every ball's decision is made (no interval straddles an edge)."""
        return all(self.inside(eps) is not None for eps in balls)

    def to_dict(self) -> dict:
        """The JSON form written into ``results.json``'s epochs (``general_sample``)."""
        return {**asdict(self), "interval": "t (ratio estimator, without replacement)"}


def ratio_interval(edit_sums: Sequence[float], p0_sums: Sequence[float], total: int,
                   level: float = DEFAULT_LEVEL) -> Interval:
    """The degradation of a sample of G and its t-interval (the module's docstring has the formula).

    Args:
        edit_sums: per sampled text, its summed token NLL under the edit (``a_i``).
        p0_sums: the same texts' summed token NLL under p0 (``b_i``), in the same order.
        total: the number of texts in G (``N``), for the finite-population factor.
        level: the confidence level.

    Raises:
        ValueError: fewer than two texts (unless G has one), the two lists of unequal length, or a sample larger than G.
    """
    n = len(edit_sums)
    if n != len(p0_sums) or n < min(2, total) or n > total:
        raise ValueError(f"ratio_interval: {n} edit sums, {len(p0_sums)} p0 sums, {total} texts of G")
    sum_b = math.fsum(p0_sums)
    diffs = [a - b for a, b in zip(edit_sums, p0_sums, strict=True)]
    d = math.fsum(diffs) / sum_b
    if not math.isfinite(d) or n == total:  # all of G: the exact degradation
        return Interval(d, d, d, level, n, total)
    s2 = math.fsum((di - d * b) ** 2 for di, b in zip(diffs, p0_sums, strict=True)) / (n - 1)
    se = math.sqrt(max(0.0, 1.0 - n / total) * s2 / n) / (sum_b / n)
    half = t_quantile((1.0 + level) / 2.0, n - 1) * se
    return Interval(d, d - half, d + half, level, n, total)


__all__ = ["ALL", "AUTO", "AUTO_FIRST", "DEFAULT_LEVEL", "Interval", "parse_general_sample", "parse_level",
           "ratio_interval", "sample_order", "sample_sizes", "t_quantile"]
