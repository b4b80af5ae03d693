"""Degradation balls (SPEC sections 1, 6 and 9): what a ball is, its results-file key (and edit folder), the
degradation and success change a ball reports, the in-ball rule, and the choice of epoch (fits) and beta (the
ensemble).

Every place that decides whether a general NLL is inside a ball (the fit's epoch choice, the ensemble's beta,
sweeps and reports) goes through ``inside``, so the rule is written once: strictly below ``(1 + eps)`` times the
unedited model's general NLL, and a NaN or infinite NLL is never inside.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from editing.core.errors import ConfigError
from editing.core.types import Metric

BALLS_SETTING = "--budget.balls"
MAX_EPOCH_SETTING = "--budget.max_epoch"


def ball_key(eps: float | Ball) -> str:
    """The name of a ball in results files: ``1e-03`` when that string reads back as exactly ``eps``, else the
    shortest string that does (``0.0012``). Distinct eps values always get distinct keys, and ``key_eps`` inverts
    it exactly."""
    eps = eps.eps if isinstance(eps, Ball) else float(eps)
    short = f"{eps:.0e}"
    return short if float(short) == eps else repr(eps)


def key_eps(key: str) -> float:
    """The eps of a ball key (``ball_key``'s inverse)."""
    try:
        return float(key)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key!r} is not a ball key (a ball is named by its eps, e.g. '1e-03')") from err


def key_label(key: str) -> str:
    """A compact label for tables and plots: ``1e-3`` for ``1e-03``, the key itself otherwise."""
    return key.replace("e-0", "e-")


def degradation(general_nll: float, initial: float) -> float:
    """How much the general NLL grew relative to the unedited model's: ``general_nll / initial - 1`` (a ball of eps
    holds the NLLs whose degradation is below eps)."""
    return general_nll / initial - 1.0


def success_change_pp(initial: float, after: float) -> float:
    """The change in success rate, in percentage points (the gain a ball reports, SPEC section 6)."""
    return 100.0 * (after - initial)


def edit_folder_name(key: str) -> str:
    """The folder of a ball's edit inside a run folder's ``edits/``: ``ball_<key>``."""
    return f"ball_{key}"


def inside(nll: float | None, initial: float | None, eps: float | Ball) -> bool:
    """Whether a general NLL is inside the ball of ``eps`` around ``initial`` (the unedited model's general NLL).

    Inside means ``nll < (1 + eps) * initial`` (strict, SPEC section 6). A missing, NaN or infinite value (of either
    NLL) is never inside: a broken evaluation must not count as an edit that kept the model intact.
    """
    eps = eps.eps if isinstance(eps, Ball) else float(eps)
    if nll is None or initial is None:
        return False
    nll, initial = float(nll), float(initial)
    if not (math.isfinite(nll) and math.isfinite(initial)):
        return False
    return nll < (1.0 + eps) * initial


@dataclass(frozen=True)
class Ball:
    """A degradation ball: the general NLL may grow by at most a factor ``1 + eps`` (0 < eps < 1)."""

    eps: float

    def __post_init__(self) -> None:
        value = self.eps
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"ball eps {value!r} is not a number; give eps values such as 0.001")
        value = float(value)
        if not math.isfinite(value) or not 0.0 < value < 1.0:
            raise ConfigError(f"ball eps {value!r} is out of range: eps must be a finite number with 0 < eps < 1 "
                              "(e.g. 0.001, 0.0001, 0.00001)")
        object.__setattr__(self, "eps", value)

    @property
    def key(self) -> str:
        """The ball's name in results files (see ``ball_key``)."""
        return ball_key(self.eps)

    def inside(self, nll: float | None, initial: float | None) -> bool:
        """Whether ``nll`` is inside this ball around ``initial`` (see ``inside``)."""
        return inside(nll, initial, self.eps)


DEFAULT_BALLS: tuple[Ball, ...] = (Ball(1e-3), Ball(1e-4), Ball(1e-5))


def parse_balls(values: Iterable[float | str | Ball] | None, setting: str = BALLS_SETTING) -> tuple[Ball, ...]:
    """Validated balls from eps values, in the order given (None: ``DEFAULT_BALLS``).

    Args:
        values: eps values (numbers, numeric strings or ``Ball``).
        setting: the option the values came from, named in errors.

    Returns:
        The balls.

    Raises:
        ConfigError: an eps is not a finite number in (0, 1), the list is empty, or an eps is given twice.
    """
    if values is None:
        return DEFAULT_BALLS
    if isinstance(values, (str, bytes, int, float, Ball)):
        values = [values]
    balls: list[Ball] = []
    for value in values:
        if isinstance(value, Ball):
            ball = value
        else:
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise ConfigError(f"{setting}: {value!r} is not a number; give eps values such as "
                                      "[0.001, 0.0001, 0.00001]") from None
            try:
                ball = Ball(value)
            except ConfigError as err:
                raise ConfigError(f"{setting}: {err}") from None
        balls.append(ball)
    if not balls:
        raise ConfigError(f"{setting}: no ball given; give at least one eps, e.g. [0.001, 0.0001, 0.00001]")
    seen: dict[str, Ball] = {}
    for ball in balls:
        if ball.key in seen:
            # equal eps, or (were the keys ever lossy) two eps with one name: either way one result would be lost
            other = seen[ball.key]
            what = "is listed twice" if other.eps == ball.eps else f"and {other.eps!r} share the key {ball.key!r}"
            raise ConfigError(f"{setting}: eps {ball.eps!r} {what}; each ball must be listed once")
        seen[ball.key] = ball
    return tuple(balls)


