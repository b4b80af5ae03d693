"""The degradation-budget rule of SPEC section 6 on constructed metric histories."""

from __future__ import annotations

import pytest

from callbacks.degradation_budget import ball_key, choose_epochs


def history(nlls: list[float], success: list[float] | None = None) -> list[dict]:
    success = success or [0.0] * len(nlls)
    pairs = enumerate(zip(nlls, success, strict=True))
    return [{"epoch": i, "general_nll": n, "success_rate": s} for i, (n, s) in pairs]


def test_last_epoch_inside_each_ball_is_chosen() -> None:
    base = 4.0
    # relative changes per epoch: 0, 5e-6, 5e-5, 2e-6, 5e-4, 2e-3, 8e-6
    rel = [0, 5e-6, 5e-5, 2e-6, 5e-4, 2e-3, 8e-6]
    chosen = choose_epochs(history([base * (1 + r) for r in rel]))
    # 1e-5 ball: the last epoch with change < 1e-5 is epoch 6 (8e-6): the rule is "last", not "first run"
    assert chosen == {"1e-03": 6, "1e-04": 6, "1e-05": 6}
    chosen = choose_epochs(history([base * (1 + r) for r in rel[:6]]))
    assert chosen == {"1e-03": 4, "1e-04": 3, "1e-05": 3}


def test_epoch_zero_when_nothing_stays_inside() -> None:
    chosen = choose_epochs(history([3.0, 3.1, 3.2]))
    assert chosen == {"1e-03": 0, "1e-04": 0, "1e-05": 0}


def test_boundary_is_strict_and_nan_never_qualifies() -> None:
    base = 2.0
    chosen = choose_epochs(history([base, base * (1 + 1e-3), float("nan")]), balls=(1e-3,))
    assert chosen == {ball_key(1e-3): 0}


def test_test_rule_caps_at_validation_epoch() -> None:
    base = 5.0
    h = history([base, base * (1 + 1e-6), base * (1 + 2e-6), base * (1 + 3e-6)])
    assert choose_epochs(h, balls=(1e-5,)) == {"1e-05": 3}
    assert choose_epochs(h, balls=(1e-5,), max_epoch={"1e-05": 1}) == {"1e-05": 1}


@pytest.mark.parametrize("eps,key", [(1e-3, "1e-03"), (1e-4, "1e-04"), (1e-5, "1e-05")])
def test_ball_keys(eps: float, key: str) -> None:
    assert ball_key(eps) == key
