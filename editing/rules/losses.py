"""Scores and losses of SPEC sections 4 and 5, from per-suffix NLLs.

``nll`` tensors have one column per suffix: shape (examples, 1) for single-suffix tasks and (examples, 2)
for pair tasks (suffix1, suffix2).
"""

from __future__ import annotations

import torch

from editing.core.errors import ConfigError
from editing.core.types import LossType


def example_score(nll_sum: torch.Tensor, loss: LossType | str) -> torch.Tensor:
    """Evaluation score per example from the SUM of suffix-token NLLs (SPEC section 5).

    Args:
        nll_sum: (n, 1) or (n, 2) sums of suffix-token NLL.
        loss: the task's loss type (a ``LossType`` or its name; an unknown name raises ``ConfigError``).

    Returns:
        (n,) scores; an example fails when its score is above the task threshold.
    """
    return _combine(nll_sum, loss)


def training_loss(nll_mean: torch.Tensor, loss: LossType | str) -> torch.Tensor:
    """Training loss per example from the MEAN suffix-token NLL (SPEC section 4).

    Args:
        nll_mean: (n, 1) or (n, 2) means of suffix-token NLL.
        loss: the task's loss type (a ``LossType`` or its name; an unknown name raises ``ConfigError``).

    Returns:
        (n,) losses (average them over the batch).
    """
    return _combine(nll_mean, loss)


def _combine(values: torch.Tensor, loss: LossType | str) -> torch.Tensor:
    loss = LossType(loss)
    if loss is LossType.GOOD:
        return values[:, 0]
    if loss is LossType.BAD:
        return -values[:, 0]
    if values.shape[1] != 2:
        raise ConfigError(f"loss {loss.value!r} needs two suffixes per example, got {values.shape[1]}")
    if loss is LossType.BALANCE:
        return (values[:, 0] - values[:, 1]).abs()
    if loss is LossType.GOOD_V_BAD:  # suffix1 is the preferred one
        return values[:, 0] - values[:, 1]
    raise ConfigError(f"loss type {loss.value!r} has no scoring rule")  # a new LossType member must get one here
