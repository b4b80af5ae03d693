"""torchmetrics metrics of SPEC section 5. States are sums (float64 where precision matters), so they reduce
exactly across DDP processes.

A NaN or infinite score is a failure (``score > threshold`` alone is false for NaN), and every metric counts the
non-finite values it saw (``nonfinite``) so that the evaluation can say so.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def failed(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which examples fail (SPEC section 5): score above the threshold, or a NaN or infinite score.

    Args:
        scores: per-example scores.
        threshold: the task's threshold.

    Returns:
        A boolean tensor shaped like ``scores``.
    """
    return ~torch.isfinite(scores) | (scores > threshold)


def nonfinite(values: torch.Tensor) -> torch.Tensor:
    """How many of ``values`` are NaN or infinite (a 0-d long tensor)."""
    return (~torch.isfinite(values)).sum()


class SuccessRate(Metric):
    """Fraction of evaluation examples whose score is finite and at most the threshold."""

    full_state_update = False

    def __init__(self, threshold: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.add_state("failed", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("nonfinite", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor) -> None:
        self.failed += failed(scores, self.threshold).sum()
        self.total += scores.numel()
        self.nonfinite += nonfinite(scores)

    def compute(self) -> torch.Tensor:
        return 1.0 - self.failed.double() / self.total.clamp(min=1)


class TokenMeanNLL(Metric):
    """Token-mean NLL over all scored tokens (the general and targeted degradation measures)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("nonfinite", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sums: torch.Tensor, token_counts: torch.Tensor) -> None:
        # a non-finite sequence makes the mean non-finite too: a broken measurement is never a small one
        self.nll += nll_sums.double().sum()
        self.tokens += token_counts.sum()
        self.nonfinite += nonfinite(nll_sums)

    def compute(self) -> torch.Tensor:
        return self.nll / self.tokens.clamp(min=1)


class ExampleMeanNLL(Metric):
    """Mean over examples of a per-example value (hard negatives: the suffix NLL sum, or a text's mean NLL)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("nonfinite", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        self.total += values.double().sum()
        self.count += values.numel()
        self.nonfinite += nonfinite(values)

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


class ExampleScores(Metric):
    """Collects (file index, score) of every evaluation example, gathered across processes."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("score", default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor, score: torch.Tensor) -> None:
        self.index.append(index.long())
        self.score.append(score.double())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, score) sorted by index. torchmetrics squeezes one-element results to 0-d tensors: callers
        reshape(-1)."""
        if isinstance(self.index, list) and not self.index:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        index = torch.cat(self.index) if isinstance(self.index, list) else self.index
        score = torch.cat(self.score) if isinstance(self.score, list) else self.score
        order = torch.argsort(index)
        return index[order], score[order]