def parse_max_epoch(max_epoch: Mapping[str, int] | None, balls: Iterable[Ball],
                    setting: str = MAX_EPOCH_SETTING) -> dict[str, int] | None:
    """The test rule's per-ball epoch caps, keyed by the balls' keys.

    A cap's key may be any spelling of a ball's eps (``1e-03``, ``0.001``); a key that names no ball of the run is an
    error, since that ball's epoch would otherwise go uncapped.
    """
    if max_epoch is None:
        return None
    by_eps = {ball.eps: ball.key for ball in balls}
    caps: dict[str, int] = {}
    for raw, epoch in dict(max_epoch).items():
        try:
            eps = float(raw)
        except (TypeError, ValueError):
            eps = None
        if eps not in by_eps:
            raise ConfigError(f"{setting}: {raw!r} is not one of this run's balls ({', '.join(by_eps.values())}); "
                              f"name each cap by its ball's eps, e.g. {{\"{next(iter(by_eps.values()))}\": 3}}")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"{setting}: the cap of ball {raw!r} is {epoch!r}; it must be an epoch number >= 0")
        caps[by_eps[eps]] = epoch
    return caps


EPOCH_RULES = ("last", "best")
"""``--budget.epoch_rule``: ``last`` (SPEC section 6, the default) reports the last epoch inside each ball; ``best``
the epoch inside it with the highest ``epoch_objective`` (ties: the later), so that an edit which generalizes best
early in training and then overfits its literal prompts keeps its early epoch (``editing auto``'s trials)."""


def epoch_objective(record: Mapping) -> float:
    """What the ``best`` epoch rule maximizes: reliability plus success rate on the evaluation set (``editing auto``'s
    objective), a missing or NaN rate counting 0."""
    total = 0.0
    for metric in (Metric.RELIABILITY, Metric.SUCCESS_RATE):
        value = record.get(metric)
        if value is not None and math.isfinite(value):
            total += float(value)
    return total


def parse_epoch_rule(rule: str, setting: str = "--budget.epoch_rule") -> str:
    """``rule`` checked against ``EPOCH_RULES``."""
    if rule not in EPOCH_RULES:
        raise ConfigError(f"{setting}={rule!r}: expected one of {', '.join(EPOCH_RULES)} (last: SPEC section 6)")
    return rule


def choose_epochs(history: list[dict], balls: Iterable[float | Ball] | None = None,
                  max_epoch: Mapping[str, int] | None = None, initial: float | None = None,
                  rule: str = "last") -> dict[str, int]:
    """The reported epoch per ball (SPEC section 6): the LAST evaluated epoch whose general NLL is inside the ball
    around epoch 0's; epoch 0 always qualifies (zero improvement). With ``rule="best"`` it is instead the epoch
    inside the ball (within the cap) with the highest ``epoch_objective``, the later one on a tie.

    Args:
        history: per-epoch records with ``epoch`` and ``general_nll``; the first is the unedited model (epoch 0).
        balls: the balls or their eps values (default ``DEFAULT_BALLS``).
        max_epoch: per ball key, an epoch not to go past (the test pair's rule, SPEC section 6): the reported epoch is
            then the last epoch inside the ball among epochs 0..cap, as the reference's test report computes it (it
            walks the epochs up to the one chosen at validation and keeps the last one inside), so a reported epoch is
            always inside its ball.
        initial: the general NLL the balls are around (default: epoch 0's). A fit on top of an earlier edit
            (``--base_edit``) passes the original base model's, so that a sequence of edits stays inside the balls of
            the model it started from; epoch 0 (the model the fit started from) is then inside only if that is, and
            is still reported when no epoch is (nothing this fit trained can be kept).
        rule: ``last`` (SPEC section 6) or ``best`` (``EPOCH_RULES``).

    Returns:
        Ball key -> chosen epoch, in the order of ``balls``.
    """
    balls = parse_balls(balls)
    caps = parse_max_epoch(max_epoch, balls) or {}
    parse_epoch_rule(rule)
    initial = history[0][Metric.GENERAL_NLL] if initial is None else initial
    by_epoch = {int(record["epoch"]): record for record in history}
    chosen = {}
    for ball in balls:
        limit = caps.get(ball.key)
        inside = [int(record["epoch"]) for record in history if (limit is None or record["epoch"] <= limit)
                  and ball.inside(record.get(Metric.GENERAL_NLL), initial)]
        inside = inside or [0]  # nothing inside: epoch 0, the model the fit started from
        if rule == "best":
            chosen[ball.key] = max(inside, key=lambda e: (epoch_objective(by_epoch[e]), e))
        else:
            chosen[ball.key] = max(inside)
    return chosen


def choose_beta(nll_by_beta: Mapping[float, float], eps: float | Ball) -> float:
    """The ensemble's beta for a ball (SPEC section 9): from the largest beta down, the first whose general NLL is
    inside the ball around the large model's (beta 0); 0 when none is."""
    initial = nll_by_beta[0.0]
    for beta in sorted(nll_by_beta, reverse=True):
        if beta > 0 and inside(nll_by_beta[beta], initial, eps):
            return beta
    return 0.0


__all__ = ["DEFAULT_BALLS", "EPOCH_RULES", "Ball", "ball_key", "choose_beta", "choose_epochs", "degradation",
           "edit_folder_name", "epoch_objective", "inside", "key_eps", "key_label", "parse_balls", "parse_epoch_rule",
           "parse_max_epoch", "success_change_pp"]
